"""Work is never lost or run twice (issue 14, items 1, 3 and 4), on the real control plane:

* a finished Job that disappears (ttlSecondsAfterFinished: 0, `kubectl delete job`, or removed by
  its TTL while the operator is down) is never created again: exactly one Job ever, and the phase
  comes from the Job's last view or progress.json's final state;
* a Job is replaced (a spec change applied while suspended) only once the old one's pods are gone,
  terminating ones included: never two writers on one run root;
* cleanupOnDelete deletes the workload and waits for its pods before deleting the outputs.

Pods that must stay Running while they are deleted run on a static node: no kubelet (and no KWOK)
serves it, the test plays the kubelet, as a trainer writing its last checkpoint would hold a pod."""

from __future__ import annotations

import time

import pytest

from operator_helpers import (
    TOLERATE_ALL,
    OpEnv,
    close_env,
    condition,
    jobs_ever_created,
    kubelet_runs,
    make_env,
    static_node,
    tijob,
    write_checkpoint,
    write_progress,
)
from tinv.api.models import ConditionType as C
from tinv.api.models import Reason as R

pytestmark = pytest.mark.cluster

STATIC = "STATIC_ONCE"
#: longer than the operator's sweep re-checks a Job missing from the watch (max(30 s, 2 polls))
SWEEP_WINDOW = 35


@pytest.fixture(scope="module")
def env(control_plane, tmp_path_factory):
    e = make_env(control_plane, tmp_path_factory, "op-once")
    static_node(control_plane, "static-once-0", STATIC)
    yield e
    close_env(e)


def _running(env: OpEnv, name: str) -> dict:
    return env.wait_status("tijob", name, lambda s: s.get("phase") == "Running", 60, "Running")


def _static_pod_running(env: OpEnv, job: str) -> dict:
    """The pod bound to the static node, reported Running (the test is its kubelet)."""
    pod = env.wait(lambda: next((p for p in env.pods(job) if p["spec"].get("nodeName") == "static-once-0"), None), 60, f"{job} bound")
    kubelet_runs(env.cp, env.ns, pod)
    return pod


def _force_delete(env: OpEnv, pod: dict) -> None:
    env.cp.kubectl("delete", "pod", pod["metadata"]["name"], "-n", env.ns, "--grace-period=0", "--force", "--wait=false", check=False)


def test_a_job_that_disappears_is_never_created_again(env: OpEnv):
    # finished, and removed by its TTL at once
    env.create(tijob("ttl0", run_policy={"ttlSecondsAfterFinished": 0}))
    obj = _running(env, "ttl0")
    root = env.root(obj)
    ck = write_checkpoint(root, 100, 0.1)
    write_progress(root, 100, 100, 0.1, [ck], state="succeeded")
    env.cp.finish_pod(env.ns, env.running_pods("ttl0-train")[0]["metadata"]["name"], 0)
    obj = env.wait_status("tijob", "ttl0", lambda s: s.get("phase") == "Succeeded", 60, "Succeeded")
    env.wait(lambda: not env.cp.get_json("jobs", "-n", env.ns, "--field-selector", "metadata.name=ttl0-train")["items"], 30, "TTL removed the Job")
    assert condition(obj, C.SUCCEEDED)["reason"] == R.COMPLETED and obj["status"]["latestCheckpoint"]["uuid"] == ck["uuid"]
    # unfinished, and deleted by hand
    env.create(tijob("deljob"))
    obj = _running(env, "deljob")
    root = env.root(obj)
    ck = write_checkpoint(root, 40, 0.3)
    write_progress(root, 40, 100, 0.3, [ck])
    env.wait_status("tijob", "deljob", lambda s: (s.get("latestCheckpoint") or {}).get("uuid") == ck["uuid"], 30, "checkpoint")
    env.cp.kubectl("delete", "job", "deljob-train", "-n", env.ns, "--wait=true", timeout=60)
    obj = env.wait_status("tijob", "deljob", lambda s: s.get("phase") == "Failed", 60, "Failed")
    failed = condition(obj, C.FAILED)
    assert failed["reason"] == R.JOB_DELETED and "not re-created" in failed["message"] and ck["uuid"] in failed["message"]
    assert any(e["reason"] == R.JOB_DELETED and e["type"] == "Warning" for e in env.events("deljob"))
    # for longer than the sweep takes to re-check a missing Job: still no second Job
    time.sleep(SWEEP_WINDOW)
    for name, phase in (("ttl0", "Succeeded"), ("deljob", "Failed")):
        assert len(jobs_ever_created(env.cp, env.ns, f"{name}-train")) == 1, f"{name}: a second Job was created\n{env.op.logs()}"
        assert env.status("tijob", name)["phase"] == phase


def test_a_job_that_finishes_and_is_removed_while_the_operator_is_down_is_not_run_again(control_plane, tmp_path_factory):
    env = make_env(control_plane, tmp_path_factory, "op-outage")
    try:
        env.create(tijob("outage", run_policy={"ttlSecondsAfterFinished": 0}))
        obj = _running(env, "outage")
        root = env.root(obj)
        ck1 = write_checkpoint(root, 50, 0.3)
        write_progress(root, 50, 100, 0.3, [ck1])
        env.wait_status("tijob", "outage", lambda s: (s.get("latestCheckpoint") or {}).get("uuid") == ck1["uuid"], 30, "checkpoint")
        env.op.stop()
        # the run ends while nobody watches; the TTL controller removes the Job at once
        ck2 = write_checkpoint(root, 100, 0.1)
        write_progress(root, 100, 100, 0.1, [ck1, ck2], state="succeeded")
        env.cp.finish_pod(env.ns, env.running_pods("outage-train")[0]["metadata"]["name"], 0)
        env.wait(lambda: not env.cp.get_json("jobs", "-n", env.ns)["items"], 60, "TTL removed the Job")
        env.op.start()
        obj = env.wait_status("tijob", "outage", lambda s: s.get("phase") == "Succeeded", 60, "Succeeded from progress.json")
        assert "progress.json" in condition(obj, C.SUCCEEDED)["message"]
        assert obj["status"]["latestCheckpoint"]["uuid"] == ck2["uuid"]
        time.sleep(5)
        assert not env.cp.get_json("jobs", "-n", env.ns)["items"], f"the finished run was started again\n{env.op.logs()}"
        assert len(jobs_ever_created(env.cp, env.ns, "outage-train")) == 1
    finally:
        close_env(env)


def test_a_job_is_replaced_only_after_its_terminating_pods_are_gone(env: OpEnv):
    env.create(tijob("swap", gpu_class=STATIC, region="TST1", resources=TOLERATE_ALL))
    pod = _static_pod_running(env, "swap-train")
    _running(env, "swap")
    old_uid = env.get("job", "swap-train")["metadata"]["uid"]
    env.patch("tijob", "swap", {"spec": {"resources": {"gpusPerWorker": 2}}})
    env.wait_status("tijob", "swap", lambda s: condition({"status": s}, C.ACCEPTED).get("reason") == R.SPEC_CHANGE_PENDING, 30)
    env.patch("tijob", "swap", {"spec": {"runPolicy": {"suspend": True}}})
    # the Job controller deletes the pod; without a kubelet it stays Running, terminating
    env.wait(lambda: env.cp.get_json("pod", pod["metadata"]["name"], "-n", env.ns)["metadata"].get("deletionTimestamp"), 30, "pod terminating")
    env.wait(lambda: (env.get("job", "swap-train").get("status") or {}).get("terminating") == 1, 30, "Job counts it terminating")
    time.sleep(8)
    assert env.get("job", "swap-train")["metadata"]["uid"] == old_uid, "a new Job was created while the old pod still ran"
    assert len(jobs_ever_created(env.cp, env.ns, "swap-train")) == 1
    _force_delete(env, pod)  # the pod is gone: now the Job is replaced with the new pod spec
    job = env.wait(lambda: (j := env.get("job", "swap-train"))["metadata"]["uid"] != old_uid and j, 60, "Job replaced")
    assert job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert job["spec"]["suspend"] is True
    obj = env.wait_status("tijob", "swap", lambda s: (s.get("workload") or {}).get("jobUid") == job["metadata"]["uid"], 30, "new record")
    assert obj["status"]["phase"] == "Suspended"


def test_cleanup_on_delete_waits_for_the_pods_before_deleting_outputs(env: OpEnv):
    env.create(tijob("tidy", gpu_class=STATIC, region="TST1", resources=TOLERATE_ALL,
                     storage={"uri": env.storage_uri, "cleanupOnDelete": True}))
    pod = _static_pod_running(env, "tidy-train")
    obj = _running(env, "tidy")
    root = env.root(obj)
    write_checkpoint(root, 10, 0.5)
    env.cp.kubectl("delete", "tijob", "tidy", "-n", env.ns, "--wait=false")
    # the operator deletes the Job; its pod is told to stop but still runs (writing a checkpoint)
    env.wait(lambda: env.cp.get_json("pod", pod["metadata"]["name"], "-n", env.ns)["metadata"].get("deletionTimestamp"), 30, "pod terminating")
    obj = env.wait_status("tijob", "tidy", lambda s: condition({"status": s}, C.RUNNING).get("reason") == R.DELETING, 30, "Deleting")
    assert "waiting for 1 pod" in condition(obj, C.RUNNING)["message"] and "creating" not in condition(obj, C.RUNNING)["message"]
    time.sleep(5)
    assert root.exists(), "outputs deleted while a pod could still write into them"
    write_checkpoint(root, 11, 0.4)  # the SIGTERM'd trainer's last checkpoint
    _force_delete(env, pod)
    env.wait(lambda: not env.cp.get_json("tijobs", "-n", env.ns, "--field-selector", "metadata.name=tidy")["items"], 60, "resource gone")
    assert not root.exists()
    assert any(e["reason"] == R.OUTPUTS_DELETED for e in env.events("tidy"))
