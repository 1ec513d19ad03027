"""Embedding files: the three formats tinv writes, and every common one it reads.

Written into each checkpoint folder (all loadable with ``torch.load(..., weights_only=True)``;
tensors are fp32 on CPU, shape ``[n_vectors, width]``):

``learned_embeds.safetensors``
    ``{token: Tensor[n, d]}``, one key per concept token. With one concept the checkpoint
    folder loads in one call: ``pipe.load_textual_inversion(folder)``. With several, diffusers
    refuses a file of several tokens ("Loaded state dictionary is incorrect"); load them all
    with this one line::

        sd = load_file(f"{folder}/learned_embeds.safetensors"); pipe.load_textual_inversion(list(sd.values()), token=list(sd))

    (``from safetensors.torch import load_file``) -- or load the per-token files below.
``<token>.safetensors``
    ``{token: Tensor[n, d]}`` for one token, written for every concept: diffusers loads it on its
    own; ComfyUI (``embedding:<token>``) and AUTOMATIC1111 take its only tensor, with the file
    name as the trigger word.
``<token>.pt``
    AUTOMATIC1111's layout: ``{"string_to_token": {"*": id("*")}, "string_to_param": {"*": Tensor[n, d]},
    "name": token, "step": step, "sd_checkpoint": None, "sd_checkpoint_name": model source}``;
    the web UI's prompt trigger is the file name, which is the token.
``learned_embeddings_dict.pt``
    The Determined example's layout: ``{token: {"initializer_strs": phrase, "learned_embeddings":
    Tensor[n, d]}}`` -- each concept with its *own* rows (the example saved the whole new matrix
    under every concept; tinv does not). The example's pipeline (``detsd/pipeline.py``) adds one
    dummy token per tokenizer token of ``initializer_strs`` and asserts that this count equals the
    rows, so ``initializer_strs`` is a phrase of exactly ``n`` tokens: the initializer when it
    has ``n``, else its tokens repeated or cut to ``n`` (the phrase itself is in manifest.json).

Read by :func:`read_embeddings` (a file, a checkpoint folder, or a URI of either): all of the
above, diffusers ``.bin``, the Determined demo file (also with ``initializer_tokens``), a bare
tensor (token = file stem), ``{"emb_params": T}``, and SDXL ``{"clip_l": T, "clip_g": T}``
(token = file stem; returned as a dict of the two), and a folder holding diffusers' SDXL pair
``learned_embeds.safetensors`` + ``learned_embeds_2.safetensors`` (what tinv's SDXL checkpoints
hold, :mod:`.sdxl`).
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import torch

from tinv.api.storage import DETERMINED_FILE as DETERMINED
from tinv.api.storage import EMBEDS_FILE as SAFETENSORS
from tinv.api.storage import OPTIMIZER_FILE

from .errors import FormatError


def safe_filename(token: str) -> str:
    """A token as a file name: only '/', '\\' and NUL are replaced (A1111 triggers on the name)."""
    return re.sub(r"[/\\\x00]", "_", token)


def write_all(
    folder: Path,
    embeddings: dict[str, torch.Tensor],
    initializers: dict[str, str],
    step: int,
    model_source: str | None = None,
    star_id: int = 265,
) -> list[str]:
    """Write the formats above into folder; returns the file names written."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    emb = {t: e.detach().to("cpu", torch.float32).contiguous().clone() for t, e in embeddings.items()}
    names = []
    save_file(emb, str(folder / SAFETENSORS), metadata={"format": "pt", "tinv": "learned_embeds", "step": str(step)})
    names.append(SAFETENSORS)
    for token, e in emb.items():
        name = f"{safe_filename(token)}.safetensors"
        save_file({token: e}, str(folder / name), metadata={"format": "pt", "step": str(step)})
        names.append(name)
        a1111 = {
            "string_to_token": {"*": int(star_id)},
            "string_to_param": {"*": e},
            "name": token,
            "step": int(step),
            "sd_checkpoint": None,
            "sd_checkpoint_name": model_source,
        }
        name = f"{safe_filename(token)}.pt"
        torch.save(a1111, folder / name)
        names.append(name)
    det = {t: {"initializer_strs": initializers.get(t, ""), "learned_embeddings": e} for t, e in emb.items()}
    torch.save(det, folder / DETERMINED)
    names.append(DETERMINED)
    return names


def _as_matrix(t, where: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise FormatError(f"{where}: expected a tensor, found {type(t).__name__}")
    t = t.detach().to("cpu", torch.float32)
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() != 2:
        raise FormatError(f"{where}: expected shape [vectors, width], found {tuple(t.shape)}")
    return t


def parse(obj, stem: str, where: str) -> dict:
    """Interpret a loaded object as {token: Tensor[n, d]} (or {token: {"clip_l":..,"clip_g":..}})."""
    if isinstance(obj, torch.Tensor):
        return {stem: _as_matrix(obj, where)}
    if not isinstance(obj, dict) or not obj:
        raise FormatError(f"{where}: not an embedding file (found {type(obj).__name__})")
    if "string_to_param" in obj:  # AUTOMATIC1111
        params = obj["string_to_param"]
        if not isinstance(params, dict) or not params:
            raise FormatError(f"{where}: AUTOMATIC1111 file without vectors")
        tensor = params.get("*", next(iter(params.values())))
        if isinstance(tensor, dict) and {"clip_l", "clip_g"} <= set(tensor):
            return {stem: {k: _as_matrix(tensor[k], where) for k in ("clip_l", "clip_g")}}
        return {stem: _as_matrix(tensor, where)}
    if {"clip_l", "clip_g"} <= set(obj):  # SDXL
        return {stem: {k: _as_matrix(obj[k], where) for k in ("clip_l", "clip_g")}}
    if "emb_params" in obj:
        return {stem: _as_matrix(obj["emb_params"], where)}
    if all(isinstance(v, dict) and "learned_embeddings" in v for v in obj.values()):  # Determined
        return {str(k): _as_matrix(v["learned_embeddings"], f"{where}[{k}]") for k, v in obj.items()}
    if all(isinstance(v, torch.Tensor) for v in obj.values()):  # diffusers / tinv safetensors
        return {str(k): _as_matrix(v, f"{where}[{k}]") for k, v in obj.items()}
    raise FormatError(
        f"{where}: unknown embedding layout (keys {sorted(map(str, obj))[:8]}); expected diffusers, "
        "AUTOMATIC1111, Determined or SDXL clip_l/clip_g"
    )


def read_file(path: Path) -> dict:
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise FormatError(f"{where}: no such file")
    stem = path.stem
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj = load_file(str(path))
        except Exception as e:
            raise FormatError(f"{where}: not a readable safetensors file ({e})") from e
        return parse(obj, stem, where)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise FormatError(
            f"{where}: cannot be read with torch.load(weights_only=True) ({type(e).__name__}: {e}); "
            "tinv does not unpickle arbitrary objects"
        ) from e
    return parse(obj, stem, where)


def read_folder(folder: Path) -> dict:
    """A checkpoint folder: learned_embeds.safetensors, else the Determined dict, else *.pt/*.bin."""
    folder = Path(folder)
    from . import sdxl

    pair = sdxl.read_pair(folder)  # an SDXL checkpoint: learned_embeds.safetensors + learned_embeds_2.safetensors
    if pair is not None:
        return pair
    for name in (SAFETENSORS, "learned_embeds.bin", DETERMINED):
        if (folder / name).is_file():
            return read_file(folder / name)
    out: dict = {}
    for p in sorted(folder.glob("*")):
        if p.suffix in (".pt", ".bin", ".safetensors") and p.name != OPTIMIZER_FILE:
            out.update(read_file(p))
    if not out:
        raise FormatError(f"{folder}: no embedding files found")
    return out


def read_embeddings(location: str | Path, store=None) -> dict:
    """{token: Tensor[n, d]} from a file, a folder, or a URI (s3:// is downloaded to a temp dir)."""
    from . import storage

    loc = str(location)
    p = storage.local_path(loc)
    if p is not None:
        if p.is_dir():
            return read_folder(p)
        return read_file(p)
    store = store or storage.Store()
    with tempfile.TemporaryDirectory(prefix="tinv-emb-") as tmp:
        name = loc.rstrip("/").rsplit("/", 1)[-1]
        if Path(name).suffix in (".pt", ".bin", ".safetensors"):
            target = Path(tmp) / name
            target.write_bytes(store.read_bytes(loc))
            return read_file(target)
        store.download_prefix(loc, tmp)
        return read_folder(Path(tmp))
