"""A real Kubernetes control plane on loopback for tests, the way controller-runtime's envtest runs one,
plus what makes Jobs and scheduling real:

* etcd and kube-apiserver with certificates, client-certificate authentication, Node+RBAC
  authorisation, service-account token signing and the default admission plugins;
* kube-controller-manager (job, garbage-collector, namespace, ttl-after-finished, serviceaccount,
  node-lifecycle ... controllers; each with its own service-account credentials) and kube-scheduler;
* KWOK managing fake GPU nodes labelled the way CoreWeave labels them, so pods are really scheduled
  (or stay Pending when no node fits) and move Running -> Succeeded/Failed as tests steer them
  (see ``kwok-stages.yaml``: annotations ``kwok.tinv.io/exit-code``, ``kwok.tinv.io/message``,
  ``kwok.tinv.io/run-for``).

Everything listens on free ports of 127.0.0.1, logs to files in a temporary directory and is torn
down (process groups killed, directory removed) by ``stop()``. Usable outside pytest::

    with ControlPlane() as cp:
        cp.kubectl("get", "nodes", "-L", "gpu.nvidia.com/class")

``USE_EXISTING_CLUSTER=true`` (with ``KUBECONFIG``) starts nothing and uses that cluster instead.
"""

from __future__ import annotations

import atexit
import base64
import http.client
import json
import os
import secrets
import shutil
import ssl
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from .binaries import REPO_ROOT, Binaries, find_binaries
from .procs import Process, claim_dir, free_port, reap_stale_dirs, wait_until

HERE = Path(__file__).resolve().parent
KWOK_STAGES = HERE / "kwok-stages.yaml"
CRD_DIR = REPO_ROOT / "deploy" / "crds"

#: Pod annotations that steer the KWOK stages (see kwok-stages.yaml).
EXIT_CODE_ANNOTATION = "kwok.tinv.io/exit-code"
MESSAGE_ANNOTATION = "kwok.tinv.io/message"
RUN_FOR_ANNOTATION = "kwok.tinv.io/run-for"

GPU_CLASS_LABEL = "gpu.nvidia.com/class"
REGION_LABEL = "topology.kubernetes.io/region"
GPU_RESOURCE = "nvidia.com/gpu"
FAKE_NODE_LABEL = "type"  # KWOK's convention: type=kwok
FAKE_NODE_VALUE = "kwok"

SERVICE_CIDR = "10.96.0.0/16"
POD_CIDR = "10.244.0.0/16"

#: The components a full harness runs; ``missing_components`` names those that could not be started.
WORKLOAD_COMPONENTS = ("kube-controller-manager", "kube-scheduler", "kwok")


# client requests per second of the controller-manager's controllers and of the scheduler (their
# defaults: 20 and 50)
CONTROLLER_QPS = 200


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class FakeNode:
    """A KWOK node. GPU nodes carry CoreWeave's placement labels and ``nvidia.com/gpu`` capacity."""

    name: str
    region: str
    gpu_class: str | None = None
    gpus: int = 0
    cpu: str = "32"
    memory: str = "256Gi"
    extra_labels: tuple[tuple[str, str], ...] = ()

    @property
    def labels(self) -> dict[str, str]:
        labels = {
            FAKE_NODE_LABEL: FAKE_NODE_VALUE,
            "kubernetes.io/hostname": self.name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            REGION_LABEL: self.region,
        }
        if self.gpu_class:
            labels[GPU_CLASS_LABEL] = self.gpu_class
        labels.update(dict(self.extra_labels))
        return labels

    @property
    def capacity(self) -> dict[str, str]:
        cap = {"cpu": self.cpu, "memory": self.memory, "pods": "110", "ephemeral-storage": "1Ti"}
        if self.gpus:
            cap[GPU_RESOURCE] = str(self.gpus)
        return cap

    def manifest(self) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.name,
                "labels": self.labels,
                "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
            },
            "spec": {},
            "status": {
                "capacity": self.capacity,
                "allocatable": self.capacity,
                "nodeInfo": {"architecture": "amd64", "operatingSystem": "linux"},
            },
        }


DEFAULT_NODES: tuple[FakeNode, ...] = (
    FakeNode("a100-ord1-0", region="ORD1", gpu_class="A100_PCIE_80GB", gpus=8, cpu="96", memory="1000Gi"),
    FakeNode("a100-ord1-1", region="ORD1", gpu_class="A100_PCIE_80GB", gpus=8, cpu="96", memory="1000Gi"),
    FakeNode("a40-las1-0", region="LAS1", gpu_class="A40", gpus=8, cpu="48", memory="500Gi"),
    FakeNode("rtxa6000-lga1-0", region="LGA1", gpu_class="RTX_A6000", gpus=8, cpu="48", memory="500Gi"),
    FakeNode("cpu-ord1-0", region="ORD1", cpu="32", memory="128Gi"),
)


class ControlPlaneError(RuntimeError):
    pass


class CrdApplyError(ControlPlaneError):
    """The apiserver refused some CRD files: ``errors`` maps file name -> message; ``applied`` lists the
    CRDs that did apply (and are Established)."""

    def __init__(self, applied: list[str], errors: dict[str, str]):
        self.applied, self.errors = applied, errors
        super().__init__("the apiserver refused " + "; ".join(f"{k}: {v}" for k, v in errors.items()))


class KubectlError(subprocess.CalledProcessError):
    def __str__(self) -> str:
        return (f"kubectl {' '.join(self.cmd[2:])} exited {self.returncode}:\n"
                f"{(self.stderr or '').strip()}\n{(self.stdout or '').strip()}").strip()


class _Rest:
    """Minimal HTTPS client for the harness's own apiserver (admin client certificate)."""

    def __init__(self, host: str, port: int, ca: Path, cert: Path, key: Path):
        self.host, self.port = host, port
        self.ctx = ssl.create_default_context(cafile=str(ca))
        self.ctx.load_cert_chain(str(cert), str(key))

    def request(self, method: str, path: str, body: Any = None, timeout: float = 10.0,
                content_type: str = "application/json") -> tuple[int, Any]:
        conn = http.client.HTTPSConnection(self.host, self.port, context=self.ctx, timeout=timeout)
        try:
            data = None if body is None else (body if isinstance(body, (bytes, str)) else json.dumps(body))
            headers = {"Accept": "application/json"}
            if data is not None:
                headers["Content-Type"] = content_type
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read().decode("utf-8", "replace")
        finally:
            conn.close()
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            return resp.status, raw


def _healthz(port: int, path: str = "/healthz") -> bool:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=2)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status == 200 and resp.read().strip() == b"ok"
    finally:
        conn.close()


def _kubeconfig(server: str, ca_pem: bytes, user: dict[str, Any], name: str = "tinv-test") -> str:
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return json.dumps({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": name, "cluster": {"server": server, "certificate-authority-data": b64(ca_pem)}}],
        "users": [{"name": name, "user": user}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": name, "namespace": "default"}}],
        "current-context": name,
        "preferences": {},
    }, indent=2)


class ControlPlane:
    """See the module docstring. Attributes after ``start()``:

    ``kubeconfig`` (path, admin: system:masters), ``server`` (https URL), ``nodes`` (FakeNode list),
    ``workdir`` (logs, certificates, kubeconfigs), ``binaries`` (paths and versions),
    ``missing_components`` (of WORKLOAD_COMPONENTS, when only etcd+apiserver could run),
    ``existing`` (True for USE_EXISTING_CLUSTER), ``timings`` (start-up seconds per phase).
    """

    def __init__(self, nodes: Iterable[FakeNode] = DEFAULT_NODES, *, binaries: Binaries | None = None,
                 workdir: str | Path | None = None, keep_workdir: bool | None = None,
                 existing: bool | None = None, kubeconfig: str | None = None,
                 start_timeout: float = 90.0, log: Callable[[str], None] | None = None):
        self.nodes: list[FakeNode] = list(nodes)
        self.binaries = binaries
        self.existing = _truthy(os.environ.get("USE_EXISTING_CLUSTER")) if existing is None else existing
        self.keep_workdir = _truthy(os.environ.get("TINV_KEEP_CLUSTER_DIR")) if keep_workdir is None else keep_workdir
        self._workdir_arg = workdir
        self.workdir: Path | None = None
        self.kubeconfig: str = kubeconfig or ""
        self.server: str = ""
        self.ca_file: Path | None = None
        self.start_timeout = start_timeout
        self.missing_components: list[str] = []
        self.timings: dict[str, float] = {}
        self._procs: dict[str, Process] = {}
        self._rest: _Rest | None = None
        self._namespaces: list[str] = []
        self._kubectl: str | None = None
        self._log = log or (lambda msg: None)
        self._started = False
        self._atexit_registered = False

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "ControlPlane":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "ControlPlane":
        if self._started:
            return self
        t0 = time.monotonic()
        if self.existing:
            self._start_existing()
        else:
            try:
                self._start_local()
            except BaseException as e:
                diag = self.diagnostics()
                self.stop()
                if isinstance(e, (KeyboardInterrupt, SystemExit)):
                    raise
                raise ControlPlaneError(f"control plane failed to start: {e}\n{diag}") from e
        self.timings["total"] = time.monotonic() - t0
        self._started = True
        self._log(f"control plane ready in {self.timings['total']:.1f} s ({self.server})")
        return self

    @property
    def startup_seconds(self) -> float:
        return self.timings.get("total", 0.0)

    def stop(self) -> None:
        if self.existing:
            for ns in self._namespaces:
                self.kubectl("delete", "namespace", ns, "--wait=false", "--ignore-not-found", check=False)
            self._namespaces.clear()
            self._started = False
            if self.workdir and self.workdir.exists() and not self.keep_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)
            return
        for name in ("kwok", "kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd"):
            proc = self._procs.pop(name, None)
            if proc is not None:
                proc.stop()
        self._started = False
        if self.workdir and self.workdir.exists() and not self.keep_workdir and self._workdir_arg is None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # ------------------------------------------------------------------ start-up
    def _phase(self, name: str, t: float) -> None:
        self.timings[name] = round(time.monotonic() - t, 2)

    def _start_local(self) -> None:
        if not self._atexit_registered:
            atexit.register(self.stop)
            self._atexit_registered = True
        t = time.monotonic()
        if self.binaries is None:
            self.binaries = find_binaries(("etcd", "kube-apiserver", "kubectl", "helm") + WORKLOAD_COMPONENTS)
        bins = self.binaries
        etcd_bin, apiserver_bin = bins.require("etcd"), bins.require("kube-apiserver")
        self._kubectl = bins.get("kubectl")
        self.missing_components = [c for c in WORKLOAD_COMPONENTS if not bins.get(c)]
        self._phase("binaries", t)

        if self._workdir_arg is not None:
            self.workdir = Path(self._workdir_arg)
            self.workdir.mkdir(parents=True, exist_ok=True)
        else:
            reap_stale_dirs(Path(tempfile.gettempdir()), "tinv-cp-")
            self.workdir = Path(tempfile.mkdtemp(prefix="tinv-cp-"))
            claim_dir(self.workdir)
        wd = self.workdir
        (wd / "logs").mkdir(exist_ok=True)

        t = time.monotonic()
        from .pki import PKI  # needs `cryptography`

        pki = PKI(wd / "pki")
        serving = pki.issue(
            "apiserver", "kube-apiserver", server=True,
            dns=("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
                 "kubernetes.default.svc.cluster.local"),
            ips=("127.0.0.1", "10.96.0.1"),
        )
        admin = pki.issue("admin", "tinv-admin", ("system:masters",), client=True)
        kcm = pki.issue("controller-manager", "system:kube-controller-manager", client=True)
        sched = pki.issue("scheduler", "system:kube-scheduler", client=True)
        kwok = pki.issue("kwok", "tinv-kwok", ("system:masters",), client=True)
        sa = pki.signing_key("sa")
        self.ca_file = pki.ca.cert
        self._phase("pki", t)

        # etcd
        t = time.monotonic()
        etcd_port, peer_port = free_port(), free_port()
        self._spawn("etcd", [
            etcd_bin, "--name=tinv", f"--data-dir={wd / 'etcd'}",
            f"--listen-client-urls=http://127.0.0.1:{etcd_port}",
            f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
            f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
            f"--initial-cluster=tinv=http://127.0.0.1:{peer_port}",
            "--initial-cluster-state=new", "--unsafe-no-fsync=true",
            "--quota-backend-bytes=4294967296", "--log-level=warn",
        ])
        self._wait("etcd", lambda: self._etcd_healthy(etcd_port), 30)
        self._phase("etcd", t)

        # kube-apiserver
        t = time.monotonic()
        api_port = free_port()
        self.server = f"https://127.0.0.1:{api_port}"
        self._spawn("kube-apiserver", [
            apiserver_bin,
            f"--etcd-servers=http://127.0.0.1:{etcd_port}",
            "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={api_port}",
            f"--cert-dir={wd / 'apiserver-certs'}",
            f"--tls-cert-file={serving.cert}", f"--tls-private-key-file={serving.key}",
            f"--client-ca-file={pki.ca.cert}",
            "--authorization-mode=Node,RBAC",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={sa.cert}", f"--service-account-signing-key-file={sa.key}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--allow-privileged=true",
            "--endpoint-reconciler-type=none",
            # /debug/pprof for bench/operator.py --profile-apiserver; off otherwise, as in production
            f"--profiling={'true' if _truthy(os.environ.get('TINV_APISERVER_PROFILING')) else 'false'}",
            "--event-ttl=1h0m0s",
            "--v=1",
        ])
        self._rest = _Rest("127.0.0.1", api_port, pki.ca.cert, admin.cert, admin.key)
        self._wait("kube-apiserver", lambda: self._rest.request("GET", "/readyz", timeout=3)[0] == 200, 60)
        self._phase("kube-apiserver", t)

        # kubeconfigs: the admin one for tests/kubectl/kopf, one per component
        ca_pem = pki.ca.cert_pem

        def cert_user(kp) -> dict[str, str]:
            return {"client-certificate-data": base64.b64encode(kp.cert_pem).decode(),
                    "client-key-data": base64.b64encode(kp.key_pem).decode()}

        self.kubeconfig = str(wd / "kubeconfig")
        Path(self.kubeconfig).write_text(_kubeconfig(self.server, ca_pem, cert_user(admin)))
        for name, kp in (("controller-manager", kcm), ("scheduler", sched), ("kwok", kwok)):
            (wd / f"{name}.kubeconfig").write_text(_kubeconfig(self.server, ca_pem, cert_user(kp)))

        # controller-manager, scheduler, KWOK: started together
        t = time.monotonic()
        health_ports: dict[str, int] = {}
        if bins.get("kube-controller-manager"):
            health_ports["kube-controller-manager"] = port = free_port()
            self._spawn("kube-controller-manager", [
                bins.get("kube-controller-manager"),
                f"--kubeconfig={wd / 'controller-manager.kubeconfig'}",
                "--leader-elect=false", "--bind-address=127.0.0.1", f"--secure-port={port}",
                f"--cert-dir={wd / 'kcm-certs'}",
                "--use-service-account-credentials=true",
                f"--service-account-private-key-file={sa.key}",
                f"--root-ca-file={pki.ca.cert}",
                f"--cluster-signing-cert-file={pki.ca.cert}", f"--cluster-signing-key-file={pki.ca.key}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--controllers=*",
                "--concurrent-job-syncs=10", "--concurrent-gc-syncs=20",
                # client-go's default of 20 requests/s per controller made the Job controller, not the
                # operator, set the pace at scale: 1,000 pods and their Job status updates took it
                # 100+ s (bench/README.md, 2026-12-03); large clusters raise it the same way
                f"--kube-api-qps={CONTROLLER_QPS}", f"--kube-api-burst={2 * CONTROLLER_QPS}",
                "--v=0",
            ])
        if bins.get("kube-scheduler"):
            health_ports["kube-scheduler"] = port = free_port()
            self._spawn("kube-scheduler", [
                bins.get("kube-scheduler"),
                f"--kubeconfig={wd / 'scheduler.kubeconfig'}",
                "--leader-elect=false", "--bind-address=127.0.0.1", f"--secure-port={port}",
                f"--cert-dir={wd / 'scheduler-certs'}",
                f"--kube-api-qps={CONTROLLER_QPS}", f"--kube-api-burst={2 * CONTROLLER_QPS}",
                "--v=0",
            ])
        if bins.get("kwok"):
            kwok_home = wd / "kwok"
            kwok_home.mkdir(exist_ok=True)
            config = wd / "kwok.yaml"
            config.write_text(
                "apiVersion: config.kwok.x-k8s.io/v1alpha1\n"
                "kind: KwokConfiguration\n"
                "options:\n"
                f"  manageNodesWithLabelSelector: {FAKE_NODE_LABEL}={FAKE_NODE_VALUE}\n"
                "  nodeLeaseDurationSeconds: 40\n"
                "  nodeLeaseParallelism: 4\n"
                "  nodePlayStageParallelism: 4\n"
                "  podPlayStageParallelism: 8\n"
                "  podsOnNodeSyncParallelism: 2\n"
                f"  cidr: {POD_CIDR}\n"
                "  nodeIP: 10.240.0.1\n"
                "---\n" + KWOK_STAGES.read_text()
            )
            env = dict(os.environ, KWOK_WORKDIR=str(kwok_home))
            env.pop("KUBECONFIG", None)
            self._spawn("kwok", [
                bins.get("kwok"), f"--kubeconfig={wd / 'kwok.kubeconfig'}", f"--config={config}", "-v=info",
            ], env=env)
            for node in self.nodes:
                status, body = self._rest.request("POST", "/api/v1/nodes", node.manifest())
                if status not in (200, 201, 409):
                    raise ControlPlaneError(f"creating node {node.name}: HTTP {status}: {body}")
        else:
            self.nodes = []
        for name, port in health_ports.items():
            self._wait(name, lambda port=port: _healthz(port), 60)
        if self.nodes:
            self._wait("kwok", self._nodes_ready, 60)
        if "kube-controller-manager" in health_ports:
            # the serviceaccount controller is up when the default namespace has its "default" account
            self._wait("kube-controller-manager",
                       lambda: self._rest.request("GET", "/api/v1/namespaces/default/serviceaccounts/default")[0]
                       == 200, 60)
        self._phase("controllers+kwok", t)

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Process:
        assert self.workdir is not None
        proc = Process(name, argv, self.workdir / "logs" / f"{name}.log", env=env).start()
        self._procs[name] = proc
        self._log(f"started {name} (pid {proc.pid})")
        return proc

    def _wait(self, name: str, predicate: Callable[[], Any], timeout: float) -> Any:
        proc = self._procs.get(name)

        def check():
            if proc is not None and not proc.alive():
                raise ControlPlaneError(f"{name} exited with status {proc.returncode()}:\n{proc.tail(60)}")
            return predicate()

        deadline = time.monotonic() + timeout
        while True:
            try:
                if check():
                    return True
            except ControlPlaneError:
                raise
            except Exception:  # noqa: BLE001 - not up yet
                pass
            if time.monotonic() > deadline:
                raise ControlPlaneError(f"{name} not ready after {timeout:.0f} s")
            time.sleep(0.1)

    @staticmethod
    def _etcd_healthy(port: int) -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            conn.request("GET", "/health")
            body = conn.getresponse().read()
            return b'"health":"true"' in body
        finally:
            conn.close()

    def _nodes_ready(self) -> bool:
        status, body = self._rest.request("GET", f"/api/v1/nodes?labelSelector={FAKE_NODE_LABEL}%3D{FAKE_NODE_VALUE}")
        if status != 200:
            return False
        ready = {
            item["metadata"]["name"]
            for item in body.get("items", [])
            if any(c.get("type") == "Ready" and c.get("status") == "True"
                   for c in item.get("status", {}).get("conditions", []))
        }
        return all(n.name in ready for n in self.nodes)

    def _start_existing(self) -> None:
        # scratch space (token kubeconfigs, kubectl and helm caches), removed by stop()
        self.workdir = Path(tempfile.mkdtemp(prefix="tinv-cp-existing-"))
        if not self.kubeconfig:
            self.kubeconfig = (os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")).split(os.pathsep)[0]
        if self.binaries is None:
            self.binaries = find_binaries(("kubectl", "helm"), build=False)
        self._kubectl = self.binaries.get("kubectl")
        out = self.kubectl("config", "view", "--minify", "-o", "jsonpath={.clusters[0].cluster.server}")
        self.server = out.stdout.strip()
        self.kubectl("get", "--raw", "/readyz")
        # Fake GPU nodes are whatever nodes carry KWOK's type=kwok label (e.g. a kwokctl cluster).
        nodes = json.loads(self.kubectl("get", "nodes", "-l", f"{FAKE_NODE_LABEL}={FAKE_NODE_VALUE}",
                                        "-o", "json").stdout)["items"]
        self.nodes = []
        for item in nodes:
            labels = item["metadata"].get("labels", {})
            cap = item.get("status", {}).get("capacity", {})
            self.nodes.append(FakeNode(
                item["metadata"]["name"], region=labels.get(REGION_LABEL, ""),
                gpu_class=labels.get(GPU_CLASS_LABEL), gpus=int(cap.get(GPU_RESOURCE, 0) or 0),
                cpu=cap.get("cpu", "0"), memory=cap.get("memory", "0"),
            ))

    # ------------------------------------------------------------------ diagnostics
    def logs(self, component: str, lines: int = 60) -> str:
        proc = self._procs.get(component)
        return proc.tail(lines) if proc else ""

    def pids(self) -> dict[str, int]:
        """The running components' process ids, by name (etcd, kube-apiserver, kwok, ...)."""
        return {name: proc.pid for name, proc in self._procs.items() if proc.alive() and proc.pid}

    def diagnostics(self, lines: int = 40) -> str:
        parts = []
        for name, proc in self._procs.items():
            state = "running" if proc.alive() else f"exited {proc.returncode()}"
            parts.append(f"----- {name} ({state}), log {proc.log} -----\n{proc.tail(lines)}")
        return "\n".join(parts)

    # ------------------------------------------------------------------ clients
    @property
    def kubectl_path(self) -> str:
        if not self._kubectl:
            raise ControlPlaneError("no kubectl: run `make cluster-bins` or put kubectl on PATH")
        return self._kubectl

    @property
    def helm_path(self) -> str | None:
        return self.binaries.get("helm") if self.binaries else None

    def env(self) -> dict[str, str]:
        """Environment for child processes (kubectl, helm, kopf ...) that should talk to this cluster."""
        env = dict(os.environ, KUBECONFIG=self.kubeconfig)
        if self.workdir is not None:
            env["KUBECACHEDIR"] = str(self.workdir / "kube-cache")
            env["HELM_CACHE_HOME"] = str(self.workdir / "helm" / "cache")
            env["HELM_CONFIG_HOME"] = str(self.workdir / "helm" / "config")
            env["HELM_DATA_HOME"] = str(self.workdir / "helm" / "data")
        bindirs = [str(Path(p).parent) for p in (self._kubectl, self.helm_path) if p]
        env["PATH"] = os.pathsep.join(dict.fromkeys(bindirs + [env.get("PATH", "")]))
        return env

    def kubectl(self, *args: str, input: str | bytes | None = None, check: bool = True,
                timeout: float = 120, kubeconfig: str | None = None) -> subprocess.CompletedProcess:
        """Run kubectl against this cluster (admin). Text in, text out; raises KubectlError when
        ``check`` and the exit status is not 0."""
        cmd = [self.kubectl_path, f"--kubeconfig={kubeconfig or self.kubeconfig}", *map(str, args)]
        if isinstance(input, bytes):
            input = input.decode()
        proc = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout, env=self.env())
        if check and proc.returncode != 0:
            raise KubectlError(proc.returncode, cmd, proc.stdout, proc.stderr)
        return proc

    def helm(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        if not self.helm_path:
            raise ControlPlaneError("no helm binary: run `make cluster-bins`")
        cmd = [self.helm_path, f"--kubeconfig={self.kubeconfig}", *map(str, args)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=self.env())
        if check and proc.returncode != 0:
            raise subprocess.CalledProcessError(proc.returncode, cmd, proc.stdout, proc.stderr)
        return proc

    def api_client(self, kubeconfig: str | None = None):
        """A fresh ``kubernetes.client.ApiClient`` for this cluster (admin unless ``kubeconfig``)."""
        from kubernetes import config

        return config.new_client_from_config(config_file=kubeconfig or self.kubeconfig)

    def token_kubeconfig(self, namespace: str, service_account: str, duration: str = "2h") -> str:
        """A kubeconfig that authenticates as a ServiceAccount with a bound token (TokenRequest API),
        e.g. to run the operator with exactly its RBAC."""
        token = self.kubectl("create", "token", service_account, "-n", namespace, f"--duration={duration}").stdout.strip()
        ca_pem = Path(self.ca_file).read_bytes() if self.ca_file else None
        if ca_pem is None:  # existing cluster: reuse its CA data
            raw = json.loads(self.kubectl("config", "view", "--minify", "--raw", "-o", "json").stdout)
            ca_pem = base64.b64decode(raw["clusters"][0]["cluster"].get("certificate-authority-data", ""))
        path = Path(self.workdir) / f"{namespace}-{service_account}-{secrets.token_hex(3)}.kubeconfig"
        path.write_text(_kubeconfig(self.server, ca_pem, {"token": token}, name=f"{namespace}-{service_account}"))
        return str(path)

    # ------------------------------------------------------------------ helpers for tests
    def new_namespace(self, prefix: str = "test", labels: dict[str, str] | None = None) -> str:
        """Create a namespace ``<prefix>-<random>`` and wait for its default ServiceAccount (pods need it)."""
        from kubernetes import client

        name = f"{prefix}-{secrets.token_hex(3)}"
        with self.api_client() as api:
            core = client.CoreV1Api(api)
            core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name, labels=labels)))
            self._namespaces.append(name)
            if "kube-controller-manager" not in self.missing_components:
                def has_default_sa():
                    core.read_namespaced_service_account("default", name)
                    return True
                self.wait_for(has_default_sa, 30, what=f"ServiceAccount {name}/default")
        return name

    def delete_namespace(self, name: str, wait: bool = False) -> None:
        self.kubectl("delete", "namespace", name, f"--wait={str(wait).lower()}", "--ignore-not-found")
        if name in self._namespaces:
            self._namespaces.remove(name)

    def crd_files(self, directory: str | Path = CRD_DIR) -> list[Path]:
        directory = Path(directory)
        return sorted(p for p in directory.glob("*.y*ml") if p.is_file()) if directory.is_dir() else []

    def apply_crds(self, directory: str | Path = CRD_DIR, timeout: float = 60) -> list[str]:
        """Server-side apply every CRD in ``directory`` (default deploy/crds) and wait until each is
        Established. Idempotent. Returns the CRD names (empty when there are no files). Every file is
        tried; when the apiserver refuses some, CrdApplyError names them and lists the applied ones."""
        import yaml

        applied: list[str] = []
        errors: dict[str, str] = {}
        for f in self.crd_files(directory):
            names = [doc["metadata"]["name"] for doc in yaml.safe_load_all(f.read_text())
                     if isinstance(doc, dict) and doc.get("kind") == "CustomResourceDefinition"]
            proc = self.kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=tinv-tests",
                                "-f", str(f), check=False)
            if proc.returncode != 0:
                errors[f.name] = proc.stderr.strip()
                continue
            applied += names
        if applied:
            # polled rather than `kubectl wait`, which fails ("accessor error") when it looks before the
            # CRD has any status
            def established() -> bool:
                items = self.get_json("crd", *applied)
                items = items.get("items", [items])
                return len(items) == len(applied) and all(
                    any(c.get("type") == "Established" and c.get("status") == "True"
                        for c in (item.get("status") or {}).get("conditions") or [])
                    for item in items)

            self.wait_for(established, timeout, interval=0.1, what=f"CRDs {', '.join(applied)} to be Established")
        if errors:
            raise CrdApplyError(applied, errors)
        return applied

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 30, interval: float = 0.2,
                 what: str = "condition") -> Any:
        """Poll ``predicate`` until truthy; on timeout raise TimeoutError with the components' log tails."""
        return wait_until(predicate, timeout, interval, what, on_timeout=lambda: self.diagnostics(15))

    def get_json(self, *args: str) -> dict[str, Any]:
        """``kubectl get ARGS -o json``, parsed."""
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    def create(self, manifest: dict[str, Any] | str, namespace: str | None = None) -> dict[str, Any]:
        """``kubectl create -f -`` of one manifest (dict or YAML/JSON text); returns the created object."""
        text = manifest if isinstance(manifest, str) else json.dumps(manifest)
        ns = ["-n", namespace] if namespace else []
        return json.loads(self.kubectl("create", *ns, "-f", "-", "-o", "json", input=text).stdout)

    def wait_for_job(self, namespace: str, name: str, conditions: Iterable[str] = ("Complete", "Failed"),
                     timeout: float = 90) -> dict[str, Any]:
        """Wait until the batch/v1 Job has one of ``conditions`` True; return the Job (JSON)."""
        wanted = set(conditions)

        def done():
            job = self.get_json("job", name, "-n", namespace)
            for c in job.get("status", {}).get("conditions") or []:
                if c.get("type") in wanted and c.get("status") == "True":
                    return job
            return None

        return self.wait_for(done, timeout, interval=0.3, what=f"Job {namespace}/{name} to be {'/'.join(wanted)}")

    def wait_for_pod_phase(self, namespace: str, name: str, phases: Iterable[str], timeout: float = 60) -> dict[str, Any]:
        wanted = set(phases)

        def reached():
            pod = self.get_json("pod", name, "-n", namespace)
            return pod if pod.get("status", {}).get("phase") in wanted else None

        return self.wait_for(reached, timeout, interval=0.2, what=f"pod {namespace}/{name} to be {'/'.join(wanted)}")

    def node(self, name: str) -> FakeNode:
        return next(n for n in self.nodes if n.name == name)

    def gpu_nodes(self, gpu_class: str | None = None, region: str | None = None) -> list[FakeNode]:
        return [n for n in self.nodes if n.gpus and (gpu_class is None or n.gpu_class == gpu_class)
                and (region is None or n.region == region)]

    def finish_pod(self, namespace: str, name: str, exit_code: int = 0, message: str | None = None) -> None:
        """Make a running fake pod exit: KWOK moves it to Succeeded (0) or Failed with that exit code."""
        annotations = {EXIT_CODE_ANNOTATION: str(exit_code)}
        if message is not None:
            annotations[MESSAGE_ANNOTATION] = message
        self.kubectl("annotate", "pod", name, "-n", namespace, "--overwrite",
                     *[f"{k}={v}" for k, v in annotations.items()])


def pod_annotations(exit_code: int | None = None, message: str | None = None,
                    run_for: str | None = None) -> dict[str, str]:
    """Pod(-template) annotations that steer KWOK: exit with ``exit_code`` (after ``run_for``, a Go
    duration such as "2s") and termination ``message``; with no exit code the pod stays Running."""
    out: dict[str, str] = {}
    if exit_code is not None:
        out[EXIT_CODE_ANNOTATION] = str(exit_code)
    if message is not None:
        out[MESSAGE_ANNOTATION] = message
    if run_for is not None:
        out[RUN_FOR_ANNOTATION] = run_for
    return out
