"""The storage contract: where each resource's outputs live, and a small client for them.

Layout (DESIGN.md), below a resource's run root `<storage.uri>/<namespace>/<name>-<uid8>/`:

    progress.json                              rewritten atomically while the workload runs
    checkpoints/<uuid>/learned_embeds.safetensors   diffusers-loadable, one key per token
                      <token>.pt                    AUTOMATIC1111 layout
                      learned_embeddings_dict.pt    the Determined example's layout
                      optimizer.pt                  resume state
                      manifest.json                 written last: a checkpoint without it is incomplete
    tensorboard/                               scalars and validation images (generate-<i>-of-<n>/ per grid shard)
    images/                                    GenerationGrid output: <name>.png, index.json, index.html,
                                               sheets/p<NNN>.png (one contact sheet per prompt)
    shards/shard-<i>-of-<n>.json               per-shard grid progress; progress.json aggregates them

progress.json (snake_case keys; the operator copies them into status.progress):
    {"state": "running"|"succeeded"|"failed", "step", "total_steps", "loss", "samples_per_second",
     "eta_seconds", "updated_at" (RFC 3339), "latest_checkpoint": {"uuid", "step", "uri"} | null,
     "stopped": null|"preempted"|"interrupted" (a pre-empted run stays state "running"),
     "learning_rate", "summary", "epoch", "world_size", "started_at", "checkpoints", "job",
     "message", "exit_code"}
    and for grids {"images_done", "images_total", "images_per_second", ...}.
manifest.json of a checkpoint:
    {"uuid", "step", "loss", "created_at" (RFC 3339), "job": {"namespace", "name", "uid"},
     "tokens": {token: n_vectors}, "files": {file name: sha256}, "hyperparameters": {...},
     "format", "uri", "total_steps", "model", "concepts", "effective_batch_size", "learning_rate",
     "world_size", "embedding_width", "resumed_from", "file_sizes", "trainer", "determined"}

URIs are `s3://bucket/key`, `file:///abs/path`, `pvc://claim/path` (inside a pod the claim is
mounted at `$TINV_PVC_ROOT/<claim>`, default /mnt/pvc) or a plain local path. `Store` reads and
writes all of them; boto3 is imported only when an s3:// URI is used, so this module stays light.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlparse

PROGRESS_FILE = "progress.json"
CHECKPOINTS_DIR = "checkpoints"
MANIFEST_FILE = "manifest.json"
EMBEDS_FILE = "learned_embeds.safetensors"
DETERMINED_FILE = "learned_embeddings_dict.pt"
OPTIMIZER_FILE = "optimizer.pt"
TENSORBOARD_DIR = "tensorboard"
IMAGES_DIR = "images"
INDEX_FILE = "index.json"
GALLERY_FILE = "index.html"
SHARDS_DIR = "shards"
LOCAL_ROOT = "tinv-runs"
DEFAULT_PVC_ROOT = "/mnt/pvc"


class StorageError(RuntimeError):
    """Storage could not be reached or refused an operation; the message names the URI."""


class NotFound(StorageError):
    """The object does not exist."""


class TooLarge(StorageError):
    """The object is larger than the reader accepts (the message names it and both sizes)."""


def join(base: str, *parts: str) -> str:
    """Join URI or path parts with single slashes, keeping the scheme."""
    out = base.rstrip("/")
    for part in parts:
        part = part.strip("/")
        if part:
            out = f"{out}/{part}"
    return out


def run_root(storage_uri: str | None, namespace: str | None, name: str, uid: str | None) -> str:
    """The run root of one resource: `<storage.uri>/<namespace>/<name>-<uid8>`.

    The uid suffix keeps a deleted-and-recreated resource of the same name from mixing its
    outputs with the old one's. Local runs have no uid and use `local`.
    """
    base = storage_uri or LOCAL_ROOT
    return join(base, namespace or "default", f"{name}-{(uid or 'local')[:8]}")


def root_of(resource: Any) -> str:
    """The run root of a tinv.api resource (TextualInversionJob or GenerationGrid)."""
    md = resource.metadata
    return run_root(resource.spec.storage.uri, md.namespace, md.name, md.uid)


def checkpoint_uri(root: str, uuid: str) -> str:
    return join(root, CHECKPOINTS_DIR, uuid)


def pvc_path(uri: str) -> Path:
    """Local path of a pvc://claim/path URI inside a pod (claims are mounted under TINV_PVC_ROOT)."""
    parsed = urlparse(uri)
    return Path(os.environ.get("TINV_PVC_ROOT", DEFAULT_PVC_ROOT)) / parsed.netloc / parsed.path.lstrip("/")


def pvc_claims(*uris: str | None) -> list[str]:
    """The PersistentVolumeClaims named by pvc:// URIs, in order, without repeats."""
    claims: list[str] = []
    for uri in uris:
        if uri and uri.startswith("pvc://"):
            claim = urlparse(uri).netloc
            if claim not in claims:
                claims.append(claim)
    return claims


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def local_path(uri: str) -> Path:
    """The filesystem path of a file://, pvc:// or plain-path URI."""
    if uri.startswith("file://"):
        return Path(urlparse(uri).path)
    if uri.startswith("pvc://"):
        return pvc_path(uri)
    if "://" in uri:
        raise StorageError(f"{uri}: not a local path (expected file://, pvc:// or a plain path)")
    return Path(uri)


def _split_s3(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if not parsed.netloc:
        raise StorageError(f"{uri}: an s3:// URI needs a bucket, e.g. s3://my-bucket/tinv")
    return parsed.netloc, parsed.path.lstrip("/")


@dataclass
class S3Settings:
    """How to reach an S3-compatible endpoint; credentials default to the standard AWS env vars."""

    endpoint: str | None = None
    addressing_style: str = "auto"
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    # network time limits of one call (the operator's poller uses much tighter ones than pods)
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    retries: int = 3  # after the first attempt (botocore's retries.max_attempts)

    @classmethod
    def from_spec(cls, storage: Any | None, env: dict[str, str] | None = None) -> "S3Settings":
        """From a tinv.api Storage model (or None) plus the process environment."""
        env = dict(os.environ if env is None else env)
        return cls(
            endpoint=getattr(storage, "endpoint", None) or env.get("TINV_S3_ENDPOINT") or env.get("AWS_ENDPOINT_URL"),
            addressing_style=getattr(storage, "addressing_style", None) or "auto",
            region=getattr(storage, "region", None) or env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION"),
            access_key_id=env.get("AWS_ACCESS_KEY_ID"),
            secret_access_key=env.get("AWS_SECRET_ACCESS_KEY"),
        )


class Store:
    """Read and write objects by URI: s3://, file://, pvc:// or plain paths.

    Local writes are atomic (temp file + rename); S3 PUTs are atomic per object. Network
    calls time out quickly so an unreachable endpoint is reported, not waited on.
    """

    def __init__(self, s3: S3Settings | None = None):
        self.s3_settings = s3 or S3Settings.from_spec(None)
        self._client = None

    # ------------------------------------------------------------------ s3 plumbing
    @property
    def client(self):
        if self._client is None:
            import boto3
            from botocore.config import Config

            s = self.s3_settings
            self._client = boto3.client(
                "s3",
                endpoint_url=s.endpoint,
                region_name=s.region or "us-east-1",
                aws_access_key_id=s.access_key_id,
                aws_secret_access_key=s.secret_access_key,
                config=Config(
                    s3={"addressing_style": s.addressing_style},
                    connect_timeout=s.connect_timeout,
                    read_timeout=s.read_timeout,
                    retries={"max_attempts": s.retries, "mode": "standard"},
                ),
            )
        return self._client

    def _s3_call(self, uri: str, fn, *args, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(*args, **kwargs)
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                raise NotFound(f"{uri}: no such object") from None
            if code == "NoSuchBucket":
                raise StorageError(f"{uri}: bucket does not exist; create it or fix storage.uri") from None
            if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"):
                raise StorageError(f"{uri}: access denied ({code}); check the credentials Secret") from None
            raise StorageError(f"{uri}: {code or err}") from None
        except BotoCoreError as err:
            raise StorageError(f"{uri}: storage unreachable ({err}); check storage.endpoint") from None

    # ------------------------------------------------------------------ operations
    def read_bytes(self, uri: str, *, max_bytes: int | None = None, timeout: float | None = None) -> bytes:
        """An object's bytes. `max_bytes`: refuse a larger object (TooLarge) without reading it;
        `timeout`: give up (StorageError) when the whole read takes longer, even if the server
        keeps trickling bytes (each socket read is bounded by the client's read_timeout)."""
        if is_s3(uri):
            import time

            t0 = time.monotonic()
            bucket, key = _split_s3(uri)
            resp = self._s3_call(uri, self.client.get_object, Bucket=bucket, Key=key)
            body = resp["Body"]
            size = resp.get("ContentLength")
            try:
                if max_bytes is not None and size is not None and size > max_bytes:
                    raise TooLarge(_too_large(uri, size, max_bytes))
                # read1 returns whatever one socket read brings (read(n) waits for n bytes): a server
                # trickling bytes within every socket timeout still meets the wall-clock limit
                read = getattr(getattr(body, "_raw_stream", None), "read1", None) if timeout is not None else None
                chunks, total = [], 0
                while chunk := self._s3_call(uri, read or body.read, 65536):
                    chunks.append(chunk)
                    total += len(chunk)
                    if max_bytes is not None and total > max_bytes:
                        raise TooLarge(_too_large(uri, total, max_bytes))
                    if timeout is not None and time.monotonic() - t0 > timeout:
                        raise StorageError(f"{uri}: reading took longer than {timeout:g}s; storage too slow")
                return b"".join(chunks)
            except StorageError:
                raise
            except Exception as err:  # noqa: BLE001 - urllib3's own errors from read1 (a dropped connection, a timeout)
                raise StorageError(f"{uri}: storage unreachable ({err}); check storage.endpoint") from None
            finally:
                body.close()
        path = local_path(uri)
        try:
            if max_bytes is not None and (size := path.stat().st_size) > max_bytes:
                raise TooLarge(_too_large(uri, size, max_bytes))
            return path.read_bytes()
        except FileNotFoundError:
            raise NotFound(f"{uri}: no such file") from None

    def write_bytes(self, uri: str, data: bytes, content_type: str | None = None) -> None:
        """Write an object. `content_type` matters on S3: a browser opens a gallery page straight
        from a bucket only when it is served as text/html (and its images as image/png)."""
        if is_s3(uri):
            bucket, key = _split_s3(uri)
            extra = {"ContentType": content_type} if content_type else {}
            self._s3_call(uri, self.client.put_object, Bucket=bucket, Key=key, Body=data, **extra)
            return
        path = local_path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def read_json(self, uri: str, *, max_bytes: int | None = None, timeout: float | None = None) -> Any:
        return json.loads(self.read_bytes(uri, max_bytes=max_bytes, timeout=timeout))

    def write_json(self, uri: str, value: Any) -> None:
        self.write_bytes(uri, json.dumps(value, indent=2, sort_keys=True).encode() + b"\n")

    def exists(self, uri: str) -> bool:
        if is_s3(uri):
            bucket, key = _split_s3(uri)
            try:
                self._s3_call(uri, self.client.head_object, Bucket=bucket, Key=key)
                return True
            except NotFound:
                return False
        return local_path(uri).exists()

    def list(self, prefix: str) -> Iterator[str]:
        """Every object URI below a prefix (recursive), in key order."""
        if is_s3(prefix):
            bucket, key = _split_s3(prefix)
            key = key.rstrip("/") + "/" if key else ""
            paginator = self.client.get_paginator("list_objects_v2")
            pages = paginator.paginate(Bucket=bucket, Prefix=key)
            try:
                for page in self._s3_call(prefix, lambda: list(pages)):
                    for obj in page.get("Contents", []):
                        yield f"s3://{bucket}/{obj['Key']}"
            except NotFound:
                return
            return
        root = local_path(prefix)
        if not root.is_dir():
            return
        base = prefix.rstrip("/")
        for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
            yield join(base, path.relative_to(root).as_posix())

    def children(self, prefix: str) -> list[str]:
        """Names of the immediate sub-folders of a prefix (e.g. checkpoint uuids)."""
        if is_s3(prefix):
            bucket, key = _split_s3(prefix)
            key = key.rstrip("/") + "/" if key else ""
            paginator = self.client.get_paginator("list_objects_v2")
            names: list[str] = []
            for page in self._s3_call(prefix, lambda: list(paginator.paginate(Bucket=bucket, Prefix=key, Delimiter="/"))):
                names += [p["Prefix"][len(key):].rstrip("/") for p in page.get("CommonPrefixes", [])]
            return sorted(names)
        root = local_path(prefix)
        return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []

    def upload_file(self, uri: str, path: str | Path) -> None:
        if is_s3(uri):
            bucket, key = _split_s3(uri)
            self._s3_call(uri, self.client.upload_file, str(path), bucket, key)
            return
        self.write_bytes(uri, Path(path).read_bytes())

    def download_file(self, uri: str, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if is_s3(uri):
            bucket, key = _split_s3(uri)
            self._s3_call(uri, self.client.download_file, bucket, key, str(path))
            return
        try:
            shutil.copyfile(local_path(uri), path)
        except FileNotFoundError:
            raise NotFound(f"{uri}: no such file") from None

    def download_prefix(self, prefix: str, dest: str | Path) -> list[Path]:
        """Copy every object below a prefix into a local folder, keeping relative paths."""
        dest = Path(dest)
        base = prefix.rstrip("/") + "/"
        out = []
        for uri in self.list(prefix):
            target = dest / uri[len(base):]
            self.download_file(uri, target)
            out.append(target)
        return out

    def delete(self, uri: str) -> None:
        if is_s3(uri):
            bucket, key = _split_s3(uri)
            self._s3_call(uri, self.client.delete_object, Bucket=bucket, Key=key)
            return
        local_path(uri).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        if is_s3(prefix):
            for uri in list(self.list(prefix)):
                self.delete(uri)
            return
        shutil.rmtree(local_path(prefix), ignore_errors=True)


def list_checkpoints(store: Store, root: str, *, known: dict[str, dict[str, Any]] | None = None,
                     read: Callable[[str, str], Any] | None = None) -> list[dict[str, Any]]:
    """Complete checkpoints under a run root (those whose manifest.json exists), oldest step first.

    Each item is the manifest dict plus `uri` (the checkpoint folder). A folder without a
    manifest is a checkpoint still being written, or one interrupted: it is never listed.
    A caller that polls passes `known` (uuid -> manifest already read: not read again) and its
    own `read(uuid, manifest_uri)` (size and time limits, back-off for incomplete folders).
    """
    base = join(root, CHECKPOINTS_DIR)
    found = []
    for uuid in store.children(base):
        if known is not None and uuid in known:
            found.append(known[uuid])
            continue
        try:
            manifest = read(uuid, join(base, uuid, MANIFEST_FILE)) if read else store.read_json(join(base, uuid, MANIFEST_FILE))
        except NotFound:
            continue
        except (ValueError, StorageError):
            if read is not None:
                raise  # the caller decides (e.g. an oversized manifest is reported by name)
            continue
        if not isinstance(manifest, dict):
            continue
        manifest["uri"] = join(base, uuid)
        found.append(manifest)
    found.sort(key=lambda m: (m.get("step", 0), m.get("created_at", "")))
    return found


# ---------------------------------------------------------------------------- finding a job's checkpoints
# ONE resolver for "the checkpoints of job X", used by training (resumeFrom), generation
# (embeddings: job) and the operator.

RUN_SUFFIX = re.compile(r"^(?P<job>.+)-(?P<uid>[0-9a-f]{8}|local)$")


def namespace_root(storage_uri: str | None, namespace: str | None) -> str:
    """`<storage.uri>/<namespace>`: the folder holding every run root of a namespace."""
    return join(storage_uri or LOCAL_ROOT, namespace or "default")


def job_of_run(folder: str) -> str | None:
    """The resource name of a run root (`<name>-<uid8>` or `<name>-local`), or None."""
    m = RUN_SUFFIX.match(folder.rstrip("/").rsplit("/", 1)[-1])
    return m.group("job") if m else None


def job_of_checkpoint(uri: str) -> str | None:
    """The resource name of the run holding a checkpoint folder `<root>/checkpoints/<uuid>`."""
    return job_of_run(uri.rstrip("/").rsplit("/" + CHECKPOINTS_DIR + "/", 1)[0])


def run_roots(store: Store, storage_uri: str | None, namespace: str | None, job: str | None = None) -> list[str]:
    """Run roots of one resource -- folders named EXACTLY `<job>-<uid8>` or `<job>-local`, never
    by prefix (so job `foo` never sees `foo-bar`'s runs) -- or, with job None, of every resource."""
    base = namespace_root(storage_uri, namespace)
    try:
        names = store.children(base)
    except NotFound:
        return []
    return [join(base, n) for n in names if job_of_run(n) is not None and (job is None or job_of_run(n) == job)]


def _order(manifest: dict[str, Any]) -> tuple:
    return (int(manifest.get("step", 0) or 0), str(manifest.get("created_at") or ""))


def job_checkpoints(store: Store, storage_uri: str | None, namespace: str | None, job: str) -> list[dict[str, Any]]:
    """Every complete checkpoint of a job over all its run roots, oldest first (by step, then time)."""
    found = [m for root in run_roots(store, storage_uri, namespace, job) for m in list_checkpoints(store, root)]
    return sorted(found, key=_order)


def checkpoint_uuid(manifest: dict[str, Any]) -> str:
    return str(manifest.get("uuid") or manifest["uri"].rstrip("/").rsplit("/", 1)[-1])


def newest_checkpoint(store: Store, storage_uri: str | None, namespace: str | None, job: str) -> dict[str, Any] | None:
    """The newest complete checkpoint of a job (highest step, then latest created_at), or None."""
    found = job_checkpoints(store, storage_uri, namespace, job)
    return found[-1] if found else None


def find_checkpoint(
    store: Store, storage_uri: str | None, namespace: str | None, uuid: str, job: str | None = None
) -> dict[str, Any] | None:
    """The manifest (with `uri`) of the complete checkpoint `uuid`: in `job`'s run roots, or with
    job None in any run root of the namespace."""
    for root in run_roots(store, storage_uri, namespace, job):
        folder = checkpoint_uri(root, uuid)
        try:
            manifest = store.read_json(join(folder, MANIFEST_FILE))
        except (NotFound, ValueError):
            continue
        manifest["uri"] = folder
        return manifest
    return None


def _too_large(uri: str, size: int, limit: int) -> str:
    return f"{uri}: {size} bytes, over the limit of {limit} bytes: not read"
