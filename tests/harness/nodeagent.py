"""A test "node agent": runs a scheduled pod's container command for real, on this machine.

KWOK pretends to be the kubelet for fake GPU nodes: it moves pods to Running but runs nothing.
For end-to-end tests this agent does the kubelet's remaining job for one container: it builds
the container's environment exactly as the pod spec says (plain values, `secretKeyRef` and
`configMapKeyRef` read from the API like the kubelet would, `envFrom`, downward-API `fieldRef`
such as the Job completion index), materialises its volumes (ConfigMaps, downward-API files such
as the resource document, Secrets, emptyDirs, PVCs) in a scratch folder and maps their mount paths
there, expands `$(VAR)` references, runs the command, and then finishes the pod through KWOK with
the real exit code and the real termination message. A missing Secret or key fails the container the way the kubelet would
(CreateContainerConfigError), so the operator's reaction to it is real too.
"""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .controlplane import ControlPlane

_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


@dataclass
class PodRun:
    name: str
    exit_code: int
    message: str
    log: str
    seconds: float


class ContainerConfigError(RuntimeError):
    """What the kubelet reports as CreateContainerConfigError (e.g. a missing Secret)."""


@dataclass
class NodeAgent:
    cp: ControlPlane
    namespace: str
    workdir: Path
    #: prepended to PATH so the pod's `tinv` / `torchrun` are this checkout's
    bin_dir: Path = Path(sys.executable).parent
    timeout: float = 600
    runs: list[PodRun] = field(default_factory=list)

    # ------------------------------------------------------------------ API reads
    def _get(self, kind: str, name: str) -> dict[str, Any] | None:
        r = self.cp.kubectl("get", kind, name, "-n", self.namespace, "-o", "json", check=False)
        if r.returncode != 0:
            return None
        import json

        return json.loads(r.stdout)

    def _secret(self, name: str) -> dict[str, str]:
        obj = self._get("secret", name)
        if obj is None:
            raise ContainerConfigError(f'secret "{name}" not found')
        return {k: base64.b64decode(v).decode() for k, v in (obj.get("data") or {}).items()}

    def _referenced_secret(self, ref: dict[str, Any]) -> dict[str, str] | None:
        """A referenced Secret's data; None when it is missing and the reference is optional."""
        try:
            return self._secret(ref["name"])
        except ContainerConfigError:
            if ref.get("optional"):
                return None
            raise

    def _configmap(self, name: str) -> dict[str, str]:
        obj = self._get("configmap", name)
        if obj is None:
            raise ContainerConfigError(f'configmap "{name}" not found')
        return dict(obj.get("data") or {})

    # ------------------------------------------------------------------ kubelet work
    def _field(self, pod: dict[str, Any], path: str) -> str:
        m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
        if m:
            return pod["metadata"].get(m.group(1), {}).get(m.group(2), "")
        node: Any = pod
        for part in path.split("."):
            node = node.get(part, "") if isinstance(node, dict) else ""
        return str(node)

    def _env(self, pod: dict[str, Any], container: dict[str, Any]) -> dict[str, str]:
        env: dict[str, str] = {}
        for src in container.get("envFrom") or []:
            prefix = src.get("prefix", "")
            if "secretRef" in src:
                data = self._referenced_secret(src["secretRef"])
                if data is None:
                    continue
            else:
                data = self._configmap(src["configMapRef"]["name"])
            env.update({prefix + k: v for k, v in data.items()})
        for item in container.get("env") or []:
            name = item["name"]
            if "value" in item:
                env[name] = _VAR.sub(lambda m: env.get(m.group(1), m.group(0)), item["value"])
                continue
            source = item.get("valueFrom", {})
            if "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                data = self._referenced_secret(ref)
                if data is None:
                    continue
                if ref["key"] not in data:
                    if ref.get("optional"):
                        continue
                    raise ContainerConfigError(f"couldn't find key {ref['key']} in Secret {self.namespace}/{ref['name']}")
                env[name] = data[ref["key"]]
            elif "configMapKeyRef" in source:
                ref = source["configMapKeyRef"]
                env[name] = self._configmap(ref["name"]).get(ref["key"], "")
            elif "fieldRef" in source:
                env[name] = self._field(pod, source["fieldRef"]["fieldPath"])
            elif "resourceFieldRef" in source:
                env[name] = "1"
        return env

    def _volumes(self, pod: dict[str, Any], container: dict[str, Any], root: Path) -> dict[str, Path]:
        """Materialise volumes; return mountPath -> local folder (or file, for subPath mounts)."""
        local: dict[str, Path] = {}
        for vol in pod["spec"].get("volumes") or []:
            target = root / "volumes" / vol["name"]
            target.mkdir(parents=True, exist_ok=True)
            if "configMap" in vol:
                data = self._configmap(vol["configMap"]["name"])
                items = vol["configMap"].get("items") or [{"key": k, "path": k} for k in data]
                for item in items:
                    (target / item["path"]).write_text(data[item["key"]])
            elif "downwardAPI" in vol:  # fieldRef items, as env vars read them (the pod's labels, annotations)
                for item in vol["downwardAPI"].get("items") or []:
                    (target / item["path"]).write_text(self._field(pod, item["fieldRef"]["fieldPath"]))
            elif "secret" in vol:
                data = self._secret(vol["secret"]["secretName"])
                for key, value in data.items():
                    (target / key).write_text(value)
            elif "persistentVolumeClaim" in vol:
                claim = self.workdir / "pvc" / vol["persistentVolumeClaim"]["claimName"]
                claim.mkdir(parents=True, exist_ok=True)
                target.rmdir()
                target.symlink_to(claim)
            local[vol["name"]] = target
        mounts: dict[str, Path] = {}
        for m in container.get("volumeMounts") or []:
            path = local[m["name"]]
            mounts[m["mountPath"]] = path / m["subPath"] if m.get("subPath") else path
        return mounts

    @staticmethod
    def _rewrite(text: str, mounts: dict[str, Path]) -> str:
        """Map container paths under a mount to the local folder, in one pass (a local folder may
        itself lie under a mount path such as /tmp, so replacing mounts one by one would nest)."""
        if not mounts:
            return text
        alternatives = "|".join(re.escape(m) for m in sorted(mounts, key=len, reverse=True))
        pattern = re.compile(rf"(?<![\w/.])({alternatives})(?=/|$|\s|[\"':;,])")
        return pattern.sub(lambda m: str(mounts[m.group(1)]), text)

    def run_pod(self, name: str) -> PodRun:
        """Run one Running pod's first container to completion and finish the pod with its result."""
        started = time.monotonic()
        pod = self._get("pod", name)
        assert pod is not None, f"pod {name} vanished"
        container = pod["spec"]["containers"][0]
        root = self.workdir / "pods" / name
        root.mkdir(parents=True, exist_ok=True)
        try:
            env = self._env(pod, container)
            mounts = self._volumes(pod, container, root)
        except ContainerConfigError as err:
            run = PodRun(name, 1, f"CreateContainerConfigError: {err}", "", time.monotonic() - started)
            self.runs.append(run)
            self.cp.finish_pod(self.namespace, name, exit_code=1, message=run.message)
            return run
        term_path = container.get("terminationMessagePath", "/dev/termination-log")
        term_local = root / "termination-log"
        mounts[term_path] = term_local
        env = {k: self._rewrite(v, mounts) for k, v in env.items()}
        argv = [*(container.get("command") or []), *(container.get("args") or [])]
        argv = [self._rewrite(_VAR.sub(lambda m: env.get(m.group(1), m.group(0)), a), mounts) for a in argv]
        full_env = {
            "PATH": f"{self.bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "HOME": str(root / "home"),
            "LANG": "C.UTF-8",
            "PYTHONUNBUFFERED": "1",
            "TINV_TERMINATION_MESSAGE_PATH": str(term_local),
            **env,
        }
        workdir = container.get("workingDir")
        cwd = Path(self._rewrite(workdir, mounts)) if workdir else root
        cwd.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(argv, env=full_env, cwd=cwd, capture_output=True, text=True, timeout=self.timeout)
        log = proc.stdout + proc.stderr
        (root / "log.txt").write_text(log)
        message = term_local.read_text() if term_local.exists() else ""
        if not message and proc.returncode != 0 and container.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            message = "\n".join(log.splitlines()[-80:])[-4096:]
        run = PodRun(name, proc.returncode, message, log, time.monotonic() - started)
        self.runs.append(run)
        self.cp.finish_pod(self.namespace, name, exit_code=proc.returncode, message=message[:4096] or None)
        return run

    # ------------------------------------------------------------------ the loop
    def running_pods(self, selector: str) -> list[str]:
        import json

        r = self.cp.kubectl("get", "pods", "-n", self.namespace, "-l", selector, "-o", "json")
        done = {run.name for run in self.runs}
        return [
            p["metadata"]["name"]
            for p in json.loads(r.stdout)["items"]
            if p.get("status", {}).get("phase") == "Running" and p["metadata"]["name"] not in done
            and not p["metadata"].get("deletionTimestamp")
        ]

    def serve(self, selector: str, stop: threading.Event, interval: float = 0.5) -> None:
        """Run every pod matching `selector` as it starts Running, until `stop` is set."""
        while not stop.is_set():
            for name in self.running_pods(selector):
                self.run_pod(name)
            stop.wait(interval)
