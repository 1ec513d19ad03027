"""The trained shapes model shipped in the package (``weights/``), and its manifest.

``weights/model/`` is an ordinary diffusers Stable Diffusion folder; ``weights/evaluator.safetensors``
is the world's classifier; ``weights/manifest.json`` records the command, seed, steps actually run,
library versions, timings and the SHA-256 of every file, which a test checks.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
from pathlib import Path

WEIGHTS = Path(__file__).parent / "weights"
MANIFEST = "manifest.json"


def digests(root: Path) -> dict[str, str]:
    """SHA-256 of every file under root except the manifest, by POSIX relative path."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            out[p.relative_to(root).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def versions() -> dict[str, str]:
    import diffusers
    import numpy
    import PIL
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "numpy": numpy.__version__, "pillow": PIL.__version__}


def model_dir(root: Path = WEIGHTS) -> Path:
    return root / "model"


def available(root: Path = WEIGHTS) -> bool:
    return (root / MANIFEST).exists() and (model_dir(root) / "model_index.json").exists()


def mismatches(root: Path = WEIGHTS) -> list[str]:
    """Files that differ from the manifest (missing, changed, or not listed); [] when all agree."""
    want = json.loads((root / MANIFEST).read_text())["files"]
    have = digests(root)
    bad = [f"{k}: missing" for k in want if k not in have]
    bad += [f"{k}: digest differs" for k in want if k in have and have[k] != want[k]]
    bad += [f"{k}: not in the manifest" for k in have if k not in want]
    return bad


def install(run: Path, dest: Path = WEIGHTS) -> Path:
    """Copy a training run's model and evaluator into dest and write the manifest there."""
    record = json.loads((run / MANIFEST).read_text())
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copytree(run / "model", tmp / "model")
    shutil.copy2(run / "evaluator.safetensors", tmp / "evaluator.safetensors")
    record["files"] = digests(tmp)
    (tmp / MANIFEST).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    # Beside every weights file, a manifest naming it: a reader of one component folder sees how
    # it was made without the top-level one (which lists every file of the install).
    for folder in sorted({f.parent for f in tmp.rglob("*.safetensors")} - {tmp}):
        here = {f.name: h for f, h in ((tmp / k, h) for k, h in record["files"].items()) if f.parent == folder}
        part = {k: record[k] for k in ("command", "reproduce", "seed", "versions") if k in record}
        part.update(files=here, whole=f"{'../' * len(folder.relative_to(tmp).parts)}{MANIFEST}")
        (folder / MANIFEST).write_text(json.dumps(part, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def model_folder(root: Path = WEIGHTS) -> Path:
    """The shipped diffusers folder of builtin:shapes; a clear error when the package lacks it."""
    from ..errors import ModelError

    if not available(root):
        raise ModelError(
            f"builtin:shapes: no trained weights in {root} (this checkout or wheel ships none). Train them with "
            "`python -m tinv.trainer.world train OUT` and install with `python -m tinv.trainer.world install OUT`"
        )
    return model_dir(root)


def unpack(root: Path, run: Path) -> dict[str, list[str]]:
    """Lay the shipped weights out as a finished training run in `run`, so that later stages (or a
    new one, such as the decoder stage added after these weights were made) continue from them:
    ``train run --stages decoder``. Each stage the manifest records gets its done.json; the files a
    later stage reads are copied from the model folder. Returns the stages restored and those whose
    own outputs the install does not hold (the first UNet cycle's EMA, a VAE replaced by the
    decoder stage): rerunning a stage that reads those raises a clear error."""
    record = json.loads((root / MANIFEST).read_text())
    stages = run / "stages"
    if stages.exists():
        raise FileExistsError(f"{run} already holds a run (stages/); unpack into an empty folder")
    model = model_dir(root)
    shutil.copytree(model, run / "model")
    shutil.copy2(root / "evaluator.safetensors", run / "evaluator.safetensors")
    vae_stage = "decoder" if (record["stages"].get("decoder") or {}).get("steps") else "vae"  # a 0-step decoder left the VAE as it was
    outputs = {
        "clip": [(model / "text_encoder", stages / "clip" / "text_encoder"), (model / "tokenizer", stages / "clip" / "tokenizer")],
        "evaluator": [(root / "evaluator.safetensors", stages / "evaluator" / "evaluator.safetensors")],
        vae_stage: [(model / "vae", stages / vae_stage / "vae")],
        "refine": [(model / "unet", stages / "refine" / "unet")],
    }
    restored, missing = [], []
    for name, rec in record["stages"].items():
        (stages / name).mkdir(parents=True, exist_ok=True)
        for src, dst in outputs.get(name, []):
            (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)
        (restored if name in outputs else missing).append(name)
        (stages / name / "done.json").write_text(json.dumps(rec, indent=2))
    if "refine" in record["stages"]:
        # refine has run: its fallback (OUT/model/unet as the first cycle) must not apply
        (stages / "refine" / "progress.json").write_text(json.dumps({"steps": record["stages"]["refine"]["steps"]}))
    # the next `train` in this folder lists both in its manifest's history: how the stages were made, then this
    earlier = {k: v for k, v in record.items() if k != "files"}
    earlier["history"] = record.get("history", []) + [record["command"]]
    earlier["command"] = f"python -m tinv.trainer.world unpack {run}"
    (run / MANIFEST).write_text(json.dumps(earlier, indent=2, sort_keys=True) + "\n")
    return {"restored": sorted(restored), "not_restored": sorted(missing)}
