"""Pure status logic: phases, conditions with actionable reasons, progress, checkpoints, events."""

from __future__ import annotations

import json

from tinv.api.models import ConditionType as C
from tinv.api.models import GenerationGridStatus, Reason as R, TextualInversionJobStatus
from tinv.operator import status as S
from tinv.operator.builders import GRID, TIJOB

NOW = "2026-01-01T00:00:00Z"
LATER = "2026-01-01T00:05:00Z"
SPEC = {"training": {"checkpointsKept": 2}, "runPolicy": {"suspend": False}, "resources": {"gpuClass": "A100_PCIE_80GB", "region": "ORD1"}}


def facts(**kw) -> S.Facts:
    base = dict(kind=TIJOB, job_name="demo-train", generation=2, output_uri="s3://b/ns/demo-0eae2594", workers=1,
                placement="gpu.nvidia.com/class=A100_PCIE_80GB topology.kubernetes.io/region=ORD1 nvidia.com/gpu=1")
    base.update(kw)
    return S.Facts(**base)


def job(**kw) -> dict:
    base = {"name": "demo-train", "suspend": False, "active": 1, "failed": 0, "succeeded": 0, "conditions": {}, "startTime": NOW}
    base.update(kw)
    return base


def pod(phase="Running", node="a100-ord1-0", **kw) -> dict:
    base = {"name": "demo-train-abc", "phase": phase, "node": node, "deleting": False, "scheduled": None, "waiting": [], "terminated": []}
    base.update(kw)
    return base


def compute(kind=TIJOB, old=None, spec=SPEC, f=None, j=None, pods=(), storage=None, now=NOW) -> dict:
    return S.compute_status(kind=kind, old=old, generation=2, spec=spec, facts=f or facts(kind=kind), job=j, pods=list(pods),
                            storage=storage, now=now)


def cond(st: dict, type_: str) -> dict:
    return next((c for c in st["conditions"] if c["type"] == type_), {})


def valid(st: dict, kind=TIJOB) -> None:
    """Every computed status fits the contract's status model (and so the CRD schema)."""
    model = TextualInversionJobStatus if kind == TIJOB else GenerationGridStatus
    model.model_validate(st)
    json.dumps(st)


# --------------------------------------------------------------------------- views


def test_pod_view_reads_scheduling_waits_and_exits():
    body = {
        "metadata": {"name": "p", "labels": {"tinv.io/owner-uid": "u"}, "annotations": {"batch.kubernetes.io/job-completion-index": "1"}},
        "spec": {"nodeName": "n1"},
        "status": {
            "phase": "Pending",
            "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/5 nodes are available"}],
            "containerStatuses": [
                {"name": "trainer", "image": "img", "state": {"waiting": {"reason": "ImagePullBackOff", "message": "back-off"}}},
                {"name": "side", "state": {"terminated": {"exitCode": 75, "reason": "Error", "message": "{}", "finishedAt": NOW}}},
            ],
        },
    }
    v = S.pod_view(body)
    assert v["index"] == "1" and v["node"] == "n1" and v["ownerUid"] == "u"
    assert v["scheduled"] == {"status": "False", "reason": "Unschedulable", "message": "0/5 nodes are available"}
    assert v["waiting"][0]["reason"] == "ImagePullBackOff"
    assert v["terminated"][0]["exitCode"] == 75


def test_job_view():
    body = {"metadata": {"name": "j", "uid": "x", "annotations": {"tinv.io/spec-hash": "h"}, "labels": {"tinv.io/owner-uid": "u"}},
            "spec": {"suspend": True, "backoffLimit": 3},
            "status": {"active": 2, "conditions": [{"type": "Suspended", "status": "True", "reason": "JobSuspended"}]}}
    v = S.job_view(body)
    assert v["suspend"] is True and v["active"] == 2 and v["specHash"] == "h" and v["ownerUid"] == "u"
    assert v["conditions"]["Suspended"]["status"] == "True" and v["backoffLimit"] == 3


# --------------------------------------------------------------------------- phases


def test_no_job_yet_is_pending():
    st = compute()
    assert st["phase"] == "Pending"
    assert cond(st, C.ACCEPTED)["status"] == "True" and cond(st, C.ACCEPTED)["reason"] == R.VALID
    assert cond(st, C.RUNNING)["reason"] == R.JOB_CREATED
    assert st["workload"] == {"jobName": "demo-train"}
    assert st["observedGeneration"] == 2 and cond(st, C.ACCEPTED)["observedGeneration"] == 2
    valid(st)


def test_running_pod_is_running():
    st = compute(j=job(), pods=[pod()])
    assert st["phase"] == "Running"
    assert cond(st, C.SCHEDULED)["status"] == "True" and "a100-ord1-0" in cond(st, C.SCHEDULED)["message"]
    assert cond(st, C.RUNNING) | {} and cond(st, C.RUNNING)["reason"] == R.TRAINING
    assert st["startTime"] == NOW
    valid(st)


def test_unschedulable_carries_the_schedulers_message_and_the_placement():
    msg = "0/5 nodes are available: 5 node(s) didn't match Pod's node affinity/selector."
    p = pod(phase="Pending", node=None, scheduled={"status": "False", "reason": "Unschedulable", "message": msg})
    st = compute(j=job(), pods=[p])
    assert st["phase"] == "Pending"
    sched = cond(st, C.SCHEDULED)
    assert sched["status"] == "False" and sched["reason"] == R.UNSCHEDULABLE
    assert msg in sched["message"] and "A100_PCIE_80GB" in sched["message"] and "ORD1" in sched["message"]
    assert cond(st, C.RUNNING)["reason"] == R.UNSCHEDULABLE
    valid(st)


def test_missing_secret_names_the_secret():
    p = pod(phase="Pending", waiting=[{"container": "trainer", "reason": "CreateContainerConfigError", "message": 'secret "tinv-s3" not found'}])
    st = compute(j=job(), pods=[p])
    running = cond(st, C.RUNNING)
    assert running["reason"] == R.SECRET_MISSING and "tinv-s3" in running["message"]
    p = pod(phase="Pending", waiting=[{"container": "trainer", "reason": "CreateContainerConfigError",
                                        "message": "couldn't find key AWS_SECRET_ACCESS_KEY in Secret ns/tinv-s3"}])
    running = cond(compute(j=job(), pods=[p]), C.RUNNING)
    assert running["reason"] == R.SECRET_MISSING and "AWS_SECRET_ACCESS_KEY" in running["message"] and "tinv-s3" in running["message"]


def test_image_pull_back_off():
    p = pod(phase="Pending", waiting=[{"container": "trainer", "reason": "ImagePullBackOff", "image": "bad/img:1", "message": "Back-off pulling image"}])
    running = cond(compute(j=job(), pods=[p]), C.RUNNING)
    assert running["reason"] == R.IMAGE_PULL_BACK_OFF and "bad/img:1" in running["message"]


def test_succeeded_with_termination_summary_and_final_checkpoint():
    term = {"phase": "Succeeded", "exitCode": 0, "reason": "Completed", "message": "trained", "step": 100, "totalSteps": 100, "loss": 0.0912345,
            "latestCheckpoint": {"uuid": "c3", "step": 100, "uri": "s3://b/ns/demo/checkpoints/c3"}}
    p = pod(phase="Succeeded", terminated=[{"container": "trainer", "exitCode": 0, "reason": "Completed", "message": json.dumps(term), "finishedAt": NOW}])
    j = job(active=0, succeeded=1, completionTime=LATER, conditions={"Complete": {"status": "True", "reason": "CompletionsReached", "message": ""}})
    st = compute(j=j, pods=[p])
    assert st["phase"] == "Succeeded" and st["completionTime"] == LATER
    assert cond(st, C.SUCCEEDED)["status"] == "True" and cond(st, C.SUCCEEDED)["reason"] == R.COMPLETED
    assert st["latestCheckpoint"]["uuid"] == "c3"
    assert "loss 0.09123" in st["message"] and "c3" in st["message"]
    assert st["progress"]["summary"] == "100/100 (100%)"
    valid(st)


def test_failed_reasons():
    for job_reason, reason in (("BackoffLimitExceeded", R.BACKOFF_LIMIT_EXCEEDED), ("DeadlineExceeded", R.DEADLINE_EXCEEDED),
                               ("PodFailurePolicy", R.NON_RETRYABLE_EXIT)):
        j = job(active=0, failed=1, conditions={"Failed": {"status": "True", "reason": job_reason, "message": "the Job failed"}})
        p = pod(phase="Failed", terminated=[{"container": "trainer", "exitCode": 2, "reason": "Error", "message": "bad images\nInvalidSpec: no images", "finishedAt": NOW}])
        st = compute(j=j, pods=[p])
        assert st["phase"] == "Failed"
        assert cond(st, C.FAILED)["reason"] == reason
        assert "exit code 2" in cond(st, C.FAILED)["message"] and "no images" in cond(st, C.FAILED)["message"]
        assert st["completionTime"]
        valid(st)


def test_suspend_and_resume():
    old = compute(j=job(), pods=[pod()])
    st = compute(old=old, j=job(suspend=True, active=0), spec={**SPEC, "runPolicy": {"suspend": True}})
    assert st["phase"] == "Suspended"
    assert cond(st, C.SUSPENDED)["status"] == "True" and cond(st, C.SUSPENDED)["reason"] == R.SUSPENDED_BY_USER
    assert cond(st, C.RUNNING)["status"] == "False"
    back = compute(old=st, j=job(), pods=[pod()], now=LATER)
    assert back["phase"] == "Running"
    assert cond(back, C.SUSPENDED)["status"] == "False" and cond(back, C.SUSPENDED)["reason"] == R.RESUMED
    assert cond(back, C.SUSPENDED)["lastTransitionTime"] == LATER
    valid(back)


def test_kueue_suspended_job_is_queued_not_suspended():
    st = compute(j=job(suspend=True, active=0), f=facts(queue="team-a"))
    assert st["phase"] == "Pending" and cond(st, C.RUNNING)["reason"] == S.QUEUED and "team-a" in cond(st, C.RUNNING)["message"]


def test_retry_after_preemption_is_reported():
    term = {"phase": "Preempted", "exitCode": 75, "reason": "Preempted", "message": "SIGTERM: checkpoint written", "step": 40}
    p = pod(phase="Failed", terminated=[{"container": "trainer", "exitCode": 75, "reason": "Error", "message": json.dumps(term), "finishedAt": NOW}])
    st = compute(j=job(active=0, failed=1), pods=[p])
    assert st["phase"] == "Pending"
    running = cond(st, C.RUNNING)
    assert running["reason"] == S.RETRYING and "75" in running["message"] and "newest checkpoint" in running["message"]


def test_invalid_spec_is_failed_and_recovers_when_fixed():
    st = compute(f=facts(invalid="spec.storage.uri: not set"))
    assert st["phase"] == "Failed"
    assert cond(st, C.ACCEPTED) == {**cond(st, C.ACCEPTED), "status": "False", "reason": R.INVALID_SPEC}
    assert cond(st, C.FAILED)["reason"] == R.INVALID_SPEC and "storage.uri" in cond(st, C.FAILED)["message"]
    valid(st)
    fixed = compute(old=st, now=LATER)
    assert fixed["phase"] == "Pending" and cond(fixed, C.ACCEPTED)["status"] == "True"
    assert cond(fixed, C.FAILED)["status"] == "False" and "completionTime" not in fixed


def test_finished_job_removed_by_ttl_keeps_its_outcome():
    j = job(active=0, succeeded=1, conditions={"Complete": {"status": "True", "reason": "", "message": ""}})
    done = compute(j=j)
    after = compute(old=done, j=None, now=LATER)
    assert after["phase"] == "Succeeded" and after["conditions"] == done["conditions"]


def test_storage_unreachable_keeps_running():
    st = compute(j=job(), pods=[pod()], storage=S.StorageView(error="s3://b/x: storage unreachable (timeout)"))
    running = cond(st, C.RUNNING)
    assert st["phase"] == "Running" and running["status"] == "True"
    assert running["reason"] == R.STORAGE_UNREACHABLE and "unreachable" in running["message"]


def test_grid_waiting_then_resolved():
    f = facts(kind=GRID, job_name="g-grid", waiting=(R.WAITING_FOR_JOB, "waiting for TextualInversionJob det-logo to finish"))
    st = compute(kind=GRID, f=f)
    assert st["phase"] == "Waiting"
    assert cond(st, C.WAITING)["status"] == "True" and "det-logo" in cond(st, C.WAITING)["message"]
    valid(st, GRID)
    resolved = [{"job": "det-logo", "checkpoint": "c3", "uri": "s3://b/c3"}]
    st2 = compute(kind=GRID, old=st, f=facts(kind=GRID, job_name="g-grid", resolved=resolved), j=job(name="g-grid"), pods=[pod()])
    assert st2["phase"] == "Running" and st2["resolvedEmbeddings"] == resolved
    assert cond(st2, C.WAITING)["status"] == "False" and "det-logo@c3" in cond(st2, C.WAITING)["message"]
    assert cond(st2, C.RUNNING)["reason"] == R.GENERATING
    valid(st2, GRID)


def test_grid_progress_and_gallery():
    storage = S.StorageView(progress={"images_done": 30, "images_total": 240, "images_per_second": 1.23456})
    j = job(conditions={"Complete": {"status": "True", "reason": "", "message": ""}})
    st = compute(kind=GRID, f=facts(kind=GRID, job_name="g-grid"), j=j, storage=storage)
    assert st["progress"] == {"imagesDone": 30, "imagesTotal": 240, "imagesPerSecond": 1.23, "summary": "30/240 (12%)"}
    assert st["galleryUri"] == "s3://b/ns/demo-0eae2594/images/index.html"
    assert st["indexUri"].endswith("/images/index.json")
    valid(st, GRID)


# --------------------------------------------------------------------------- progress and checkpoints


def test_progress_from_trainer_progress_json():
    raw = {"phase": "Running", "step": 120, "totalSteps": 500, "loss": 0.123456789, "samplesPerSecond": 45.678, "etaSeconds": 321.7,
           "updatedAt": NOW}
    assert S.normalize_progress(raw, TIJOB) == {"step": 120, "totalSteps": 500, "loss": 0.1235, "samplesPerSecond": 45.7,
                                                "summary": "120/500 (24%)", "etaSeconds": 321, "updatedAt": NOW}
    snake = {"state": "running", "step": 5, "total_steps": 10, "loss": 1.0, "samples_per_second": 2, "eta_seconds": 3, "updated_at": NOW}
    assert S.normalize_progress(snake, TIJOB)["summary"] == "5/10 (50%)"
    assert S.normalize_progress("garbage", TIJOB) is None
    assert S.normalize_progress({"loss": float("nan")}, TIJOB) is None


def test_checkpoints_merge_newest_n_and_never_lose_one():
    a = {"uuid": "a", "step": 10, "uri": "s3://x/a"}
    b = {"uuid": "b", "step": 20, "uri": "s3://x/b", "loss": 0.5}
    c = {"uuid": "c", "step": 30, "uri": "s3://x/c", "created_at": NOW, "loss": 0.123456}
    merged = S.merge_checkpoints(2, [a], [b, {"uuid": "b", "step": 20, "uri": "s3://x/b", "createdAt": NOW}], [c])
    assert [m["uuid"] for m in merged] == ["b", "c"]
    assert merged[0] == {"uuid": "b", "step": 20, "uri": "s3://x/b", "loss": 0.5, "createdAt": NOW}
    assert merged[1]["loss"] == 0.1235 and merged[1]["createdAt"] == NOW
    # storage unreachable afterwards: status keeps what it had
    old = compute(j=job(), pods=[pod()], storage=S.StorageView(checkpoints=[b, c]))
    again = compute(old=old, j=job(), pods=[pod()], storage=S.StorageView(error="down"))
    assert [x["uuid"] for x in again["checkpoints"]] == ["b", "c"] and again["latestCheckpoint"]["uuid"] == "c"
    assert S.merge_checkpoints(3, [{"uuid": "x"}, {"step": 1}, None, "junk"]) == []


def test_conditions_keep_transition_time_when_status_is_unchanged():
    first = compute(j=job(), pods=[pod()], now=NOW)
    second = compute(old=first, j=job(), pods=[pod()], now=LATER)
    assert cond(second, C.RUNNING)["lastTransitionTime"] == NOW
    assert S.merge_patch(first, second) is None  # nothing to write


def test_termination_summary_handles_json_and_logs():
    assert S.termination_summary('{"reason": "InvalidSpec", "message": "no images in s3://x"}') == "InvalidSpec; no images in s3://x"
    assert S.termination_summary("line1\nline2\nTraceback...\nValueError: boom\n") == "line2 | Traceback... | ValueError: boom"
    assert S.termination_summary("") is None
    snake = {"state": "succeeded", "exit_code": 0, "step": 500, "total_steps": 500, "loss": 0.123456,
             "latest_checkpoint": {"uuid": "c9", "step": 500, "uri": "s3://x/c9"}}
    assert S.termination_summary(json.dumps(snake)) == "succeeded; step 500/500; loss 0.1235; latest checkpoint c9"


# --------------------------------------------------------------------------- patches and events


def test_merge_patch_is_minimal_and_removes_keys():
    old = {"phase": "Running", "progress": {"step": 1, "etaSeconds": 9}, "conditions": [{"type": "A"}], "message": "x"}
    new = {"phase": "Running", "progress": {"step": 2}, "conditions": [{"type": "A"}, {"type": "B"}]}
    assert S.merge_patch(old, new) == {"progress": {"step": 2, "etaSeconds": None}, "conditions": [{"type": "A"}, {"type": "B"}], "message": None}
    assert S.merge_patch(new, new) is None


def test_events_per_transition_and_checkpoint():
    pending = compute()
    p = pod(phase="Pending", node=None, scheduled={"status": "False", "reason": "Unschedulable", "message": "no nodes"})
    unsched = compute(old=pending, j=job(), pods=[p])
    events = S.transitions(pending, unsched)
    assert events == [("Warning", R.UNSCHEDULABLE, events[0][2])] and "no nodes" in events[0][2]
    running = compute(old=unsched, j=job(), pods=[pod()], storage=S.StorageView(checkpoints=[{"uuid": "c1", "step": 10, "uri": "s3://c1", "loss": 0.3}]))
    events = S.transitions(unsched, running)
    assert events[0][:2] == ("Normal", R.TRAINING) and "Pending -> Running" in events[0][2]
    assert events[1][:2] == ("Normal", S.CHECKPOINT_RECORDED) and "c1" in events[1][2] and "step 10" in events[1][2]
    assert S.transitions(running, running) == []
    assert S.new_checkpoints(unsched, running) == 1


# --------------------------------------------------------------------------- issue 14: lost Jobs, holds, deletion, bounds

RECORD = {"jobGeneration": 2, "jobUid": "job-uid-1"}
RUNNING = {"phase": "Running", "conditions": [], "workload": {"jobName": "demo-train", **RECORD}}


def progress(state: str, **kw) -> S.StorageView:
    return S.StorageView(progress={"state": state, "step": 100, "total_steps": 100, "loss": 0.1, **kw})


def test_the_job_record_is_written_and_kept():
    st = compute(f=facts(record=RECORD), j=job(), pods=[pod()])
    assert st["workload"] == {"jobName": "demo-train", "jobGeneration": 2, "jobUid": "job-uid-1"}
    valid(st)


def test_a_recorded_job_not_in_the_watch_is_not_reported_as_being_created():
    st = compute(old=RUNNING, f=facts(record=RECORD), j=None)
    assert st["phase"] == "Running" and cond(st, C.RUNNING).get("reason") != R.JOB_CREATED
    assert "creating" not in json.dumps(st)


def test_a_deleted_job_whose_progress_says_succeeded_is_succeeded():
    st = compute(old=RUNNING, f=facts(record=RECORD, job_gone=True), j=None, storage=progress("succeeded", updated_at=NOW))
    assert st["phase"] == "Succeeded" and cond(st, C.SUCCEEDED)["reason"] == R.COMPLETED
    assert "progress.json" in cond(st, C.SUCCEEDED)["message"] and st["completionTime"] == NOW
    assert ("Normal", R.COMPLETED) in [(t, r) for t, r, _ in S.transitions(RUNNING, st)]
    valid(st)


def test_a_deleted_job_whose_progress_says_failed_is_failed():
    st = compute(old=RUNNING, f=facts(record=RECORD, job_gone=True), j=None, storage=progress("failed", message="CUDA error"))
    assert st["phase"] == "Failed" and cond(st, C.FAILED)["reason"] == R.JOB_FAILED and "CUDA error" in cond(st, C.FAILED)["message"]


def test_a_job_deleted_before_it_finished_fails_and_says_how_to_continue():
    ck = {"uuid": "c1", "step": 40, "uri": "s3://b/c1"}
    st = compute(old=RUNNING, f=facts(record=RECORD, job_gone=True), j=None, storage=progress("running", step=40, latest_checkpoint=ck))
    failed = cond(st, C.FAILED)
    assert st["phase"] == "Failed" and failed["reason"] == R.JOB_DELETED
    assert "not re-created" in failed["message"] and "c1" in failed["message"] and "resumeFrom" in failed["message"]
    assert ("Warning", R.JOB_DELETED) in [(t, r) for t, r, _ in S.transitions(RUNNING, st)]


def test_a_deleted_job_waits_for_storage_before_deciding():
    for view in (None, S.StorageView(error="s3://b: storage unreachable")):
        st = compute(old=RUNNING, f=facts(record=RECORD, job_gone=True), j=None, storage=view)
        assert st["phase"] not in S.TERMINAL and cond(st, C.RUNNING)["reason"] == R.JOB_DELETED


def test_a_removed_finished_job_still_tells_its_outcome():
    j = job(active=0, succeeded=1, removed=True, conditions={"Complete": {"status": "True", "reason": "", "message": ""}})
    st = compute(old=RUNNING, f=facts(record=RECORD), j=j)
    assert st["phase"] == "Succeeded"


def test_held_jobs_say_why():
    secret = compute(f=facts(hold=(R.SECRET_MISSING, "the default storage credentials Secret tinv-s3 does not exist")))
    assert secret["phase"] == "Pending" and cond(secret, C.RUNNING)["reason"] == R.SECRET_MISSING
    assert ("Warning", R.SECRET_MISSING) in [(t, r) for t, r, _ in S.transitions({}, secret)]
    pods = compute(f=facts(hold=(R.WAITING_FOR_PODS, "waiting for 1 pod(s) of an earlier Job")))
    assert cond(pods, C.RUNNING)["reason"] == R.WAITING_FOR_PODS


def test_deleting_never_says_creating():
    st = compute(old=RUNNING, f=facts(record=RECORD, deleting="being deleted: waiting for 1 pod(s) of Job demo-train to stop"), j=None)
    assert cond(st, C.RUNNING)["reason"] == R.DELETING and "creating" not in json.dumps(st)
    valid(st)


def test_blocked_grid_fails_with_the_reason_and_recovers():
    f = facts(kind=GRID, job_name="g-grid", blocked=(R.CHECKPOINT_NOT_FOUND, "checkpoint x (spec.embeddings[0].checkpoint) is not a checkpoint"))
    st = compute(kind=GRID, f=f)
    assert st["phase"] == "Failed" and cond(st, C.FAILED)["reason"] == R.CHECKPOINT_NOT_FOUND
    assert "spec.embeddings[0]" in cond(st, C.WAITING)["message"]
    assert ("Warning", R.CHECKPOINT_NOT_FOUND) in [(t, r) for t, r, _ in S.transitions({"phase": "Waiting"}, st)]
    valid(st, GRID)
    again = compute(kind=GRID, old=st, f=facts(kind=GRID, job_name="g-grid", resolved=[{"uri": "s3://b/e"}]), now=LATER)
    assert again["phase"] == "Pending" and cond(again, C.FAILED)["status"] == "False"


def test_observed_generation_is_the_reconciled_one():
    st = S.compute_status(kind=TIJOB, old=None, generation=5, spec=SPEC, facts=facts(generation=4), job=job(), pods=[pod()], storage=None, now=NOW)
    assert st["observedGeneration"] == 4 and all(c["observedGeneration"] == 4 for c in st["conditions"])


def test_values_from_storage_are_clamped_to_the_crd():
    raw = {"step": 2**64, "totalSteps": -3, "loss": float("nan"), "samplesPerSecond": -1.0, "etaSeconds": 10**30,
           "imagesPerSecond": -2.0, "summary": "x" * 500}
    view = S.StorageView(progress=raw, checkpoints=[{"uuid": "big", "step": 2**70, "uri": "s3://b/big"},
                                                    {"uuid": "ok", "step": 3, "uri": "s3://b/ok", "loss": float("inf")}])
    st = compute(j=job(), pods=[pod()], storage=view)
    valid(st)
    assert "step" not in st.get("progress", {}) and "samplesPerSecond" not in st.get("progress", {})
    assert [c["uuid"] for c in st["checkpoints"]] == ["ok"] and "loss" not in st["checkpoints"][0]
    assert st["latestCheckpoint"]["uuid"] == "ok", "a checkpoint the CRD cannot hold never hides the newest real one"
    grid = compute(kind=GRID, f=facts(kind=GRID, job_name="g-grid"), j=job(), pods=[pod()],
                   storage=S.StorageView(progress={"imagesDone": 3, "imagesTotal": 10**40, "imagesPerSecond": -5}))
    valid(grid, GRID)
    assert grid["progress"]["imagesDone"] == 3 and len(grid["progress"].get("summary", "")) <= 64
    assert "imagesPerSecond" not in grid["progress"]


def test_clamp_drops_what_the_status_model_refuses():
    st = {"phase": "Running", "conditions": [], "progress": {"summary": "1/2"}, "checkpoints": [{"uuid": "a", "step": 1}]}
    out = S.clamp_status(TIJOB, st)
    TextualInversionJobStatus.model_validate(out)
    assert out["phase"] == "Running"
