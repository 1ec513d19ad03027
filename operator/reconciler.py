"""Reconciling children: make a resource's Job (and Service, ConfigMap) match its spec, exactly once.

Runs in kopf's handler thread pool (create / update / resume / delete) and, for re-checks, in the
status pool (`schedule`). The rules that keep GPU work from being lost or run twice:

* **one Job per record.** Before a Job is created, status.workload records it (`jobGeneration`,
  then `jobUid`). A recorded Job that is gone (GET 404) is never created again: its outcome comes
  from the Job's last view, or progress.json's final state (status.compute_status). Only the
  operator's own replacement (a spec change applied while suspended) clears the record first.
* **one writer per run root.** No Job is created while pods of an earlier one may still run
  (terminating pods included), and a Job is replaced only once its pods are gone.
* **nothing that can only fail.** A missing default credentials Secret is found before the Job is
  created (condition SecretMissing), by a metadata-only GET: the operator never reads a Secret.
* **deletion in order.** With `cleanupOnDelete` the workload is deleted and its pods waited for
  (kopf.TemporaryError, no sleeping) before the outputs are deleted, within a bounded time.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import Executor
from dataclasses import replace
from typing import Any

from pydantic import ValidationError

from tinv.api.models import GRID_KIND, RESOURCES, TIJOB_KIND
from tinv.api.models import ConditionType as C
from tinv.api.models import Reason as R
from tinv.api.storage import PROGRESS_FILE, StorageError, join, run_root
from tinv.api.validation import validate_document

from . import builders as B
from . import kueue as K
from . import policy
from .config import OperatorConfig
from .kube import ApiError, Kube, path_for
from .metrics import Metrics
from .poller import StorageReader
from .registry import Key, Registry, job_finished, live
from .status import RECOVERABLE_FAILURES, TERMINAL, Facts, job_view, placement_text, short
from .statuswriter import StatusWriter

log = logging.getLogger("tinv.operator")


class Retry(Exception):
    """A transient problem: try again after `delay` seconds (kopf.TemporaryError in handlers)."""

    def __init__(self, message: str, delay: float = 5.0):
        super().__init__(message)
        self.delay = delay


class Invalid(Exception):
    """A permanent problem with the resource (kopf.PermanentError in handlers)."""


class GaveUp(Exception):
    """The clean-up of a deleted resource stopped waiting: its outputs are kept (the message says why)."""


def record_of(status: dict[str, Any]) -> dict[str, Any] | None:
    """status.workload's record of the Job created for this resource, or None (none was)."""
    workload = status.get("workload") or {}
    if workload.get("jobGeneration") is None and not workload.get("jobUid"):
        return None
    record = {"jobGeneration": workload.get("jobGeneration"), "jobUid": workload.get("jobUid")}
    if workload.get("configMapName"):
        record["configMapName"] = workload["configMapName"]
    return record


def finished(status: dict[str, Any]) -> bool:
    """The workload's outcome is in status (a refusal the operator may lift does not count)."""
    failed = next((c for c in status.get("conditions") or [] if c.get("type") == C.FAILED), {})
    return status.get("phase") in TERMINAL and failed.get("reason") not in RECOVERABLE_FAILURES


class Reconciler:
    def __init__(self, config: OperatorConfig, kube: Kube | None, metrics: Metrics, registry: Registry,
                 status: StatusWriter, reader: StorageReader):
        self.config = config
        self.kube = kube
        self.metrics = metrics
        self.reg = registry
        self.status = status
        self.reader = reader
        self.loop: asyncio.AbstractEventLoop | None = None
        self.pool: Executor = status.api_pool
        self._locks: dict[Key, threading.Lock] = {}
        self._no_secret_check: set[str] = set()  # namespaces where the chart grants no Secret metadata check
        self._cleanup_attempts: dict[Key, int] = {}

    # ------------------------------------------------------------------ the resource
    def validate(self, kind: str, body: dict[str, Any]) -> Any:
        """The resource as a tinv.api model (schema pass; the apiserver already ran the CEL rules)."""
        doc = {"apiVersion": body.get("apiVersion"), "kind": kind, "metadata": body.get("metadata") or {}, "spec": body.get("spec")}
        try:
            return RESOURCES[kind].model_validate(doc)
        except ValidationError:
            _, problems = validate_document(doc)
            raise Invalid("; ".join(str(p) for p in problems[:10]) or "the resource does not match the schema") from None

    def _facts(self, kind: str, body: dict[str, Any], status: dict[str, Any]) -> tuple[Facts, B.Effective]:
        """The facts of a valid resource (raises Invalid / SpecError otherwise)."""
        meta = body.get("metadata") or {}
        eff = B.effective(self.validate(kind, body), self.config)
        policy.enforce(eff, self.config)  # the operator's policy (ops2, issue 14 item 8): a SpecError naming the field
        spec = eff.model.spec
        job_name = B.child_name(kind, meta.get("name"))
        facts = Facts(
            kind=kind, job_name=job_name, generation=meta.get("generation"), record=record_of(status),
            output_uri=run_root(spec.storage.uri, meta.get("namespace"), meta.get("name"), meta.get("uid")),
            storage=spec.storage.to_doc(), spec_hash=eff.spec_hash, queue=spec.resources.queue_name,
            workers=spec.resources.workers, service_name=job_name if B.needs_service(kind, eff.model) else None,
            placement=placement_text({"resources": spec.resources.to_doc()}, self.config.gpu_class_label, self.config.region_label),
        )
        return facts, eff

    def reconcile(self, kind: str, body: dict[str, Any]) -> str:
        """Make the children match the resource. Returns 'ok', 'waiting' or 'blocked'; raises Invalid or Retry.
        One at a time per resource: kopf's handler and a re-check from the sweep never interleave."""
        meta = body.get("metadata") or {}
        key: Key = (kind, meta.get("namespace"), meta.get("name"))
        with self._lock_of(key):
            return self._reconcile(kind, body)

    def _lock_of(self, key: Key) -> threading.Lock:
        with self.reg.lock:
            return self._locks.setdefault(key, threading.Lock())

    def _reconcile(self, kind: str, body: dict[str, Any]) -> str:
        meta = body.get("metadata") or {}
        ns, name, uid = meta.get("namespace"), meta.get("name"), meta.get("uid")
        key: Key = (kind, ns, name)
        job_name = B.child_name(kind, name)
        status = self.reg.status_of(key, body)
        try:
            facts, eff = self._facts(kind, body, status)
        except (Invalid, B.SpecError) as err:
            facts = Facts(kind=kind, job_name=job_name, generation=meta.get("generation"), invalid=short(str(err)), record=record_of(status))
            self.reg.set_facts(key, facts)
            raise Invalid(facts.invalid) from None
        job = self.reg.job(ns, job_name, uid)
        resolved = None
        if kind == GRID_KIND:
            resolved, waiting, blocked = self.resolve_embeddings(ns, eff.model, status)
            facts.resolved = resolved
            if job is None and (waiting or blocked):
                facts.waiting, facts.blocked = waiting, blocked
                self.reg.set_facts(key, facts)
                self.reg.wait_for(key, [e.job for e in eff.model.spec.embeddings if e.job])
                return "blocked" if blocked else "waiting"
            if waiting or blocked:
                facts.resolved = status.get("resolvedEmbeddings")
        self.reg.wait_for(key, [])
        if job is not None and job.get("removed"):
            self.reg.set_facts(key, facts)  # finished and removed: its last view tells the outcome
            return "ok"
        if job is None and finished(status):
            self.reg.set_facts(key, facts)  # the Job was removed after its outcome was recorded
            return "ok"
        if job is None and facts.record is not None:
            job = self._existing_job(ns, job_name, uid)  # the watch may lag: ask the apiserver
            if job is None and self._ran(key, eff, facts):
                facts.job_gone = True
                self.reg.set_facts(key, facts)
                log.warning("%s %s/%s: Job %s was deleted before its outcome was recorded; not re-creating it", kind, ns, name, job_name)
                return "ok"
        if job is None:
            self._create(key, eff, facts, resolved)
            return "ok"
        if job.get("deleting") or job.get("uid") == self.reg.replaced.get((ns, job_name)):
            facts.hold = (R.WAITING_FOR_PODS, f"waiting for the earlier Job {job_name} and its pods to be deleted before creating a new one")
            self.reg.set_facts(key, facts)
            raise Retry(facts.hold[1], 2)
        if not facts.record or facts.record.get("jobUid") != job.get("uid"):
            # adopt: the Job exists (created before the record had its uid, or by an older operator)
            kept = {k: v for k, v in (facts.record or {}).items() if k == "configMapName"}
            facts.record = {"jobGeneration": _int((facts.record or {}).get("jobGeneration"), job.get("generation")), "jobUid": job.get("uid"), **kept}
        facts.notice = self._update_job(key, eff, job, status, facts)
        self.reg.set_facts(key, facts)
        return "ok"

    def refuse(self, kind: str, body: dict[str, Any], message: str) -> None:
        """Record a permanent refusal (e.g. the apiserver rejected a child built from this spec)."""
        meta = body.get("metadata") or {}
        key: Key = (kind, meta.get("namespace"), meta.get("name"))
        status = self.reg.status_of(key, body)
        facts = Facts(kind=kind, job_name=B.child_name(kind, meta.get("name")), generation=meta.get("generation"),
                      invalid=short(message), record=record_of(status))
        self.reg.set_facts(key, facts)

    # ------------------------------------------------------------------ creating
    def _create(self, key: Key, eff: B.Effective, facts: Facts, resolved: list[dict[str, Any]] | None) -> None:
        kind, ns, _ = key
        uid = eff.model.metadata.uid
        hold = self._hold(eff, ns, facts.job_name, uid)
        if hold is not None:
            facts.hold = hold[:2]
            self.reg.set_facts(key, facts)
            raise Retry(hold[1], hold[2])
        generation = eff.model.metadata.generation or 0
        objs = B.children(kind, eff, self.config, resolved)
        cm = {"configMapName": facts.job_name} if objs[0]["kind"] == "ConfigMap" else {}
        self.reg.begin_creating()
        try:
            # the record goes first: if the operator dies after creating the Job, the next one knows
            self.status.write_record(key, {"jobName": facts.job_name, "configMapName": None, **cm, "jobGeneration": generation, "jobUid": None})
            facts.record = {"jobGeneration": generation, "jobUid": None, **cm}
            self.reg.set_facts(key, facts)  # status shows "creating" at once
            created = self._create_children(ns, objs, uid)
        finally:
            self.reg.end_creating()
        self.reg.replaced.pop((ns, facts.job_name), None)
        facts.record = {"jobGeneration": generation, "jobUid": created.get("uid"), **cm}
        self.reg.set_facts(key, facts)

    def _hold(self, eff: B.Effective, ns: str, job_name: str, uid: str | None) -> tuple[str, str, float] | None:
        """Why the Job must not be created yet: (reason, message, retry delay), or None."""
        pods = live(self.reg.pods(ns, job_name, uid))
        if pods:
            return (R.WAITING_FOR_PODS,
                    f"waiting for {len(pods)} pod(s) of an earlier Job {job_name} to stop before creating a new one "
                    "(two workloads must never write one run root)", 2.0)
        missing = self._missing_secret(eff, ns)
        if missing:
            return R.SECRET_MISSING, missing, 15.0
        return None

    def _missing_secret(self, eff: B.Effective, ns: str) -> str | None:
        """The defaulted credentials Secret is optional in the pod (a resource may not need it), so a
        missing one would only show as exit 69 after the model was loaded on a GPU. Check that it
        exists first, by its metadata only (the chart grants `get` on that one Secret name; where
        it does not, the check is skipped and pod state reports the problem)."""
        storage = eff.model.spec.storage
        if "storage.credentialsSecret" not in eff.defaulted or not (storage.uri or "").startswith("s3://"):
            return None
        if ns in self._no_secret_check or storage.credentials_secret is None or self.kube is None:
            return None
        name = storage.credentials_secret.name
        try:
            self.kube.metadata(path_for("Secret", ns, name))
            return None
        except ApiError as err:
            if err.not_found:
                creds = storage.credentials_secret
                return (f"the default storage credentials Secret {name} does not exist in namespace {ns}: create it with keys "
                        f"{creds.access_key_id_key} and {creds.secret_access_key_key}, or set spec.storage.credentialsSecret; "
                        "the Job is created once it exists")
            if err.status == 403:
                self._no_secret_check.add(ns)
                log.info("namespace %s: no permission to check Secret %s exists (metadata only); relying on pod state", ns, name)
                return None
            raise

    def _create_children(self, ns: str, objs: list[dict[str, Any]], uid: str | None) -> dict[str, Any]:
        """Create the built children in order (one that exists already is reused when it is this
        resource's); returns the Job's view."""
        assert self.kube is not None
        created: dict[str, Any] = {}
        for obj in objs:
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
                created = job_view(resp)
                self.reg.remember_created(ns, created)
        return created

    def _existing_job(self, ns: str, job_name: str, uid: str | None) -> dict[str, Any] | None:
        """GET the Job (the watch may not show it yet): its view, or None when it does not exist."""
        assert self.kube is not None
        try:
            resp = self.kube.get(path_for("Job", ns, job_name))
        except ApiError as err:
            if err.not_found:
                return None
            raise
        view = job_view(resp)
        if uid and view.get("ownerUid") not in (None, uid):
            raise Retry(f"Job {job_name} still belongs to an earlier resource of the same name; waiting for the garbage collector", 5)
        self.reg.remember_created(ns, view)
        return view

    def _ran(self, key: Key, eff: B.Effective, facts: Facts) -> bool:
        """Whether the recorded Job existed. Its uid in the record says so; a record without a uid
        was written just before creating it, and then progress.json tells whether it ever ran
        (absent: it never started, so creating it now runs nothing twice)."""
        if (facts.record or {}).get("jobUid"):
            return True
        view = self.reg.storage.get(key)
        if view is not None and not view.error and not view.unsupported:
            return view.progress is not None
        root = facts.output_uri or ""
        if root.startswith("pvc://"):
            return True  # unreadable here: never risk running the work twice
        try:  # the reader's client: its endpoint allow-list and limits hold here too
            return self.reader.store_for(facts.storage).exists(join(root, PROGRESS_FILE))
        except StorageError as err:
            raise Retry(f"cannot tell whether Job {facts.job_name} ran ({short(str(err), 300)}); checking again", 15) from None

    # ------------------------------------------------------------------ changing
    def _update_job(self, key: Key, eff: B.Effective, job: dict[str, Any], status: dict[str, Any], facts: Facts) -> tuple[str, str] | None:
        """Apply allowed spec changes to an existing Job; say which ones cannot be applied now."""
        assert self.kube is not None
        model = eff.model
        ns = model.metadata.namespace
        path = path_for("Job", ns, job["name"])
        if job_finished(job):
            return None
        changed = bool(job.get("specHash")) and job["specHash"] != eff.spec_hash
        if changed and job.get("suspend"):
            pods = live(self.reg.pods(ns, job["name"], model.metadata.uid))
            if job.get("active") or job.get("terminating") or pods:
                # a replacement now would be a second writer on the run root: wait for zero pods
                n = max(len(pods), int(job.get("terminating") or 0), int(job.get("active") or 0))
                raise Retry(f"spec change waits for {n} pod(s) of Job {job['name']} to stop; then the Job is replaced", 3)
            # suspended and its pods gone: replace the Job; the new one resumes from the newest
            # checkpoint. The record is cleared first (this deletion is ours, not a lost Job) and
            # Foreground deletion keeps the Job visible until its pods are gone.
            self.status.write_record(key, {"configMapName": None, "jobGeneration": None, "jobUid": None})
            facts.record = None
            self.reg.set_facts(key, facts)
            self.reg.replaced[(ns, job["name"])] = job.get("uid")  # never adopted again, even from a lagging watch
            self.kube.delete(path, "Foreground")
            self.reg.forget_created(ns, job["name"])
            raise Retry(f"spec changed while suspended: replacing Job {job['name']}", 2)
        want = bool(model.spec.run_policy.suspend)
        patch: dict[str, Any] = {}
        if model.spec.resources.queue_name:
            self.follow_kueue(ns, model.spec.resources.queue_name, want, job)  # Kueue owns spec.suspend
        elif job.get("suspend") != want:
            patch["suspend"] = want
        notice = None
        if patch:
            self.kube.merge_patch(path, {"spec": patch})
            job = {**job, **patch}
        rp = {k: v for k, v in B.job_run_policy_patch(key[0], model).items() if job.get(k) != v}
        if rp:
            try:
                self.kube.merge_patch(path, {"spec": rp})
            except ApiError as err:
                if err.retryable:
                    raise
                notice = (R.SPEC_CHANGE_PENDING, f"run policy change not applied to Job {job['name']}: {short(err.message, 300)}")
        if changed:
            notice = (
                R.SPEC_CHANGE_PENDING,
                "spec changed after the Job started (resources or grid settings); the running Job keeps its pod spec. "
                "Suspend (spec.runPolicy.suspend: true) to apply it: the Job is replaced once its pods are gone, "
                "and the workload continues from the newest checkpoint",
            )
        return notice

    # ------------------------------------------------------------------ grids
    def resolve_embeddings(self, ns: str, model: Any, status: dict[str, Any]) -> tuple[list[dict[str, Any]] | None, tuple[str, str] | None, tuple[str, str] | None]:
        """Resolve each embedding to a concrete checkpoint (uuid + URI). Returns (resolved, waiting,
        blocked): what it waits for, or why it can never resolve (both a reason and a message that
        names the field). Resolution is recorded in status and never changes afterwards."""
        wanted = model.spec.embeddings
        prev = status.get("resolvedEmbeddings") or []
        if len(prev) == len(wanted) and all(_same_embedding(e, p) for e, p in zip(wanted, prev)):
            return prev, None, None
        out: list[dict[str, Any]] = []
        for i, e in enumerate(wanted):
            if e.uri:
                out.append({"uri": e.uri})
                continue
            got = self._resolve_one(ns, e, f"spec.embeddings[{i}]")
            if isinstance(got, dict):
                out.append(got)
            elif got[0] == "waiting":
                return None, got[1], None
            else:
                return None, None, got[1]
        return out, None, None

    def _resolve_one(self, ns: str, e: Any, field: str) -> dict[str, Any] | tuple[str, tuple[str, str]]:
        jkey: Key = (TIJOB_KIND, ns, e.job)
        job = self.reg.resource(jkey)
        if job is None:
            return "waiting", (R.WAITING_FOR_JOB, f"waiting for TextualInversionJob {e.job} ({field}.job): it does not exist in namespace {ns}")
        st = job.get("status") or {}
        phase = st.get("phase") or "Pending"
        failed = next((c for c in st.get("conditions") or [] if c.get("type") == C.FAILED and c.get("status") == "True"), {})
        view = self.reg.storage.get(jkey)
        in_storage = {str(m.get("uuid")): m for m in (view.checkpoints if view else [])}
        cks = st.get("checkpoints") or []
        kept = ((job.get("spec") or {}).get("training") or {}).get("checkpointsKept", 3)
        if e.checkpoint == "latest":
            if phase == "Succeeded":
                latest = st.get("latestCheckpoint") or _newest(in_storage.values())
                if latest:
                    return {"job": e.job, "checkpoint": latest["uuid"], "uri": latest["uri"]}
                if self._read_after_end(jkey):
                    return "blocked", (R.NO_CHECKPOINT, f"TextualInversionJob {e.job} succeeded without a checkpoint in its status or storage, "
                                       f"so {field}.checkpoint 'latest' has nothing to load: check its training.checkpointEvery and outputs, "
                                       "or name an embedding uri in a new grid")
                return "waiting", (R.WAITING_FOR_CHECKPOINT, f"TextualInversionJob {e.job} succeeded; reading its final checkpoint from storage")
            if phase == "Failed" and failed.get("reason") != R.INVALID_SPEC:
                newest = st.get("latestCheckpoint")
                hint = (f"; its newest checkpoint is {newest['uuid']} (step {newest.get('step')}): to use it, create a grid that names it in {field}.checkpoint"
                        if newest else "; it has no checkpoint")
                return "blocked", (R.REFERENCED_JOB_FAILED, f"TextualInversionJob {e.job} failed ({failed.get('reason') or 'Failed'}): "
                                   f"{field}.checkpoint 'latest' takes only a finished job's final checkpoint{hint}")
            what = f"is invalid ({short(failed.get('message'), 200)}): fix it" if phase == "Failed" else f"to finish (phase {phase}, {len(cks)} checkpoint(s) so far)"
            return "waiting", (R.WAITING_FOR_JOB, f"waiting for TextualInversionJob {e.job} {what}; {field}.checkpoint 'latest' resolves to its final checkpoint")
        match = next((c for c in cks if c.get("uuid") == e.checkpoint), None) or in_storage.get(e.checkpoint)
        if match is not None:
            return {"job": e.job, "checkpoint": match["uuid"], "uri": match["uri"]}
        have = ", ".join(c.get("uuid", "?") for c in cks) or "none"
        if phase in TERMINAL:
            return "blocked", (R.CHECKPOINT_NOT_FOUND, f"checkpoint {e.checkpoint} ({field}.checkpoint) is not a checkpoint of TextualInversionJob {e.job}: "
                               f"it keeps only its newest {kept} (training.checkpointsKept) and deletes older ones; it has {have}")
        return "waiting", (R.WAITING_FOR_CHECKPOINT, f"waiting for checkpoint {e.checkpoint} ({field}.checkpoint) of TextualInversionJob {e.job} "
                           f"(phase {phase}; it has {have} and keeps the newest {kept}): if that checkpoint was already deleted, the grid fails when the job finishes")

    def _read_after_end(self, jkey: Key) -> bool:
        """Storage was read after the job ended (the final reads of the poller), or cannot be read."""
        view = self.reg.storage.get(jkey)
        return self.reg.final_sweeps.get(jkey, 0) >= 2 or bool(view and view.unsupported)

    # ------------------------------------------------------------------ Kueue
    def follow_kueue(self, ns: str, queue: str, suspend: bool, job: dict[str, Any],
                     workload: dict[str, Any] | None = None) -> None:
        """Suspend/resume a queued Job the way Kueue wants (operator/kueue.py): through its Workload's
        spec.active, or by handing a Job created suspended to Kueue; never by writing spec.suspend."""
        assert self.kube is not None
        workload = workload or self.reg.workload(ns, job["name"])
        plan = K.plan(queue, suspend, job, workload)
        if plan.job:
            self.kube.merge_patch(path_for("Job", ns, job["name"]), plan.job)
        if plan.workload and workload is not None:
            self.kube.merge_patch(K.workload_path(ns, workload["name"]), plan.workload)
        if plan.waiting:
            raise Retry(plan.waiting, 2)

    def follow_kueue_soon(self, key: Key, workload: dict[str, Any]) -> None:
        """A Workload changed: finish a suspend/resume that waited for Kueue (e.g. a Workload that did not
        exist yet when the user suspended), with this view (kopf indexes it only after the callback)."""
        facts, body = self.reg.facts.get(key), self.reg.resource(key)
        job = self.reg.job(key[1], facts.job_name) if facts else None
        if facts is None or not facts.queue or body is None or job is None or self.loop is None:
            return
        suspend = bool(((body.get("spec") or {}).get("runPolicy") or {}).get("suspend"))
        if not K.plan(facts.queue, suspend, job, workload):
            return
        queue, loop = facts.queue, self.loop

        def follow() -> None:
            try:
                self.follow_kueue(key[1], queue, suspend, job, workload)
            except Retry:
                pass
            except Exception as err:  # noqa: BLE001 - the next reconcile or Workload event retries
                log.warning("%s %s/%s: following Kueue failed: %s", *key, err)

        try:
            loop.call_soon_threadsafe(lambda: loop.run_in_executor(self.pool, follow))
        except RuntimeError:
            pass

    # ------------------------------------------------------------------ outside kopf
    def schedule(self, key: Key) -> None:
        """Re-run reconcile outside kopf (a grid whose job changed, a Job that vanished)."""
        loop = self.loop
        if loop is None:
            return

        def run() -> None:
            body = self.reg.resource(key)
            if body is None or (body.get("metadata") or {}).get("deletionTimestamp"):
                return
            try:
                self.reconcile(key[0], body)  # Registry.resource decoded a fresh copy
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
            loop.call_soon_threadsafe(lambda: loop.run_in_executor(self.pool, run))
        except RuntimeError:
            pass

    # ------------------------------------------------------------------ deletion
    def cleanup(self, kind: str, body: dict[str, Any], elapsed: float) -> str:
        """Delete a resource's outputs (storage.cleanupOnDelete), in order: delete its Job, wait for
        its pods to be gone (Retry: kopf calls again), then delete the run root. Raises GaveUp when
        the pods outlive the wait (outputs kept: a running pod must not write into a deleted
        prefix), StorageError when storage fails (the handler bounds the attempts)."""
        meta = body.get("metadata") or {}
        key: Key = (kind, meta.get("namespace"), meta.get("name"))
        ns, uid = meta.get("namespace"), meta.get("uid")
        status = self.reg.status_of(key, body)
        try:
            facts, eff = self._facts(kind, body, status)
        except (Invalid, B.SpecError) as err:
            return f"nothing to delete: {err}"
        facts.resolved = status.get("resolvedEmbeddings")
        root = facts.output_uri or ""
        job = self.reg.job(ns, facts.job_name, uid)
        job = None if job is None or job.get("removed") else job
        if job is not None and not job.get("deleting"):
            assert self.kube is not None
            try:
                self.kube.delete(path_for("Job", ns, facts.job_name), "Foreground")
            except ApiError as err:
                if not err.not_found:
                    raise
        pods = live(self.reg.pods(ns, facts.job_name, uid))
        if job is not None or pods:
            limit = self.config.termination_grace_seconds + 30
            what = f"{len(pods)} pod(s) of Job {facts.job_name}" if pods else f"Job {facts.job_name}"
            if elapsed > limit:
                raise GaveUp(f"{what} still not gone after {int(elapsed)} s; the outputs at {root} are kept, "
                             "so no running pod writes into a deleted prefix: delete them by hand once the pods are gone")
            self._deleting(key, facts, f"being deleted: waiting for {what} to stop before deleting the outputs at {root}")
            raise Retry(f"waiting for {what} to stop before deleting the outputs", 2)
        if root.startswith("pvc://"):
            return f"outputs at {root} kept: the operator cannot reach pvc:// storage"
        self._deleting(key, facts, f"being deleted: deleting the outputs at {root}")
        self.reader.delete_prefix(root, eff.model.spec.storage.to_doc())
        return f"deleted outputs at {root}"

    def _deleting(self, key: Key, facts: Facts, message: str) -> None:
        prev = self.reg.facts.get(key)
        if prev is not None and prev.deleting == message:
            return
        self.reg.set_facts(key, replace(facts, deleting=message))

    def cleanup_attempt(self, key: Key) -> int:
        """Count storage attempts of one deletion (bounded by --cleanup-retries)."""
        n = self._cleanup_attempts.get(key, 0) + 1
        self._cleanup_attempts[key] = n
        return n

    def forget(self, key: Key) -> None:
        self._cleanup_attempts.pop(key, None)
        with self.reg.lock:
            self._locks.pop(key, None)


def _int(*values: Any) -> int | None:
    for v in values:
        try:
            if v is not None:
                return int(v)
        except (TypeError, ValueError):
            continue
    return None


def _newest(manifests: Any) -> dict[str, Any] | None:
    items = [m for m in manifests if m.get("uuid") and m.get("uri")]
    return max(items, key=lambda m: (int(m.get("step") or 0), str(m.get("created_at") or m.get("createdAt") or ""))) if items else None


def _same_embedding(e: Any, prev: dict[str, Any]) -> bool:
    if e.uri:
        return prev.get("uri") == e.uri and not prev.get("job")
    return prev.get("job") == e.job and (e.checkpoint == "latest" or prev.get("checkpoint") == e.checkpoint) and bool(prev.get("uri"))
