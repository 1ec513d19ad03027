"""Storage for the trainer: the contract's layout and client (:mod:`tinv.api.storage`), plus a
few local helpers (cache folder, hashing).

URIs accepted anywhere a location is asked for: a plain path or ``file:///abs``, ``pvc://claim/path``
(mounted at ``$TINV_PVC_ROOT/<claim>``, default ``/mnt/pvc``) and ``s3://bucket/prefix`` (boto3;
endpoint, addressing style and region from ``spec.storage``, credentials from the standard AWS
env vars that the operator fills from the job's Secret).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from tinv.api.storage import (  # noqa: F401  (re-exported for the trainer's modules)
    CHECKPOINTS_DIR,
    MANIFEST_FILE,
    OPTIMIZER_FILE,
    PROGRESS_FILE,
    TENSORBOARD_DIR,
    NotFound,
    S3Settings,
    StorageError,
    Store,
    is_s3,
    join,
    list_checkpoints,
    root_of,
    run_root,
)
from tinv.api.storage import local_path as _local_path


def local_path(uri: str) -> Path | None:
    """The local path a URI denotes, or None for object storage (s3://)."""
    if is_s3(uri):
        return None
    return _local_path(uri).expanduser()


def cache_dir() -> Path:
    """Local cache for downloaded models and images: $TINV_CACHE_DIR, else ~/.cache/tinv.

    The operator points TINV_CACHE_DIR at the model-cache PVC (spec.model.cacheClaim), so
    weights are fetched once per namespace."""
    d = Path(os.environ.get("TINV_CACHE_DIR") or Path.home() / ".cache" / "tinv")
    d.mkdir(parents=True, exist_ok=True)
    return d


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
