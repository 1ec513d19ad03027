"""A real S3-compatible object store on loopback for end-to-end tests: versitygw (POSIX backend),
built from the Go module proxy by hack/cluster-bins.sh, with fresh credentials and a temporary
data directory. Usable outside pytest::

    with ObjectStore() as s3:
        s3.make_bucket("ckpt")
        s3.client().put_object(Bucket="ckpt", Key="a", Body=b"x")
"""

from __future__ import annotations

import atexit
import http.client
import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from .binaries import Binaries, find_binaries
from .procs import Process, claim_dir, free_port, reap_stale_dirs


class ObjectStoreError(RuntimeError):
    pass


class ObjectStore:
    """``endpoint_url``, ``access_key``, ``secret_key``, ``region``, ``data_dir`` after ``start()``;
    ``make_bucket(name)``, ``client()`` (boto3), ``env()`` (AWS_* variables for a child process)."""

    def __init__(self, *, binaries: Binaries | None = None, region: str = "us-east-1",
                 workdir: str | Path | None = None, keep_workdir: bool = False):
        self.binaries = binaries
        self.region = region
        self.access_key = "tinv" + secrets.token_hex(8)
        self.secret_key = secrets.token_urlsafe(30)
        self.endpoint_url = ""
        self.port = 0
        self._workdir_arg = workdir
        self.keep_workdir = keep_workdir
        self.workdir: Path | None = None
        self.data_dir: Path | None = None
        self.startup_seconds = 0.0
        self._proc: Process | None = None
        self.server = "versitygw"

    def __enter__(self) -> "ObjectStore":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 30) -> "ObjectStore":
        t0 = time.monotonic()
        if self.binaries is None:
            self.binaries = find_binaries(("versitygw",))
        binary = self.binaries.require("versitygw")
        if self._workdir_arg is None:
            reap_stale_dirs(Path(tempfile.gettempdir()), "tinv-s3-")
            self.workdir = Path(tempfile.mkdtemp(prefix="tinv-s3-"))
            claim_dir(self.workdir)
        else:
            self.workdir = Path(self._workdir_arg)
        self.data_dir = self.workdir / "data"
        sidecar = self.workdir / "meta"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        sidecar.mkdir(exist_ok=True)
        self.port = free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "VGW_", "ROOT_"))}
        self._proc = Process("versitygw", [
            binary,
            f"--port=127.0.0.1:{self.port}",
            f"--access={self.access_key}", f"--secret={self.secret_key}",
            f"--region={self.region}",
            "--quiet",
            # metadata (content type, user metadata, ACLs ...) in a sidecar folder instead of xattrs,
            # so any temp filesystem (tmpfs, overlay) works
            "posix", f"--sidecar={sidecar}", str(self.data_dir),
        ], self.workdir / "versitygw.log", env=env).start()
        atexit.register(self.stop)
        deadline = time.monotonic() + timeout
        while not self._responding():
            if not self._proc.alive():
                out = self._proc.tail(40)
                self.stop()
                raise ObjectStoreError(f"versitygw exited with status {self._proc.returncode()}:\n{out}")
            if time.monotonic() > deadline:
                out = self._proc.tail(40)
                self.stop()
                raise ObjectStoreError(f"versitygw not answering on {self.endpoint_url} after {timeout} s:\n{out}")
            time.sleep(0.05)
        self.startup_seconds = time.monotonic() - t0
        return self

    def _responding(self) -> bool:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
            try:
                conn.request("GET", "/")
                conn.getresponse().read()  # any HTTP answer (403 for an anonymous request) means it is up
                return True
            finally:
                conn.close()
        except OSError:
            return False

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.stop()
            self._proc = None
        if self.workdir and self.workdir.exists() and not self.keep_workdir and self._workdir_arg is None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def logs(self, lines: int = 60) -> str:
        return self._proc.tail(lines) if self._proc else ""

    # ------------------------------------------------------------------ clients
    def env(self) -> dict[str, str]:
        """AWS_* variables that point boto3/awscli in a child process at this store."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
        }

    def client(self, **kwargs: Any):
        """A boto3 S3 client for this store (path-style addressing: there is no DNS for buckets)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3}),
            **kwargs,
        )

    def make_bucket(self, name: str | None = None) -> str:
        """Create a bucket (default: a fresh random name) and return its name."""
        name = name or f"test-{secrets.token_hex(4)}"
        s3 = self.client()
        try:
            s3.create_bucket(Bucket=name)
        except s3.exceptions.BucketAlreadyOwnedByYou:
            pass
        return name

    def url(self, bucket: str, key: str = "") -> str:
        return f"s3://{bucket}/{key}" if key else f"s3://{bucket}"
