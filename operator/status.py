"""Pure status logic: what the user reads in `kubectl get/describe`.

`compute_status()` turns what the operator observed (the resource, its Job, the Job's pods, what
storage says, and what the handler decided) into the resource's whole `status`, in the shape of
tinv.api.models (camelCase). `merge_patch()` makes the minimal JSON merge patch from the old
status, and `transitions()` the Events a change deserves. No I/O and no clock (``now`` is an
argument), so all of it is unit-tested directly.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

from pydantic import ValidationError

from tinv.api.models import ConditionType as C
from tinv.api.models import GRID_KIND as GRID
from tinv.api.models import TIJOB_KIND as TIJOB
from tinv.api.models import Annotation, GenerationGridStatus, TextualInversionJobStatus
from tinv.api.models import Reason as R
from tinv.api.storage import join

from . import kueue as K
from .builders import COMPLETION_INDEX_ANNOTATION, GPU_RESOURCE, LABEL_OWNER_UID
from .workers import worker_status


QUEUED = R.QUEUED
RESOLVED = R.RESOLVED
SPEC_CHANGE_PENDING = R.SPEC_CHANGE_PENDING
STARTING = R.STARTING
RETRYING = R.RETRYING
CONTAINER_CONFIG_ERROR = R.CONTAINER_CONFIG_ERROR
CHECKPOINT_RECORDED = R.CHECKPOINT_RECORDED

TERMINAL = ("Succeeded", "Failed")
WARNING_REASONS = {
    R.INVALID_SPEC,
    R.SECRET_MISSING,
    R.STORAGE_UNREACHABLE,
    R.UNSCHEDULABLE,
    R.IMAGE_PULL_BACK_OFF,
    R.BACKOFF_LIMIT_EXCEEDED,
    R.DEADLINE_EXCEEDED,
    R.NON_RETRYABLE_EXIT,
    SPEC_CHANGE_PENDING,
    CONTAINER_CONFIG_ERROR,
    RETRYING,
    R.JOB_DELETED,
    R.CHECKPOINT_NOT_FOUND,
    R.NO_CHECKPOINT,
    R.REFERENCED_JOB_FAILED,
}
MAX_MESSAGE = 1024
INT64_MAX = 2**63 - 1  # the CRD's integers are int64
IMAGE_PULL_REASONS = ("ImagePullBackOff", "ErrImagePull", "InvalidImageName", "ErrImageNeverPull", "RegistryUnavailable")


def short(text: str | None, limit: int = MAX_MESSAGE) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def sig(value: Any, digits: int = 4) -> float | None:
    """Round to `digits` significant digits (loss 0.123456 -> 0.1235); None for non-numbers."""
    if value is None or isinstance(value, bool):
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(v):
        return None
    return float(f"{v:.{digits}g}")


# --------------------------------------------------------------------------- views of children


def job_view(body: dict[str, Any]) -> dict[str, Any]:
    """The part of a batch/v1 Job the status needs (small: kept in memory for every resource)."""
    meta = body.get("metadata", {})
    spec = body.get("spec", {})
    st = body.get("status", {}) or {}
    return {
        "name": meta.get("name"),
        "uid": meta.get("uid"),
        "suspend": bool(spec.get("suspend")),
        "completions": spec.get("completions"),
        "specHash": (meta.get("annotations") or {}).get(Annotation.SPEC_HASH),
        "generation": (meta.get("annotations") or {}).get(Annotation.RESOURCE_GENERATION),
        "ownerUid": (meta.get("labels") or {}).get(LABEL_OWNER_UID),
        "queue": (meta.get("labels") or {}).get(K.QUEUE_LABEL),  # set: Kueue owns spec.suspend
        "backoffLimit": spec.get("backoffLimit"),
        "backoffLimitPerIndex": spec.get("backoffLimitPerIndex"),
        "activeDeadlineSeconds": spec.get("activeDeadlineSeconds"),
        "ttlSecondsAfterFinished": spec.get("ttlSecondsAfterFinished"),
        "deleting": bool(meta.get("deletionTimestamp")),
        "active": st.get("active", 0) or 0,
        "ready": st.get("ready", 0) or 0,
        "succeeded": st.get("succeeded", 0) or 0,
        "failed": st.get("failed", 0) or 0,
        "terminating": st.get("terminating", 0) or 0,
        "failedIndexes": st.get("failedIndexes"),  # grid shards given up on (workers.worker_status)
        "completedIndexes": st.get("completedIndexes"),
        "startTime": st.get("startTime"),
        "completionTime": st.get("completionTime"),
        "conditions": {
            c.get("type"): {"status": c.get("status"), "reason": c.get("reason", ""), "message": short(c.get("message"))}
            for c in st.get("conditions", []) or []
        },
    }


def pod_view(body: dict[str, Any]) -> dict[str, Any]:
    """The part of a worker pod the status needs: phase, scheduling, container waits and exits."""
    meta = body.get("metadata", {})
    st = body.get("status", {}) or {}
    conds = {c.get("type"): c for c in st.get("conditions", []) or []}
    sched = conds.get("PodScheduled") or {}
    disruption = conds.get("DisruptionTarget") or {}
    waiting, terminated = [], []
    for cs in (st.get("initContainerStatuses") or []) + (st.get("containerStatuses") or []):
        state = cs.get("state") or {}
        if "waiting" in state and state["waiting"]:
            w = state["waiting"]
            waiting.append({"container": cs.get("name"), "reason": w.get("reason", ""), "message": short(w.get("message")), "image": cs.get("image")})
        if "terminated" in state and state["terminated"]:
            t = state["terminated"]
            terminated.append(
                {
                    "container": cs.get("name"),
                    "exitCode": t.get("exitCode"),
                    "reason": t.get("reason", ""),
                    "message": (t.get("message") or "")[:4096],
                    "finishedAt": t.get("finishedAt"),
                }
            )
    return {
        "name": meta.get("name"),
        "ownerUid": (meta.get("labels") or {}).get(LABEL_OWNER_UID),
        "index": (meta.get("annotations") or {}).get(COMPLETION_INDEX_ANNOTATION),
        "phase": st.get("phase", "Pending"),
        "node": (body.get("spec") or {}).get("nodeName"),
        "deleting": bool(meta.get("deletionTimestamp")),
        "created": meta.get("creationTimestamp"),
        "startTime": st.get("startTime"),
        "scheduled": {"status": sched.get("status"), "reason": sched.get("reason", ""), "message": short(sched.get("message"))} if sched else None,
        "disrupted": disruption.get("status") == "True",
        "waiting": waiting,
        "terminated": terminated,
    }


# --------------------------------------------------------------------------- storage documents


def normalize_checkpoint(d: Any) -> dict[str, Any] | None:
    """A CheckpointRef (camelCase) from a manifest, progress.json or termination-message entry."""
    if not isinstance(d, dict) or not d.get("uuid") or not d.get("uri"):
        return None
    try:
        step = int(d.get("step", 0) or 0)
    except (TypeError, ValueError):
        return None
    if step > INT64_MAX:
        return None  # the CRD's integer is int64: such a checkpoint could never be in status (nor take a place among the newest)
    out: dict[str, Any] = {"uuid": str(d["uuid"]), "step": max(step, 0), "uri": str(d["uri"])}
    created = d.get("createdAt") or d.get("created_at")
    if created:
        out["createdAt"] = str(created)
    loss = sig(d.get("loss"))
    if loss is not None:
        out["loss"] = loss
    return out


def merge_checkpoints(keep: int, *sources: Iterable[Any]) -> list[dict[str, Any]]:
    """Union of checkpoint lists by uuid (later sources fill missing fields), oldest step first,
    the newest `keep` kept. Status never loses a checkpoint that is still among the newest."""
    merged: dict[str, dict[str, Any]] = {}
    for source in sources:
        for item in source or []:
            ck = normalize_checkpoint(item)
            if ck is None:
                continue
            prev = merged.get(ck["uuid"])
            merged[ck["uuid"]] = {**prev, **{k: v for k, v in ck.items() if v is not None}} if prev else ck
    ordered = sorted(merged.values(), key=lambda c: (c["step"], c.get("createdAt", ""), c["uuid"]))
    return ordered[-keep:] if keep > 0 else ordered


def _first(d: dict[str, Any], *keys: str) -> Any:
    for k in keys:
        if d.get(k) is not None:
            return d[k]
    return None


def _count(value: Any) -> int | None:
    try:
        return max(int(value), 0) if value is not None and not isinstance(value, bool) else None
    except (TypeError, ValueError):
        return None


def summary(done: int | None, total: int | None) -> str | None:
    if done is None:
        return None
    if not total:
        return str(done)
    return f"{done}/{total} ({min(100, int(100 * done / total))}%)"


def normalize_progress(raw: Any, kind: str) -> dict[str, Any] | None:
    """status.progress from a progress.json document (camelCase or snake_case keys accepted)."""
    if not isinstance(raw, dict):
        return None
    out: dict[str, Any] = {}
    if kind == TIJOB:
        out["step"] = _count(_first(raw, "step"))
        out["totalSteps"] = _count(_first(raw, "totalSteps", "total_steps"))
        out["loss"] = sig(_first(raw, "loss"))
        out["samplesPerSecond"] = sig(_first(raw, "samplesPerSecond", "samples_per_second"), 3)
        out["summary"] = summary(out["step"], out["totalSteps"])
    else:
        out["imagesDone"] = _count(_first(raw, "imagesDone", "images_done"))
        out["imagesTotal"] = _count(_first(raw, "imagesTotal", "images_total"))
        out["imagesPerSecond"] = sig(_first(raw, "imagesPerSecond", "images_per_second"), 3)
        out["summary"] = summary(out["imagesDone"], out["imagesTotal"])
    if out.get("samplesPerSecond") is not None and out["samplesPerSecond"] < 0:
        out["samplesPerSecond"] = None
    out["etaSeconds"] = _count(_first(raw, "etaSeconds", "eta_seconds"))
    updated = _first(raw, "updatedAt", "updated_at")
    out["updatedAt"] = str(updated) if updated else None
    out = {k: v for k, v in out.items() if v is not None}
    return out or None


def progress_checkpoints(raw: Any) -> list[Any]:
    """Complete checkpoints a progress.json lists (the trainer writes them after their manifest)."""
    if not isinstance(raw, dict):
        return []
    items = list(raw.get("checkpoints") or [])
    latest = _first(raw, "latestCheckpoint", "latest_checkpoint")
    if latest:
        items.append(latest)
    return items


def parse_termination(message: str | None) -> dict[str, Any] | None:
    """The trainer's JSON summary from the termination message, or None (e.g. a log tail)."""
    if not message:
        return None
    try:
        doc = json.loads(message)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def termination_summary(message: str | None) -> str | None:
    """A short, human line from a termination message (JSON summary or the log tail)."""
    if not message:
        return None
    doc = parse_termination(message)
    if doc is None:
        lines = [ln.strip() for ln in message.strip().splitlines() if ln.strip()]
        return short(" | ".join(lines[-3:]), 512) if lines else None
    parts = []
    head = doc.get("reason") or doc.get("phase") or doc.get("state")
    if head:
        parts.append(str(head))
    if doc.get("message"):
        parts.append(str(doc["message"]))
    step, total = doc.get("step"), doc.get("totalSteps") or doc.get("total_steps")
    if step is not None:
        parts.append(f"step {step}/{total}" if total else f"step {step}")
    images = _first(doc, "imagesDone", "images_done")
    if images is not None:
        parts.append(f"images {images}/{_first(doc, 'imagesTotal', 'images_total') or '?'}")
    loss = sig(doc.get("loss"))
    if loss is not None:
        parts.append(f"loss {loss}")
    latest = doc.get("latestCheckpoint") or doc.get("latest_checkpoint")
    if isinstance(latest, dict) and latest.get("uuid"):
        parts.append(f"latest checkpoint {latest['uuid']}")
    return short("; ".join(parts), 512) or None


# --------------------------------------------------------------------------- inputs


@dataclass
class StorageView:
    """What the poller last read from a resource's run root."""

    progress: dict[str, Any] | None = None  # the raw progress.json
    checkpoints: list[dict[str, Any]] = field(default_factory=list)  # manifests (list_checkpoints)
    error: str | None = None
    unsupported: str | None = None  # e.g. pvc:// storage the operator cannot read


@dataclass
class Facts:
    """What the reconcile handler decided about a resource (kept in memory, rebuilt on restart)."""

    kind: str
    job_name: str
    generation: int | None = None  # the metadata.generation reconciled (status.observedGeneration)
    invalid: str | None = None  # InvalidSpec message: permanent until the spec changes
    waiting: tuple[str, str] | None = None  # (reason, message) of a grid waiting for a job
    blocked: tuple[str, str] | None = None  # (reason, message): a grid reference that can never resolve
    hold: tuple[str, str] | None = None  # (reason, message): the Job is not created yet (SecretMissing, WaitingForPods)
    resolved: list[dict[str, Any]] | None = None  # grid: resolved embeddings
    notice: tuple[str, str] | None = None  # (reason, message), e.g. a spec change not applied
    output_uri: str | None = None
    service_name: str | None = None
    queue: str | None = None
    workers: int = 1
    placement: str = ""  # "gpuClass=A100 region=ORD1 nvidia.com/gpu=2" for messages
    storage: dict[str, Any] | None = None  # the effective spec.storage (endpoint, addressing style)
    spec_hash: str = ""  # what the Job should carry in its tinv.io/spec-hash annotation
    # status.workload's record of the Job created ({"jobGeneration", "jobUid"}); None: no Job created
    record: dict[str, Any] | None = None
    job_gone: bool = False  # the recorded Job is confirmed deleted (GET 404): never re-created
    deleting: str | None = None  # the resource is being deleted: what the clean-up is doing


# --------------------------------------------------------------------------- conditions


class Conditions:
    """metav1.Condition list: lastTransitionTime moves only when the status changes."""

    def __init__(self, old: Iterable[dict[str, Any]] | None, generation: int | None, now: str):
        self.items: dict[str, dict[str, Any]] = {c["type"]: dict(c) for c in old or [] if isinstance(c, dict) and c.get("type")}
        self.generation = generation
        self.now = now

    def set(self, type_: str, status: bool | str, reason: str, message: str = "") -> None:
        status = status if isinstance(status, str) else ("True" if status else "False")
        prev = self.items.get(type_)
        ltt = prev.get("lastTransitionTime") if prev and prev.get("status") == status and prev.get("lastTransitionTime") else self.now
        cond = {"type": type_, "status": status, "reason": reason, "message": short(message), "lastTransitionTime": ltt}
        if self.generation is not None:
            cond["observedGeneration"] = self.generation
        self.items[type_] = cond

    def get(self, type_: str) -> dict[str, Any] | None:
        return self.items.get(type_)

    def is_true(self, type_: str) -> bool:
        c = self.items.get(type_)
        return bool(c and c.get("status") == "True")

    def to_list(self) -> list[dict[str, Any]]:
        order = {t: i for i, t in enumerate(C.ALL)}
        return sorted(self.items.values(), key=lambda c: (order.get(c["type"], 99), c["type"]))


# --------------------------------------------------------------------------- pods


def pod_issue(pod: dict[str, Any], placement: str = "") -> tuple[str, str] | None:
    """Why a pod does not run, with a message a user can act on; None if nothing is wrong yet."""
    for w in pod.get("waiting", []):
        reason, msg = w.get("reason", ""), w.get("message", "")
        if reason == "CreateContainerConfigError" and "secret" in msg.lower():
            m = re.search(r'secret "([^"]+)" not found', msg, re.I)
            k = re.search(r"couldn't find key (\S+) in Secret (\S+)", msg, re.I)
            if k:
                secret = k.group(2).split("/")[-1]
                return R.SECRET_MISSING, f"Secret {secret} has no key {k.group(1)}: add the key or fix the reference ({msg})"
            if m:
                return R.SECRET_MISSING, f"Secret {m.group(1)} not found: create it in this namespace or fix the reference ({msg})"
            return R.SECRET_MISSING, f"a referenced Secret or key is missing: {msg}"
        if reason in IMAGE_PULL_REASONS:
            return R.IMAGE_PULL_BACK_OFF, f"cannot pull image {w.get('image') or ''}: {reason}: {msg}".strip()
        if reason == "CreateContainerConfigError":
            return CONTAINER_CONFIG_ERROR, msg or reason
    sched = pod.get("scheduled")
    if pod.get("phase") == "Pending" and sched and sched.get("status") == "False" and sched.get("reason") == "Unschedulable":
        wants = f" (wants {placement})" if placement else ""
        return R.UNSCHEDULABLE, f"{sched.get('message') or 'no node fits the pod'}{wants}"
    return None


def _terminated_config_error(term: dict[str, Any] | None) -> tuple[str, str] | None:
    """A container that could not start because of its configuration, reported as a termination
    (some node agents finish the pod instead of leaving it waiting)."""
    message = (term or {}).get("message") or ""
    if "CreateContainerConfigError" not in message:
        return None
    text = message.split("CreateContainerConfigError", 1)[1].lstrip(": ")
    return pod_issue({"waiting": [{"reason": "CreateContainerConfigError", "message": text}]}) or (CONTAINER_CONFIG_ERROR, text)


def _latest_termination(pods: list[dict[str, Any]]) -> dict[str, Any] | None:
    ends = [t for p in pods for t in p.get("terminated", [])]
    ends.sort(key=lambda t: (t.get("finishedAt") or "", t.get("exitCode") == 0))
    return ends[-1] if ends else None


def _failure_reason(job_reason: str) -> str:
    return {
        "BackoffLimitExceeded": R.BACKOFF_LIMIT_EXCEEDED,
        "DeadlineExceeded": R.DEADLINE_EXCEEDED,
        "PodFailurePolicy": R.NON_RETRYABLE_EXIT,
        "MaxFailedIndexesExceeded": R.BACKOFF_LIMIT_EXCEEDED,
        "FailedIndexes": R.BACKOFF_LIMIT_EXCEEDED,
    }.get(job_reason, job_reason or R.BACKOFF_LIMIT_EXCEEDED)


# --------------------------------------------------------------------------- the status

#: Failed reasons the operator decided itself (not the workload's outcome): they are re-checked on
#: every reconcile and lifted when the cause is gone (the spec was fixed, the referenced job re-ran).
RECOVERABLE_FAILURES = frozenset({R.INVALID_SPEC, R.CHECKPOINT_NOT_FOUND, R.NO_CHECKPOINT, R.REFERENCED_JOB_FAILED})


@dataclass
class Observed:
    """One status computation: its inputs and the status being built (`st`, `conds`)."""

    kind: str
    facts: Facts
    old: dict[str, Any]
    spec: dict[str, Any]
    job: dict[str, Any] | None
    pods: list[dict[str, Any]]
    storage: StorageView | None
    now: str
    conds: Conditions
    st: dict[str, Any]
    prior: str  # the phase before this computation (after lifting an operator-made failure)
    term: dict[str, Any] | None  # the newest container termination of the pods
    kueue_workload: dict[str, Any] | None = None  # the Kueue Workload view of a queued Job (kueue.workload_view)

    @property
    def progress(self) -> dict[str, Any]:
        return self.st.get("progress") or {}

    def job_true(self, *types: str) -> dict[str, Any] | None:
        jc = (self.job or {}).get("conditions") or {}
        return next((jc[t] for t in types if (jc.get(t) or {}).get("status") == "True"), None)


def compute_status(
    *,
    kind: str,
    old: dict[str, Any] | None,
    generation: int | None,
    spec: dict[str, Any],
    facts: Facts,
    job: dict[str, Any] | None,
    pods: list[dict[str, Any]],
    storage: StorageView | None,
    now: str,
    kueue_workload: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The whole status of a resource from what was observed. `old` is the current status;
    `kueue_workload` is the Kueue Workload view (kueue.workload_view) of a queued Job.

    A short dispatcher: `_observe` gathers what every case shares (workload, progress,
    checkpoints, the Accepted condition), `_case` names the situation, and one function per case
    sets the phase and conditions. `observedGeneration` is the generation the handler reconciled
    (facts.generation), not whatever the resource says now. The result is clamped to the CRD's
    bounds, so a strange value in storage can never make the status write fail.
    """
    reconciled = facts.generation if facts.generation is not None else generation
    o = _observe(kind, dict(old or {}), reconciled, spec, facts, job, pods, storage, now)
    o.kueue_workload = kueue_workload
    case = _case(o)
    phase = CASES[case](o)
    _kueue_admission(o)
    o.st.update(phase=phase, conditions=o.conds.to_list(), observedGeneration=reconciled)
    _overlay_storage(o)
    return clamp_status(kind, o.st, o.old)


def _observe(kind: str, old: dict[str, Any], generation: int | None, spec: dict[str, Any], facts: Facts,
             job: dict[str, Any] | None, pods: list[dict[str, Any]], storage: StorageView | None, now: str) -> Observed:
    conds = Conditions(old.get("conditions"), generation, now)
    st: dict[str, Any] = {"workload": _workload(facts)}
    st.update(worker_status(kind, job, old))  # status.workers, status.failedShards
    if facts.output_uri:
        st["outputUri"] = facts.output_uri
    for key in ("startTime", "completionTime", "message"):
        if old.get(key):
            st[key] = old[key]
    term = _latest_termination(pods)
    term_doc = parse_termination(term.get("message")) if term else None
    progress = dict(old.get("progress") or {})
    if storage is not None and storage.progress is not None:
        progress = normalize_progress(storage.progress, kind) or progress
    elif term_doc:
        progress = {**progress, **(normalize_progress(term_doc, kind) or {})}
    if progress:
        st["progress"] = progress
    if kind == TIJOB:
        keep = int((spec.get("training") or {}).get("checkpointsKept", 3) or 3)
        sources: list[Iterable[Any]] = [old.get("checkpoints") or []]
        if old.get("latestCheckpoint"):
            sources.append([old["latestCheckpoint"]])
        if storage is not None:
            sources += [progress_checkpoints(storage.progress), storage.checkpoints]
        latest = (term_doc or {}).get("latestCheckpoint") or (term_doc or {}).get("latest_checkpoint")
        if isinstance(latest, dict):
            sources.append([latest])
        cks = merge_checkpoints(keep, *sources)
        st["checkpoints"] = cks
        if cks:
            st["latestCheckpoint"] = cks[-1]
    elif facts.resolved is not None:
        st["resolvedEmbeddings"] = facts.resolved
    elif old.get("resolvedEmbeddings"):
        st["resolvedEmbeddings"] = old["resolvedEmbeddings"]
    if term:
        text = termination_summary(term.get("message"))
        if text:
            st["message"] = text

    prior = old.get("phase") or "Pending"
    failed = conds.get(C.FAILED)
    lifted = failed and failed.get("status") == "True" and failed.get("reason") in RECOVERABLE_FAILURES
    if lifted and not (facts.invalid and failed.get("reason") == R.INVALID_SPEC) and not (facts.blocked and failed.get("reason") == facts.blocked[0]):
        # the operator's own refusal no longer holds (the spec was fixed, the reference resolves)
        conds.set(C.FAILED, False, R.VALID, "the spec is valid now" if failed.get("reason") == R.INVALID_SPEC else "the reference resolves now")
        if prior == "Failed":
            prior = "Pending"
            st.pop("completionTime", None)
    if not facts.invalid:
        if facts.notice:
            conds.set(C.ACCEPTED, True, facts.notice[0], facts.notice[1])
        else:
            conds.set(C.ACCEPTED, True, R.VALID, f"spec accepted; workload: Job {facts.job_name}")
    if conds.is_true(C.WAITING) and not facts.waiting and not facts.blocked:
        done = ", ".join(f"{e.get('job')}@{e.get('checkpoint')}" for e in (facts.resolved or []) if e.get("job"))
        conds.set(C.WAITING, False, RESOLVED, f"resolved {done}" if done else "embeddings resolved")
    return Observed(kind, facts, old, spec, job, pods, storage, now, conds, st, prior, term)


def _workload(facts: Facts) -> dict[str, Any]:
    workload: dict[str, Any] = {"jobName": facts.job_name}
    if facts.service_name:
        workload["serviceName"] = facts.service_name
    for key in ("configMapName", "jobGeneration", "jobUid"):
        if (facts.record or {}).get(key) is not None:
            workload[key] = facts.record[key]
    return workload


def _case(o: Observed) -> str:
    """The name of the situation: the key of CASES."""
    f = o.facts
    if f.deleting is not None:
        return "deleting"
    if f.invalid:
        return "invalid"
    if f.blocked:
        return "blocked"
    if f.waiting and o.job is None:
        return "waiting"
    if o.job is None:
        if o.prior in TERMINAL:
            return "finished_and_removed"
        if f.job_gone:
            return "job_gone"
        if f.hold:
            return "held"
        if (f.record or {}).get("jobUid"):
            return "job_missing"
        return "creating"
    if o.job_true("Complete", "SuccessCriteriaMet"):
        return "succeeded"
    if o.job_true("Failed", "FailureTarget"):
        return "failed"
    if o.job.get("suspend"):
        return "suspended" if ((o.spec.get("runPolicy") or {}).get("suspend") or not f.queue) else "queued"
    return "active"


# ---- one function per case: set conditions, return the phase


def _deleting(o: Observed) -> str:
    o.conds.set(C.RUNNING, False, R.DELETING, o.facts.deleting or "being deleted")
    return o.prior


def _invalid(o: Observed) -> str:
    msg = o.facts.invalid or ""
    for type_ in (C.ACCEPTED, C.RUNNING):
        o.conds.set(type_, False, R.INVALID_SPEC, msg)
    o.conds.set(C.FAILED, True, R.INVALID_SPEC, msg)
    o.st.pop("workload", None)
    o.st.setdefault("completionTime", o.now)
    return "Failed"


def _blocked(o: Observed) -> str:
    """A grid whose reference can never resolve (its spec.embeddings are immutable): Failed, with why."""
    reason, msg = o.facts.blocked or ("", "")
    o.conds.set(C.WAITING, False, reason, msg)
    o.conds.set(C.RUNNING, False, reason, msg)
    o.conds.set(C.FAILED, True, reason, msg)
    o.st.setdefault("completionTime", o.now)
    return "Failed"


def _waiting(o: Observed) -> str:
    reason, message = o.facts.waiting or ("", "")
    o.conds.set(C.WAITING, True, reason, message)
    o.conds.set(C.RUNNING, False, reason, message)
    return "Waiting"


def _finished_and_removed(o: Observed) -> str:
    """The finished Job was removed (ttlSecondsAfterFinished, or by hand): the outcome stays."""
    return o.prior


def _job_gone(o: Observed) -> str:
    """The recorded Job was deleted before its outcome reached status. It is never re-created (that
    could run finished work twice); progress.json's final state tells how it ended."""
    name = o.facts.job_name
    state = final_state(o.storage)
    if state == "succeeded":
        msg = f"Job {name} finished and was removed before the operator recorded it; progress.json says it succeeded"
        o.conds.set(C.SUCCEEDED, True, R.COMPLETED, msg)
        o.conds.set(C.RUNNING, False, R.COMPLETED, msg)
        o.st["completionTime"] = o.st.get("completionTime") or o.progress.get("updatedAt") or o.now
        _grid_outputs(o)
        return "Succeeded"
    if state == "failed":
        detail = (o.storage.progress or {}).get("message") if o.storage else None
        msg = f"Job {name} failed and was removed before the operator recorded it (progress.json: failed{f': {detail}' if detail else ''})"
        o.conds.set(C.FAILED, True, R.JOB_FAILED, msg)
        o.conds.set(C.RUNNING, False, R.JOB_FAILED, msg)
        o.st["completionTime"] = o.st.get("completionTime") or o.now
        return "Failed"
    if o.storage is None or o.storage.error:
        why = f"storage: {o.storage.error}" if o.storage and o.storage.error else "reading progress.json"
        o.conds.set(C.RUNNING, False, R.JOB_DELETED, f"Job {name} is gone; not re-created until its outcome is known ({why})")
        return "Pending" if o.prior == "Running" else o.prior
    where = o.progress.get("summary")
    latest = (o.st.get("latestCheckpoint") or {}).get("uuid")
    seen = "its progress cannot be read (pvc:// storage)" if o.storage.unsupported else f"progress.json does not say it finished{f' ({where})' if where else ''}"
    msg = (f"Job {name} was deleted before it finished and {seen}; it is not re-created, so no work runs twice. "
           + (f"Its checkpoints are kept (newest {latest}); " if latest else "")
           + "to continue, create a new resource" + (" with spec.resumeFrom.job naming this one" if o.kind == TIJOB else ""))
    o.conds.set(C.FAILED, True, R.JOB_DELETED, msg)
    o.conds.set(C.RUNNING, False, R.JOB_DELETED, msg)
    o.st["completionTime"] = o.st.get("completionTime") or o.now
    return "Failed"


def _job_missing(o: Observed) -> str:
    """The recorded Job is not in the watch: the reconciler is asking the apiserver (a moment)."""
    return o.prior


def _held(o: Observed) -> str:
    reason, msg = o.facts.hold or ("", "")
    if reason == R.UNSCHEDULABLE:
        o.conds.set(C.SCHEDULED, False, reason, msg)
    o.conds.set(C.RUNNING, False, reason, msg)
    return "Pending"


def _creating(o: Observed) -> str:
    o.conds.set(C.RUNNING, False, R.JOB_CREATED, f"creating Job {o.facts.job_name}")
    return "Pending"


def _succeeded(o: Observed) -> str:
    job = o.job or {}
    msg = o.st.get("message") or f"Job {o.facts.job_name} completed"
    o.conds.set(C.SUCCEEDED, True, R.COMPLETED, msg)
    o.conds.set(C.RUNNING, False, R.COMPLETED, msg)
    if o.conds.is_true(C.SUSPENDED):
        o.conds.set(C.SUSPENDED, False, R.RESUMED, "finished")
    _started(o)
    o.st["completionTime"] = o.st.get("completionTime") or job.get("completionTime") or o.now
    _grid_outputs(o)
    return "Succeeded"


def _failed(o: Observed) -> str:
    job, term = o.job or {}, o.term
    failed = o.job_true("Failed", "FailureTarget") or {}
    reason = _failure_reason(failed.get("reason", ""))
    detail = failed.get("message") or failed.get("reason") or "the Job failed"
    if term and term.get("exitCode") not in (None, 0):
        detail = f"{detail}; last exit code {term['exitCode']}"
    if o.st.get("message"):
        detail = f"{detail}: {o.st['message']}"
    o.conds.set(C.FAILED, True, reason, detail)
    config_error = _terminated_config_error(term)
    o.conds.set(C.RUNNING, False, *(config_error or (reason, detail)))
    _started(o)
    o.st["completionTime"] = o.st.get("completionTime") or job.get("completionTime") or o.now
    return "Failed"


def _suspended(o: Observed) -> str:
    latest = (o.st.get("latestCheckpoint") or {}).get("uuid")
    msg = "suspended: pods deleted, checkpoints kept" + (f" (newest {latest})" if latest else "")
    msg += "; set spec.runPolicy.suspend=false to resume from the newest checkpoint"
    o.conds.set(C.SUSPENDED, True, R.SUSPENDED_BY_USER, msg)
    o.conds.set(C.RUNNING, False, R.SUSPENDED_BY_USER, msg)
    _unschedule(o.conds, R.SUSPENDED_BY_USER, msg)
    _started(o)
    return "Suspended"


def _queued(o: Observed) -> str:
    reason, msg = K.waiting_message(o.kueue_workload, o.facts.queue or "")  # pending (Kueue's reason) or pre-empted
    o.conds.set(C.RUNNING, False, reason, msg)
    _unschedule(o.conds, reason, msg)  # pre-empted: its pods are gone, so is its placement
    _started(o)
    return "Pending"


def _kueue_admission(o: Observed) -> None:
    """A Job Kueue manages: mirror its Workload's QuotaReserved and Admitted (operator/kueue.py)."""
    if o.facts.queue and (o.job or {}).get("queue") and not (o.job or {}).get("removed"):
        for type_, status, reason, msg in K.mirrored_conditions(o.kueue_workload, o.facts.queue):
            o.conds.set(type_, status, reason, msg)


def _unschedule(conds: Conditions, reason: str, message: str) -> None:
    """A suspended or pre-empted Job has no pods: Scheduled=True would still name their nodes."""
    if conds.is_true(C.SCHEDULED):
        conds.set(C.SCHEDULED, False, reason, message)


def _active(o: Observed) -> str:
    """An unsuspended, unfinished Job: Running when a pod runs, else why not (scheduler, kubelet, retry)."""
    f, job, pods, conds = o.facts, o.job or {}, o.pods, o.conds
    _started(o)
    if conds.is_true(C.SUSPENDED):
        latest = (o.st.get("latestCheckpoint") or {}).get("uuid")
        conds.set(C.SUSPENDED, False, R.RESUMED, "resumed" + (f" from checkpoint {latest}" if latest else ""))
    live = [p for p in pods if p.get("phase") in ("Pending", "Running") and not p.get("deleting")]
    running = [p for p in live if p.get("phase") == "Running"]
    issues = [i for i in (pod_issue(p, f.placement) for p in live if p.get("phase") == "Pending") if i]
    if running:
        nodes = sorted({p["node"] for p in running if p.get("node")})
        conds.set(C.SCHEDULED, True, R.PODS_SCHEDULED, f"{len(running)}/{f.workers} pod(s) running on {', '.join(nodes) or 'nodes'}")
        if issues:
            conds.set(C.RUNNING, True, issues[0][0], f"{len(running)}/{f.workers} workers running; {issues[0][1]}")
        else:
            where = o.progress.get("summary")
            active = R.TRAINING if o.kind == TIJOB else R.GENERATING
            conds.set(C.RUNNING, True, active, ("training" if o.kind == TIJOB else "generating") + (f": {where}" if where else ""))
        return "Running"
    if issues:
        reason, msg = issues[0]
        if reason == R.UNSCHEDULABLE:
            conds.set(C.SCHEDULED, False, reason, msg)
        else:
            conds.set(C.SCHEDULED, True, R.PODS_SCHEDULED, "pods bound to nodes")
        conds.set(C.RUNNING, False, reason, msg)
    elif live:
        bound = [p for p in live if p.get("node")]
        if bound:
            conds.set(C.SCHEDULED, True, R.PODS_SCHEDULED, f"{len(bound)} pod(s) on {', '.join(sorted({p['node'] for p in bound}))}")
            conds.set(C.RUNNING, False, STARTING, "containers starting")
        else:
            conds.set(C.RUNNING, False, STARTING, "pods waiting for the scheduler")
    elif [p for p in pods if p.get("phase") == "Failed"] and (job.get("failed") or 0) > 0:
        term = o.term
        last = termination_summary(term.get("message")) if term else None
        code = term.get("exitCode") if term else None
        msg = f"retrying after a pod exited{f' with code {code}' if code is not None else ''}" + (f": {last}" if last else "")
        msg += "; the retry resumes from the newest checkpoint" if o.kind == TIJOB else ""
        conds.set(C.RUNNING, False, *(_terminated_config_error(term) or (RETRYING, msg)))
    else:
        conds.set(C.RUNNING, False, R.JOB_CREATED, f"Job {f.job_name} created; waiting for its pods")
    return "Pending"


CASES = {
    "deleting": _deleting,
    "invalid": _invalid,
    "blocked": _blocked,
    "waiting": _waiting,
    "finished_and_removed": _finished_and_removed,
    "job_gone": _job_gone,
    "job_missing": _job_missing,
    "held": _held,
    "creating": _creating,
    "succeeded": _succeeded,
    "failed": _failed,
    "suspended": _suspended,
    "queued": _queued,
    "active": _active,
}


def _started(o: Observed) -> None:
    if (o.job or {}).get("startTime") and not o.st.get("startTime"):
        o.st["startTime"] = o.job["startTime"]


def _grid_outputs(o: Observed) -> None:
    if o.kind == GRID and o.facts.output_uri:
        o.st["galleryUri"] = join(o.facts.output_uri, "images", "index.html")
        o.st["indexUri"] = join(o.facts.output_uri, "images", "index.json")


def final_state(storage: StorageView | None) -> str | None:
    """'succeeded' or 'failed' when progress.json records the workload's end (tinv.api.storage)."""
    state = ((storage.progress if storage else None) or {}).get("state")
    return state if state in ("succeeded", "failed") else None


def _overlay_storage(o: Observed) -> None:
    """Storage trouble shows on the Running condition while the workload runs (it keeps running)."""
    if o.storage is not None and o.storage.error and o.st.get("phase") == "Running":
        o.conds.set(C.RUNNING, True, R.STORAGE_UNREACHABLE, f"running, but progress cannot be read: {o.storage.error}")
        o.st["conditions"] = o.conds.to_list()


# --------------------------------------------------------------------------- the CRD's bounds

_PROGRESS_INTS = ("step", "totalSteps", "imagesDone", "imagesTotal", "etaSeconds")
_PROGRESS_RATES = ("samplesPerSecond", "imagesPerSecond")
_STATUS_MODELS = {TIJOB: TextualInversionJobStatus, GRID: GenerationGridStatus}


def _int64(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= INT64_MAX else None


def _finite(value: Any, minimum: float | None = None) -> float | None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return None
    return None if minimum is not None and value < minimum else float(value)


def clamp_status(kind: str, st: dict[str, Any], old: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fit a computed status into the CRD's schema (tinv.api's status models): values read from
    storage that the apiserver would refuse with 422 (negative rates, steps over 2^63, a summary
    over 64 characters, a non-finite loss) are dropped or cut, so the status write never fails on
    them. Whatever the explicit rules miss, the status model's validation finds and drops; it runs
    only when the status changed (`old`, the stored status, was accepted by the apiserver), which
    keeps the steady-state sweep over thousands of resources cheap."""
    progress = st.get("progress")
    if isinstance(progress, dict):
        for key in _PROGRESS_INTS:
            if key in progress and _int64(progress[key]) is None:
                progress.pop(key)
        for key in _PROGRESS_RATES:
            if key in progress and _finite(progress[key], 0.0) is None:
                progress.pop(key)
        if "loss" in progress and _finite(progress["loss"]) is None:
            progress.pop("loss")
        if progress.get("summary") is not None:
            progress["summary"] = short(str(progress["summary"]), 64)
        if not progress:
            st.pop("progress")
    if kind == TIJOB:
        cks = [c for c in st.get("checkpoints") or [] if _int64(c.get("step")) is not None][-100:]
        for c in cks:
            if "loss" in c and _finite(c["loss"]) is None:
                c.pop("loss")
        if "checkpoints" in st:
            st["checkpoints"] = cks
            if cks:
                st["latestCheckpoint"] = cks[-1]
            else:
                st.pop("latestCheckpoint", None)
        elif st.get("latestCheckpoint") is not None and _int64(st["latestCheckpoint"].get("step")) is None:
            st.pop("latestCheckpoint")
    if st.get("message") is not None:
        st["message"] = short(str(st["message"]), 32768)
    for c in st.get("conditions") or []:
        c["reason"] = short(c.get("reason") or "", 1024)
    return st if old is not None and st == old else _drop_invalid(kind, st)


def _drop_invalid(kind: str, st: dict[str, Any]) -> dict[str, Any]:
    """Drop each field the status model refuses (a last guard: the write must never loop on 422)."""
    model = _STATUS_MODELS[kind]
    for _ in range(5):
        try:
            model.model_validate(st)
            return st
        except ValidationError as err:
            for e in err.errors():
                _drop_path(st, [p for p in e["loc"]])
    return {k: st[k] for k in ("phase", "conditions", "observedGeneration") if k in st}


def _drop_path(doc: Any, path: list[Any]) -> None:
    for step in path[:-1]:
        try:
            doc = doc[step]
        except (KeyError, IndexError, TypeError):
            return
    try:
        if isinstance(doc, list) and isinstance(path[-1], int):
            doc.pop(path[-1])
        elif isinstance(doc, dict):
            doc.pop(path[-1], None)
    except (IndexError, TypeError):
        pass


# --------------------------------------------------------------------------- patches and events


def merge_patch(old: Any, new: Any) -> Any:
    """The RFC 7386 merge patch turning `old` into `new` (None means: no change needed)."""
    if isinstance(old, dict) and isinstance(new, dict):
        patch: dict[str, Any] = {}
        for key in old.keys() - new.keys():
            patch[key] = None
        for key, value in new.items():
            if key not in old:
                patch[key] = value
            else:
                sub = merge_patch(old[key], value)
                if sub is not None:
                    patch[key] = sub
        return patch or None
    return None if old == new else new


def _running_reason(status: dict[str, Any]) -> tuple[str, str]:
    for c in status.get("conditions") or []:
        if c.get("type") == C.RUNNING:
            return c.get("reason", ""), c.get("message", "")
    return "", ""


def transitions(old: dict[str, Any] | None, new: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Events for a status change: (type Normal|Warning, reason, message) per phase transition,
    per change of the Running condition's reason, and per newly recorded checkpoint."""
    old = old or {}
    events: list[tuple[str, str, str]] = []
    old_reason, _ = _running_reason(old)
    new_reason, new_msg = _running_reason(new)
    phase_changed = old.get("phase") != new.get("phase")
    if phase_changed or (old_reason != new_reason and (new_reason in WARNING_REASONS or old_reason in WARNING_REASONS)):
        reason = new_reason or new.get("phase") or "Unknown"
        if new.get("phase") == "Failed":
            reason = next((c.get("reason") for c in new.get("conditions", []) if c.get("type") == C.FAILED), reason)
        type_ = "Warning" if reason in WARNING_REASONS or new.get("phase") == "Failed" else "Normal"
        head = f"{old.get('phase') or 'New'} -> {new.get('phase')}" if old.get("phase") != new.get("phase") else str(new.get("phase"))
        events.append((type_, reason, short(f"{head}: {new_msg}" if new_msg else head, 1000)))
    known = {c.get("uuid") for c in old.get("checkpoints") or []}
    if (old.get("latestCheckpoint") or {}).get("uuid"):
        known.add(old["latestCheckpoint"]["uuid"])
    for ck in new.get("checkpoints") or []:
        if ck.get("uuid") not in known:
            loss = f", loss {ck['loss']}" if ck.get("loss") is not None else ""
            events.append(("Normal", CHECKPOINT_RECORDED, f"checkpoint {ck['uuid']} at step {ck['step']}{loss}: {ck['uri']}"))
    for c in new.get("conditions") or []:
        if c.get("type") == C.ACCEPTED and c.get("reason") == SPEC_CHANGE_PENDING:
            prev = next((o for o in old.get("conditions") or [] if o.get("type") == C.ACCEPTED), {})
            if prev.get("reason") != SPEC_CHANGE_PENDING:
                events.append(("Warning", SPEC_CHANGE_PENDING, c.get("message", "")))
    return events


def new_checkpoints(old: dict[str, Any] | None, new: dict[str, Any]) -> int:
    known = {c.get("uuid") for c in (old or {}).get("checkpoints") or []}
    return sum(1 for c in new.get("checkpoints") or [] if c.get("uuid") not in known)


def placement_text(spec: dict[str, Any], gpu_label: str = "gpuClass", region_label: str = "region") -> str:
    r = spec.get("resources") or {}
    parts = []
    if r.get("gpuClass"):
        parts.append(f"{gpu_label}={r['gpuClass']}")
    if r.get("region"):
        parts.append(f"{region_label}={r['region']}")
    if r.get("gpusPerWorker", 1):
        parts.append(f"{GPU_RESOURCE}={r.get('gpusPerWorker', 1)}")
    return " ".join(parts)
