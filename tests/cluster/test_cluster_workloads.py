"""The harness runs real workloads: the Job controller, the scheduler, KWOK's fake GPU nodes and the
garbage collector all act, and tests can steer pods to succeed or fail."""

from __future__ import annotations

import json
import time

import pytest

from harness import GPU_CLASS_LABEL, GPU_RESOURCE, REGION_LABEL, pod_annotations

pytestmark = pytest.mark.cluster


def gpu_pod_spec(gpu_class: str | None = None, region: str | None = None, gpus: int = 0,
                 restart_policy: str = "Never") -> dict:
    """A pod spec that asks for GPUs and CoreWeave placement the way the operator will."""
    terms = []
    if gpu_class:
        terms.append({"key": GPU_CLASS_LABEL, "operator": "In", "values": [gpu_class]})
    if region:
        terms.append({"key": REGION_LABEL, "operator": "In", "values": [region]})
    spec: dict = {
        "restartPolicy": restart_policy,
        "automountServiceAccountToken": False,
        "containers": [{
            "name": "trainer",
            "image": "example.invalid/tinv-trainer:test",
            "resources": {"limits": {GPU_RESOURCE: str(gpus)}} if gpus else {},
        }],
    }
    if terms:
        spec["affinity"] = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": terms}]}}}
    return spec


def job(name: str, pod_spec: dict, annotations: dict | None = None, **job_spec) -> dict:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "template": {"metadata": {"annotations": annotations or {}}, "spec": pod_spec},
            **job_spec,
        },
    }


def job_pods(cp, ns: str, name: str) -> list[dict]:
    return cp.get_json("pods", "-n", ns, "-l", f"job-name={name}")["items"]


def test_fake_gpu_nodes_are_ready_with_coreweave_labels(workload_cluster):
    cp = workload_cluster
    nodes = {n["metadata"]["name"]: n for n in cp.get_json("nodes", "-l", "type=kwok")["items"]}
    assert set(nodes) == {n.name for n in cp.nodes}
    for fake in cp.nodes:
        node = nodes[fake.name]
        labels = node["metadata"]["labels"]
        assert labels[REGION_LABEL] == fake.region
        assert labels.get(GPU_CLASS_LABEL) == fake.gpu_class
        ready = [c for c in node["status"]["conditions"] if c["type"] == "Ready"]
        assert ready and ready[0]["status"] == "True", ready
        assert node["status"]["allocatable"].get(GPU_RESOURCE, "0") == str(fake.gpus)
        assert not node["spec"].get("taints"), f"{fake.name} is tainted: {node['spec'].get('taints')}"
    classes = {n.gpu_class for n in cp.nodes if n.gpus}
    assert {"A100_PCIE_80GB", "A40", "RTX_A6000"} <= classes
    assert any(not n.gpus for n in cp.nodes), "a CPU-only node is part of the default set"
    # kubectl shows them the way a CoreWeave user would look at them
    out = cp.kubectl("get", "nodes", "-L", GPU_CLASS_LABEL, "-L", REGION_LABEL).stdout
    assert "A100_PCIE_80GB" in out and "ORD1" in out and "LAS1" in out


def test_job_pods_are_scheduled_onto_the_matching_gpu_nodes_and_finish(workload_cluster, namespace):
    cp, ns = workload_cluster, namespace
    a100 = {n.name for n in cp.gpu_nodes("A100_PCIE_80GB", "ORD1")}
    # 2 pods x 6 GPUs: the two A100 nodes have 8 GPUs each, so the pods must land on different nodes
    cp.create(job("a100", gpu_pod_spec("A100_PCIE_80GB", "ORD1", gpus=6), pod_annotations(exit_code=0, run_for="1s"),
                  parallelism=2, completions=2, backoffLimit=0), ns)
    done = cp.wait_for_job(ns, "a100")
    assert any(c["type"] == "Complete" for c in done["status"]["conditions"]), done["status"]
    assert done["status"]["succeeded"] == 2
    pods = job_pods(cp, ns, "a100")
    assert len(pods) == 2
    assert {p["spec"]["nodeName"] for p in pods} == a100
    for p in pods:
        assert p["status"]["phase"] == "Succeeded"
        state = p["status"]["containerStatuses"][0]["state"]["terminated"]
        assert state["exitCode"] == 0 and state["reason"] == "Completed"

    cp.create(job("a40", gpu_pod_spec("A40", gpus=1), pod_annotations(exit_code=0)), ns)
    cp.wait_for_job(ns, "a40", conditions=("Complete",))
    assert [p["spec"]["nodeName"] for p in job_pods(cp, ns, "a40")] == [n.name for n in cp.gpu_nodes("A40")]


def test_pods_stay_pending_when_no_node_fits(workload_cluster, namespace):
    cp, ns = workload_cluster, namespace
    cp.create({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "no-such-class"},
               "spec": gpu_pod_spec("H100_NVLINK_80GB", gpus=1)}, ns)
    cp.create({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "too-many-gpus"},
               "spec": gpu_pod_spec("A100_PCIE_80GB", gpus=16)}, ns)

    def unschedulable(name):
        def check():
            pod = cp.get_json("pod", name, "-n", ns)
            for c in pod["status"].get("conditions") or []:
                if c["type"] == "PodScheduled" and c["status"] == "False" and c.get("reason") == "Unschedulable":
                    return pod
        return check

    pod = cp.wait_for(unschedulable("no-such-class"), 30, what="no-such-class to be Unschedulable")
    assert pod["status"]["phase"] == "Pending" and not pod["spec"].get("nodeName")
    msg = next(c["message"] for c in pod["status"]["conditions"] if c["type"] == "PodScheduled")
    assert "node affinity" in msg, msg
    pod = cp.wait_for(unschedulable("too-many-gpus"), 30, what="too-many-gpus to be Unschedulable")
    msg = next(c["message"] for c in pod["status"]["conditions"] if c["type"] == "PodScheduled")
    assert f"Insufficient {GPU_RESOURCE}" in msg, msg
    time.sleep(2)
    assert cp.get_json("pod", "too-many-gpus", "-n", ns)["status"]["phase"] == "Pending"


def test_pods_stay_running_until_told_to_exit(workload_cluster, namespace):
    cp, ns = workload_cluster, namespace
    cp.create({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "worker"},
               "spec": gpu_pod_spec("RTX_A6000", "LGA1", gpus=2)}, ns)
    pod = cp.wait_for_pod_phase(ns, "worker", ["Running"])
    assert pod["spec"]["nodeName"] == cp.gpu_nodes("RTX_A6000")[0].name
    assert pod["status"]["podIP"]
    ready = next(c for c in pod["status"]["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True"
    time.sleep(3)
    assert cp.get_json("pod", "worker", "-n", ns)["status"]["phase"] == "Running"

    summary = json.dumps({"step": 10, "checkpoint": "0c7f6f5e"})
    cp.finish_pod(ns, "worker", exit_code=3, message=summary)
    pod = cp.wait_for_pod_phase(ns, "worker", ["Succeeded", "Failed"])
    assert pod["status"]["phase"] == "Failed"
    term = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert term["exitCode"] == 3 and term["reason"] == "Error"
    assert json.loads(term["message"]) == {"step": 10, "checkpoint": "0c7f6f5e"}


def test_job_backoff_limit_retries_failed_pods(workload_cluster, namespace):
    cp, ns = workload_cluster, namespace
    cp.create(job("flaky", gpu_pod_spec(gpus=1), pod_annotations(exit_code=1, message="CUDA error"),
                  backoffLimit=1), ns)
    done = cp.wait_for_job(ns, "flaky", timeout=120)
    failed = next(c for c in done["status"]["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "BackoffLimitExceeded", failed
    assert done["status"]["failed"] == 2
    pods = job_pods(cp, ns, "flaky")
    assert len(pods) == 2 and all(p["status"]["phase"] == "Failed" for p in pods)


def test_job_pod_failure_policy_on_exit_codes(workload_cluster, namespace):
    cp, ns = workload_cluster, namespace
    policy = {"rules": [{"action": "FailJob", "onExitCodes": {"containerName": "trainer", "operator": "In",
                                                              "values": [42]}}]}
    cp.create(job("bad-config", gpu_pod_spec(gpus=1), pod_annotations(exit_code=42, message="invalid spec"),
                  backoffLimit=5, podFailurePolicy=policy), ns)
    done = cp.wait_for_job(ns, "bad-config", timeout=60)
    failed = next(c for c in done["status"]["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "PodFailurePolicy", failed
    assert "42" in failed["message"]
    assert len(job_pods(cp, ns, "bad-config")) == 1, "FailJob must not retry"


def test_indexed_job_runs_every_index(workload_cluster, namespace):
    cp, ns = workload_cluster, namespace
    cp.create(job("shards", gpu_pod_spec("A100_PCIE_80GB", gpus=1), pod_annotations(exit_code=0),
                  completionMode="Indexed", completions=3, parallelism=3), ns)
    done = cp.wait_for_job(ns, "shards", conditions=("Complete",))
    assert done["status"]["succeeded"] == 3
    assert done["status"].get("completedIndexes") == "0-2"
    indexes = sorted(p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]
                     for p in job_pods(cp, ns, "shards"))
    assert indexes == ["0", "1", "2"]


def test_deleting_an_owner_garbage_collects_its_children(workload_cluster, namespace):
    cp, ns = workload_cluster, namespace
    # a running Job: deleting it (background propagation, kubectl's default) must remove its pods
    cp.create(job("long", gpu_pod_spec("A40", gpus=1), parallelism=2, completions=2), ns)
    cp.wait_for(lambda: len([p for p in job_pods(cp, ns, "long") if p["status"].get("phase") == "Running"]) == 2,
                60, what="two running pods")
    cp.kubectl("delete", "job", "long", "-n", ns, "--wait=false")
    cp.wait_for(lambda: not job_pods(cp, ns, "long"), 60, what="the Job's pods to be garbage-collected")

    # plain owner references between core objects
    owner = cp.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "owner"}}, ns)
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner["metadata"]["uid"],
           "controller": True, "blockOwnerDeletion": True}
    cp.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "child", "ownerReferences": [ref]},
               "stringData": {"k": "v"}}, ns)
    cp.kubectl("delete", "configmap", "owner", "-n", ns, "--cascade=foreground", "--wait=true", "--timeout=60s")
    cp.wait_for(lambda: cp.kubectl("get", "secret", "child", "-n", ns, check=False).returncode != 0, 30,
                what="the child Secret to be garbage-collected")


def test_ttl_after_finished_deletes_the_job(workload_cluster, namespace):
    cp, ns = workload_cluster, namespace
    cp.create(job("short-lived", gpu_pod_spec(), pod_annotations(exit_code=0), ttlSecondsAfterFinished=1), ns)
    cp.wait_for(lambda: cp.kubectl("get", "job", "short-lived", "-n", ns, check=False).returncode != 0, 60,
                what="the ttl-after-finished controller to delete the Job")
    cp.wait_for(lambda: not job_pods(cp, ns, "short-lived"), 60, what="its pods to go too")


def test_suspended_job_creates_no_pods_until_resumed(workload_cluster, namespace):
    cp, ns = workload_cluster, namespace
    cp.create(job("queued", gpu_pod_spec(gpus=1), pod_annotations(exit_code=0), suspend=True), ns)
    time.sleep(2)
    assert job_pods(cp, ns, "queued") == []
    cp.kubectl("patch", "job", "queued", "-n", ns, "--type=merge", "-p", '{"spec":{"suspend":false}}')
    cp.wait_for_job(ns, "queued", conditions=("Complete",))
