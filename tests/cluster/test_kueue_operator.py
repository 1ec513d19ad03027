"""The operator follows Kueue's contract, against the harness's real Kueue controller (tests/harness/kueue.py)
with a ClusterQueue of 8 fake GPUs: Kueue admits queued Jobs (the operator never writes suspend: false on
one), runPolicy.suspend stops a queued Job by deactivating its Workload and resuming reactivates it, quota
is respected, pre-emption shows on the pre-empted resource, and the Workload's admission is in the status."""

from __future__ import annotations

import time

import pytest

from harness import GPU_RESOURCE
from harness.kueue import cluster_queue, local_queue, resource_flavor
from operator_helpers import OpEnv, close_env, condition, make_env, tijob
from tinv.api.models import ConditionType as C
from tinv.api.models import Reason as R

pytestmark = pytest.mark.cluster

A100 = "A100_PCIE_80GB"


@pytest.fixture(scope="module")
def env(control_plane, kueue, tmp_path_factory):
    e = make_env(control_plane, tmp_path_factory, "kueue-op")
    yield e
    close_env(e)


@pytest.fixture
def queue(env: OpEnv, kueue, request):
    """A ResourceFlavor, a ClusterQueue with 8 nvidia.com/gpu (pre-emption of lower priorities within it)
    and a LocalQueue for it in the operator's namespace; all removed afterwards with the test's resources."""
    cp = env.cp
    tag = f"{env.ns}-{request.node.name.replace('_', '-')}"[:55].rstrip("-")
    flavor, cq, lq = f"rf-{tag}", f"cq-{tag}", f"lq-{request.node.name.replace('_', '-')}"[:60].rstrip("-")
    created = [resource_flavor(flavor),
               cluster_queue(cq, flavor, {GPU_RESOURCE: 8}, preemption={"withinClusterQueue": "LowerPriority"}),
               local_queue(env.ns, lq, cq)]
    for obj in created:
        cp.create(obj)
    cp.wait_for(lambda: condition(cp.get_json("clusterqueues.kueue.x-k8s.io", cq), "Active").get("status") == "True",
                30, what=f"ClusterQueue {cq} to be Active")
    yield lq
    cp.kubectl("delete", "tijob", "--all", "-n", env.ns, "--wait=true", timeout=120, check=False)
    cp.kubectl("delete", "jobs", "--all", "-n", env.ns, "--wait=true", timeout=120, check=False)
    cp.kubectl("delete", "localqueue", lq, "-n", env.ns, "--ignore-not-found", "--wait=false", check=False)
    cp.kubectl("delete", "clusterqueue", cq, "--ignore-not-found", "--wait=false", check=False)
    cp.kubectl("delete", "resourceflavor", flavor, "--ignore-not-found", "--wait=false", check=False)


def queued(name: str, queue: str, gpus: int = 8, **kw) -> dict:
    resources = {"queueName": queue, **kw.pop("resources", {})}
    return tijob(name, gpus=gpus, gpu_class=A100, region=None, resources=resources, **kw)


def job_of(env: OpEnv, name: str) -> dict:
    """The child Job, with its managedFields (kubectl hides them by default)."""
    return env.cp.get_json("job", f"{name}-train", "-n", env.ns, "--show-managed-fields")


def suspend_owner(job: dict) -> str | None:
    """The field manager that last wrote the Job's spec.suspend (server-side field ownership)."""
    for entry in job["metadata"].get("managedFields") or []:
        if "f:suspend" in ((entry.get("fieldsV1") or {}).get("f:spec") or {}):
            return entry.get("manager")
    return None


def assert_unsuspended_by_kueue(job: dict) -> None:
    assert job["spec"]["suspend"] is False
    owner = suspend_owner(job)
    assert owner and owner.startswith("kueue"), f"spec.suspend last written by {owner!r}, not by Kueue"


def holds(check, seconds: float, interval: float = 0.5) -> None:
    """``check()`` must keep passing for ``seconds`` (it raises AssertionError otherwise)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        check()
        time.sleep(interval)


def _running(env: OpEnv, name: str, timeout: float = 90) -> dict:
    return env.wait_status("tijob", name, lambda s: s.get("phase") == "Running", timeout, "Running")


def test_queued_job_is_admitted_by_kueue_and_status_shows_its_workload(env: OpEnv, kueue, queue):
    env.create(queued("adm", queue))
    obj = env.wait_status("tijob", "adm", lambda s: s.get("phase") == "Running"
                          and condition({"status": s}, C.ADMITTED).get("status") == "True", 90, "Running and Admitted")
    wl = kueue.workload_of(env.ns, "adm-train")
    assert wl is not None
    admitted, reserved = condition(obj, C.ADMITTED), condition(obj, C.QUOTA_RESERVED)
    assert wl["metadata"]["name"] in admitted["message"] and wl["status"]["admission"]["clusterQueue"] in admitted["message"]
    assert reserved["status"] == "True"
    assert_unsuspended_by_kueue(job_of(env, "adm"))


def test_suspend_deactivates_the_workload_and_stays_suspended_then_resume_reactivates(env: OpEnv, kueue, queue):
    env.create(queued("pause", queue))
    _running(env, "pause")
    env.patch("tijob", "pause", {"spec": {"runPolicy": {"suspend": True}}})
    env.wait_status("tijob", "pause", lambda s: s.get("phase") == "Suspended", 60, "Suspended")
    env.wait(lambda: not env.running_pods("pause-train"), 60, "pods gone")

    def still_suspended():
        st = env.status("tijob", "pause")
        assert st.get("phase") == "Suspended", st
        assert job_of(env, "pause")["spec"]["suspend"] is True
        assert not env.running_pods("pause-train")

    holds(still_suspended, 12)  # Kueue had every chance to unsuspend it again
    wl = kueue.workload_of(env.ns, "pause-train")
    assert wl["spec"]["active"] is False
    assert condition(env.get("tijob", "pause"), C.SUSPENDED)["reason"] == R.SUSPENDED_BY_USER

    env.patch("tijob", "pause", {"spec": {"runPolicy": {"suspend": False}}})
    obj = env.wait_status("tijob", "pause", lambda s: s.get("phase") == "Running"
                          and condition({"status": s}, C.ADMITTED).get("status") == "True", 90, "Running again")
    assert kueue.workload_of(env.ns, "pause-train")["spec"]["active"] is True
    assert condition(obj, C.SUSPENDED)["reason"] == R.RESUMED
    assert_unsuspended_by_kueue(job_of(env, "pause"))


def test_created_suspended_is_not_admitted_until_resumed(env: OpEnv, kueue, queue):
    env.create(queued("cold", queue, run_policy={"suspend": True}))
    env.wait_status("tijob", "cold", lambda s: s.get("phase") == "Suspended", 60, "Suspended")

    def never_started():
        assert env.status("tijob", "cold").get("phase") == "Suspended"
        assert job_of(env, "cold")["spec"]["suspend"] is True
        assert not env.pods("cold-train")

    holds(never_started, 10)
    env.patch("tijob", "cold", {"spec": {"runPolicy": {"suspend": False}}})
    env.wait_status("tijob", "cold", lambda s: s.get("phase") == "Running"
                    and condition({"status": s}, C.ADMITTED).get("status") == "True", 90, "Running")
    assert_unsuspended_by_kueue(job_of(env, "cold"))


def test_quota_is_respected_and_the_pending_reason_shown(env: OpEnv, kueue, queue):
    env.create(queued("first", queue))
    _running(env, "first")
    env.create(queued("second", queue))
    obj = env.wait_status("tijob", "second", lambda s: condition({"status": s}, C.QUOTA_RESERVED).get("status") == "False"
                          and condition({"status": s}, C.QUOTA_RESERVED).get("reason") == "Pending", 60, "pending in Kueue")
    wl = kueue.workload_of(env.ns, "second-train")
    reserved = condition(obj, C.QUOTA_RESERVED)
    assert wl["metadata"]["name"] in reserved["message"] and "quota for nvidia.com/gpu" in reserved["message"]
    assert obj["status"]["phase"] == "Pending"
    assert condition(obj, C.RUNNING)["reason"] == R.QUEUED and "quota for nvidia.com/gpu" in condition(obj, C.RUNNING)["message"]

    # suspending and resuming the waiting one must not let it past the quota
    env.patch("tijob", "second", {"spec": {"runPolicy": {"suspend": True}}})
    env.wait_status("tijob", "second", lambda s: s.get("phase") == "Suspended", 60, "Suspended")
    env.patch("tijob", "second", {"spec": {"runPolicy": {"suspend": False}}})

    def one_at_a_time():
        assert not env.pods("second-train"), "the second Job got pods past the ClusterQueue's quota"
        assert job_of(env, "second")["spec"]["suspend"] is True
        assert env.status("tijob", "first").get("phase") == "Running"

    holds(one_at_a_time, 12)
    assert env.status("tijob", "second").get("phase") == "Pending"

    # quota frees up: Kueue admits the second one
    env.cp.kubectl("delete", "tijob", "first", "-n", env.ns, "--wait=true", timeout=60)
    env.wait_status("tijob", "second", lambda s: s.get("phase") == "Running", 120, "Running after the first is gone")
    assert_unsuspended_by_kueue(job_of(env, "second"))


def test_preemption_by_a_higher_priority_workload_shows_on_the_resource(env: OpEnv, kueue, queue):
    cp = env.cp
    low, high = f"{env.ns}-low", f"{env.ns}-high"
    for name, value in ((low, 100), (high, 1000)):
        cp.create({"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass", "metadata": {"name": name}, "value": value})
    try:
        env.create(queued("victim", queue, resources={"priorityClassName": low}))
        _running(env, "victim")
        env.create(queued("urgent", queue, resources={"priorityClassName": high}))
        env.wait_status("tijob", "urgent", lambda s: s.get("phase") == "Running", 120, "the high-priority job Running")
        obj = env.wait_status("tijob", "victim", lambda s: condition({"status": s}, C.RUNNING).get("reason") == R.PREEMPTED,
                              60, "pre-empted")
        running = condition(obj, C.RUNNING)
        assert obj["status"]["phase"] == "Pending" and "pre-empted" in running["message"].lower()
        assert condition(obj, C.ADMITTED)["status"] == "False"
        assert condition(obj, C.SCHEDULED)["status"] == "False"
        assert not env.running_pods("victim-train")
        assert job_of(env, "victim")["spec"]["suspend"] is True
        wl = kueue.workload_of(env.ns, "victim-train")
        assert condition(wl, "Evicted").get("reason") == "Preempted" or condition(wl, "Preempted").get("status") == "True"
    finally:
        cp.kubectl("delete", "priorityclass", low, high, "--ignore-not-found", check=False)
