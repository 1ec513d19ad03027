"""The operator's engine behind one small facade, shared by every kopf handler.

Split by concern, each in its own module:

* `registry.Registry` — the registry of facts: what the watches show (resources, Jobs, pods), what the
  operator decided per resource (`status.Facts`), what storage said, what was last written;
* `reconciler.Reconciler` — reconciling children: the Job (its pods carry the resource document), Service, created exactly once
  per record, replaced only once their pods are gone; grids' references; deletion clean-up;
* `statuswriter.StatusWriter` — writing status (the pure `status.compute_status()`) and Events;
* `polling.Polling` — polling storage and the periodic sweep.

* `watch.Watches` — the operator's own watches of its Jobs and pods (server-side label selector),
  kept as small views.

Concurrency model (no thread per resource): kopf watches the resources and keeps them in its
indexes; the children's watches run on one thread per namespace and kind; their callbacks only
mark the owning resource dirty. Reconcile runs in kopf's handler pool; one status task and one
poll task run on kopf's event loop, each with a bounded thread pool.
"""

from __future__ import annotations

import asyncio
from typing import Any

from .config import OperatorConfig
from .kube import Kube
from .metrics import Metrics
from .poller import PollLimits, StorageReader
from .polling import Polling
from .reconciler import GaveUp, Invalid, Reconciler, Retry
from .registry import IDX_JOBS, IDX_PODS, IDX_RESOURCES, IDX_WORKLOADS, Key, Registry, slim
from .status import Facts
from .statuswriter import StatusWriter, now_rfc3339
from .watch import Watches

__all__ = ["Controller", "GaveUp", "IDX_JOBS", "IDX_PODS", "IDX_RESOURCES", "IDX_WORKLOADS", "Invalid", "Key", "Retry",
           "now_rfc3339", "slim"]


class Controller:
    def __init__(self, config: OperatorConfig, kube: Kube | None, metrics: Metrics, reader: StorageReader | None = None):
        self.kube = kube
        self.metrics = metrics
        self.reader = reader or StorageReader(limits=PollLimits.from_config(config), workers=config.poll_workers)
        self.registry = Registry()
        self.status = StatusWriter(config, kube, metrics, self.registry)
        self.reconciler = Reconciler(config, kube, metrics, self.registry, self.status, self.reader)
        self.polling = Polling(config, metrics, self.registry, self.reader, self.reconciler)
        self._config = config
        self._tasks: list[asyncio.Task] = []
        self.watches: Watches | None = None

    # ------------------------------------------------------------------ configuration and state
    @property
    def config(self) -> OperatorConfig:
        return self._config

    @config.setter
    def config(self, value: OperatorConfig) -> None:
        self._config = value
        for part in (self.status, self.reconciler, self.polling):
            part.config = value

    @property
    def ready(self) -> bool:
        return self.registry.ready

    @ready.setter
    def ready(self, value: bool) -> None:
        self.registry.ready = value

    @property
    def indices(self) -> dict[str, Any]:
        return self.registry.indices

    @indices.setter
    def indices(self, value: dict[str, Any]) -> None:
        self.registry.indices = value

    @property
    def facts(self) -> dict[Key, Facts]:
        return self.registry.facts

    @property
    def storage(self) -> dict[Key, Any]:
        return self.registry.storage

    @property
    def dirty(self) -> set[Key]:
        return self.registry.dirty

    @property
    def waiting(self) -> dict[tuple[str, str], set[Key]]:
        return self.registry.waiting

    @property
    def api_pool(self):
        return self.status.api_pool

    @property
    def event_pool(self):
        return self.status.event_pool

    # ------------------------------------------------------------------ lifecycle
    async def start(self, indices: dict[str, Any]) -> None:
        """Start the status writer, the poller and (with a client) the Job and pod watches. Returns
        once the watches have listed what exists: a reconcile must never miss an existing Job."""
        if self.kube is not None:
            self.watches = Watches(self.kube, None if self._config.cluster_wide else self._config.namespaces,
                                   on_job=self.on_job_event, on_pod=self.on_pod_event)
            indices = {**indices, IDX_JOBS: self.watches.jobs, IDX_PODS: self.watches.pods}
            self.watches.start()
            if not await asyncio.to_thread(self.watches.wait_synced, 120.0):
                raise RuntimeError("the Job and pod watches did not finish their first LIST within 120 s")
        self.registry.indices = indices
        loop = asyncio.get_running_loop()
        self.status.bind(loop)
        self.reconciler.loop = loop
        self._tasks = [
            asyncio.create_task(self.status.run(), name="tinv status writer"),
            asyncio.create_task(self.polling.run(), name="tinv storage poller"),
        ]

    async def stop(self) -> None:
        if self.watches is not None:
            await asyncio.to_thread(self.watches.stop)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        self.status.shutdown()
        self.reader.close()

    # ------------------------------------------------------------------ what the watches tell
    def on_resource(self, kind: str, ns: str, name: str) -> None:
        key = (kind, ns, name)
        if key in self.registry.facts:
            self.registry.mark(key)
        if kind == "TextualInversionJob":
            for grid in list(self.registry.waiting.get((ns, name), ())):
                self.reconciler.schedule(grid)

    def on_child(self, ns: str, job_name: str, job: dict[str, Any] | None = None) -> None:
        """A Job or pod event (`job`: the Job's view, when it is a Job)."""
        self.registry.saw_job(ns, job_name, job)
        key = self.registry.owner_of(ns, job_name)
        if key is not None:
            self.registry.mark(key)

    def on_job_event(self, type_: str, ns: str, job_name: str, view: dict[str, Any]) -> None:
        if type_ == "DELETED":
            self.registry.saw_job(ns, job_name, view or None)  # a finished Job's last view keeps its outcome
            self.on_job_deleted(ns, job_name)
        else:
            self.on_child(ns, job_name, view)

    def on_pod_event(self, type_: str, ns: str, job_name: str, view: dict[str, Any]) -> None:
        self.on_child(ns, job_name)

    def on_workload(self, ns: str, job_name: str, workload: dict[str, Any]) -> None:
        """A Kueue Workload of a queued Job changed (operator/kueue.py): refresh the status, and finish
        a suspend/resume that waited for Kueue."""
        key = self.registry.owner_of(ns, job_name)
        if key is not None:
            self.registry.mark(key)
            self.reconciler.follow_kueue_soon(key, workload)

    def on_job_deleted(self, ns: str, job_name: str) -> None:
        """A Job is gone: reconcile its owner now (it decides; a recorded Job is never re-created)."""
        key = self.registry.owner_of(ns, job_name)
        if key is not None:
            self.registry.mark(key)
            self.reconciler.schedule(key)

    def forget(self, key: Key) -> None:
        self.registry.forget(key)
        self.reconciler.forget(key)
        self.reader.forget(key)

    # ------------------------------------------------------------------ delegation
    def job(self, ns: str, job_name: str, uid: str | None = None) -> dict[str, Any] | None:
        return self.registry.job(ns, job_name, uid)

    def validate(self, kind: str, body: dict[str, Any]) -> Any:
        return self.reconciler.validate(kind, body)

    def reconcile(self, kind: str, body: dict[str, Any]) -> str:
        return self.reconciler.reconcile(kind, body)

    def refuse(self, kind: str, body: dict[str, Any], message: str) -> None:
        self.reconciler.refuse(kind, body, message)

    def cleanup_outputs(self, kind: str, body: dict[str, Any], elapsed: float = 0.0) -> str:
        return self.reconciler.cleanup(kind, body, elapsed)

    def compute(self, key: Key, now: str | None = None):
        return self.status.compute(key, now)

    def write_status(self, key: Key, body: dict[str, Any], old: dict[str, Any], new: dict[str, Any]) -> None:
        self.status.write_status(key, body, old, new)

    def post_event(self, kind: str, meta: dict[str, Any], type_: str, reason: str, message: str) -> bool:
        return self.status.post_event(kind, meta, type_, reason, message)

    async def poll_once(self) -> int:
        return await self.polling.poll_once()

    def sweep(self) -> None:
        self.polling.sweep()
