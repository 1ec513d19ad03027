"""Helpers of the operator's cluster tests and benchmark: run `tinv operator` as a subprocess
against the harness's control plane (so it can be killed and restarted), make resources, and
write progress.json / checkpoint manifests into a file:// storage root the way the trainer does.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid as uuidlib
from pathlib import Path
from typing import Any

from harness.procs import free_port  # noqa: F401  (re-exported for the cluster and e2e tests)

REPO = Path(__file__).resolve().parents[2]
GROUP_VERSION = "tinv.io/v1alpha1"




def now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class OperatorProcess:
    """`tinv operator --namespace NS ...` in a subprocess with the control plane's KUBECONFIG."""

    def __init__(self, cp: Any, namespaces: list[str], workdir: Path, *, storage_uri: str | None = None,
                 poll_interval: float = 1.0, extra: list[str] | None = None, env: dict[str, str] | None = None):
        self.cp = cp
        self.namespaces = namespaces
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.metrics_port = free_port()
        self.health_port = free_port()
        self.args = [sys.executable, "-m", "tinv.api.cli", "operator"]
        for ns in namespaces:
            self.args += ["--namespace", ns]
        self.args += ["--image", "example.invalid/tinv-trainer:test", "--poll-interval", str(poll_interval),
                      "--metrics-port", str(self.metrics_port), "--health-port", str(self.health_port),
                      "--pod-annotation-prefix", "kwok.tinv.io/"]
        if storage_uri:
            self.args += ["--storage-uri", storage_uri]
        self.args += list(extra or [])
        self.env = {**cp.env(), "PYTHONUNBUFFERED": "1"}
        self.env.pop("POD_NAMESPACE", None)  # unless the test says where the operator "runs"
        self.env.update(env or {})
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def log_path(self) -> Path:
        return self.workdir / f"operator-{self.starts}.log"

    def start(self) -> "OperatorProcess":
        self.starts += 1
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=str(self.workdir),
                                     start_new_session=True)
        log.close()
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: the operator gets no chance to clean up (a crash, an OOM kill, a node loss)."""
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 20) -> None:
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)

    def logs(self, lines: int = 80) -> str:
        out = []
        for i in range(1, self.starts + 1):
            p = self.workdir / f"operator-{i}.log"
            if p.exists():
                out.append(f"--- operator run {i} ---\n" + "\n".join(p.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(out)

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def __enter__(self) -> "OperatorProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def metric_value(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        if not (head == name or head.startswith(name + "{")):
            continue
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


# --------------------------------------------------------------------------- resources


def tijob(name: str, images: str = "file:///data/images", *, gpus: int = 1, gpu_class: str | None = "A100_PCIE_80GB",
          region: str | None = "ORD1", workers: int = 1, steps: int = 100, checkpoint_every: int = 10, kept: int = 3,
          annotations: dict[str, str] | None = None, storage: dict[str, Any] | None = None,
          run_policy: dict[str, Any] | None = None, resources: dict[str, Any] | None = None,
          model: dict[str, Any] | None = None) -> dict[str, Any]:
    res = {"gpusPerWorker": gpus, "workers": workers, **(resources or {})}
    if gpu_class:
        res["gpuClass"] = gpu_class
    if region:
        res["region"] = region
    return {
        "apiVersion": GROUP_VERSION,
        "kind": "TextualInversionJob",
        "metadata": {"name": name, "annotations": annotations or {}},
        "spec": {
            "model": model or {"source": "builtin:tiny"},
            "concepts": [{"token": "det-logo", "initializer": "brain logo", "images": images}],
            "training": {"steps": steps, "checkpointEvery": checkpoint_every, "checkpointsKept": kept},
            "resources": res,
            **({"storage": storage} if storage else {}),
            **({"runPolicy": run_policy} if run_policy else {}),
        },
    }


def grid(name: str, job: str | None = None, checkpoint: str = "latest", *, workers: int = 2, gpus: int = 1,
         gpu_class: str | None = "A40", region: str | None = "LAS1", annotations: dict[str, str] | None = None) -> dict[str, Any]:
    res: dict[str, Any] = {"gpusPerWorker": gpus, "workers": workers}
    if gpu_class:
        res["gpuClass"] = gpu_class
    if region:
        res["region"] = region
    embeddings = [{"job": job, "checkpoint": checkpoint}] if job else []
    return {
        "apiVersion": GROUP_VERSION,
        "kind": "GenerationGrid",
        "metadata": {"name": name, "annotations": annotations or {}},
        "spec": {
            "model": {"source": "builtin:tiny"},
            "embeddings": embeddings,
            "prompts": ["a photo of a det-logo"],
            # every axis spelled out: the generated CRD does not default list fields yet
            "grid": {"guidanceScales": [2, 4], "steps": [20], "schedulers": ["ddim"], "seeds": [1, 2],
                     "sizes": [{"width": 512, "height": 512}]},
            "resources": res,
        },
    }


def get(cp: Any, kind: str, ns: str, name: str) -> dict[str, Any]:
    return cp.get_json(kind, name, "-n", ns)


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == type_:
            return c
    return {}


def run_root(storage_uri: str, obj: dict[str, Any]) -> Path:
    """The file:// run root of a resource (tinv.api.storage.run_root)."""
    from tinv.api.storage import local_path, run_root as rr

    meta = obj["metadata"]
    return local_path(rr(storage_uri, meta["namespace"], meta["name"], meta["uid"]))


def write_checkpoint(root: Path, step: int, loss: float, uid: str | None = None) -> dict[str, Any]:
    """A complete checkpoint folder as the trainer leaves it (manifest.json written last; the
    storage contract's snake_case keys, tinv.api.storage). Returns its status.checkpoints entry."""
    cid = uid or str(uuidlib.uuid4())
    folder = root / "checkpoints" / cid
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "learned_embeds.safetensors").write_bytes(b"\0" * 16)
    created = now()
    manifest = {"format": "tinv.checkpoint/v1", "uuid": cid, "step": step, "loss": loss, "created_at": created,
                "uri": f"file://{folder}", "job": {}}
    tmp = folder / ".manifest.json.tmp"
    tmp.write_text(json.dumps(manifest))
    tmp.rename(folder / "manifest.json")
    return {"uuid": cid, "step": step, "uri": f"file://{folder}", "createdAt": created, "loss": loss}


def write_progress(root: Path, step: int, total: int, loss: float | None, checkpoints: list[dict[str, Any]] | None = None,
                   state: str = "running", sps: float | None = 12.5) -> None:
    """progress.json as the trainer rewrites it (tinv.api.storage's keys)."""
    checkpoints = [{"uuid": c["uuid"], "step": c["step"], "uri": c["uri"], "created_at": c.get("createdAt"), "loss": c.get("loss")}
                   for c in checkpoints or []]
    pct = int(100 * step / total) if total else 0
    doc = {
        "format": "tinv.progress/v1", "state": state, "step": step, "total_steps": total, "loss": loss,
        "samples_per_second": sps, "eta_seconds": int((total - step) / sps) if sps else None,
        "summary": f"{step}/{total} ({pct}%)", "updated_at": now(),
        "latest_checkpoint": checkpoints[-1] if checkpoints else None, "checkpoints": checkpoints,
    }
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / ".progress.json.tmp"
    tmp.write_text(json.dumps(doc))
    tmp.rename(root / "progress.json")


# --------------------------------------------------------------------------- a node the test plays the kubelet for

#: tolerates every taint (a static node has no heartbeat, so the node controller may taint it)
TOLERATE_ALL = {"tolerations": [{"operator": "Exists"}]}


def static_node(cp: Any, name: str, gpu_class: str, region: str = "TST1") -> None:
    """A node no kubelet (and no KWOK) runs: the test plays the kubelet for pods bound to it, so a
    pod can stay Running while it is being deleted (a trainer writing its last checkpoint)."""
    node = {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {"gpu.nvidia.com/class": gpu_class, "topology.kubernetes.io/region": region, "type": "static"}}}
    cp.kubectl("apply", "-f", "-", input=json.dumps(node))
    cap = {"cpu": "32", "memory": "128Gi", "pods": "110", "nvidia.com/gpu": "8"}
    status = {"status": {"capacity": cap, "allocatable": cap,
                         "conditions": [{"type": "Ready", "status": "True", "reason": "Test", "message": "static",
                                         "lastHeartbeatTime": "2026-01-01T00:00:00Z", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}}
    cp.kubectl("patch", "node", name, "--subresource=status", "--type=merge", "-p", json.dumps(status))


def kubelet_says(cp: Any, ns: str, pod: dict[str, Any], reason: str, message: str) -> None:
    """Report the pod's container as waiting (reason, message), as a kubelet would."""
    c = pod["spec"]["containers"][0]
    status = {"status": {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "True"}],
                         "containerStatuses": [{"name": c["name"], "image": c["image"], "imageID": "", "ready": False, "restartCount": 0,
                                                "started": False, "state": {"waiting": {"reason": reason, "message": message}}}]}}
    cp.kubectl("patch", "pod", pod["metadata"]["name"], "-n", ns, "--subresource=status", "--type=merge", "-p", json.dumps(status))


def kubelet_runs(cp: Any, ns: str, pod: dict[str, Any]) -> None:
    """Report the pod Running, as a kubelet would once its container started."""
    c = pod["spec"]["containers"][0]
    status = {"status": {"phase": "Running", "startTime": now()[:19] + "Z",
                         "conditions": [{"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "True"}],
                         "containerStatuses": [{"name": c["name"], "image": c["image"], "imageID": "", "ready": True, "restartCount": 0,
                                                "started": True, "state": {"running": {"startedAt": now()[:19] + "Z"}}}]}}
    cp.kubectl("patch", "pod", pod["metadata"]["name"], "-n", ns, "--subresource=status", "--type=merge", "-p", json.dumps(status))


def jobs_ever_created(cp: Any, ns: str, job: str) -> set[str]:
    """The uids of every Job of this name the namespace has seen (from the Job controller's Events,
    which outlive the Job), plus the one that exists now."""
    events = cp.get_json("events", "-n", ns, "--field-selector", f"involvedObject.kind=Job,involvedObject.name={job}")["items"]
    uids = {e["involvedObject"].get("uid") for e in events if e["involvedObject"].get("uid")}
    current = cp.get_json("jobs", "-n", ns, "--field-selector", f"metadata.name={job}")["items"]
    return uids | {j["metadata"]["uid"] for j in current}


def job_pods(cp: Any, ns: str, job: str) -> list[dict[str, Any]]:
    return cp.get_json("pods", "-n", ns, "-l", f"batch.kubernetes.io/job-name={job}")["items"]


def wait(cp: Any, predicate, timeout: float = 60, what: str = "condition", op: OperatorProcess | None = None):
    try:
        return cp.wait_for(predicate, timeout, interval=0.3, what=what)
    except TimeoutError as err:
        extra = f"\n{op.logs()}" if op is not None else ""
        raise TimeoutError(f"{err}{extra}") from None


def elapsed(t0: float) -> float:
    return round(time.monotonic() - t0, 2)


def apply_crds(cp: Any) -> list[str]:
    """Apply deploy/crds (the harness waits until each is Established)."""
    return cp.apply_crds()


# --------------------------------------------------------------------------- test environments


class OpEnv:
    """A namespace, a file:// storage root and a running operator for it."""

    def __init__(self, cp: Any, ns: str, store: Path, op: OperatorProcess):
        self.cp, self.ns, self.store, self.op = cp, ns, store, op
        self.storage_uri = f"file://{store}"

    def create(self, manifest: dict[str, Any]) -> dict[str, Any]:
        return self.cp.create(manifest, self.ns)

    def get(self, kind: str, name: str) -> dict[str, Any]:
        return get(self.cp, kind, self.ns, name)

    def status(self, kind: str, name: str) -> dict[str, Any]:
        return self.get(kind, name).get("status") or {}

    def wait(self, predicate, timeout: float = 60, what: str = "condition"):
        return wait(self.cp, predicate, timeout, what, self.op)

    def wait_status(self, kind: str, name: str, check, timeout: float = 60, what: str = "status"):
        """Wait until check(status) is truthy; return the object."""
        def ready():
            obj = self.get(kind, name)
            return obj if check(obj.get("status") or {}) else None
        return self.wait(ready, timeout, f"{kind} {name}: {what}")

    def root(self, obj: dict[str, Any]) -> Path:
        return run_root(self.storage_uri, obj)

    def pods(self, job: str) -> list[dict[str, Any]]:
        return job_pods(self.cp, self.ns, job)

    def running_pods(self, job: str) -> list[dict[str, Any]]:
        return [p for p in self.pods(job) if p.get("status", {}).get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")]

    def events(self, name: str) -> list[dict[str, Any]]:
        items = self.cp.get_json("events", "-n", self.ns, "--field-selector", f"involvedObject.name={name}")["items"]
        return sorted(items, key=lambda e: (e.get("firstTimestamp") or e.get("eventTime") or "", e["metadata"]["name"]))

    def patch(self, kind: str, name: str, patch: dict[str, Any], check: bool = True):
        return self.cp.kubectl("patch", kind, name, "-n", self.ns, "--type=merge", "-p", json.dumps(patch), check=check)


def make_env(cp: Any, tmp_factory: Any, prefix: str, extra: list[str] | None = None, poll_interval: float = 1.0,
             env: dict[str, str] | None = None) -> OpEnv:
    import pytest

    if cp.missing_components or not cp.nodes:
        pytest.skip(f"needs the full harness (missing: {', '.join(cp.missing_components) or 'KWOK nodes'})")
    apply_crds(cp)
    ns = cp.new_namespace(prefix)
    store = tmp_factory.mktemp(f"{prefix}-store")
    op = OperatorProcess(cp, [ns], tmp_factory.mktemp(f"{prefix}-operator"), storage_uri=f"file://{store}",
                         poll_interval=poll_interval, extra=extra, env=env).start()
    return OpEnv(cp, ns, store, op)


def close_env(env: OpEnv, request: Any = None) -> None:
    env.op.stop()
    failed = request is not None and getattr(request.node, "rep_failed", False)
    if failed or os.environ.get("TINV_OPERATOR_LOGS"):
        print(env.op.logs(200), file=sys.stderr)
    env.cp.delete_namespace(env.ns)
