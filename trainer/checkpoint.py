"""Checkpoints: writing, listing, pruning and reading them back (resume and fork).

A checkpoint is the folder ``<run>/checkpoints/<uuid>/``:

- the embedding files of :mod:`.formats` (``learned_embeds.safetensors``, ``<token>.pt``,
  ``learned_embeddings_dict.pt``, ...)
- ``optimizer.pt`` -- the resume state, a plain dict (``torch.load(weights_only=True)`` works)::

      {"format": "tinv.trainer-state/v1",
       "step": int,                       # optimisation steps done
       "samples_seen": int,               # global sample index of the next sample (data order)
       "seed": int,                       # training.seed; the data order and every noise draw
                                          #   are pure functions of (seed, sample index)
       "global_batch": int,               # batch x accumulation x world size
       "tokens": [str], "vectors": [int], # concept layout of the rows below
       "embeddings": {"text_encoder": Tensor[rows, width]},   # exact fp32 parameter
       "optimizer": torch optimizer state_dict,
       "scaler": GradScaler state_dict | None,
       "loss_history": [float]}           # recent step losses (smoothed loss continues)

- ``manifest.json``, written LAST: a checkpoint without it is incomplete and never referenced.
  The keys of the contract (tinv.api.storage) plus tinv.trainer's extras::

      {"uuid", "step", "loss", "created_at", "job": {"namespace","name","uid"},
       "tokens": {token: n_vectors}, "files": {name: sha256}, "hyperparameters": {...},
       # extras:
       "format": "tinv.checkpoint/v1", "uri", "total_steps", "model": {"source","revision","variant"},
       "concepts": [{"token","vectors","initializer","property"}], "effective_batch_size",
       "learning_rate", "world_size", "embedding_width", "resumed_from", "file_sizes": {name: bytes},
       "trainer": {"version"}}

Retention: after each new checkpoint the newest ``checkpointsKept`` complete ones stay; older
complete ones and incomplete leftovers (from a crash) are deleted. The newest complete one is
never deleted.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import tempfile
import uuid as _uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from . import formats, storage
from .errors import ConfigError, FormatError

log = logging.getLogger("tinv.trainer")

STATE = "optimizer.pt"
MANIFEST = "manifest.json"
STATE_FORMAT = "tinv.trainer-state/v1"
MANIFEST_FORMAT = "tinv.checkpoint/v1"


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class CheckpointRef:
    uuid: str
    step: int
    uri: str
    created_at: str | None = None
    loss: float | None = None

    def to_json(self) -> dict:
        return {"uuid": self.uuid, "step": self.step, "uri": self.uri, "created_at": self.created_at, "loss": self.loss}


def write(
    store: storage.Store,
    run: str,
    *,
    step: int,
    embeddings: dict[str, torch.Tensor],
    initializers: dict[str, str],
    state: dict,
    manifest: dict,
    star_id: int = 265,
) -> CheckpointRef:
    """Write one checkpoint folder (embedding files, optimizer.pt, then manifest.json)."""
    cid = str(_uuid.uuid4())
    uri = storage.join(run, "checkpoints", cid)
    with tempfile.TemporaryDirectory(prefix="tinv-ckpt-") as tmp:
        folder = Path(tmp)
        names = formats.write_all(folder, embeddings, initializers, step, manifest.get("model", {}).get("source"), star_id)
        torch.save(state, folder / STATE)
        names.append(STATE)
        files, sizes = {}, {}
        for name in names:
            files[name] = storage.sha256_file(folder / name)
            sizes[name] = (folder / name).stat().st_size
            store.upload_file(storage.join(uri, name), folder / name)
    created = now()
    doc = {
        "format": MANIFEST_FORMAT,
        "uuid": cid,
        "step": step,
        "created_at": created,
        "uri": uri,
        **manifest,
        "files": files,
        "file_sizes": sizes,
    }
    store.write_bytes(storage.join(uri, MANIFEST), json.dumps(doc, indent=2).encode())
    return CheckpointRef(uuid=cid, step=step, uri=uri, created_at=created, loss=manifest.get("loss"))


def list_checkpoints(store: storage.Store, run: str) -> tuple[list[CheckpointRef], list[str]]:
    """(complete checkpoints oldest first, uris of incomplete folders)."""
    base = storage.join(run, storage.CHECKPOINTS_DIR)
    complete, incomplete = [], []
    for m in storage.list_checkpoints(store, run):
        complete.append(CheckpointRef(m["uuid"] if "uuid" in m else m["uri"].rsplit("/", 1)[-1], int(m.get("step", 0)), m["uri"], m.get("created_at"), m.get("loss")))
    done = {r.uuid for r in complete}
    for cid in store.children(base):
        if cid not in done:
            incomplete.append(storage.join(base, cid))
    return complete, incomplete


def prune(store: storage.Store, run: str, keep: int) -> list[CheckpointRef]:
    """Keep the newest `keep` complete checkpoints (at least one); returns the kept ones."""
    complete, incomplete = list_checkpoints(store, run)
    keep = max(1, keep)
    for ref in complete[:-keep]:
        log.info("deleting old checkpoint %s (step %d)", ref.uuid, ref.step)
        store.delete_prefix(ref.uri)
    newest = complete[-1] if complete else None
    for uri in incomplete:
        # Only leftovers older than the newest complete checkpoint: nothing else writes here.
        if newest is not None:
            log.info("deleting incomplete checkpoint folder %s", uri)
            store.delete_prefix(uri)
    return complete[-keep:]


@dataclass
class Loaded:
    """What a resume source provides."""

    uri: str
    embeddings: dict  # token -> Tensor[n, d]
    state: dict | None  # optimizer.pt dict, when the source is a tinv checkpoint
    manifest: dict | None


def load(store: storage.Store, uri: str) -> Loaded:
    """Read a checkpoint folder or an embedding file at uri."""
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    if Path(name).suffix in (".pt", ".bin", ".safetensors"):
        return Loaded(uri, formats.read_embeddings(uri, store), None, None)
    manifest = state = None
    try:
        manifest = json.loads(store.read_bytes(storage.join(uri, MANIFEST)))
    except storage.NotFound:
        manifest = None
    try:
        with tempfile.TemporaryDirectory(prefix="tinv-resume-") as tmp:
            p = Path(tmp) / STATE
            p.write_bytes(store.read_bytes(storage.join(uri, STATE)))
            state = torch.load(p, map_location="cpu", weights_only=True)
    except storage.NotFound:
        state = None
    except storage.StorageError:
        raise
    except Exception as e:
        raise FormatError(f"cannot read {storage.join(uri, STATE)}: {e}") from e
    if state is not None and state.get("format") != STATE_FORMAT:
        raise FormatError(f"{storage.join(uri, STATE)}: not a tinv trainer state (format {state.get('format')!r})")
    emb = formats.read_embeddings(uri, store)
    return Loaded(uri, emb, state, manifest)


def resolve(store: storage.Store, run: str, storage_root: str | None, namespace: str, resume_from) -> str | None:
    """The URI a spec.resumeFrom points at (a checkpoint folder or an embedding file).

    - checkpoint with '://' or a path separator: used as is (a folder or a file)
    - checkpoint uuid: looked up in this job's run folder, then in `job`'s folders
    - job only: that job's newest complete checkpoint (its run folder is found by name:
      ``<root>/<namespace>/<job>-*``; the newest checkpoint across matches wins)
    """
    if resume_from is None:
        return None
    ck = getattr(resume_from, "checkpoint", None)
    job = getattr(resume_from, "job", None)
    if ck and ("://" in ck or "/" in ck or ck.endswith((".pt", ".bin", ".safetensors"))):
        return ck
    candidates = [run] if not job else []
    if job:
        root = storage.join(storage_root or "tinv-runs", namespace)
        try:
            names = set(store.children(root))
        except storage.StorageError:
            names = set()
        candidates += [storage.join(root, n) for n in sorted(names) if n.startswith(f"{job}-")]
    best: CheckpointRef | None = None
    for r in candidates:
        complete, _ = list_checkpoints(store, r)
        for ref in complete:
            if ck and ref.uuid == ck:
                return ref.uri
            if not ck and (best is None or (ref.step, ref.created_at or "") > (best.step, best.created_at or "")):
                best = ref
    if ck:
        where = f"job {job!r}" if job else "this job"
        raise ConfigError(f"resumeFrom.checkpoint {ck!r}: no complete checkpoint with that uuid in {where}")
    if best is None:
        raise ConfigError(f"resumeFrom.job {job!r}: no complete checkpoint found for that job")
    return best.uri
