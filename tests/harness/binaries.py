"""Where the control-plane and object-store binaries come from.

Order, per binary:
1. ``$KUBEBUILDER_ASSETS/<name>`` (controller-runtime envtest assets: etcd, kube-apiserver, kubectl);
2. the cache that ``hack/cluster-bins.sh`` fills from the Go module proxy
   (``${TINV_CACHE_DIR:-~/.cache/tinv}/bin/<component>-<version>/``);
3. ``PATH``.

When a binary is in none of them, ``hack/cluster-bins.sh`` is run to build the cache (once; minutes
to half an hour cold), unless ``TINV_CLUSTER_BINS_BUILD=0`` or KUBEBUILDER_ASSETS is set.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "hack" / "cluster-bins.sh"

#: binary name -> key printed by ``hack/cluster-bins.sh --env``
NAMES = {
    "etcd": "ETCD",
    "kube-apiserver": "KUBE_APISERVER",
    "kube-controller-manager": "KUBE_CONTROLLER_MANAGER",
    "kube-scheduler": "KUBE_SCHEDULER",
    "kubectl": "KUBECTL",
    "kwok": "KWOK",
    "helm": "HELM",
    "versitygw": "VERSITYGW",
    "kueue": "KUEUE",  # its rendered install manifests lie beside it (manifests.yaml)
}


class BinariesError(RuntimeError):
    pass


@dataclass
class Binaries:
    paths: dict[str, str] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    build_log: str = ""

    def get(self, name: str) -> str | None:
        return self.paths.get(name)

    def require(self, name: str) -> str:
        path = self.paths.get(name)
        if not path:
            raise BinariesError(
                f"no {name} binary: run `make cluster-bins` (bash hack/cluster-bins.sh), set "
                f"KUBEBUILDER_ASSETS to a folder holding it, or put it on PATH"
                + (f"\n--- hack/cluster-bins.sh said:\n{self.build_log[-4000:]}" if self.build_log else "")
            )
        return path


def _script_env(build: bool) -> tuple[dict[str, str], str]:
    """Run hack/cluster-bins.sh (building when ``build``), return its NAME=PATH lines and its log."""
    if not SCRIPT.exists():
        return {}, f"{SCRIPT} not found"
    args = ["bash", str(SCRIPT), "--env"] + ([] if build else ["--check"])
    started = time.monotonic()
    proc = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    log = proc.stderr + f"\n(hack/cluster-bins.sh exited {proc.returncode} after {time.monotonic() - started:.0f} s)"
    if proc.returncode != 0 and build:
        return {}, log
    env = {}  # with --check, the lines name the cache paths even when some are missing
    for line in proc.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            env[key.strip()] = value.strip()
    return env, log


def find_binaries(names: tuple[str, ...] = tuple(NAMES), *, build: bool | None = None) -> Binaries:
    """Locate ``names``; run hack/cluster-bins.sh to build missing ones when ``build`` (default: allowed
    unless TINV_CLUSTER_BINS_BUILD=0 or KUBEBUILDER_ASSETS is set)."""
    assets = os.environ.get("KUBEBUILDER_ASSETS")
    if build is None:
        build = os.environ.get("TINV_CLUSTER_BINS_BUILD", "1") != "0" and not assets
    result = Binaries()

    def from_assets(name: str) -> str | None:
        if assets:
            p = Path(assets) / name
            if p.is_file() and os.access(p, os.X_OK):
                return str(p)
        return None

    cache, log = _script_env(build=False)
    missing = [n for n in names if not from_assets(n) and not _cached(cache, n) and not shutil.which(n)]
    # Prefer the cache over PATH: build when something is not cached and nothing else provides it,
    # or when the cache is empty and building is allowed (PATH tools may be older than we need).
    if build and (missing or not all(_cached(cache, n) for n in names if not from_assets(n))):
        cache, log = _script_env(build=True)
    result.build_log = log
    for n in names:
        path = from_assets(n) or _cached(cache, n) or shutil.which(n)
        if path:
            result.paths[n] = path
    for key, value in cache.items():
        if key.endswith("_VERSION"):
            result.versions[key[: -len("_VERSION")].lower()] = value
    return result


def _cached(env: dict[str, str], name: str) -> str | None:
    path = env.get(NAMES.get(name, name.upper().replace("-", "_")))
    if path and os.path.isfile(path) and os.access(path, os.X_OK):
        return path
    return None
