"""What a run's storage holds, read for one page: progress.json, complete checkpoints, TensorBoard
scalars and validation images, and for grids images/index.json and shards/*.json.

Every read goes through a tinv.api Store, so local folders, file://, pvc:// and s3:// roots look
the same. Nothing here raises on a storage problem: the problem becomes `StorageView.problem`,
which the page shows on that run while everything the API knows still renders.

TensorBoard event files are read with tensorboard's own EventAccumulator. It reads local folders;
for object storage the event files are copied into a private cache folder first (re-copied at
most every `refresh` seconds while a run is going).
"""

from __future__ import annotations

import hashlib
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tinv.api.storage import (
    CHECKPOINTS_DIR,
    IMAGES_DIR,
    INDEX_FILE,
    PROGRESS_FILE,
    TENSORBOARD_DIR,
    NotFound,
    Store,
    StorageError,
    is_s3,
    join,
    list_checkpoints,
    local_path,
)

SHARDS_DIR = "shards"
LOSS_TAG = "train/loss"
LR_TAG = "train/learning_rate"
THROUGHPUT_TAG = "train/samples_per_second"
VALIDATION_PREFIX = "validation/"


@dataclass
class Scalars:
    """TensorBoard scalars and validation images of one run folder."""

    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # tag -> [(step, value)]
    images: dict[str, dict[int, bytes]] = field(default_factory=dict)  # validation tag -> step -> PNG


@dataclass
class StorageView:
    progress: dict[str, Any] | None = None
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    scalars: Scalars = field(default_factory=Scalars)
    index: dict[str, Any] | None = None
    shards: list[dict[str, Any]] = field(default_factory=list)
    problem: str | None = None


def _guard(view: StorageView, fn, *args, default=None):
    """Run one storage read; a storage error becomes the view's problem (the first one is kept)."""
    try:
        return fn(*args)
    except NotFound:
        return default
    except (StorageError, OSError, ValueError) as err:
        view.problem = view.problem or _problem_text(err)
        return default
    except Exception as err:  # noqa: BLE001 - e.g. botocore's endpoint errors: a message, not a broken page
        view.problem = view.problem or f"storage: {type(err).__name__}: {err}"
        return default


def _problem_text(err: Exception) -> str:
    text = str(err)
    return text if isinstance(err, StorageError) else f"storage: {type(err).__name__}: {text}"


class TensorBoardCache:
    """EventAccumulator results per run folder, reloaded at most every `refresh` seconds."""

    def __init__(self, refresh: float = 3.0, cache_dir: str | Path | None = None):
        self.refresh = refresh
        self.cache_dir = Path(cache_dir or tempfile.mkdtemp(prefix="tinv-ui-tb-"))
        self._entries: dict[str, tuple[float, Scalars]] = {}
        self._lock = threading.Lock()

    def get(self, store: Store, root: str, *, final: bool = False) -> Scalars:
        """Scalars of `<root>/tensorboard`; a finished run (`final`) is read once and kept."""
        uri = join(root, TENSORBOARD_DIR)
        with self._lock:
            hit = self._entries.get(uri)
            if hit and (final or time.monotonic() - hit[0] < self.refresh):
                return hit[1]
        folder = self._local_folder(store, uri)
        scalars = _read_events(folder) if folder is not None else Scalars()
        with self._lock:
            self._entries[uri] = (time.monotonic(), scalars)
        return scalars

    def _local_folder(self, store: Store, uri: str) -> Path | None:
        if not is_s3(uri):
            path = local_path(uri)
            return path if path.is_dir() else None
        dest = self.cache_dir / hashlib.sha256(uri.encode()).hexdigest()[:16]
        base = uri.rstrip("/") + "/"
        found = False
        for obj in store.list(uri):
            rel = obj[len(base):]
            if "/" in rel or "tfevents" not in rel:
                continue  # a job's own events are at the top; grid shards have sub-folders
            store.download_file(obj, dest / rel)
            found = True
        return dest if found else None


def _read_events(folder: Path) -> Scalars:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    out = Scalars()
    for tag in tags.get("scalars", []):
        out.series[tag] = [(int(e.step), float(e.value)) for e in acc.Scalars(tag)]
    for tag in tags.get("images", []):
        if tag.startswith(VALIDATION_PREFIX):
            out.images[tag] = {int(e.step): e.encoded_image_string for e in acc.Images(tag)}
    return out


def read_job(store: Store, root: str, tb: TensorBoardCache) -> StorageView:
    view = StorageView()
    view.progress = _guard(view, store.read_json, join(root, PROGRESS_FILE))
    if view.problem:
        return view  # unreachable: one message, not one per file
    view.checkpoints = _guard(view, list_checkpoints, store, root, default=[]) or []
    final = isinstance(view.progress, dict) and view.progress.get("state") in ("succeeded", "failed")
    view.scalars = _tb(view, tb, store, root, final)
    return view


def _tb(view: StorageView, tb: TensorBoardCache, store: Store, root: str, final: bool) -> Scalars:
    try:
        return tb.get(store, root, final=final)
    except (StorageError, OSError, ValueError) as err:
        view.problem = view.problem or _problem_text(err)
    except Exception as err:  # noqa: BLE001
        view.problem = view.problem or f"tensorboard: {type(err).__name__}: {err}"
    return Scalars()


def read_grid(store: Store, root: str) -> StorageView:
    view = StorageView()
    view.progress = _guard(view, store.read_json, join(root, PROGRESS_FILE))
    if view.problem:
        return view
    view.index = _guard(view, store.read_json, join(root, IMAGES_DIR, INDEX_FILE))
    shard_uris = _guard(view, lambda: [u for u in store.list(join(root, SHARDS_DIR)) if u.endswith(".json")], default=[]) or []
    for uri in shard_uris:
        shard = _guard(view, store.read_json, uri)
        if isinstance(shard, dict):
            view.shards.append(shard)
    view.shards.sort(key=lambda s: (s.get("shard") or {}).get("index", 0))
    return view


def checkpoint_file_uri(root: str, uuid: str, name: str) -> str:
    return join(root, CHECKPOINTS_DIR, uuid, name)


def image_uri(root: str, rel: str) -> str:
    return join(root, IMAGES_DIR, rel)
