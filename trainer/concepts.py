"""Learned concepts for generation: find them, read them, check them against the model.

A concept reference names where embedding vectors live, in any of these forms:

- a TextualInversionJob's checkpoint: ``EmbeddingRef(job="det-logo", checkpoint="latest" | uuid)``,
  in Python also ``"job:det-logo"`` or ``"job:det-logo@<uuid>"``. In a cluster the operator has
  already resolved it (``status.resolvedEmbeddings`` of the GenerationGrid); locally the job's run
  folders ``<storage>/<namespace>/<job>-<uid8|local>/`` are searched and ``latest`` is the newest
  *complete* checkpoint (its ``manifest.json`` exists).
- a bare checkpoint uuid (Python only): searched in every run folder of the namespace.
- a URI or path of a checkpoint folder or of one file: diffusers ``learned_embeds.safetensors``
  (or ``.bin``), an AUTOMATIC1111 ``<token>.pt`` (the token is the file name), the Determined
  example's ``learned_embeddings_dict.pt`` -- also its demo layout, a folder holding only
  ``learned_embeddings_dict_demo.pt`` -- or any layout :mod:`tinv.trainer.formats` reads.

Reading uses :func:`tinv.trainer.formats.read_embeddings`; this module adds the resolution of job
references and uuids, per-concept provenance (URI, checkpoint uuid, job, a content hash) for the
PNG metadata, and the checks with messages a user can act on: width against the text encoder,
duplicate tokens, SDXL files on an SD 1.x/2.x model and SD 1.x/2.x files on SDXL. An SDXL concept
(``clip_l`` + ``clip_g``) is held as one ``[n, 768 + 1280]`` matrix, the layout the engine installs
(:mod:`tinv.trainer.sdxl`). Tokens that are already words of the
vocabulary are refused by :class:`tinv.trainer.tokens.ConceptVocab`.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from tinv.api import storage as api_storage

from . import formats
from .errors import ConfigError, FormatError

log = logging.getLogger("tinv.trainer")

UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors")


@dataclass(frozen=True)
class ConceptRef:
    """Where one concept's vectors come from (before resolution)."""

    job: str | None = None
    checkpoint: str = "latest"
    uri: str | None = None
    token: str | None = None  # rename a single-concept file's token

    def describe(self) -> str:
        if self.job:
            return f"job {self.job!r} checkpoint {self.checkpoint}"
        return self.uri or "?"


@dataclass
class Concept:
    """One loaded concept: its token, its vectors and where they came from."""

    token: str
    vectors: torch.Tensor  # [n, width] fp32 on CPU
    uri: str  # the checkpoint folder or file read (absolute for local paths)
    checkpoint: str | None = None  # checkpoint uuid, when the source is a tinv checkpoint
    job: str | None = None
    family: str = "sd"  # "sdxl" for clip_l/clip_g files: vectors are then [n, w_l + w_g]

    @property
    def width(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def sha256(self) -> str:
        """Hash of the exact fp32 vectors: identifies the content whatever file it came from."""
        v = self.vectors.detach().to("cpu", torch.float32).contiguous()
        return hashlib.sha256(v.numpy().tobytes() + str(tuple(v.shape)).encode()).hexdigest()

    def to_json(self) -> dict[str, Any]:
        return {
            "token": self.token,
            "vectors": int(self.vectors.shape[0]),
            "uri": self.uri,
            "checkpoint": self.checkpoint,
            "job": self.job,
            "sha256": self.sha256,
        }


# ---------------------------------------------------------------------------- references


def as_ref(ref: Any) -> ConceptRef:
    """A ConceptRef from an EmbeddingRef, a ResolvedEmbedding-like dict, a dict, or a string.

    Strings: ``job:NAME``, ``job:NAME@UUID``, ``job:NAME@latest``, a checkpoint uuid, or a URI/path
    (an optional ``#token`` suffix renames a single-concept file, e.g. ``x.pt#<cat-toy>``).
    """
    if isinstance(ref, ConceptRef):
        return ref
    if isinstance(ref, (str, Path)):
        s = str(ref)
        token = None
        if "#" in s and not s.startswith("job:"):
            s, token = s.rsplit("#", 1)
            token = token or None
        if s.startswith("job:"):
            name, _, ck = s[4:].partition("@")
            if not name:
                raise ConfigError(f"concept reference {ref!r}: expected job:NAME or job:NAME@UUID")
            return ConceptRef(job=name, checkpoint=ck or "latest")
        if UUID_RE.match(s):
            return ConceptRef(checkpoint=s, token=token)
        return ConceptRef(uri=s, token=token)
    if isinstance(ref, dict):
        get = ref.get
    else:
        def get(k, default=None):
            return getattr(ref, k, default)
    job, uri = get("job"), get("uri")
    if job and uri:
        # A ResolvedEmbedding names both: the URI is the resolved location.
        return ConceptRef(job=job, checkpoint=get("checkpoint") or "latest", uri=uri, token=get("token"))
    if not job and not uri:
        raise ConfigError(f"concept reference {ref!r}: needs a job or a uri")
    return ConceptRef(job=job, checkpoint=get("checkpoint") or "latest", uri=uri, token=get("token"))


def resolve(ref: ConceptRef, *, store: api_storage.Store, storage_uri: str | None, namespace: str | None) -> tuple[str, str | None, str | None]:
    """(uri, checkpoint uuid or None, job or None) of a reference; raises ConfigError if absent.

    Job references use tinv.api.storage's resolver (the one training and the operator use): run
    folders named exactly ``<job>-<uid8>`` / ``<job>-local``; ``latest`` is the newest complete
    checkpoint by step, then time."""
    if ref.uri:
        return ref.uri, (ref.checkpoint if UUID_RE.match(ref.checkpoint or "") else None), ref.job
    where = api_storage.namespace_root(storage_uri, namespace)
    if ref.job:
        if ref.checkpoint == "latest":
            m = api_storage.newest_checkpoint(store, storage_uri, namespace, ref.job)
            if m is None:
                roots = api_storage.run_roots(store, storage_uri, namespace, ref.job)
                hint = (
                    f"no run folder {ref.job}-<uid8|local> exists there"
                    if not roots
                    else f"its run folders ({', '.join(r.rsplit('/', 1)[-1] for r in roots)}) hold no complete checkpoint yet"
                )
                raise ConfigError(
                    f"embedding from job {ref.job!r}: no complete checkpoint under {where} ({hint}). "
                    f"Train it first (tinv train JOB.yaml), or point spec.storage.uri at the job's storage"
                )
            return m["uri"], api_storage.checkpoint_uuid(m), ref.job
        m = api_storage.find_checkpoint(store, storage_uri, namespace, ref.checkpoint, job=ref.job)
        if m is not None:
            return m["uri"], ref.checkpoint, ref.job
        raise ConfigError(
            f"embedding from job {ref.job!r}: no complete checkpoint {ref.checkpoint} under {where}/{ref.job}-* "
            "(it may have been pruned by checkpointsKept, or still be incomplete: no manifest.json)"
        )
    # a bare uuid: any run folder of the namespace
    m = api_storage.find_checkpoint(store, storage_uri, namespace, ref.checkpoint)
    if m is not None:
        return m["uri"], ref.checkpoint, api_storage.job_of_checkpoint(m["uri"])
    raise ConfigError(f"checkpoint {ref.checkpoint}: no complete checkpoint with that uuid under {where}/*/checkpoints/")


def _absolute(uri: str) -> str:
    """Local paths made absolute (so the PNG metadata works from any folder); URIs unchanged."""
    if "://" in uri:
        return uri
    return str(Path(uri).expanduser().resolve())


def _provenance(store: api_storage.Store, uri: str) -> tuple[str | None, str | None]:
    """(checkpoint uuid, job name) from the manifest of the checkpoint folder holding uri, if any."""
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    folder = uri.rstrip("/").rsplit("/", 1)[0] if name.endswith(_EMBEDDING_SUFFIXES) else uri.rstrip("/")
    try:
        m = store.read_json(api_storage.join(folder, api_storage.MANIFEST_FILE))
    except Exception:  # noqa: BLE001 - no manifest: a plain file, not a tinv checkpoint
        return None, None
    job = m.get("job") or {}
    return m.get("uuid") or folder.rsplit("/", 1)[-1], job.get("name") if isinstance(job, dict) else None


def read(ref: ConceptRef, *, store: api_storage.Store, storage_uri: str | None = None, namespace: str | None = None) -> list[Concept]:
    """Resolve a reference and read its concepts (one per token in the file or folder)."""
    uri, ck, job = resolve(ref, store=store, storage_uri=storage_uri, namespace=namespace)
    try:
        found = formats.read_embeddings(uri, store)
    except FormatError:
        raise
    except api_storage.NotFound as e:
        raise ConfigError(f"embedding {uri}: not found ({e})") from e
    except FileNotFoundError as e:
        raise ConfigError(f"embedding {uri}: no such file or folder") from e
    if not found:
        raise ConfigError(f"embedding {uri}: holds no concepts")
    p_ck, p_job = _provenance(store, uri)
    ck, job = ck or p_ck, job or p_job
    if ref.token:
        if len(found) == 1:
            found = {ref.token: next(iter(found.values()))}
        elif ref.token in found:
            found = {ref.token: found[ref.token]}
        else:
            raise ConfigError(
                f"embedding {uri} holds {len(found)} concepts ({', '.join(found)}); token {ref.token!r} is none of them. "
                "Leave token unset to load them all, or name one of them"
            )
    out = []
    for token, vec in found.items():
        family = "sd"
        if isinstance(vec, dict):  # SDXL: clip_l + clip_g, joined in the encoders' order
            from . import sdxl

            vec, family = sdxl.join(vec), sdxl.FAMILY
        out.append(Concept(token=str(token), vectors=vec.detach().to("cpu", torch.float32).contiguous(), uri=_absolute(uri),
                           checkpoint=ck, job=job, family=family))
    return out


def load_all(
    refs: Iterable[Any], *, store: api_storage.Store, storage_uri: str | None = None, namespace: str | None = None
) -> list[Concept]:
    """Read every reference; tokens must be unique across all of them."""
    concepts: list[Concept] = []
    seen: dict[str, Concept] = {}
    for raw in refs:
        ref = as_ref(raw)
        for c in read(ref, store=store, storage_uri=storage_uri, namespace=namespace):
            prev = seen.get(c.token.lower())
            if prev is not None:
                raise ConfigError(
                    f"concept token {c.token!r} is loaded twice (from {prev.uri} and {c.uri}); give one of them "
                    "another token (spec.embeddings[].token, or '#newtoken' after the path in Python)"
                )
            seen[c.token.lower()] = c
            concepts.append(c)
    return concepts


def check_against(concepts: list[Concept], text_encoder, family: str = "sd", widths: list[int] | None = None) -> None:
    """Every concept must belong to the model's family, and its width match the text encoder's
    token embeddings (SDXL: each of both encoders')."""
    for c in concepts:
        if c.family != family:
            if c.family == "sdxl":
                raise ConfigError(
                    f"embedding {c.token!r} from {c.uri} is an SDXL embedding (clip_l + clip_g); this model is SD 1.x/2.x "
                    "(one text encoder). Use it with an SDXL model, or train the concept on this one"
                )
            raise ConfigError(
                f"embedding {c.token!r} from {c.uri} is an SD 1.x/2.x embedding ({c.width} wide, one text encoder); this model "
                f"is SDXL, which needs vectors for both encoders (clip_l {widths[0] if widths else 768} + clip_g "
                f"{widths[1] if widths else 1280}). Train the concept on this SDXL model, or use it with the model it was trained for"
            )
        if family == "sdxl" and widths is not None and c.width != sum(widths):
            raise ConfigError(
                f"embedding {c.token!r} from {c.uri} has clip_l + clip_g {c.width} wide in all; this SDXL model's encoders are "
                f"{widths[0]} + {widths[1]} = {sum(widths)}. Use the base model it was trained on"
            )
    if family == "sdxl":
        return
    width = int(text_encoder.get_input_embeddings().embedding_dim)
    for c in concepts:
        if c.width != width:
            fams = {768: "SD 1.x (CLIP ViT-L/14, 768)", 1024: "SD 2.x (OpenCLIP ViT-H, 1024)", 1280: "SDXL's second encoder (1280)"}
            made_for = fams.get(c.width, f"a model with {c.width}-wide token embeddings")
            raise ConfigError(
                f"embedding {c.token!r} from {c.uri} is {c.width} wide, but this model's text encoder is {width} wide: "
                f"it was trained for {made_for}. Use the base model it was trained on"
            )
