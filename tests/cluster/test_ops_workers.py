"""Two workers (an Indexed Job, 2 pods) really train together through `tinv.trainer.launch`, and the
trainer's exit code reaches the Job's podFailurePolicy: a bad input (exit 2) fails the Job at once
instead of being retried backoffLimit times (under torchrun every failure was exit 1).

The pods' commands run for real on this machine (the node agent, tests/harness/nodeagent.py),
both at once, as two pods on two nodes would; the headless Service's DNS name of pod 0 is this
machine's loopback here.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from cluster.operator_helpers import OperatorProcess, get, tijob, wait
from harness.nodeagent import NodeAgent
from harness.procs import free_port_pair

pytestmark = [pytest.mark.cluster, pytest.mark.e2e, pytest.mark.slow]


class ConcurrentAgent(NodeAgent):
    """Runs every pod as soon as it is Running, each in its own thread (the workers of one Job
    must run at the same time to meet at the rendezvous)."""

    def _env(self, pod, container):
        env = super()._env(pod, container)
        if "MASTER_ADDR" in env:
            env["MASTER_ADDR"] = "127.0.0.1"  # <job>-0.<job> resolves to pod 0; pod 0 is on this machine
        return env

    def serve(self, selector: str, stop: threading.Event, interval: float = 0.5) -> None:
        started: set[str] = set()
        while not stop.is_set():
            for name in self.running_pods(selector):
                if name not in started:
                    started.add(name)
                    threading.Thread(target=self.run_pod, args=(name,), daemon=True).start()
            stop.wait(interval)


@pytest.fixture
def env(workload_cluster, tinv_crds, tmp_path):
    cp = workload_cluster
    ns = cp.new_namespace("ops-workers")
    store = tmp_path / "runs"
    op = OperatorProcess(cp, [ns], tmp_path / "op", storage_uri=f"file://{store}",
                         extra=["--master-port", str(free_port_pair()), "--termination-grace-seconds", "5"])
    agent = ConcurrentAgent(cp, ns, tmp_path / "node", timeout=600)
    stop = threading.Event()
    thread = threading.Thread(target=agent.serve, args=("tinv.io/kind", stop), daemon=True)
    with op:
        thread.start()
        try:
            yield cp, ns, store, op, agent
        finally:
            stop.set()
            thread.join(30)
    cp.delete_namespace(ns)


def _job(name: str, images: str) -> dict:
    doc = tijob(name, images, gpus=0, gpu_class=None, region=None, workers=2, steps=4, checkpoint_every=2, kept=2)
    doc["spec"]["training"].update({"batchSize": 1, "gradientAccumulation": 1, "resolution": 64, "logEvery": 1, "mixedPrecision": "no"})
    doc["spec"]["runPolicy"] = {"backoffLimit": 3}
    return doc


def _diag(cp, ns, op, agent) -> str:
    runs = "\n".join(f"--- pod {r.name} exit {r.exit_code}\n{r.log[-2500:]}" for r in agent.runs)
    return cp.kubectl("get", "tijobs,jobs,pods", "-n", ns, "-o", "wide", check=False).stdout + op.logs(60) + runs


def test_two_workers_train_together(env, tmp_path):
    cp, ns, store, op, agent = env
    from tinv.trainer.samples import write_samples

    images = tmp_path / "images"
    write_samples(images, count=4, size=64)
    cp.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(_job("pair", str(images))))
    done = wait(cp, lambda: (s := get(cp, "tijob", ns, "pair").get("status") or {}).get("phase") in ("Succeeded", "Failed") and s,
                timeout=420, what="the 2-worker job to finish", op=op)
    assert done["phase"] == "Succeeded", _diag(cp, ns, op, agent)
    runs = sorted(agent.runs, key=lambda r: r.name)
    assert len(runs) == 2 and [r.exit_code for r in runs] == [0, 0], _diag(cp, ns, op, agent)
    latest = done["latestCheckpoint"]
    manifest = json.loads((Path(latest["uri"].removeprefix("file://")) / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["step"] == 4


def test_bad_input_on_two_workers_fails_the_job_without_retries(env, tmp_path):
    cp, ns, store, op, agent = env
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "x.png").write_text("not an image")
    cp.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(_job("bad", str(junk))))
    done = wait(cp, lambda: (s := get(cp, "tijob", ns, "bad").get("status") or {}).get("phase") in ("Succeeded", "Failed") and s,
                timeout=300, what="the bad job to fail", op=op)
    assert done["phase"] == "Failed", _diag(cp, ns, op, agent)
    job = cp.get_json("job", "bad-train", "-n", ns)
    reasons = {c["type"]: c.get("reason") for c in job["status"].get("conditions") or []}
    assert reasons.get("Failed") == "PodFailurePolicy", (reasons, _diag(cp, ns, op, agent))  # FailJob on exit 2
    assert {r.exit_code for r in agent.runs} == {2} and len(agent.runs) <= 2, _diag(cp, ns, op, agent)
    assert "no usable images" in " ".join(r.message + r.log for r in agent.runs)
