"""``tinv generate``: render one shard of a GenerationGrid into its storage.

The pieces live beside it: the grid as a list of images (:mod:`.grid`, pure), the rendering engine
(:mod:`.engine`), PNG metadata (:mod:`.pngmeta`) and the gallery (:mod:`.gallery`). This module is
the runner:

- a shard's images (:func:`tinv.trainer.grid.shard`) are grouped by (size, steps, scheduler) and
  rendered ``batchSize`` at a time; PNG encoding and upload run on background threads while the
  next batch renders;
- output: ``<run root>/images/<name>.png`` with the metadata of :mod:`.pngmeta`; ``progress.json``
  at the run root (aggregated over the shards' files in ``shards/``); TensorBoard image summaries in
  ``tensorboard/generate-<i>-of-<n>/``; when every image exists, the gallery: ``images/index.json``,
  contact sheets, ``images/index.html``;
- re-running skips every image whose PNG exists, decodes and carries the same parameters key;
- SIGTERM/SIGINT: the images of the current batch are written, then :class:`tinv.trainer.runtime.Stopped`
  (exit 75 / 130) says how many are kept.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from tinv.api import storage as api_storage

from . import concepts as concepts_mod
from . import gallery, pngmeta
from .engine import Engine, Rendered, load_engine, render_adaptive
from .grid import GridImage, expand, grid_root, plan_batches, shard, shard_from_env
from .reporting import TensorBoard
from .runtime import StopFlag, Stopped, now

log = logging.getLogger("tinv.trainer")



@dataclass
class GridOptions:
    """Run options that are not part of the spec (CLI flags / env)."""

    shard: tuple[int, int] | None = None  # (i, n); default: JOB_COMPLETION_INDEX / workers, else 0/1
    device: str | None = None
    precision: str | None = None  # overrides spec.precision
    batch_size: int | None = None  # overrides spec.batchSize
    model: str | None = None  # overrides spec.model.source
    storage: str | None = None  # overrides spec.storage.uri
    compile: bool = False
    vae_batch: int | None = None
    tensorboard: bool = True
    gallery: bool = True
    force: bool = False  # re-render images that already exist
    writers: int = 4  # PNG encode/upload threads
    progress_bar: bool | None = None
    stop_after_batches: int | None = None  # behave as if SIGTERM arrived after this many batches (tests)
    progress_interval: float = float(os.environ.get("TINV_PROGRESS_MIN_INTERVAL", "2"))


@dataclass
class GridResult:
    root: str
    images_uri: str
    shard: tuple[int, int]
    images_total: int  # the whole grid
    shard_total: int  # this shard's images
    rendered: int
    skipped: int
    seconds: float
    images_per_second: float | None
    gallery_uri: str | None = None
    index_uri: str | None = None
    complete: bool = False  # every image of the grid exists
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "state": "succeeded",
            "images_total": self.images_total,
            "shard": f"{self.shard[0]}/{self.shard[1]}",
            "shard_images": self.shard_total,
            "rendered": self.rendered,
            "skipped": self.skipped,
            "images_per_second": self.images_per_second,
            "output_uri": self.images_uri,
            "gallery_uri": self.gallery_uri,
            "index_uri": self.index_uri,
            "complete": self.complete,
        }




def refs_of(grid) -> list:
    """spec.embeddings, with the operator's resolved URIs (status.resolvedEmbeddings) when present."""
    spec_refs = list(grid.spec.embeddings)
    resolved = list(getattr(grid.status, "resolved_embeddings", None) or []) if grid.status else []
    if not resolved:
        return spec_refs
    out = []
    if len(resolved) == len(spec_refs):
        pairs = list(zip(spec_refs, resolved))
    else:
        pairs = []
        pool = list(resolved)
        for e in spec_refs:
            match = next((r for r in pool if (e.job and r.job == e.job) or (e.uri and r.uri == e.uri)), None)
            if match is not None:
                pool.remove(match)
            pairs.append((e, match))
    for e, r in pairs:
        if r is None:
            out.append(e)
        else:
            out.append(concepts_mod.ConceptRef(job=r.job or e.job, checkpoint=r.checkpoint or e.checkpoint, uri=r.uri, token=e.token))
    return out


class _Progress:
    """This shard's progress file, and progress.json aggregated over every shard's file."""

    def __init__(self, store, root: str, shard: tuple[int, int], grid_total: int, shard_total: int, interval: float, bar: bool | None):
        self.store = store
        self.root = root
        self.i, self.n = shard
        self.grid_total = grid_total
        self.shard_total = shard_total
        self.interval = interval
        self.started = now()
        self.t0 = time.monotonic()
        self.last = 0.0
        self.done = 0
        self.rendered = 0
        self.render_t0: float | None = None
        self.bar = None
        use_bar = (os.isatty(2) if bar is None else bar)
        if use_bar:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=shard_total, desc=f"tinv generate {self.i}/{self.n}", unit="img", dynamic_ncols=True)
            except Exception:  # noqa: BLE001
                self.bar = None

    @property
    def shard_uri(self) -> str:
        return api_storage.join(self.root, api_storage.SHARDS_DIR, f"shard-{self.i:03d}-of-{self.n:03d}.json")

    def rate(self) -> float | None:
        if not self.rendered or self.render_t0 is None:
            return None
        dt = time.monotonic() - self.render_t0
        return self.rendered / dt if dt > 0 else None

    def add(self, done: int = 0, rendered: int = 0) -> None:
        """Count images written (`done`, from the writer threads) or rendered; callers hold the lock."""
        if rendered and self.render_t0 is None:
            self.render_t0 = time.monotonic()
        if done:
            self.done += done
        if rendered:
            self.rendered += rendered
        if self.bar is not None:
            self.bar.n = self.done
            r = self.rate()
            if r:
                self.bar.set_postfix({"img/s": f"{r:.2f}"}, refresh=False)
            self.bar.refresh()

    def start_rendering(self) -> None:
        self.render_t0 = time.monotonic()

    def shard_doc(self, state: str, message: str | None = None, stopped: str | None = None) -> dict:
        rate = self.rate()
        left = self.shard_total - self.done
        return {
            "format": "tinv.grid-shard/v1",
            "state": state,
            "stopped": stopped,
            "shard": {"index": self.i, "count": self.n},
            "images_done": self.done,
            "images_total": self.shard_total,
            "images_rendered": self.rendered,
            "images_per_second": rate,
            "eta_seconds": int(left / rate) if rate and state == "running" else (0 if state == "succeeded" else None),
            "started_at": self.started,
            "updated_at": now(),
            "message": message,
        }

    def write(self, state: str, message: str | None = None, force: bool = False, stopped: str | None = None) -> None:
        now = time.monotonic()
        if not force and now - self.last < self.interval:
            return
        self.last = now
        try:
            doc = self.shard_doc(state, message, stopped)
            self.store.write_bytes(self.shard_uri, json.dumps(doc, indent=2).encode(), content_type="application/json")
            self.store.write_bytes(api_storage.join(self.root, api_storage.PROGRESS_FILE),
                                   json.dumps(self.aggregate(doc), indent=2).encode(), content_type="application/json")
        except Exception as e:  # noqa: BLE001 - progress is best effort
            log.warning("cannot write progress: %s", e)

    def aggregate(self, mine: dict) -> dict:
        docs = {}
        suffix = f"-of-{self.n:03d}.json"
        try:
            for uri in self.store.list(api_storage.join(self.root, api_storage.SHARDS_DIR)):
                if uri.endswith(suffix):
                    try:
                        d = self.store.read_json(uri)
                        docs[int(d["shard"]["index"])] = d
                    except Exception:  # noqa: BLE001 - a shard writing its file right now
                        continue
        except Exception:  # noqa: BLE001
            pass
        docs[self.i] = mine
        done = sum(d.get("images_done", 0) for d in docs.values())
        states = [d.get("state") for d in docs.values()]
        if any(s == "failed" for s in states):
            state = "failed"
        elif len(docs) == self.n and all(s == "succeeded" for s in states):
            state = "succeeded"
        else:
            state = "running"
        live = [d for d in docs.values() if d.get("state") == "running"] or (list(docs.values()) if state == "succeeded" else [])
        rate = sum(d.get("images_per_second") or 0.0 for d in live) or None
        etas = [d.get("eta_seconds") for d in docs.values() if d.get("eta_seconds") is not None]
        pct = int(100 * done / self.grid_total) if self.grid_total else 100
        return {
            "format": "tinv.progress/v1",
            "kind": "GenerationGrid",
            "state": state,
            "phase": {"running": "Running", "succeeded": "Succeeded", "failed": "Failed"}[state],
            "images_done": done,
            "images_total": self.grid_total,
            "images_per_second": rate,
            "eta_seconds": max(etas) if etas and state == "running" else (0 if state == "succeeded" else None),
            "summary": f"{done}/{self.grid_total} ({pct}%)",
            "stopped": mine.get("stopped") if state == "running" else None,
            "message": mine.get("message"),
            "shards": {"count": self.n, "reported": len(docs),
                       "states": {str(k): v.get("state") for k, v in sorted(docs.items())}},
            "started_at": min((d.get("started_at") or self.started) for d in docs.values()),
            "updated_at": now(),
        }

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def existing_images(store: api_storage.Store, images_uri: str, wanted: dict[str, str], workers: int = 8) -> set[str]:
    """File names (of `wanted`: name -> params key) that exist, decode and carry that key."""
    present = {u.rsplit("/", 1)[-1] for u in store.list(images_uri) if u.endswith(".png")}
    todo = [n for n in wanted if n in present]

    def ok(name: str) -> bool:
        try:
            return pngmeta.png_complete(store.read_bytes(api_storage.join(images_uri, name)), wanted[name])
        except Exception:  # noqa: BLE001
            return False

    with cf.ThreadPoolExecutor(max_workers=max(1, workers)) as ex:
        flags = list(ex.map(ok, todo))
    return {n for n, f in zip(todo, flags) if f}


def run_grid(grid, opts: GridOptions | None = None, *, engine: Engine | None = None) -> GridResult:
    """Render one shard of a GenerationGrid into its storage (see the module doc)."""
    opts = opts or GridOptions()
    spec = grid.spec
    images = expand(spec)
    i, n = shard_from_env(spec, opts.shard)
    mine = shard(images, i, n)
    root = grid_root(grid, opts.storage)
    images_uri = api_storage.join(root, api_storage.IMAGES_DIR)
    store = api_storage.Store(api_storage.S3Settings.from_spec(spec.storage))
    storage_uri = opts.storage or spec.storage.uri
    batch_size = int(opts.batch_size or spec.batch_size)
    log.info("grid %s: %d images; shard %d/%d renders %d of them into %s", grid.metadata.name, len(images), i, n, len(mine), images_uri)

    with StopFlag("grid", prog="tinv generate") as stop:  # a signal while loading stops at once
        stop.saved = "no new image rendered; the images already written are kept, re-run to resume"
        if engine is None:
            engine = load_engine(
                opts.model or spec.model.source, refs_of(grid), revision=spec.model.revision, variant=spec.model.variant,
                device=opts.device, precision=opts.precision or spec.precision, storage_uri=storage_uri,
                namespace=grid.metadata.namespace, store=store, compile=opts.compile, vae_batch=opts.vae_batch,
                vae=spec.model.vae,
            )
        stop.defer()
        return _render_shard(grid, opts, engine, stop, images, mine, (i, n), root, images_uri, store, batch_size)


def _render_shard(grid, opts: GridOptions, engine: Engine, stop: StopFlag, images: list[GridImage], mine: list[GridImage],
                  where: tuple[int, int], root: str, images_uri: str, store: api_storage.Store, batch_size: int) -> GridResult:
    spec = grid.spec
    i, n = where
    warn = engine.check_prompts(spec.prompts, python_warnings=False)
    grid_info = {"name": grid.metadata.name, "namespace": grid.metadata.namespace or "default", "uid": grid.metadata.uid}

    # Which images are already there (resume after pre-emption), by file name and parameters key.
    def meta_for(img: GridImage, r: Rendered) -> dict:
        return engine.metadata(r, {"grid": {**grid_info, "index": img.index, "prompt_index": img.prompt_index,
                                            "seed_base": img.seed_base, "image_in_cell": img.k, "file": img.filename,
                                            "shard": [i, n]}})

    def expected_key(img: GridImage) -> str:
        return engine.metadata(Rendered(img.request(), np.zeros((1, 1, 3), np.uint8), 1, 0, True))["key"]

    keys = {img.filename: expected_key(img) for img in mine}
    done = set() if opts.force else existing_images(store, images_uri, keys)
    todo = [img for img in mine if img.filename not in done]
    if done:
        log.info("shard %d/%d: %d of its %d images already exist and are complete; rendering %d", i, n, len(done), len(mine), len(todo))

    progress = _Progress(store, root, (i, n), len(images), len(mine), opts.progress_interval, opts.progress_bar)
    progress.add(done=len(done))
    progress.write("running", force=True)
    tb = TensorBoard(store, api_storage.join(root, api_storage.TENSORBOARD_DIR, f"generate-{i:03d}-of-{n:03d}")) if opts.tensorboard else None
    pool = cf.ThreadPoolExecutor(max_workers=max(1, opts.writers), thread_name_prefix="tinv-png")
    pending: list[cf.Future] = []
    t_start = time.monotonic()
    rendered = 0
    lock = threading.Lock()

    def write_one(img: GridImage, r: Rendered) -> None:
        meta = meta_for(img, r)
        store.write_bytes(api_storage.join(images_uri, img.filename), pngmeta.encode_png(r.pixels, meta), content_type="image/png")
        with lock:
            progress.add(done=1)

    try:
        batches = plan_batches(todo, batch_size)
        progress.start_rendering()
        for b_i, batch in enumerate(batches):
            results = render_adaptive(engine, [img.request() for img in batch])
            rendered += len(batch)
            with lock:
                progress.add(rendered=len(batch))
            for img, r in zip(batch, results):
                pending.append(pool.submit(write_one, img, r))
                if tb is not None:
                    tag = (f"p{img.prompt_index:03d} {img.prompt[:80]}/{img.scheduler} {img.steps} steps "
                           f"{img.width}x{img.height} guidance {img.guidance_scale:g}")
                    tb.image(tag, r.pixels, img.seed, max_side=512)  # keep event files small
            pending = _reap(pending)
            if tb is not None:
                tb.scalar("generate/images_per_second", progress.rate(), progress.done)
            progress.write("running")
            stopped = stop.set or (opts.stop_after_batches is not None and b_i + 1 >= opts.stop_after_batches)
            if stopped and b_i + 1 < len(batches):
                _reap(pending, wait=True)
                e = Stopped(stop.signal or signal.SIGTERM,
                            f"stopped after {progress.done} of {len(mine)} images of shard {i}/{n}: they are kept, re-run to resume")
                progress.write("running", f"{e.stopped}: the images written so far are kept; re-run to resume", force=True, stopped=e.stopped)
                raise e
        _reap(pending, wait=True)
    except BaseException as e:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True)
        if not isinstance(e, Stopped):
            progress.write("failed", f"{type(e).__name__}: {e}", force=True)
        progress.close()
        if tb is not None:
            tb.close()
        raise
    pool.shutdown(wait=True)
    seconds = time.monotonic() - t_start
    rate = rendered / seconds if rendered and seconds > 0 else None
    progress.write("succeeded", force=True)
    progress.close()
    if tb is not None:
        tb.close()
    result = GridResult(root=root, images_uri=images_uri, shard=(i, n), images_total=len(images), shard_total=len(mine),
                        rendered=rendered, skipped=len(done), seconds=seconds, images_per_second=rate, warnings=warn)
    if opts.gallery:
        built = gallery.build(store, grid, images, images_uri)
        result.gallery_uri, result.index_uri, result.complete = built.gallery_uri, built.index_uri, built.complete
    log.info("shard %d/%d: rendered %d, skipped %d, %.1f s%s", i, n, rendered, len(done), seconds,
             f", {rate:.2f} images/s" if rate else "")
    return result


def _reap(futures: list[cf.Future], wait: bool = False) -> list[cf.Future]:
    """Raise the first write error; keep the unfinished futures (all of them finished if wait)."""
    if wait:
        cf.wait(futures)
    left = []
    for f in futures:
        if f.done():
            f.result()
        else:
            left.append(f)
    return left
