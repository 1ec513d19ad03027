"""The kopf handlers: small, typed, and delegating to the Controller.

Registered on an explicit registry (`register()`), so an operator can be built more than once in a
process (tests) and nothing happens at import time.

* indexes: the resources and Kueue's Workloads; their callbacks only mark a resource dirty (the
  Jobs and pods are watched by the controller itself, operator/watch.py: kopf's per-object
  machinery for 10,000 children fed only two small views);
* create / update / resume: `Controller.reconcile()`; invalid specs raise kopf.PermanentError
  (a condition, no retry loop), transient API errors kopf.TemporaryError with back-off;
* delete: only for resources with spec.storage.cleanupOnDelete (only those get the finalizer):
  delete the Job, wait for its pods (kopf.TemporaryError, never a sleep), then delete the outputs;
  bounded in time and attempts, then the outputs are kept and a Warning says so (on the operator's
  pod when the resource's namespace is terminating and takes no new Event);
* startup: kopf settings (watch timeouts, annotation-based progress, the diff-base in memory) and
  the controller's watches, status and poll tasks; cleanup: stop them.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Any

import kopf

from tinv.api.models import GROUP, PLURALS, VERSION, Annotation
from tinv.api.models import Reason as R

from . import builders as B
from . import kueue as K
from .config import OperatorConfig
from .controller import IDX_RESOURCES, IDX_WORKLOADS, Controller, GaveUp, Invalid, Retry, slim
from .kube import ApiError
from .registry import compact
from .status import short

log = logging.getLogger("tinv.operator")
FINALIZER = "tinv.io/cleanup-outputs"


def _uid(body: Any) -> str | None:
    return (body.get("metadata") or {}).get("uid")


class DiffBaseMemory(kopf.DiffBaseStorage):
    """kopf's diff-base -- the essence it compares to tell create / update / resume apart -- kept in
    the operator's memory instead of an annotation on every resource.

    kopf's annotation storage costs one PATCH of each resource after its first reconcile (2,000 of
    the 17,000 requests until every Job existed, with 2,000 new resources), one more watch event for
    kopf to process, and the spec once more, as a string, in every later event of the resource. tinv needs
    none of it: its reconcile is level-triggered (it compares the resource with its Job and its status,
    never with kopf's diff), so after a restart, when this memory is empty and kopf takes every
    resource for a new one (create instead of resume), the same reconcile runs as on resume.

    The essence is built from the parts kopf keeps: kopf's own `build` deep-copies the whole body --
    status, managedFields, every annotation -- on every watch event only to delete most of it (12 % of
    the operator's busy CPU with 1,000 resources, bench/README.md); it equals the essence kopf's
    annotation storage builds (which leaves out the annotation it stored, as this one does)."""

    def __init__(self) -> None:
        super().__init__()
        self._essences: dict[str, Any] = {}

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> Any:
        if extra_fields:  # fields of other stanzas asked for (no tinv handler does): kopf's way
            essence = super().build(body=body, extra_fields=extra_fields)
        else:
            meta = body.get("metadata") or {}
            lean = {k: v for k, v in body.items() if k not in ("metadata", "status")}
            lean["metadata"] = {k: meta[k] for k in ("name", "namespace", "labels", "annotations") if k in meta}
            essence = super().build(body=kopf.Body(lean))
        annotations = (essence.get("metadata") or {}).get("annotations") or {}
        if Annotation.DIFF_BASE in annotations:
            del annotations[Annotation.DIFF_BASE]
            self.remove_empty_stanzas(essence)
        return essence

    def fetch(self, *, body: kopf.Body) -> Any:
        return self._essences.get(_uid(body))  # kopf copies it before changing anything (progress clear)

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: Any) -> None:
        self._essences[_uid(body)] = compact(essence)  # nothing in the patch: no request

    def forget(self, uid: str | None) -> None:
        self._essences.pop(uid, None)

    def __len__(self) -> int:
        return len(self._essences)


class ProgressAnnotations(kopf.AnnotationsProgressStorage):
    """kopf's handler progress (retries, back-off) in annotations, as kopf keeps it, without kopf's
    `tinv.io/kopf-managed` marker. kopf adds the marker with the first progress record, even for a
    handler that succeeds at once and whose record it deletes in the same patch: with the diff-base
    in memory, the marker alone would still cost a PATCH and a watch event per resource. (It only
    tells other kopf operators' diff-bases to skip tinv.io/ annotations; tinv's own progress
    annotations exist only while a handler retries, and kopf strips them from the essence by prefix.)"""

    def _store_marker(self, prefix: str, patch: kopf.Patch, body: kopf.Body) -> None:
        return None


def configure_settings(settings: kopf.OperatorSettings, config: OperatorConfig, diffbase: DiffBaseMemory | None = None) -> None:
    settings.posting.reporting_component = B.MANAGED_BY
    settings.posting.level = logging.WARNING  # our own Events come from the controller
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 10
    settings.networking.request_timeout = 60
    settings.networking.connect_timeout = 10
    settings.persistence.progress_storage = ProgressAnnotations(prefix=Annotation.KOPF_PREFIX)
    settings.persistence.diffbase_storage = diffbase if diffbase is not None else DiffBaseMemory()
    settings.persistence.finalizer = FINALIZER
    settings.execution.max_workers = config.api_workers
    settings.scanning.disabled = not config.cluster_scan
    settings.peering.standalone = True


def _plain(body: Any) -> dict[str, Any]:
    return copy.deepcopy(dict(body))


def _backoff(retry: int) -> float:
    return float(min(60, 2 ** max(0, retry)))


def register(registry: kopf.OperatorRegistry, controller: Controller, config: OperatorConfig) -> None:
    metrics = controller.metrics
    on = kopf.on
    diffbase = DiffBaseMemory()

    on.login(registry=registry)(kopf.login_via_client)

    @on.startup(registry=registry)
    async def startup(settings: kopf.OperatorSettings, **kwargs: Any) -> None:
        configure_settings(settings, config, diffbase)
        indices = {k: kwargs[k] for k in (IDX_WORKLOADS, *IDX_RESOURCES.values()) if k in kwargs}
        await controller.start(indices)
        log.info("tinv operator watching namespaces %s", ", ".join(config.namespaces))

    @on.cleanup(registry=registry)
    async def cleanup(**_: Any) -> None:
        await controller.stop()

    # ---------------------------------------------------------------- indexes (kopf's watch cache)
    # Kueue hook: the Workloads of queued Jobs (operator/kueue.py); not served where Kueue's CRDs are absent
    @kopf.index(K.GROUP, K.VERSION, K.WORKLOADS, id=IDX_WORKLOADS, registry=registry)
    async def kueue_workloads(namespace: str, body: kopf.Body, **_: Any) -> dict[Any, Any] | None:
        job = K.owner_job(body)
        if not job:
            return None
        view = K.workload_view(body)
        controller.on_workload(namespace, job, view)
        return {(namespace, job): view}

    for kind, plural in PLURALS.items():
        _register_kind(registry, controller, config, metrics, kind, plural, diffbase)


def _register_kind(registry: kopf.OperatorRegistry, controller: Controller, config: OperatorConfig, metrics: Any, kind: str, plural: str,
                   diffbase: DiffBaseMemory) -> None:
    on = kopf.on

    async def index(name: str, namespace: str, body: kopf.Body, **_: Any) -> dict[Any, Any]:
        controller.on_resource(kind, namespace, name)
        return {(namespace, name): slim(body)}

    kopf.index(GROUP, VERSION, plural, id=IDX_RESOURCES[kind], registry=registry)(index)

    async def deleted(type: str, name: str, namespace: str, uid: str, **_: Any) -> None:
        if type == "DELETED":
            controller.forget((kind, namespace, name))
            diffbase.forget(uid)

    on.event(GROUP, VERSION, plural, id=f"{plural}-deleted", registry=registry)(deleted)

    def reconcile(body: kopf.Body, retry: int, **_: Any) -> None:
        controller.ready = True
        t0 = time.monotonic()
        meta = body.get("metadata", {})
        where = f"{kind} {meta.get('namespace')}/{meta.get('name')}"
        try:
            result = controller.reconcile(kind, _plain(body))
            metrics.reconciles.labels(kind, result).inc()
        except Invalid as err:
            metrics.reconciles.labels(kind, "invalid").inc()
            raise kopf.PermanentError(f"{where}: invalid: {err}") from None
        except Retry as err:
            metrics.reconciles.labels(kind, "retry").inc()
            raise kopf.TemporaryError(f"{where}: {err}", delay=err.delay) from None
        except ApiError as err:
            metrics.reconcile_errors.labels(kind, str(err.status or err.reason)).inc()
            if err.retryable:
                metrics.reconciles.labels(kind, "retry").inc()
                raise kopf.TemporaryError(f"{where}: {err}", delay=_backoff(retry)) from None
            if err.status == 403:
                metrics.reconciles.labels(kind, "retry").inc()
                raise kopf.TemporaryError(f"{where}: forbidden ({err.message}): check the operator's RBAC", delay=60) from None
            if err.status in (400, 422):
                metrics.reconciles.labels(kind, "invalid").inc()
                controller.refuse(kind, _plain(body), f"the apiserver refused a child object: {short(err.message, 600)}")
                raise kopf.PermanentError(f"{where}: {err}") from None
            metrics.reconciles.labels(kind, "error").inc()
            raise kopf.TemporaryError(f"{where}: {err}", delay=_backoff(retry)) from None
        except Exception as err:
            metrics.reconciles.labels(kind, "error").inc()
            metrics.reconcile_errors.labels(kind, type(err).__name__).inc()
            raise
        finally:
            metrics.reconcile_seconds.labels(kind).observe(time.monotonic() - t0)

    on.create(GROUP, VERSION, plural, id="create", registry=registry)(reconcile)
    on.update(GROUP, VERSION, plural, id="update", registry=registry)(reconcile)
    on.resume(GROUP, VERSION, plural, id="resume", registry=registry)(reconcile)

    def wants_cleanup(spec: kopf.Spec, **_: Any) -> bool:
        return bool((spec.get("storage") or {}).get("cleanupOnDelete"))

    def cleanup_outputs(body: kopf.Body, runtime: Any = None, **_: Any) -> None:
        """Delete the workload, wait for its pods (kopf calls again: never a sleep here), then the
        outputs. Bounded: pods get --termination-grace-seconds plus 30 s, storage --cleanup-retries
        attempts; then the outputs are kept and a Warning says so, where a user can still read it."""
        plain = _plain(body)
        meta = plain.get("metadata", {})
        key = (kind, meta.get("namespace"), meta.get("name"))
        elapsed = runtime.total_seconds() if runtime is not None else 0.0
        try:
            message = controller.cleanup_outputs(kind, plain, elapsed)
        except Retry as err:
            raise kopf.TemporaryError(str(err), delay=err.delay) from None
        except GaveUp as err:
            _gave_up(controller, kind, meta, str(err))
            return
        except Exception as err:  # noqa: BLE001 - storage errors, unreachable endpoints ...
            attempt = controller.reconciler.cleanup_attempt(key)
            if attempt < max(1, config.cleanup_retries):
                raise kopf.TemporaryError(f"cannot delete the outputs yet ({short(str(err), 300)})", delay=min(10, 2**attempt)) from None
            _gave_up(controller, kind, meta, f"gave up deleting the outputs after {attempt} attempts: {short(str(err), 600)}; they are kept")
            return
        controller.post_event(kind, meta, "Normal", R.OUTPUTS_DELETED, message)
        controller.forget(key)

    on.delete(GROUP, VERSION, plural, id="cleanup-outputs", when=wants_cleanup, registry=registry)(cleanup_outputs)


def _gave_up(controller: Controller, kind: str, meta: dict[str, Any], message: str) -> None:
    """The clean-up stops: say so on the resource, and where a user can read it when the resource's
    namespace takes no new Event (it is being deleted): an Event on the operator's pod, and the log."""
    where = f"{kind} {meta.get('namespace')}/{meta.get('name')}"
    log.warning("%s: %s", where, message)
    if not controller.post_event(kind, meta, "Warning", R.OUTPUTS_KEPT, message):
        controller.status.post_operator_event("Warning", R.OUTPUTS_KEPT, f"{where}: {message}")
    controller.forget((kind, meta.get("namespace"), meta.get("name")))
