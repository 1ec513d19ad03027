"""Kueue's contract for the Jobs of resources with ``spec.resources.queueName`` (pure: no I/O, no kopf).

A batch/v1 Job carrying the label ``kueue.x-k8s.io/queue-name`` belongs to Kueue: Kueue makes a Workload
for it, unsuspends the Job when the Workload is admitted within quota and suspends it again when the
Workload is evicted (pre-emption, deactivation). So for such a Job the operator

* never writes ``spec.suspend`` (``false`` would bypass admission and quota; ``true`` is undone by Kueue
  while the Workload stays admitted);
* stops it through Kueue's documented mechanism: the Workload's ``spec.active: false`` (Kueue evicts it and
  suspends the Job), and resumes it with ``spec.active: true`` (Kueue queues and admits it again);
* creates a Job that is suspended from the start (``runPolicy.suspend: true``) *without* the queue label, so
  Kueue never admits it before the operator could deactivate its Workload; resuming adds the label and
  Kueue takes the Job from there;
* reports the Workload's admission (QuotaReserved, Admitted, pre-emption) in the resource's conditions.

The controller feeds these functions the Job view (status.job_view), the Workload view (``workload_view``)
and the wanted state, and applies the patches they return.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tinv.api.models import ConditionType as C
from tinv.api.models import Reason as R

GROUP = "kueue.x-k8s.io"
VERSION = "v1beta2"
WORKLOADS = "workloads"
QUEUE_LABEL = f"{GROUP}/queue-name"

# Workload condition types and the reasons tinv acts on (sigs.k8s.io/kueue/apis/kueue/v1beta2).
QUOTA_RESERVED = C.QUOTA_RESERVED  # tinv mirrors these two under Kueue's own type names
ADMITTED = C.ADMITTED
EVICTED = "Evicted"
PREEMPTED = "Preempted"
REASON_PENDING = "Pending"
REASON_PREEMPTED = "Preempted"
#: The Workload conditions mirrored on the resource (same type names as Kueue's).
MIRRORED = (QUOTA_RESERVED, ADMITTED)


def workload_path(namespace: str, name: str) -> str:
    return f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{WORKLOADS}/{name}"


def owner_job(body: dict[str, Any]) -> str | None:
    """The name of the batch/v1 Job a Workload belongs to (its controller ownerReference)."""
    for ref in (body.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("kind") == "Job" and str(ref.get("apiVersion", "")).startswith("batch/") and ref.get("controller"):
            return ref.get("name")
    return None


def workload_view(body: dict[str, Any]) -> dict[str, Any]:
    """The part of a Workload tinv needs (small: kept in memory per queued resource)."""
    meta = body.get("metadata") or {}
    spec = body.get("spec") or {}
    st = body.get("status") or {}
    owner_uid = next((r.get("uid") for r in meta.get("ownerReferences") or [] if r.get("controller")), None)
    return {
        "name": meta.get("name"),
        "jobUid": owner_uid,
        "active": spec.get("active") is not False,  # defaults to true
        "queueName": spec.get("queueName"),
        "clusterQueue": (st.get("admission") or {}).get("clusterQueue"),
        "conditions": {
            c.get("type"): {"status": c.get("status"), "reason": c.get("reason", ""), "message": c.get("message", "")}
            for c in st.get("conditions") or [] if c.get("type")
        },
    }


def queue_label(queue_name: str | None, suspended: bool) -> dict[str, str]:
    """The Kueue label of a new Job: none without a queue, and none while the resource is suspended
    (Kueue would admit and start it before the operator could deactivate its Workload)."""
    return {QUEUE_LABEL: queue_name} if queue_name and not suspended else {}


@dataclass
class Plan:
    """What to change so that a queued Job follows the wanted state; empty when nothing."""

    job: dict[str, Any] = field(default_factory=dict)  # merge patch of the Job (metadata only, never spec.suspend)
    workload: dict[str, Any] = field(default_factory=dict)  # merge patch of the Workload
    waiting: str | None = None  # a step that needs Kueue first (e.g. its Workload does not exist yet)

    def __bool__(self) -> bool:
        return bool(self.job or self.workload)


def plan(queue_name: str, suspend: bool, job: dict[str, Any], workload: dict[str, Any] | None) -> Plan:
    """Follow ``suspend`` for the queued Job ``job`` (status.job_view) whose Workload view is ``workload``
    (None: Kueue has not made it yet, or the Job is not labelled for Kueue)."""
    labelled = bool(job.get("queue"))  # Kueue manages the Job (the label may be Kueue's own default)
    if workload is not None and workload.get("jobUid") not in (None, job.get("uid")):
        workload = None  # the Workload of an earlier Job of the same name
    if suspend:
        if workload is not None and workload["active"]:
            return Plan(workload={"spec": {"active": False}})
        if labelled and workload is None and not job.get("suspend"):
            return Plan(waiting="the Job runs under Kueue but its Workload is not known yet; deactivating it when it is")
        return Plan()
    out = Plan()
    if job.get("queue") != queue_name and job.get("suspend"):
        # created while suspended (no label, or the label Kueue defaults to its "default" LocalQueue):
        # hand the still-suspended Job to Kueue in the resource's queue now
        out.job = {"metadata": {"labels": {QUEUE_LABEL: queue_name}}}
    if workload is not None and not workload["active"]:
        out.workload = {"spec": {"active": True}}
    return out


# --------------------------------------------------------------------------- status


def _cond(workload: dict[str, Any] | None, type_: str) -> dict[str, Any]:
    return ((workload or {}).get("conditions") or {}).get(type_) or {}


def mirrored_conditions(workload: dict[str, Any] | None, queue_name: str) -> list[tuple[str, str, str, str]]:
    """(type, status, reason, message) of QuotaReserved and Admitted, from the Workload: the reason is
    Kueue's, the message names the Workload and its ClusterQueue (or why it waits)."""
    if workload is None:
        msg = f"waiting for Kueue to create the Workload of the Job (LocalQueue {queue_name})"
        return [(t, "Unknown", "WorkloadPending", msg) for t in MIRRORED]
    out = []
    for type_ in MIRRORED:
        c = _cond(workload, type_)
        status = c.get("status") or "False"
        reason = c.get("reason") or (REASON_PENDING if status != "True" else type_)
        msg = f"Workload {workload['name']}"
        if status == "True" and workload.get("clusterQueue"):
            msg += f" in ClusterQueue {workload['clusterQueue']}"
        else:
            msg += f" (LocalQueue {queue_name})"
        detail = c.get("message")
        if detail:
            msg += f": {detail}"
        if not workload["active"]:
            msg += "; deactivated (spec.runPolicy.suspend: true)"
        out.append((type_, status, reason, msg))
    return out


def admitted(workload: dict[str, Any] | None) -> bool:
    return _cond(workload, ADMITTED).get("status") == "True"


def preemption(workload: dict[str, Any] | None) -> str | None:
    """Kueue's message when the Workload was evicted by pre-emption (and is not admitted again yet)."""
    ev = _cond(workload, EVICTED)
    pre = _cond(workload, PREEMPTED)
    if admitted(workload):
        return None
    if pre.get("status") == "True":
        return pre.get("message") or ev.get("message") or "pre-empted"
    if ev.get("status") == "True" and ev.get("reason") == REASON_PREEMPTED:
        return ev.get("message") or "pre-empted"
    return None


def waiting_message(workload: dict[str, Any] | None, queue_name: str) -> tuple[str, str]:
    """(reason, message) of a queued Job that Kueue keeps suspended: pre-empted, or pending admission
    with Kueue's reason (e.g. insufficient quota)."""
    pre = preemption(workload)
    if pre:
        return R.PREEMPTED, (f"pre-empted by Kueue (Workload {workload['name']}): {pre}; it resumes from the newest "
                                  "checkpoint when admitted again")
    if workload is None:
        return R.QUEUED, f"waiting for Kueue to admit the Job in LocalQueue {queue_name}"
    qr = _cond(workload, QUOTA_RESERVED)
    why = qr.get("message") or "waiting for quota"
    return R.QUEUED, f"Workload {workload['name']} waits for admission in LocalQueue {queue_name}: {why}"
