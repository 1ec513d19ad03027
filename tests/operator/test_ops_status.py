"""Status fields users of Kubeflow/KubeRay expect (issue 14, item 12): worker counts, failed grid
shards by index, Scheduled cleared after a pre-emption, managedBy passed to the Job."""

from __future__ import annotations

from test_operator_status import SPEC, compute, cond, facts, job, pod, valid

from tinv.api.models import ConditionType as C
from tinv.operator import builders as B
from tinv.operator.builders import GRID, TIJOB
from tinv.operator.status import job_view
from tinv.operator.workers import parse_indexes, worker_status


def test_worker_counts_come_from_the_job():
    st = compute(j=job(active=3, ready=2, failed=1, succeeded=0, terminating=1), pods=[pod()])
    assert st["workers"] == {"active": 3, "ready": 2, "succeeded": 0, "failed": 1, "terminating": 1}
    valid(st)
    # the Job was removed after it finished: the last counts stay
    later = compute(old={**st, "phase": "Succeeded"}, j=None)
    assert later["workers"] == st["workers"]


def test_failed_grid_shards_by_index():
    body = {"metadata": {"name": "g-render"}, "spec": {}, "status": {"failedIndexes": "1,3-4", "completedIndexes": "0,2", "failed": 3}}
    view = job_view(body)
    st = compute(kind=GRID, f=facts(kind=GRID, job_name="g-render", workers=5), j={**job(name="g-render"), **view, "active": 1})
    assert st["failedShards"] == [1, 3, 4]
    valid(st, GRID)
    assert parse_indexes("0,2-3,x,7") == {0, 2, 3, 7} and parse_indexes(None) == set()
    assert "failedShards" not in worker_status(TIJOB, {**view}, {})  # jobs have no shards


def test_scheduled_is_cleared_after_a_preemption():
    f = facts(queue="team-gpus")
    running = compute(f=f, j=job(), pods=[pod()])
    assert cond(running, C.SCHEDULED)["status"] == "True"
    # Kueue pre-empts: the Job is suspended again, its pods are deleted
    preempted = compute(old=running, f=f, j=job(suspend=True, active=0), pods=[])
    sched = cond(preempted, C.SCHEDULED)
    assert sched["status"] == "False" and sched["reason"] == "Queued" and "team-gpus" in sched["message"]
    # user suspend too
    suspended = compute(old=running, spec={**SPEC_SUSPENDED}, j=job(suspend=True, active=0), pods=[])
    assert cond(suspended, C.SCHEDULED)["status"] == "False"


SPEC_SUSPENDED = {"training": {"checkpointsKept": 2}, "runPolicy": {"suspend": True}, "resources": {}}


def test_managed_by_reaches_the_job():
    from tinv.api.validation import validate_document
    from tinv.operator.config import OperatorConfig

    doc = {"apiVersion": "tinv.io/v1alpha1", "kind": "TextualInversionJob",
           "metadata": {"name": "j", "namespace": "ns", "uid": "u-1", "generation": 1},
           "spec": {"model": {"source": "builtin:tiny"}, "concepts": [{"token": "t", "initializer": "x", "images": "s3://b/i/"}],
                    "storage": {"uri": "s3://b/r"}, "runPolicy": {"managedBy": "kueue.x-k8s.io/multikueue"}}}
    model, problems = validate_document(doc)
    assert model is not None, problems
    job_obj = B.build_job(TIJOB, B.effective(model, OperatorConfig()), OperatorConfig())
    assert job_obj["spec"]["managedBy"] == "kueue.x-k8s.io/multikueue"
    bad, problems = validate_document({**doc, "spec": {**doc["spec"], "runPolicy": {"managedBy": "not a path"}}})
    assert bad is None and any("spec.runPolicy.managedBy" in str(p) for p in problems)
