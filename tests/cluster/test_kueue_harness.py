"""The harness's real Kueue admits batch/v1 Jobs by quota: a queued Job created suspended is admitted
and unsuspended by Kueue; one that does not fit the ClusterQueue's quota stays suspended with Kueue's
pending reason on its Workload."""

from __future__ import annotations

import json
import re
import time

import pytest

from harness import GPU_CLASS_LABEL, GPU_RESOURCE
from harness.kueue import QUEUE_LABEL, cluster_queue, local_queue, resource_flavor

pytestmark = pytest.mark.cluster


def queued_gpu_job(name: str, queue: str, gpus: int) -> dict:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "labels": {QUEUE_LABEL: queue}},
        "spec": {
            "suspend": True,
            "backoffLimit": 0,
            "template": {"spec": {
                "restartPolicy": "Never",
                "automountServiceAccountToken": False,
                "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                    {"matchExpressions": [{"key": GPU_CLASS_LABEL, "operator": "In", "values": ["A100_PCIE_80GB"]}]}]}}},
                "containers": [{"name": "trainer", "image": "example.invalid/tinv-trainer:test",
                                "resources": {"limits": {GPU_RESOURCE: str(gpus)}}}],
            }},
        },
    }


def condition(obj: dict, type_: str) -> dict:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c.get("type") == type_), {})


@pytest.fixture
def gpu_queue(workload_cluster, kueue, namespace):
    """ResourceFlavor + ClusterQueue (8 nvidia.com/gpu) + LocalQueue ``lq`` in the test's namespace."""
    cp = workload_cluster
    flavor, cq = f"gpu-{namespace}", f"cq-{namespace}"
    for obj in (resource_flavor(flavor), cluster_queue(cq, flavor, {GPU_RESOURCE: 8}), local_queue(namespace, "lq", cq)):
        cp.create(obj)
    cp.wait_for(lambda: condition(cp.get_json(f"clusterqueues.kueue.x-k8s.io", cq), "Active").get("status") == "True",
                30, what=f"ClusterQueue {cq} to be Active")
    yield "lq"
    cp.kubectl("delete", "jobs", "--all", "-n", namespace, "--wait=true", "--cascade=foreground", check=False, timeout=60)
    cp.kubectl("delete", "clusterqueue", cq, "--ignore-not-found", "--wait=false", check=False)
    cp.kubectl("delete", "resourceflavor", flavor, "--ignore-not-found", "--wait=false", check=False)


def test_kueue_admits_within_quota_and_holds_the_rest(workload_cluster, kueue, namespace, gpu_queue):
    cp = workload_cluster
    cp.create(queued_gpu_job("first", gpu_queue, 8), namespace)

    # admitted: Kueue unsuspends the Job, the Job controller creates the pod, KWOK runs it
    def admitted():
        wl = kueue.workload_of(namespace, "first")
        job = cp.get_json("job", "first", "-n", namespace)
        return wl if wl and condition(wl, "Admitted").get("status") == "True" and job["spec"].get("suspend") is False else None

    wl = cp.wait_for(admitted, 60, what="Kueue to admit Job first")
    assert wl["status"]["admission"]["clusterQueue"] == f"cq-{namespace}"
    pod = cp.wait_for(lambda: next(iter(cp.get_json("pods", "-n", namespace, "-l", "job-name=first")["items"]), None),
                      30, what="the pod of Job first")
    cp.wait_for_pod_phase(namespace, pod["metadata"]["name"], ["Running"])

    # the second 8-GPU Job does not fit: it stays suspended, its Workload says why
    cp.create(queued_gpu_job("second", gpu_queue, 8), namespace)

    def pending():
        wl = kueue.workload_of(namespace, "second")
        qr = condition(wl or {}, "QuotaReserved")
        return wl if qr.get("status") == "False" and qr.get("reason") == "Pending" else None

    wl2 = cp.wait_for(pending, 60, what="Job second's Workload to be pending")
    assert re.search(r"insufficient (unused )?quota for nvidia.com/gpu", condition(wl2, "QuotaReserved")["message"]), json.dumps(wl2["status"])
    time.sleep(3)  # Kueue had every chance to act
    job2 = cp.get_json("job", "second", "-n", namespace)
    assert job2["spec"]["suspend"] is True
    assert not cp.get_json("pods", "-n", namespace, "-l", "job-name=second")["items"]
    assert condition(kueue.workload_of(namespace, "second"), "Admitted").get("status") != "True"
