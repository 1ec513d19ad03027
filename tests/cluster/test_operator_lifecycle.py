"""Operator lifecycle on the real control plane: suspend/resume, spec changes after start, deletion
(children through ownerReferences, outputs kept or cleaned, a finalizer that never blocks forever),
and killing the operator at any point (no second Job, no checkpoint lost, no spurious Events)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from harness import KubectlError
from operator_helpers import (
    OpEnv,
    OperatorProcess,
    close_env,
    condition,
    make_env,
    tijob,
    write_checkpoint,
    write_progress,
)
from tinv.api.models import ConditionType as C
from tinv.api.models import Reason as R

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def env(control_plane, tmp_path_factory):
    e = make_env(control_plane, tmp_path_factory, "op-life", extra=["--cleanup-retries", "2"])
    yield e
    close_env(e)


def _running(env: OpEnv, name: str) -> dict:
    return env.wait_status("tijob", name, lambda s: s.get("phase") == "Running", 60, "Running")


def test_suspend_deletes_pods_keeps_checkpoints_and_resume_continues(env: OpEnv):
    env.create(tijob("pause"))
    obj = _running(env, "pause")
    ck = write_checkpoint(env.root(obj), 10, 0.4)
    write_progress(env.root(obj), 10, 100, 0.4, [ck])
    env.wait_status("tijob", "pause", lambda s: (s.get("latestCheckpoint") or {}).get("uuid") == ck["uuid"], 30)
    env.patch("tijob", "pause", {"spec": {"runPolicy": {"suspend": True}}})
    obj = env.wait_status("tijob", "pause", lambda s: s.get("phase") == "Suspended", 60, "Suspended")
    assert env.get("job", "pause-train")["spec"]["suspend"] is True
    env.wait(lambda: not env.running_pods("pause-train"), 60, "pods deleted")
    susp = condition(obj, C.SUSPENDED)
    assert susp["status"] == "True" and susp["reason"] == R.SUSPENDED_BY_USER and ck["uuid"] in susp["message"]
    assert obj["status"]["latestCheckpoint"]["uuid"] == ck["uuid"]
    env.patch("tijob", "pause", {"spec": {"runPolicy": {"suspend": False}}})
    obj = env.wait_status("tijob", "pause", lambda s: s.get("phase") == "Running", 60, "Running again")
    assert env.get("job", "pause-train")["spec"]["suspend"] is False
    resumed = condition(obj, C.SUSPENDED)
    assert resumed["status"] == "False" and resumed["reason"] == R.RESUMED and ck["uuid"] in resumed["message"]
    assert obj["status"]["checkpoints"][-1]["uuid"] == ck["uuid"]
    reasons = [e["reason"] for e in env.events("pause") for _ in range(e.get("count") or 1)]  # aggregated Events count repeats
    assert R.SUSPENDED_BY_USER in reasons and reasons.count(R.TRAINING) == 2


def test_created_suspended_never_starts_pods(env: OpEnv):
    env.create(tijob("cold", run_policy={"suspend": True}))
    obj = env.wait_status("tijob", "cold", lambda s: s.get("phase") == "Suspended", 60)
    assert not env.pods("cold-train") and env.get("job", "cold-train")["spec"]["suspend"] is True
    assert condition(obj, C.RUNNING)["reason"] == R.SUSPENDED_BY_USER


def test_spec_changes_after_start(env: OpEnv):
    env.create(tijob("change"))
    _running(env, "change")
    # immutable fields are refused by the apiserver's CEL rules, with a clear message
    with pytest.raises(KubectlError) as refused:
        env.patch("tijob", "change", {"spec": {"training": {"steps": 999}}})
    assert "immutable" in str(refused.value)
    # allowed: run policy, applied to the Job in place
    env.patch("tijob", "change", {"spec": {"runPolicy": {"activeDeadlineSeconds": 7200, "ttlSecondsAfterFinished": 60}}})
    env.wait(lambda: env.get("job", "change-train")["spec"].get("activeDeadlineSeconds") == 7200, 30, "deadline applied")
    assert env.get("job", "change-train")["spec"]["ttlSecondsAfterFinished"] == 60
    # resources: the running Job keeps its pod spec; the status says how to apply the change
    env.patch("tijob", "change", {"spec": {"resources": {"gpusPerWorker": 2}}})
    obj = env.wait_status("tijob", "change", lambda s: condition({"status": s}, C.ACCEPTED).get("reason") == "SpecChangePending", 30)
    assert "Suspend" in condition(obj, C.ACCEPTED)["message"]
    assert any(e["reason"] == "SpecChangePending" and e["type"] == "Warning" for e in env.events("change"))
    old_uid = env.get("job", "change-train")["metadata"]["uid"]
    # suspend: the Job is replaced with the new pod spec once its pods are gone; resume runs it
    env.patch("tijob", "change", {"spec": {"runPolicy": {"suspend": True}}})
    env.wait(lambda: env.get("job", "change-train")["metadata"]["uid"] != old_uid, 60, "Job replaced")
    job = env.get("job", "change-train")
    assert job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert job["spec"]["suspend"] is True
    env.patch("tijob", "change", {"spec": {"runPolicy": {"suspend": False}}})
    # the status may still show the pre-suspend run (writes are paced): wait for the new Job's,
    # which runs with the change applied and no notice left
    env.wait_status("tijob", "change", lambda s: s.get("phase") == "Running" and condition({"status": s}, C.ACCEPTED).get("reason") == R.VALID,
                    60, "Running the replaced Job with the change accepted")


def test_the_resource_itself_is_never_patched_and_a_change_made_while_down_is_applied(env: OpEnv):
    """kopf's diff-base lives in the operator's memory (handlers.DiffBaseMemory): the operator writes
    the status subresource only -- no annotation, so no PATCH and no watch event more per resource --
    and after a restart, with that memory empty, a spec change made while it was down still reaches
    the Job (kopf calls it a create; tinv's reconcile compares the resource with its Job)."""
    env.create(tijob("quiet"))
    obj = _running(env, "quiet")
    assert not [k for k in obj["metadata"].get("annotations") or {} if k.startswith("tinv.io/")], obj["metadata"]["annotations"]
    fields = env.cp.get_json("tijob", "quiet", "-n", env.ns, "--show-managed-fields")["metadata"]["managedFields"]
    writers = {m["manager"] for m in fields if m.get("subresource") != "status"}
    assert len(writers) == 1, f"only the creator writes the resource itself: {writers}"
    env.op.stop()
    try:
        env.patch("tijob", "quiet", {"spec": {"runPolicy": {"activeDeadlineSeconds": 5400}}})
    finally:
        env.op.start()
    env.wait(lambda: env.get("job", "quiet-train")["spec"].get("activeDeadlineSeconds") == 5400, 60, "deadline applied after the restart")
    env.patch("tijob", "quiet", {"spec": {"runPolicy": {"activeDeadlineSeconds": 7200}}})  # an update, seen live
    env.wait(lambda: env.get("job", "quiet-train")["spec"].get("activeDeadlineSeconds") == 7200, 30, "deadline applied while up")


def test_deletion_removes_children_and_keeps_outputs(env: OpEnv):
    env.create(tijob("gone"))
    obj = _running(env, "gone")
    root = env.root(obj)
    write_checkpoint(root, 10, 0.5)
    assert not obj["metadata"].get("finalizers"), "no finalizer unless the resource asks for clean-up"
    env.cp.kubectl("delete", "tijob", "gone", "-n", env.ns, "--wait=true", timeout=60)
    env.wait(lambda: not env.cp.get_json("jobs,configmaps,pods", "-n", env.ns, "-l", f"tinv.io/owner-uid={obj['metadata']['uid']}")["items"],
             60, "children garbage-collected")
    assert (root / "checkpoints").is_dir(), "outputs are kept by default"


def test_cleanup_on_delete_removes_outputs(env: OpEnv):
    env.create(tijob("wipe", storage={"uri": env.storage_uri, "cleanupOnDelete": True}))
    obj = env.wait(lambda: (o := env.get("tijob", "wipe"))["metadata"].get("finalizers") and o, 30, "finalizer")
    assert obj["metadata"]["finalizers"] == ["tinv.io/cleanup-outputs"]
    obj = _running(env, "wipe")
    root = env.root(obj)
    write_checkpoint(root, 10, 0.5)
    env.cp.kubectl("delete", "tijob", "wipe", "-n", env.ns, "--wait=true", timeout=60)
    assert not root.exists()
    assert any(e["reason"] == "OutputsDeleted" for e in env.events("wipe"))


def test_unreachable_storage_never_blocks_deletion(env: OpEnv):
    storage = {"uri": "s3://tinv-nowhere/runs", "endpoint": "http://127.0.0.1:9", "cleanupOnDelete": True}
    env.create(tijob("stuck", storage=storage))
    env.wait(lambda: env.get("tijob", "stuck")["metadata"].get("finalizers"), 30, "finalizer")
    t0 = time.monotonic()
    env.cp.kubectl("delete", "tijob", "stuck", "-n", env.ns, "--wait=true", "--timeout=90s", timeout=120)
    took = time.monotonic() - t0
    assert took < 90
    kept = [e for e in env.events("stuck") if e["reason"] == "OutputsKept"]
    assert kept and kept[0]["type"] == "Warning" and "kept" in kept[0]["message"]
    print(f"\n[operator] deletion with unreachable storage finished after {took:.1f} s (--cleanup-retries 2)")


def test_operator_killed_and_restarted_mid_job(control_plane, tmp_path_factory):
    from operator_helpers import make_env

    env = make_env(control_plane, tmp_path_factory, "op-restart")
    try:
        names = ["r0", "r1", "r2"]
        for n in names:
            env.create(tijob(n))
        first = {}
        for n in names:
            obj = _running(env, n)
            ck = write_checkpoint(env.root(obj), 10, 0.5)
            write_progress(env.root(obj), 10, 100, 0.5, [ck])
            first[n] = ck
        for n in names:
            env.wait_status("tijob", n, lambda s, n=n: (s.get("latestCheckpoint") or {}).get("uuid") == first[n]["uuid"], 30)
        jobs_before = {n: env.get("job", f"{n}-train")["metadata"]["uid"] for n in names}
        # SIGKILL: no cleanup at all
        env.op.kill()
        killed_at = time.time()
        second = {}
        for n in names:
            obj = env.get("tijob", n)
            second[n] = write_checkpoint(env.root(obj), 20, 0.4)
            write_progress(env.root(obj), 20, 100, 0.4, [first[n], second[n]])
        env.create(tijob("late"))  # created while the operator is down
        # a burst of creations, and a kill in the middle of reconciling them
        env.op.start()
        for i in range(6):
            env.create(tijob(f"burst{i}"))
        time.sleep(1.0)
        env.op.kill()
        env.op.start()
        for n in names:
            obj = env.wait_status("tijob", n, lambda s, n=n: (s.get("latestCheckpoint") or {}).get("uuid") == second[n]["uuid"], 60, "new checkpoint")
            assert [c["uuid"] for c in obj["status"]["checkpoints"]] == [first[n]["uuid"], second[n]["uuid"]], "no checkpoint lost"
            assert obj["status"]["phase"] == "Running"
        for n in ["late"] + [f"burst{i}" for i in range(6)]:
            _running(env, n)
        jobs = env.cp.get_json("jobs", "-n", env.ns)["items"]
        owners = [j["metadata"]["labels"]["tinv.io/owner-uid"] for j in jobs]
        assert len(owners) == len(set(owners)) == 10, "exactly one Job per resource"
        assert {n: env.get("job", f"{n}-train")["metadata"]["uid"] for n in names} == jobs_before
        # the restart changed no phase: only the new checkpoints are news
        for n in names:
            after = [e["reason"] for e in env.events(n) if (e.get("lastTimestamp") or "") >= time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(killed_at + 1))]
            assert set(after) <= {"CheckpointRecorded"}, after
    finally:
        close_env(env)
