"""Where the trainer reads and writes: URIs, the run folder, and a small object-store client.

URIs the trainer accepts anywhere a location is asked for:

- a plain path or ``file:///abs/path``            -> the local filesystem
- ``pvc://claim/sub/path``                         -> ``$TINV_PVC_ROOT/claim/sub/path`` (the operator
  mounts each claim at ``$TINV_PVC_ROOT/<claim>``, default ``/mnt/pvc``)
- ``s3://bucket/prefix``                           -> S3-compatible object storage through boto3;
  endpoint, addressing style and region come from the job's ``spec.storage`` (or the env vars
  ``AWS_ENDPOINT_URL``/``TINV_S3_ADDRESSING_STYLE``/``AWS_REGION``), credentials from the standard
  AWS env vars the operator fills from the job's Secret.

The run folder of a job is ``<storage.uri>/<namespace>/<name>-<uid8>/`` (DESIGN.md); with no
storage uri it is ``./tinv-runs/<namespace>/<name>-<uid8>/``. ``tinv.api.storage`` owns the
layout; this module uses it when present and otherwise applies the same rules itself.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

try:  # the shared contract, when the lead's module provides it
    from tinv.api import storage as _api_storage  # type: ignore
except Exception:  # pragma: no cover - absent in early checkouts
    _api_storage = None


def pvc_root() -> Path:
    return Path(os.environ.get("TINV_PVC_ROOT", "/mnt/pvc"))


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def local_path(uri: str) -> Path | None:
    """The local path a URI denotes, or None for object storage."""
    if is_s3(uri):
        return None
    if uri.startswith("file://"):
        return Path(uri[len("file://") :])
    if uri.startswith("pvc://"):
        rest = uri[len("pvc://") :].strip("/")
        return pvc_root() / rest
    if "://" in uri:
        raise ValueError(f"unsupported URI scheme in {uri!r}: use s3://, pvc://, file:// or a local path")
    return Path(uri).expanduser()


def join(uri: str, *parts: str) -> str:
    out = uri.rstrip("/")
    for p in parts:
        p = p.strip("/")
        if p:
            out = f"{out}/{p}"
    return out


def split_s3(uri: str) -> tuple[str, str]:
    rest = uri[len("s3://") :]
    bucket, _, key = rest.partition("/")
    return bucket, key


@dataclass
class S3Options:
    endpoint: str | None = None
    addressing_style: str = "auto"
    region: str | None = None

    @classmethod
    def from_spec(cls, storage) -> "S3Options":
        """From a tinv.api Storage model (or None), falling back to env vars."""
        endpoint = getattr(storage, "endpoint", None) or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        style = getattr(storage, "addressing_style", None) or os.environ.get("TINV_S3_ADDRESSING_STYLE", "auto")
        region = getattr(storage, "region", None) or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        return cls(endpoint=endpoint, addressing_style=style, region=region)


class ObjectStore:
    """put/get/list/delete on file://, pvc://, plain paths and s3:// URIs (boto3 imported lazily).

    Local writes are atomic (temp file + rename), so a reader never sees half a file.
    """

    def __init__(self, s3: S3Options | None = None):
        self.s3opts = s3 or S3Options.from_spec(None)
        self._client = None

    # -- s3 plumbing
    def client(self):
        if self._client is None:
            import boto3
            from botocore.config import Config

            cfg = Config(
                s3={"addressing_style": self.s3opts.addressing_style},
                retries={"max_attempts": 5, "mode": "standard"},
                connect_timeout=10,
                read_timeout=60,
            )
            self._client = boto3.client(
                "s3", endpoint_url=self.s3opts.endpoint, region_name=self.s3opts.region, config=cfg
            )
        return self._client

    # -- API
    def put_bytes(self, uri: str, data: bytes) -> None:
        p = local_path(uri)
        if p is None:
            b, k = split_s3(uri)
            self.client().put_object(Bucket=b, Key=k, Body=data)
            return
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, p)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def put_file(self, uri: str, path: str | Path) -> None:
        p = local_path(uri)
        if p is None:
            b, k = split_s3(uri)
            self.client().upload_file(str(path), b, k)
            return
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.parent / f".{p.name}.tmp"
        shutil.copyfile(path, tmp)
        os.replace(tmp, p)

    def get_bytes(self, uri: str) -> bytes:
        p = local_path(uri)
        if p is None:
            b, k = split_s3(uri)
            return self.client().get_object(Bucket=b, Key=k)["Body"].read()
        return p.read_bytes()

    def exists(self, uri: str) -> bool:
        p = local_path(uri)
        if p is None:
            b, k = split_s3(uri)
            try:
                self.client().head_object(Bucket=b, Key=k)
                return True
            except Exception as e:  # botocore ClientError 404
                code = getattr(e, "response", {}).get("Error", {}).get("Code")
                if code in ("404", "NoSuchKey", "NotFound"):
                    return False
                raise
        return p.exists()

    def list(self, prefix: str) -> list[str]:
        """URIs of all objects (files) under prefix, recursively, sorted."""
        p = local_path(prefix)
        if p is None:
            b, k = split_s3(prefix)
            k = k.rstrip("/") + "/" if k else ""
            out = []
            for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=b, Prefix=k):
                for obj in page.get("Contents", []):
                    out.append(f"s3://{b}/{obj['Key']}")
            return sorted(out)
        if not p.is_dir():
            return []
        base = prefix.rstrip("/")
        return sorted(f"{base}/{f.relative_to(p).as_posix()}" for f in p.rglob("*") if f.is_file())

    def delete_prefix(self, prefix: str) -> None:
        p = local_path(prefix)
        if p is None:
            b, k = split_s3(prefix)
            keys = [split_s3(u)[1] for u in self.list(prefix)]
            for i in range(0, len(keys), 1000):
                self.client().delete_objects(Bucket=b, Delete={"Objects": [{"Key": x} for x in keys[i : i + 1000]]})
            return
        shutil.rmtree(p, ignore_errors=True)

    def download_prefix(self, prefix: str, dest: str | Path) -> Path:
        """Copy every object under prefix into dest (keeping relative paths); returns dest."""
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        base = prefix.rstrip("/")
        for uri in self.list(prefix):
            rel = uri[len(base) + 1 :]
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            p = local_path(uri)
            if p is None:
                b, k = split_s3(uri)
                self.client().download_file(b, k, str(target))
            else:
                shutil.copyfile(p, target)
        return dest


def run_uri(storage_uri: str | None, namespace: str | None, name: str | None, uid: str | None, spec_doc: dict | None = None) -> str:
    """``<storage.uri>/<namespace>/<name>-<uid8>``.

    With no uid (a job run from a file, never applied to a cluster) uid8 is a hash of the spec,
    so re-running the same file finds and resumes its own checkpoints, and a changed spec
    starts a fresh folder.
    """
    if _api_storage is not None and hasattr(_api_storage, "run_uri") and uid:
        try:
            return _api_storage.run_uri(storage_uri, namespace, name, uid)  # type: ignore[attr-defined]
        except TypeError:
            pass
    root = storage_uri or "tinv-runs"
    ns = namespace or "default"
    nm = name or "job"
    if uid:
        uid8 = uid.replace("-", "")[:8]
    else:
        import json

        uid8 = hashlib.sha256(json.dumps(spec_doc or {}, sort_keys=True).encode()).hexdigest()[:8]
    return join(root, ns, f"{nm}-{uid8}")


def cache_dir() -> Path:
    """Local cache for downloaded models and data: $TINV_CACHE_DIR, else ~/.cache/tinv."""
    d = Path(os.environ.get("TINV_CACHE_DIR") or Path.home() / ".cache" / "tinv")
    d.mkdir(parents=True, exist_ok=True)
    return d


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def iter_chunks(seq: list, n: int) -> Iterable[list]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]
