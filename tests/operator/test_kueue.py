"""Kueue's contract, pure (tinv.operator.kueue): which patches follow suspend/resume for a queued Job,
and what the status says about its Workload. The real Kueue runs in tests/cluster/test_kueue_operator.py."""

from __future__ import annotations

from tinv.api.models import ConditionType as C
from tinv.api.models import Reason as R
from tinv.operator import kueue as K
from tinv.operator import status as S
from tinv.operator.builders import TIJOB

JOB_UID = "11111111-2222-3333-4444-555555555555"


def workload_body(*, active: bool | None = True, conditions=(), cluster_queue: str | None = None,
                  owner_uid: str = JOB_UID, name: str = "job-demo-train-3f2a1") -> dict:
    spec: dict = {"queueName": "lq", "podSets": []}
    if active is not None:
        spec["active"] = active
    status: dict = {"conditions": [{"type": t, "status": s, "reason": r, "message": m} for t, s, r, m in conditions]}
    if cluster_queue:
        status["admission"] = {"clusterQueue": cluster_queue}
    return {
        "apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "Workload",
        "metadata": {"name": name, "namespace": "ns", "ownerReferences": [
            {"apiVersion": "batch/v1", "kind": "Job", "name": "demo-train", "uid": owner_uid, "controller": True}]},
        "spec": spec, "status": status,
    }


def wl(**kw) -> dict:
    return K.workload_view(workload_body(**kw))


def job(*, queue: str | None = "lq", suspend: bool = True, uid: str = JOB_UID) -> dict:
    return {"name": "demo-train", "uid": uid, "queue": queue, "suspend": suspend, "active": 0, "conditions": {}}


ADMITTED = [("QuotaReserved", "True", "QuotaReserved", "Quota reserved in ClusterQueue cq"),
            ("Admitted", "True", "Admitted", "The workload is admitted")]
PENDING = [("QuotaReserved", "False", "Pending",
            "couldn't assign flavors to pod set main: insufficient quota for nvidia.com/gpu in flavor gpu, 8 more needed")]


# --------------------------------------------------------------------------- views


def test_workload_view_and_owner():
    body = workload_body(active=None, conditions=ADMITTED, cluster_queue="cq")
    view = K.workload_view(body)
    assert K.owner_job(body) == "demo-train"
    assert view["active"] is True  # Kueue's default
    assert view["jobUid"] == JOB_UID and view["clusterQueue"] == "cq"
    assert view["conditions"]["Admitted"]["status"] == "True"
    assert K.workload_view(workload_body(active=False))["active"] is False
    assert K.owner_job({"metadata": {"ownerReferences": [{"kind": "Job", "apiVersion": "batch/v1", "name": "x"}]}}) is None
    assert K.workload_path("ns", "w") == "/apis/kueue.x-k8s.io/v1beta2/namespaces/ns/workloads/w"


def test_queue_label_only_for_jobs_kueue_may_start():
    assert K.queue_label("lq", suspended=False) == {K.QUEUE_LABEL: "lq"}
    assert K.queue_label("lq", suspended=True) == {}
    assert K.queue_label(None, suspended=False) == {}


# --------------------------------------------------------------------------- plan: never spec.suspend


def test_suspend_deactivates_the_workload():
    p = K.plan("lq", True, job(suspend=False), wl(conditions=ADMITTED, cluster_queue="cq"))
    assert p.workload == {"spec": {"active": False}} and p.job == {}


def test_suspend_is_done_once_the_workload_is_inactive():
    assert not K.plan("lq", True, job(suspend=True), wl(active=False))


def test_suspend_before_kueue_made_the_workload_waits_for_it():
    p = K.plan("lq", True, job(suspend=False), None)
    assert not p and p.waiting
    assert not K.plan("lq", True, job(suspend=True), None)  # still suspended: nothing can start it yet


def test_resume_reactivates_the_workload_and_never_unsuspends_the_job():
    p = K.plan("lq", False, job(suspend=True), wl(active=False))
    assert p.workload == {"spec": {"active": True}}
    assert "spec" not in p.job


def test_resume_of_a_job_created_suspended_hands_it_to_kueue():
    p = K.plan("lq", False, job(queue=None, suspend=True), None)
    assert p.job == {"metadata": {"labels": {K.QUEUE_LABEL: "lq"}}}
    assert not p.workload


def test_resume_moves_a_job_kueue_defaulted_to_its_default_queue():
    # LocalQueueDefaulting (GA in Kueue 0.17): a Job created without the label in a namespace with a
    # LocalQueue "default" gets queue-name: default; its Workload was deactivated while suspended
    p = K.plan("lq", False, job(queue="default", suspend=True), wl(active=False))
    assert p.job == {"metadata": {"labels": {K.QUEUE_LABEL: "lq"}}} and p.workload == {"spec": {"active": True}}
    assert K.plan("lq", True, job(queue="default", suspend=False), wl()).workload == {"spec": {"active": False}}


def test_pending_or_admitted_job_needs_nothing():
    assert not K.plan("lq", False, job(suspend=True), wl(conditions=PENDING))
    assert not K.plan("lq", False, job(suspend=False), wl(conditions=ADMITTED, cluster_queue="cq"))


def test_workload_of_an_earlier_job_is_ignored():
    stale = wl(active=False, owner_uid="00000000-0000-0000-0000-000000000000")
    assert not K.plan("lq", False, job(suspend=True), stale)


# --------------------------------------------------------------------------- status


def test_mirrored_conditions_name_the_workload_and_kueue_reason():
    conds = {t: (s, r, m) for t, s, r, m in K.mirrored_conditions(wl(conditions=PENDING), "lq")}
    assert conds[C.QUOTA_RESERVED][0] == "False" and conds[C.QUOTA_RESERVED][1] == "Pending"
    assert "job-demo-train-3f2a1" in conds[C.QUOTA_RESERVED][2] and "insufficient quota" in conds[C.QUOTA_RESERVED][2]
    assert conds[C.ADMITTED][:2] == ("False", "Pending")
    ok = {t: (s, r, m) for t, s, r, m in K.mirrored_conditions(wl(conditions=ADMITTED, cluster_queue="cq"), "lq")}
    assert ok[C.ADMITTED][0] == "True" and "ClusterQueue cq" in ok[C.ADMITTED][2]
    unknown = K.mirrored_conditions(None, "lq")
    assert {c[1] for c in unknown} == {"Unknown"}


def test_preemption_is_told_until_admitted_again():
    evicted = [("Evicted", "True", "Preempted", "Preempted to accommodate a workload (UID: x) due to prioritization in the ClusterQueue"),
               ("Preempted", "True", "InClusterQueue", "Preempted to accommodate a workload (UID: x) due to prioritization in the ClusterQueue"),
               ("QuotaReserved", "False", "Preempted", "Preempted to accommodate a workload")]
    reason, msg = K.waiting_message(wl(conditions=evicted), "lq")
    assert reason == R.PREEMPTED and "prioritization" in msg and "job-demo-train-3f2a1" in msg
    assert K.preemption(wl(conditions=evicted + ADMITTED)) is None
    reason, msg = K.waiting_message(wl(conditions=PENDING), "lq")
    assert reason == R.QUEUED and "insufficient quota" in msg


# --------------------------------------------------------------------------- the status hook


def _status(workload, j, spec_suspend=False, old=None) -> dict:
    facts = S.Facts(kind=TIJOB, job_name="demo-train", generation=1, queue="lq", workers=1)
    return S.compute_status(kind=TIJOB, old=old, generation=1, spec={"runPolicy": {"suspend": spec_suspend}}, facts=facts,
                            job=j, pods=[], storage=None, now="2026-01-01T00:00:00Z", kueue_workload=workload)


def _cond(st, type_):
    return next(c for c in st["conditions"] if c["type"] == type_)


def test_status_of_a_pending_workload():
    st = _status(wl(conditions=PENDING), job(suspend=True))
    assert st["phase"] == "Pending"
    assert _cond(st, C.RUNNING)["reason"] == R.QUEUED and "insufficient quota" in _cond(st, C.RUNNING)["message"]
    assert _cond(st, C.QUOTA_RESERVED)["status"] == "False" and _cond(st, C.ADMITTED)["status"] == "False"


def test_status_of_a_preempted_workload():
    evicted = [("Evicted", "True", "Preempted", "Preempted to accommodate a higher priority workload")]
    was_running = {"phase": "Running", "conditions": [{"type": C.SCHEDULED, "status": "True", "reason": R.PODS_SCHEDULED,
                                                       "message": "1/1 pod(s) running on a100-ord1-0"}]}
    st = _status(wl(conditions=evicted), job(suspend=True), old=was_running)
    assert st["phase"] == "Pending" and _cond(st, C.RUNNING)["reason"] == R.PREEMPTED
    assert _cond(st, C.SCHEDULED)["status"] == "False"


def test_status_of_a_job_created_suspended_has_no_workload_conditions():
    st = _status(None, job(queue=None, suspend=True), spec_suspend=True)
    assert st["phase"] == "Suspended"
    assert not [c for c in st["conditions"] if c["type"] in (C.QUOTA_RESERVED, C.ADMITTED)]
