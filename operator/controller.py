"""The operator's engine, shared by every kopf handler: reconcile a resource into its children,
and keep its status true to what the cluster and storage say.

Concurrency model (no thread per resource):

* kopf watches the resources, their Jobs and pods (server-side label selector) and keeps them in
  its indexes; index callbacks only mark the owning resource *dirty*.
* reconcile (`reconcile()`) runs in kopf's handler thread pool: validate, fill defaults, create the
  ConfigMap / Service / Job (409 -> read and check ownership), apply allowed spec changes.
* one status task coalesces dirty resources every `status_batch_interval`, recomputes their
  status with the pure `status.compute_status()`, and writes only changes (a merge patch of the
  status subresource) plus an Event per transition, through a bounded thread pool.
* one poll task reads every active resource's progress.json and checkpoint manifests every
  `poll_interval` seconds with a bounded thread pool, and marks changed ones dirty.
"""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import logging
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pydantic import ValidationError

from tinv.api.models import ConditionType as C
from tinv.api.models import Reason as R
from tinv.api.storage import run_root
from tinv.api.validation import validate_document

from . import builders as B
from . import kueue as K
from .config import OperatorConfig
from .kube import ApiError, Kube, path_for
from .metrics import Metrics
from .poller import StorageReader
from .status import (
    TERMINAL,
    Facts,
    StorageView,
    compute_status,
    job_view,
    merge_patch,
    new_checkpoints,
    placement_text,
    short,
    transitions,
)

log = logging.getLogger("tinv.operator")

Key = tuple[str, str, str]  # (kind, namespace, name)

#: kopf index ids (handler ids) the controller reads.
IDX_RESOURCES = {B.TIJOB: "tinv_tijobs", B.GRID: "tinv_grids"}
IDX_JOBS = "tinv_jobs"
IDX_PODS = "tinv_pods"
IDX_WORKLOADS = "tinv_kueue_workloads"  # Kueue Workloads of queued Jobs, by (namespace, job name)


class Retry(Exception):
    """A transient problem: try again after `delay` seconds (kopf.TemporaryError in handlers)."""

    def __init__(self, message: str, delay: float = 5.0):
        super().__init__(message)
        self.delay = delay


class Invalid(Exception):
    """A permanent problem with the resource (kopf.PermanentError in handlers)."""


def now_rfc3339() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _rv(body: dict[str, Any] | None) -> int:
    try:
        return int(((body or {}).get("metadata") or {}).get("resourceVersion") or 0)
    except (TypeError, ValueError):
        return 0


def slim(body: Any) -> dict[str, Any]:
    """The part of a resource the operator keeps in memory (a deep copy: kopf reuses nothing)."""
    meta = body.get("metadata", {}) or {}
    keep = ("name", "namespace", "uid", "generation", "resourceVersion", "deletionTimestamp", "creationTimestamp", "labels", "annotations")
    return {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": copy.deepcopy({k: meta[k] for k in keep if k in meta}),
        "spec": copy.deepcopy(dict(body.get("spec") or {})),
        "status": copy.deepcopy(dict(body.get("status") or {})),
    }


def _one(index: Any, key: Any) -> Any:
    """The single value of a kopf index key, or None (safe to call from a worker thread)."""
    if index is None:
        return None
    for _ in range(3):
        try:
            store = index.get(key)
            return next(iter(store), None) if store else None
        except RuntimeError:  # changed while read from another thread: read again
            continue
    return None


def _all(index: Any, key: Any) -> list[Any]:
    if index is None:
        return []
    for _ in range(3):
        try:
            store = index.get(key)
            return list(store) if store else []
        except RuntimeError:
            continue
    return []


class Controller:
    def __init__(self, config: OperatorConfig, kube: Kube | None, metrics: Metrics, reader: StorageReader | None = None):
        self.config = config
        self.kube = kube
        self.metrics = metrics
        self.reader = reader or StorageReader()
        self.indices: dict[str, Any] = {}
        self.facts: dict[Key, Facts] = {}
        self.storage: dict[Key, StorageView] = {}
        self.written: dict[Key, tuple[int, dict[str, Any]]] = {}
        self.created_jobs: dict[tuple[str, str], dict[str, Any]] = {}
        self.waiting: dict[tuple[str, str], set[Key]] = {}
        self.final_sweeps: dict[Key, int] = {}
        self.missing_since: dict[Key, float] = {}
        self.job_owner: dict[tuple[str, str], Key] = {}
        self.last_write: dict[Key, float] = {}
        self.dirty: set[Key] = set()
        self.inflight: set[Key] = set()
        self.ready = False
        self.instance = os.environ.get("POD_NAME") or socket.gethostname()
        self._lock = threading.RLock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._tasks: list[asyncio.Task] = []
        # status and Events: a smaller pool than kopf's handler pool, so a burst of creations is not
        # slowed down by status writes (which coalesce while they wait)
        self.api_pool = ThreadPoolExecutor(config.status_workers, thread_name_prefix="tinv-status")
        # Events go out on their own small pool, after the status they describe: never ahead of it
        self.event_pool = ThreadPoolExecutor(2, thread_name_prefix="tinv-events")
        self.poll_pool = ThreadPoolExecutor(config.poll_workers, thread_name_prefix="tinv-poll")
        self.poll_rounds = 0

    # ------------------------------------------------------------------ lifecycle
    async def start(self, indices: dict[str, Any]) -> None:
        self.indices = indices
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._tasks = [
            asyncio.create_task(self._status_loop(), name="tinv status writer"),
            asyncio.create_task(self._poll_loop(), name="tinv storage poller"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        self.api_pool.shutdown(wait=False, cancel_futures=True)
        self.poll_pool.shutdown(wait=False, cancel_futures=True)
        self.event_pool.shutdown(wait=False, cancel_futures=False)

    # ------------------------------------------------------------------ observations
    def resource(self, key: Key) -> dict[str, Any] | None:
        kind, ns, name = key
        return _one(self.indices.get(IDX_RESOURCES[kind]), (ns, name))

    def job(self, ns: str, job_name: str, uid: str | None = None) -> dict[str, Any] | None:
        job = _one(self.indices.get(IDX_JOBS), (ns, job_name))
        if job is None:
            job = self.created_jobs.get((ns, job_name))
        elif (ns, job_name) in self.created_jobs:
            with self._lock:
                self.created_jobs.pop((ns, job_name), None)
        if job is not None and uid and job.get("ownerUid") not in (None, uid):
            return None  # a Job of a deleted resource with the same name, not yet collected
        return job

    def pods(self, ns: str, job_name: str, uid: str | None = None) -> list[dict[str, Any]]:
        pods = _all(self.indices.get(IDX_PODS), (ns, job_name))
        return [p for p in pods if not uid or p.get("ownerUid") in (None, uid)]

    def workload(self, ns: str, job_name: str) -> dict[str, Any] | None:
        """The Kueue Workload view (kueue.workload_view) of a queued Job; None without one or without Kueue."""
        return _one(self.indices.get(IDX_WORKLOADS), (ns, job_name))

    def mark(self, key: Key) -> None:
        """Recompute this resource's status soon (thread-safe)."""
        with self._lock:
            self.dirty.add(key)
        loop, wake = self._loop, self._wake
        if loop is None or wake is None:
            return
        try:
            if _in_loop(loop):
                wake.set()
            else:
                loop.call_soon_threadsafe(wake.set)
        except RuntimeError:
            pass  # the loop is closed: shutting down

    def on_resource(self, kind: str, ns: str, name: str) -> None:
        key = (kind, ns, name)
        if key in self.facts:
            self.mark(key)
        if kind == B.TIJOB:
            for grid in list(self.waiting.get((ns, name), ())):
                self._schedule_reconcile(grid)

    def on_child(self, ns: str, job_name: str) -> None:
        key = self._owner_of(ns, job_name)
        if key is not None:
            self.mark(key)

    def on_workload(self, ns: str, job_name: str, workload: dict[str, Any]) -> None:
        """A Kueue Workload changed: refresh the status, and finish a suspend/resume that waited for
        Kueue (e.g. a Workload that did not exist yet when the user suspended)."""
        key = self._owner_of(ns, job_name)
        if key is None:
            return
        self.mark(key)
        facts, body, job = self.facts.get(key), self.resource(key), self.job(ns, job_name)
        if facts is None or not facts.queue or body is None or job is None:
            return
        suspend = bool(((body.get("spec") or {}).get("runPolicy") or {}).get("suspend"))
        if not K.plan(facts.queue, suspend, job, workload) or self._loop is None:
            return
        queue, loop = facts.queue, self._loop

        def follow() -> None:  # with this view: kopf stores it in the index only after this callback
            try:
                self._follow_kueue(ns, queue, suspend, job, workload)
            except Retry:
                pass
            except Exception as err:  # noqa: BLE001 - the next reconcile or Workload event retries
                log.warning("%s %s/%s: following Kueue failed: %s", *key, err)

        try:
            loop.call_soon_threadsafe(lambda: loop.run_in_executor(self.api_pool, follow))
        except RuntimeError:
            pass

    def _owner_of(self, ns: str, job_name: str) -> Key | None:
        return self.job_owner.get((ns, job_name))

    def forget(self, key: Key) -> None:
        with self._lock:
            facts = self.facts.pop(key, None)
            if facts is not None:
                self.job_owner.pop((key[1], facts.job_name), None)
            self.storage.pop(key, None)
            self.written.pop(key, None)
            self.last_write.pop(key, None)
            self.final_sweeps.pop(key, None)
            self.missing_since.pop(key, None)
            self.dirty.discard(key)
            for waiting in self.waiting.values():
                waiting.discard(key)
        self.reader.forget(key)

    # ------------------------------------------------------------------ reconcile
    def validate(self, kind: str, body: dict[str, Any]) -> Any:
        """The resource as a tinv.api model (schema pass; the apiserver already ran the CEL rules)."""
        doc = {"apiVersion": body.get("apiVersion"), "kind": kind, "metadata": body.get("metadata") or {}, "spec": body.get("spec")}
        model_cls = B.MODELS[kind]
        try:
            return model_cls.model_validate(doc)
        except ValidationError:
            _, problems = validate_document(doc)
            raise Invalid("; ".join(str(p) for p in problems[:10]) or "the resource does not match the schema") from None

    def reconcile(self, kind: str, body: dict[str, Any]) -> str:
        """Make the children match the resource. Returns 'ok' or 'waiting'; raises Invalid or Retry."""
        meta = body.get("metadata") or {}
        ns, name, uid = meta.get("namespace"), meta.get("name"), meta.get("uid")
        key: Key = (kind, ns, name)
        generation = meta.get("generation")
        job_name = B.child_name(kind, name)
        facts = Facts(kind=kind, job_name=job_name, generation=generation)
        try:
            model = self.validate(kind, body)
            eff = B.effective(model, self.config)
        except (Invalid, B.SpecError) as err:
            facts.invalid = short(str(err))
            self._set_facts(key, facts)
            raise Invalid(facts.invalid) from None
        spec = eff.model.spec
        storage_doc = spec.storage.to_doc()
        facts.output_uri = run_root(spec.storage.uri, ns, name, uid)
        facts.storage = storage_doc
        facts.spec_hash = eff.spec_hash
        facts.queue = spec.resources.queue_name
        facts.workers = spec.resources.workers
        facts.service_name = job_name if B.needs_service(kind, eff.model) else None
        facts.placement = placement_text({"resources": spec.resources.to_doc()}, self.config.gpu_class_label, self.config.region_label)
        status = body.get("status") or {}
        job = self.job(ns, job_name, uid)
        resolved = None
        if kind == B.GRID:
            resolved, waiting = self.resolve_embeddings(ns, eff.model, status)
            facts.resolved = resolved
            if waiting and job is None:
                facts.waiting = waiting
                self._set_facts(key, facts)
                self._wait_for(key, [e.job for e in spec.embeddings if e.job])
                return "waiting"
            if waiting and job is not None:
                facts.resolved = status.get("resolvedEmbeddings")
        self._wait_for(key, [])
        if job is None:
            failed = next((c for c in status.get("conditions") or [] if c.get("type") == C.FAILED), {})
            finished = status.get("phase") in TERMINAL and failed.get("reason") != R.INVALID_SPEC
            if finished:
                self._set_facts(key, facts)  # the Job was removed after it finished: nothing to do
                return "ok"
            self._set_facts(key, facts)  # status shows "creating" at once
            self._create_children(kind, eff, resolved, uid)
        else:
            facts.notice = self._update_job(kind, eff, job, status)
        self._set_facts(key, facts)
        return "ok"

    def refuse(self, kind: str, body: dict[str, Any], message: str) -> None:
        """Record a permanent refusal (e.g. the apiserver rejected a child built from this spec)."""
        meta = body.get("metadata") or {}
        key: Key = (kind, meta.get("namespace"), meta.get("name"))
        facts = Facts(kind=kind, job_name=B.child_name(kind, meta.get("name")), generation=meta.get("generation"), invalid=short(message))
        self._set_facts(key, facts)

    def _set_facts(self, key: Key, facts: Facts) -> None:
        with self._lock:
            if key not in self.facts:
                # the first write waits status_min_interval too: Pending -> scheduled -> Running
                # within that time is one write (and one Event), not three
                self.last_write.setdefault(key, time.monotonic())
            self.facts[key] = facts
            self.job_owner[(key[1], facts.job_name)] = key
            self.missing_since.pop(key, None)
        self.mark(key)

    def _wait_for(self, grid: Key, jobs: list[str]) -> None:
        with self._lock:
            for waiting in self.waiting.values():
                waiting.discard(grid)
            for job in jobs:
                self.waiting.setdefault((grid[1], job), set()).add(grid)

    def resolve_embeddings(self, ns: str, model: Any, status: dict[str, Any]) -> tuple[list[dict[str, Any]] | None, tuple[str, str] | None]:
        """Resolve each embedding to a concrete checkpoint (uuid + URI); or say what it waits for.
        Resolution is recorded in status and never changes afterwards (restart-safe)."""
        wanted = model.spec.embeddings
        prev = status.get("resolvedEmbeddings") or []
        if len(prev) == len(wanted) and all(_same_embedding(e, p) for e, p in zip(wanted, prev)):
            return prev, None
        out: list[dict[str, Any]] = []
        for e in wanted:
            if e.uri:
                out.append({"uri": e.uri})
                continue
            job = self.resource((B.TIJOB, ns, e.job))
            if job is None:
                return None, (R.WAITING_FOR_JOB, f"waiting for TextualInversionJob {e.job}: it does not exist in namespace {ns}")
            st = job.get("status") or {}
            phase = st.get("phase") or "Pending"
            cks = st.get("checkpoints") or []
            if e.checkpoint == "latest":
                latest = st.get("latestCheckpoint")
                if phase == "Succeeded" and latest:
                    out.append({"job": e.job, "checkpoint": latest["uuid"], "uri": latest["uri"]})
                    continue
                if phase == "Failed":
                    if latest:
                        out.append({"job": e.job, "checkpoint": latest["uuid"], "uri": latest["uri"]})
                        continue
                    return None, (R.WAITING_FOR_CHECKPOINT, f"TextualInversionJob {e.job} failed without a checkpoint; fix and re-run it, or name a checkpoint uri")
                return None, (R.WAITING_FOR_JOB, f"waiting for TextualInversionJob {e.job} to finish (phase {phase}, {len(cks)} checkpoint(s) so far): 'latest' resolves to its final checkpoint")
            match = next((c for c in cks if c.get("uuid") == e.checkpoint), None)
            if match is None:
                return None, (R.WAITING_FOR_CHECKPOINT, f"waiting for checkpoint {e.checkpoint} of TextualInversionJob {e.job} (phase {phase})")
            out.append({"job": e.job, "checkpoint": match["uuid"], "uri": match["uri"]})
        return out, None

    def _create_children(self, kind: str, eff: B.Effective, resolved: list[dict[str, Any]] | None, uid: str) -> None:
        assert self.kube is not None
        ns = eff.model.metadata.namespace
        for obj in B.children(kind, eff, self.config, resolved):
            okind, oname = obj["kind"], obj["metadata"]["name"]
            try:
                resp = self.kube.create(path_for(okind, ns), obj)
            except ApiError as err:
                if not err.exists:
                    raise
                resp = self.kube.get(path_for(okind, ns, oname))
                owner = ((resp.get("metadata") or {}).get("labels") or {}).get(B.LABEL_OWNER_UID)
                if owner != uid:
                    raise Retry(f"{okind} {oname} still belongs to an earlier resource of the same name; waiting for the garbage collector", 5) from None
                if okind == "ConfigMap" and resp.get("data") != obj["data"]:
                    resp = self.kube.merge_patch(path_for(okind, ns, oname), {"data": obj["data"]})
            if okind == "Job":
                with self._lock:
                    self.created_jobs[(ns, oname)] = job_view(resp)

    def _update_job(self, kind: str, eff: B.Effective, job: dict[str, Any], status: dict[str, Any]) -> tuple[str, str] | None:
        """Apply allowed spec changes to an existing Job; say which ones cannot be applied now."""
        assert self.kube is not None
        model = eff.model
        ns = model.metadata.namespace
        path = path_for("Job", ns, job["name"])
        finished = any((job.get("conditions") or {}).get(t, {}).get("status") == "True" for t in ("Complete", "Failed", "FailureTarget", "SuccessCriteriaMet"))
        if finished:
            return None
        if job.get("specHash") and job["specHash"] != eff.spec_hash and job.get("suspend") and not job.get("active"):
            # suspended and its pods gone: replace the Job; the new one resumes from the newest checkpoint
            self.kube.delete(path, "Background")
            with self._lock:
                self.created_jobs.pop((ns, job["name"]), None)
            raise Retry(f"spec changed while suspended: replacing Job {job['name']}", 2)
        want = bool(model.spec.run_policy.suspend)
        patch: dict[str, Any] = {}
        if model.spec.resources.queue_name:
            self._follow_kueue(ns, model.spec.resources.queue_name, want, job)  # Kueue owns spec.suspend
        elif job.get("suspend") != want:
            patch["suspend"] = want
        notice = None
        if patch:
            self.kube.merge_patch(path, {"spec": patch})
            job = {**job, **patch}
        rp = {k: v for k, v in B.job_run_policy_patch(kind, model).items() if job.get(k) != v}
        if rp:
            try:
                self.kube.merge_patch(path, {"spec": rp})
            except ApiError as err:
                if err.retryable:
                    raise
                notice = (_spec_change_pending(), f"run policy change not applied to Job {job['name']}: {short(err.message, 300)}")
        if job.get("specHash") and job["specHash"] != eff.spec_hash:
            notice = (
                _spec_change_pending(),
                "spec changed after the Job started (resources or grid settings); the running Job keeps its pod spec. "
                "Suspend (spec.runPolicy.suspend: true) to apply it: the Job is replaced once its pods are gone, "
                "and the workload continues from the newest checkpoint",
            )
        return notice

    def _follow_kueue(self, ns: str, queue: str, suspend: bool, job: dict[str, Any],
                      workload: dict[str, Any] | None = None) -> None:
        """Suspend/resume a queued Job the way Kueue wants (operator/kueue.py): through its Workload's
        spec.active, or by handing a Job created suspended to Kueue; never by writing spec.suspend."""
        assert self.kube is not None
        workload = workload or self.workload(ns, job["name"])
        plan = K.plan(queue, suspend, job, workload)
        if plan.job:
            self.kube.merge_patch(path_for("Job", ns, job["name"]), plan.job)
        if plan.workload and workload is not None:
            self.kube.merge_patch(K.workload_path(ns, workload["name"]), plan.workload)
        if plan.waiting:
            raise Retry(plan.waiting, 2)

    def _schedule_reconcile(self, key: Key) -> None:
        """Re-run reconcile outside kopf (a grid whose job changed, a vanished Job)."""
        loop = self._loop
        if loop is None:
            return

        def run() -> None:
            body = self.resource(key)
            if body is None or (body.get("metadata") or {}).get("deletionTimestamp"):
                return
            try:
                self.reconcile(key[0], copy.deepcopy(body))
                self.metrics.reconciles.labels(key[0], "ok").inc()
            except Retry as err:
                log.info("%s %s/%s: %s (retried at the next sweep)", key[0], key[1], key[2], err)
            except Invalid:
                pass
            except ApiError as err:
                self.metrics.reconcile_errors.labels(key[0], str(err.status)).inc()
                log.warning("%s %s/%s: reconcile failed: %s (retried at the next sweep)", key[0], key[1], key[2], err)
            except Exception:  # noqa: BLE001
                log.exception("%s %s/%s: reconcile failed", *key)

        try:
            loop.call_soon_threadsafe(lambda: loop.run_in_executor(self.api_pool, run))
        except RuntimeError:
            pass

    # ------------------------------------------------------------------ status
    def compute(self, key: Key, now: str | None = None) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]] | None:
        facts = self.facts.get(key)
        body = self.resource(key)
        if facts is None or body is None:
            return None
        meta = body.get("metadata") or {}
        if meta.get("deletionTimestamp"):
            return None
        uid = meta.get("uid")
        old = body.get("status") or {}
        written = self.written.get(key)
        if written and written[0] > _rv(body):
            old = written[1]  # our last write is newer than the watch has shown yet
        job = None if facts.invalid or facts.waiting else self.job(key[1], facts.job_name, uid)
        pods = self.pods(key[1], facts.job_name, uid) if job else []
        new = compute_status(
            kind=key[0], old=old, generation=meta.get("generation"), spec=body.get("spec") or {}, facts=facts,
            job=job, pods=pods, storage=self.storage.get(key), now=now or now_rfc3339(),
            kueue_workload=self.workload(key[1], facts.job_name) if job and facts.queue else None,
        )
        return body, old, new

    def write_status(self, key: Key, body: dict[str, Any], old: dict[str, Any], new: dict[str, Any]) -> None:
        """PATCH the status subresource with the changes, then post an Event per transition."""
        assert self.kube is not None
        patch = merge_patch(old, new)
        if not patch:
            return
        kind, ns, name = key
        log.debug("status of %s %s/%s: %s", kind, ns, name, patch)
        try:
            resp = self.kube.merge_patch(path_for(kind, ns, name, "status"), {"status": patch})
        except ApiError as err:
            if err.not_found:
                return
            raise
        with self._lock:
            self.written[key] = (_rv(resp), resp.get("status") or new)
        self.metrics.status_updates.labels(kind).inc()
        added = new_checkpoints(old, new)
        if added:
            self.metrics.checkpoints.labels(kind).inc(added)
        meta = resp.get("metadata") or body.get("metadata") or {}
        events = transitions(old, new)

        def post_all() -> None:  # in order, one object's Events of one change together
            for type_, reason, message in events:
                self.post_event(kind, meta, type_, reason, message)

        if events:
            try:
                self.event_pool.submit(post_all)
            except RuntimeError:  # shutting down
                post_all()

    def post_event(self, kind: str, meta: dict[str, Any], type_: str, reason: str, message: str) -> None:
        assert self.kube is not None
        ts = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        ns = meta.get("namespace")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta.get('name')}.", "namespace": ns},
            "involvedObject": {
                "apiVersion": B.API_VERSION, "kind": kind, "name": meta.get("name"), "namespace": ns, "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
            "type": type_,
            "reason": reason,
            "message": short(message, 1024),
            "source": {"component": B.MANAGED_BY},
            "reportingComponent": f"{B.MANAGED_BY}",
            "reportingInstance": self.instance[:128],
            "firstTimestamp": ts[:19] + "Z",
            "lastTimestamp": ts[:19] + "Z",
            "count": 1,
        }
        try:
            self.kube.create(path_for("Event", ns), event)
            self.metrics.events.labels(type_).inc()
        except ApiError as err:
            log.warning("cannot post Event %s on %s %s/%s: %s", reason, kind, ns, meta.get("name"), err)

    async def _status_loop(self) -> None:
        assert self._wake is not None and self._loop is not None
        loop = self._loop
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(self.config.status_batch_interval)  # coalesce a burst of events
            if not self.ready:
                continue
            soon = time.monotonic() - self.config.status_min_interval
            with self._lock:
                batch = {k for k in self.dirty - self.inflight if self.last_write.get(k, 0.0) <= soon}
                self.dirty -= batch
                deferred = bool(self.dirty - self.inflight)
            if deferred:
                # written less than status_min_interval ago: coalesce further changes into one write
                loop.call_later(self.config.status_min_interval, self._wake.set)
            now = now_rfc3339()
            for key in batch:
                try:
                    result = self.compute(key, now)
                except Exception:  # noqa: BLE001 - one resource must not stop the others
                    log.exception("computing the status of %s %s/%s failed", *key)
                    continue
                if result is None:
                    continue
                body, old, new = result
                if merge_patch(old, new) is None:
                    continue
                with self._lock:
                    self.inflight.add(key)
                    self.last_write[key] = time.monotonic()
                fut = loop.run_in_executor(self.api_pool, self.write_status, key, body, old, new)
                fut.add_done_callback(lambda f, key=key: self._written(key, f))

    def _written(self, key: Key, fut: asyncio.Future) -> None:
        with self._lock:
            self.inflight.discard(key)
        exc = fut.exception() if not fut.cancelled() else None
        if exc is not None:
            status = getattr(exc, "status", "exception")
            self.metrics.reconcile_errors.labels(key[0], f"status-{status}").inc()
            log.warning("writing the status of %s %s/%s failed: %s (retrying)", *key, exc)
            if self._loop is not None:
                self._loop.call_later(2.0, self.mark, key)
            return
        with self._lock:
            pending = key in self.dirty
        if pending and self._wake is not None:
            self._wake.set()

    # ------------------------------------------------------------------ storage polling
    def poll_targets(self) -> list[tuple[Key, Facts]]:
        out = []
        for key, facts in list(self.facts.items()):
            if facts.invalid or facts.waiting or not facts.output_uri:
                continue
            body = self.resource(key)
            if body is None:
                continue
            phase = (body.get("status") or {}).get("phase")
            if phase in TERMINAL:
                # a couple of final reads catch the last checkpoint and progress after the end
                n = self.final_sweeps.get(key, 0)
                if n >= 2:
                    continue
                self.final_sweeps[key] = n + 1
            else:
                self.final_sweeps.pop(key, None)
            out.append((key, facts))
        return out

    def _read(self, key: Key, facts: Facts) -> tuple[Key, StorageView]:
        view = self.reader.read(key, facts.output_uri or "", facts.storage, checkpoints=key[0] == B.TIJOB)
        return key, view

    async def poll_once(self) -> int:
        assert self._loop is not None
        targets = self.poll_targets()
        t0 = time.monotonic()
        futures = [self._loop.run_in_executor(self.poll_pool, self._read, key, facts) for key, facts in targets]
        changed = 0
        for result in await asyncio.gather(*futures, return_exceptions=True):
            if isinstance(result, BaseException):
                log.warning("storage read failed: %s", result)
                continue
            key, view = result
            if view.error:
                self.metrics.read_failures.labels(key[0]).inc()
            if key not in self.facts:
                continue
            if self.storage.get(key) != view:
                self.storage[key] = view
                changed += 1
                self.mark(key)
        self.metrics.poll_seconds.observe(time.monotonic() - t0)
        self.metrics.poll_targets.set(len(targets))
        self.poll_rounds += 1
        return changed

    def sweep(self) -> None:
        """Every poll interval: recompute every status (cheap, catches missed events), count phases,
        re-check waiting grids, and recreate a Job that vanished before its resource finished."""
        counts: dict[tuple[str, str], int] = {}
        now = time.monotonic()
        for key, facts in list(self.facts.items()):
            body = self.resource(key)
            if body is None:
                continue
            phase = (body.get("status") or {}).get("phase") or "Pending"
            counts[(key[0], phase)] = counts.get((key[0], phase), 0) + 1
            self.mark(key)
            if facts.waiting:
                self._schedule_reconcile(key)
            elif not facts.invalid and phase not in TERMINAL:
                uid = (body.get("metadata") or {}).get("uid")
                if self.job(key[1], facts.job_name, uid) is None:
                    first = self.missing_since.setdefault(key, now)
                    if now - first > max(30.0, 2 * self.config.poll_interval):
                        self.missing_since.pop(key, None)
                        log.info("%s %s/%s: Job %s is gone; recreating it", *key, facts.job_name)
                        self._schedule_reconcile(key)
                else:
                    self.missing_since.pop(key, None)
                    job = self.job(key[1], facts.job_name, uid)
                    if job and job.get("suspend") and not job.get("active") and job.get("specHash") not in (None, facts.spec_hash):
                        self._schedule_reconcile(key)  # a pending spec change can be applied now
        for kind in (B.TIJOB, B.GRID):
            for phase in ("Pending", "Waiting", "Running", "Suspended", "Succeeded", "Failed"):
                self.metrics.resources.labels(kind, phase).set(counts.get((kind, phase), 0))

    async def _poll_loop(self) -> None:
        interval = self.config.poll_interval
        while True:
            t0 = time.monotonic()
            if self.ready:
                try:
                    await self.poll_once()
                    self.sweep()
                except Exception:  # noqa: BLE001 - keep polling
                    log.exception("storage poll round failed")
            await asyncio.sleep(max(0.05, interval - (time.monotonic() - t0)))

    # ------------------------------------------------------------------ deletion
    def cleanup_outputs(self, kind: str, body: dict[str, Any]) -> str:
        """Delete a resource's outputs (storage.cleanupOnDelete). Raises StorageError to retry."""
        meta = body.get("metadata") or {}
        try:
            eff = B.effective(self.validate(kind, body), self.config)
        except (Invalid, B.SpecError) as err:
            return f"nothing to delete: {err}"
        root = run_root(eff.model.spec.storage.uri, meta.get("namespace"), meta.get("name"), meta.get("uid"))
        if root.startswith("pvc://"):
            return f"outputs at {root} kept: the operator cannot reach pvc:// storage"
        self.reader.delete_prefix(root, eff.model.spec.storage.to_doc())
        return f"deleted outputs at {root}"


def _in_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def _same_embedding(e: Any, prev: dict[str, Any]) -> bool:
    if e.uri:
        return prev.get("uri") == e.uri and not prev.get("job")
    return prev.get("job") == e.job and (e.checkpoint == "latest" or prev.get("checkpoint") == e.checkpoint) and bool(prev.get("uri"))


def _spec_change_pending() -> str:
    from .status import SPEC_CHANGE_PENDING

    return SPEC_CHANGE_PENDING

