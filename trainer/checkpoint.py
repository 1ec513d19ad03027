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
       "embeddings": {"text_encoder": Tensor[rows, width]},   # exact fp32 parameter; SDXL adds
                                          #   "text_encoder_2" (its column block, 1280 wide)
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
       "family": "sd" | "sdxl", "embedding_widths": {"clip_l": 768, "clip_g": 1280} (SDXL),
       "trainer": {"version"}, "determined": {"initializer_strs": {token: str}}}

Where a run starts (:func:`find_start`): this run's own newest complete checkpoint (a retried pod
continues), else ``spec.resumeFrom`` (:func:`resolve`: a URI as is; a uuid in this run or in
``job``'s runs; ``job`` alone -> its newest checkpoint, found by tinv.api.storage's ONE resolver,
the one generation and the operator use). :func:`restore` turns the source into starting vectors
(and, to continue, the step and optimizer state), logging what each concept took from where.

Retention: after each new checkpoint the newest ``checkpointsKept`` complete ones stay; older
complete ones and incomplete leftovers (from a crash) are deleted. The newest complete one is
never deleted.
"""

from __future__ import annotations

import json
import logging
import tempfile
import uuid as _uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from tinv.api import storage as api_storage

from . import formats, storage
from .errors import ConfigError, FormatError
from .runtime import now, version

log = logging.getLogger("tinv.trainer")

STATE = api_storage.OPTIMIZER_FILE
MANIFEST = api_storage.MANIFEST_FILE
STATE_FORMAT = "tinv.trainer-state/v1"
MANIFEST_FORMAT = "tinv.checkpoint/v1"


@dataclass
class CheckpointRef:
    uuid: str
    step: int
    uri: str
    created_at: str | None = None
    loss: float | None = None

    @classmethod
    def from_manifest(cls, m: dict) -> "CheckpointRef":
        return cls(api_storage.checkpoint_uuid(m), int(m.get("step", 0)), m["uri"], m.get("created_at"), m.get("loss"))

    def to_json(self) -> dict:
        return {"uuid": self.uuid, "step": self.step, "uri": self.uri, "created_at": self.created_at, "loss": self.loss}


# ---------------------------------------------------------------------------- what a checkpoint holds


ENCODERS = ("text_encoder", "text_encoder_2")  # optimizer.pt's embedding keys, in column order


def training_state(*, step: int, global_batch: int, seed: int, vocab, weights: torch.Tensor, optimizer, scaler, loss_history: list[float],
                   widths: list[int] | None = None) -> dict:
    """optimizer.pt: everything an exact continuation needs (see the module doc). `widths`: each
    text encoder's block of the columns of `weights` (SDXL: two)."""
    widths = list(widths or [int(weights.shape[1])])
    return {
        "format": STATE_FORMAT,
        "step": step,
        "samples_seen": step * global_batch,
        "seed": seed,
        "global_batch": global_batch,
        "tokens": [c.token for c in vocab.concepts],
        "vectors": [c.vectors for c in vocab.concepts],
        "embeddings": {name: block.clone() for name, block in zip(ENCODERS, weights.split(widths, dim=1))},
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler else None,
        "loss_history": loss_history[-1000:],
    }


def manifest(*, job, model_source: str, loss: float | None, vocab, total_steps: int, global_batch: int, learning_rate: float,
             world_size: int, width: int, resumed_from: str | None, family: str = "sd", widths: list[int] | None = None) -> dict:
    """manifest.json's keys beyond uuid/step/created_at/uri/files (which :func:`write` adds)."""
    spec, md = job.spec, job.metadata
    return {
        "loss": loss,
        "job": {"name": md.name, "namespace": md.namespace, "uid": md.uid},
        "tokens": {c.token: c.vectors for c in vocab.concepts},
        "hyperparameters": spec.training.model_dump(mode="json", by_alias=True),
        "total_steps": total_steps,
        "model": {"source": model_source, "revision": spec.model.revision, "variant": spec.model.variant,
                  **({"vae": spec.model.vae} if spec.model.vae else {})},
        "concepts": [
            {"token": c.token, "vectors": c.vectors, "initializer": c.initializer, "property": sc.property}
            for c, sc in zip(vocab.concepts, spec.concepts)
        ],
        "effective_batch_size": global_batch,
        "learning_rate": learning_rate,
        "world_size": world_size,
        "embedding_width": width,
        "resumed_from": resumed_from,
        "family": family,  # the model family the embeddings belong to: "sd" (1.x/2.x) or "sdxl"
        **({"embedding_widths": dict(zip(("clip_l", "clip_g"), widths))} if family == "sdxl" and widths else {}),
        "trainer": {"version": version()},
        # learned_embeddings_dict.pt carries, per token, an initializer_strs of exactly as many
        # tokens as it has vectors: the Determined pipeline recounts the vectors from it.
        "determined": {"initializer_strs": {c.token: vocab.initializer_text(c) for c in vocab.concepts}},
    }


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
    uri = api_storage.checkpoint_uri(run, cid)
    with tempfile.TemporaryDirectory(prefix="tinv-ckpt-") as tmp:
        folder = Path(tmp)
        source = manifest.get("model", {}).get("source")
        if manifest.get("family") == "sdxl":  # clip_l/clip_g files and diffusers' pair (tinv.trainer.sdxl)
            from . import sdxl

            names = sdxl.write_files(folder, embeddings, step, list(manifest["embedding_widths"].values()), source)
        else:
            names = formats.write_all(folder, embeddings, initializers, step, source, star_id)
        torch.save(state, folder / STATE)
        names.append(STATE)
        files, sizes = {}, {}
        for name in names:
            files[name] = storage.sha256_file(folder / name)
            sizes[name] = (folder / name).stat().st_size
            store.upload_file(storage.join(uri, name), folder / name)
    created = now()
    doc = {"format": MANIFEST_FORMAT, "uuid": cid, "step": step, "created_at": created, "uri": uri, **manifest, "files": files, "file_sizes": sizes}
    store.write_bytes(storage.join(uri, MANIFEST), json.dumps(doc, indent=2).encode())
    return CheckpointRef(uuid=cid, step=step, uri=uri, created_at=created, loss=manifest.get("loss"))


def list_checkpoints(store: storage.Store, run: str) -> tuple[list[CheckpointRef], list[str]]:
    """(complete checkpoints oldest first, uris of incomplete folders) of one run root."""
    base = storage.join(run, storage.CHECKPOINTS_DIR)
    complete = [CheckpointRef.from_manifest(m) for m in api_storage.list_checkpoints(store, run)]
    done = {r.uuid for r in complete}
    incomplete = [storage.join(base, cid) for cid in store.children(base) if cid not in done]
    return complete, incomplete


def prune(store: storage.Store, run: str, keep: int) -> list[CheckpointRef]:
    """Keep the newest `keep` complete checkpoints (at least one); returns the kept ones."""
    complete, incomplete = list_checkpoints(store, run)
    keep = max(1, keep)
    for ref in complete[:-keep]:
        log.info("deleting old checkpoint %s (step %d)", ref.uuid, ref.step)
        store.delete_prefix(ref.uri)
    if complete:  # only leftovers older than the newest complete checkpoint: nothing else writes here
        for uri in incomplete:
            log.info("deleting incomplete checkpoint folder %s", uri)
            store.delete_prefix(uri)
    return complete[-keep:]


# ---------------------------------------------------------------------------- reading back


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
    return Loaded(uri, formats.read_embeddings(uri, store), state, manifest)


def resolve(store: storage.Store, run: str, storage_root: str | None, namespace: str, resume_from) -> str | None:
    """The URI a spec.resumeFrom points at (a checkpoint folder or an embedding file).

    - checkpoint with '://' or a path separator: used as is (a folder or a file)
    - checkpoint uuid: looked up in this job's run folder, or in `job`'s run folders
    - job only: that job's newest complete checkpoint (tinv.api.storage's resolver: run folders
      named exactly ``<job>-<uid8>`` / ``<job>-local``, newest by step, then time)
    """
    if resume_from is None:
        return None
    ck, job = resume_from.checkpoint, resume_from.job
    if ck and ("://" in ck or "/" in ck or ck.endswith((".pt", ".bin", ".safetensors"))):
        return ck
    if ck:
        if job:
            m = api_storage.find_checkpoint(store, storage_root, namespace, ck, job=job)
        else:
            own = [r for r in list_checkpoints(store, run)[0] if r.uuid == ck]
            m = {"uri": own[0].uri} if own else None
        if m is not None:
            return m["uri"]
        where = f"job {job!r}" if job else "this job's run folder"
        hint = ""
        elsewhere = api_storage.find_checkpoint(store, storage_root, namespace, ck)
        if elsewhere is not None:
            owner = api_storage.job_of_checkpoint(elsewhere["uri"])
            hint = f". It belongs to job {owner!r} ({elsewhere['uri']}): set resumeFrom.job: {owner}, or give that URI as resumeFrom.checkpoint"
        elif not job:
            hint = ". A checkpoint of another job needs resumeFrom.job (that job's name) beside the uuid, or the checkpoint folder's URI"
        raise ConfigError(f"resumeFrom.checkpoint {ck!r}: no complete checkpoint with that uuid in {where}{hint}")
    m = api_storage.newest_checkpoint(store, storage_root, namespace, job)
    if m is None:
        roots = api_storage.run_roots(store, storage_root, namespace, job)
        where = api_storage.namespace_root(storage_root, namespace)
        raise ConfigError(
            f"resumeFrom.job {job!r}: no complete checkpoint found for that job under {where} "
            f"({'its run folders hold none yet' if roots else f'no run folder {job}-<uid8> or {job}-local'})"
        )
    return m["uri"]


@dataclass
class Start:
    """Where a run starts: its own newest checkpoint (a retried pod), a resumeFrom source, or nothing."""

    source_uri: str | None = None
    mode: str = "continue"  # continue | fork
    own: CheckpointRef | None = None  # this run's newest complete checkpoint, if any
    loaded: Loaded | None = None

    def saved(self) -> str:
        """What a retry would continue from, for the line printed when the run stops early."""
        if self.own is not None:
            return f"nothing new saved; checkpoint {self.own.uuid} (step {self.own.step}) is kept and a retry continues from it"
        return "nothing saved (no step had run); a retry starts over"


def find_start(store: storage.Store, run: str, *, storage_root: str | None, namespace: str, resume_from, auto_resume: bool) -> Start:
    """This run's own newest checkpoint first (so a retried pod continues), else spec.resumeFrom."""
    own = list_checkpoints(store, run)[0]
    start = Start(own=own[-1] if own else None)
    if auto_resume and own:
        start.source_uri = own[-1].uri
        log.info("continuing this run from its newest checkpoint %s (step %d)", own[-1].uuid, own[-1].step)
    elif resume_from is not None:
        start.source_uri = resolve(store, run, storage_root, namespace, resume_from)
        start.mode = resume_from.mode
        log.info("%s from %s", "continuing" if start.mode == "continue" else "forking", start.source_uri)
    if start.source_uri:
        start.loaded = load(store, start.source_uri)
    return start


@dataclass
class Restored:
    vectors: torch.Tensor  # [rows, width] fp32: the new rows to train from
    step: int  # the step to continue at
    state: dict | None  # optimizer.pt of a continued run (optimizer, scaler, loss history)


def _check_family(loaded: Loaded, family: str) -> None:
    """Refuse a start source made for the other model family (SD 1.x/2.x vs SDXL), with what to do."""
    had = None
    if loaded.manifest is not None:
        had = loaded.manifest.get("family", "sd")
    elif loaded.state is not None:
        had = "sdxl" if ENCODERS[1] in loaded.state.get("embeddings", {}) else "sd"
    elif loaded.embeddings:
        had = "sdxl" if all(isinstance(e, dict) for e in loaded.embeddings.values()) else "sd"
    if had is None or had == family:
        return
    names = {"sd": "SD 1.x/2.x", "sdxl": "SDXL"}
    raise ConfigError(
        f"{loaded.uri} holds {names.get(had, had)} embeddings, but this job's model is {names.get(family, family)}: "
        f"{'SDXL needs vectors for both of its text encoders (clip_l + clip_g)' if family == 'sdxl' else 'SD 1.x/2.x has one text encoder'}. "
        "Resume or fork from a checkpoint of the same model family, or train the concept anew (drop resumeFrom)"
    )


def restore(start: Start, vocab, init: torch.Tensor, *, family: str = "sd", widths: list[int] | None = None) -> Restored:
    """The starting vectors and step: `init` (the initializers' vectors) unless the start source
    provides them. Says, for each concept, what was taken from where. `family`, `widths`: the
    model's ("sdxl" with its two encoders' widths: vectors are their blocks side by side)."""
    loaded = start.loaded
    if loaded is None:
        return Restored(init, 0, None)
    _check_family(loaded, family)
    uri = loaded.uri
    state = loaded.state if start.mode == "continue" else None
    tokens_now = [c.token for c in vocab.concepts]
    vectors_now = [c.vectors for c in vocab.concepts]
    if state is not None:
        if list(state["tokens"]) != tokens_now or list(state["vectors"]) != vectors_now:
            raise ConfigError(
                f"cannot continue {uri}: it has concepts {state['tokens']} with vectors {state['vectors']}, "
                f"this job {tokens_now} with {vectors_now} (use resumeFrom.mode: fork to start new concepts from its embeddings)"
            )
        vectors = torch.cat([state["embeddings"][n].float() for n in ENCODERS[: len(widths or [0])]], dim=1)
        if vectors.shape[1] != init.shape[1]:
            raise ConfigError(f"cannot continue {uri}: its vectors are {vectors.shape[1]} wide, this model's {init.shape[1]}")
        return Restored(vectors.clone(), int(state["step"]), state)
    out = init.clone()
    found = 0
    for c in vocab.concepts:
        off, n = vocab.offsets[c.token], c.vectors
        e, source_token = loaded.embeddings.get(c.token), c.token
        if e is None and len(loaded.embeddings) == 1 and len(vocab.concepts) == 1:
            source_token, e = next(iter(loaded.embeddings.items()))  # a single-concept file under another name
        if e is None:
            log.warning(
                "%r starts from its initializer %r: %s has no embedding for it (it has %s)",
                c.token, c.initializer, uri, ", ".join(map(repr, sorted(loaded.embeddings))),
            )
            continue
        if isinstance(e, dict):
            if family != "sdxl":
                raise ConfigError(f"{uri} holds SDXL embeddings (clip_l/clip_g); this model is SD 1.x/2.x")
            from . import sdxl

            e = sdxl.join(e)
        elif family == "sdxl":
            raise ConfigError(f"{uri} holds an SD 1.x/2.x embedding for {source_token!r}; this model is SDXL (clip_l + clip_g)")
        if e.shape != (n, out.shape[1]):
            raise ConfigError(
                f"embedding for {source_token!r} in {uri} has shape {tuple(e.shape)}, this job needs ({n}, {out.shape[1]}) for {c.token!r}: "
                "set the concept's vectors to match, or use a model of the same width"
            )
        out[off : off + n] = e
        found += 1
        if source_token != c.token:
            log.warning("%r starts from the vectors of %r, the only concept of %s (another token's vectors, renamed)", c.token, source_token, uri)
        else:
            log.info("%r starts from its vectors in %s", c.token, uri)
    if found == 0:
        raise ConfigError(f"{uri} has no embedding for any concept of this job (it has {sorted(loaded.embeddings)})")
    if start.mode == "continue":
        log.warning("%s is not a tinv checkpoint with optimizer state: starting at step 0 from its embeddings", uri)
    return Restored(out, 0, None)
