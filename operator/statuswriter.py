"""Writing status and Events: the only place that PATCHes a resource's status subresource.

One task coalesces dirty resources every `status_batch_interval`, recomputes their status with the
pure `status.compute_status()`, and writes only changes (a merge patch) plus an Event per
transition, through a bounded thread pool. `write_record()` is the one synchronous write: the
record of a Job, made durable before the Job is created.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .builders import MANAGED_BY
from .config import OperatorConfig
from .events import EventRecorder
from .kube import ApiError, Kube, path_for
from .metrics import Metrics
from .registry import Key, Registry, resource_version
from .status import compute_status, merge_patch, new_checkpoints, short, transitions

log = logging.getLogger("tinv.operator")
EVENT_MAX_DELAY = 30.0  # seconds an Event may wait for a burst of Job creations to end


def now_rfc3339() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _in_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


class StatusWriter:
    def __init__(self, config: OperatorConfig, kube: Kube | None, metrics: Metrics, registry: Registry):
        self.config = config
        self.kube = kube
        self.metrics = metrics
        self.reg = registry
        self.instance = os.environ.get("POD_NAME") or socket.gethostname()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        # a smaller pool than kopf's handler pool, so a burst of creations is not slowed down by
        # status writes (which coalesce while they wait)
        self.api_pool = ThreadPoolExecutor(config.status_workers, thread_name_prefix="tinv-status")
        # Events go out on their own small pool, after the status they describe: never ahead of it
        self.event_pool = ThreadPoolExecutor(2, thread_name_prefix="tinv-events")
        # the same reason on the same resource updates one Event (count, lastTimestamp)
        self.events = EventRecorder(kube, self.instance, metrics) if kube is not None else None
        registry.on_mark = self.wake

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._wake = asyncio.Event()

    def shutdown(self) -> None:
        self.api_pool.shutdown(wait=False, cancel_futures=True)
        self.event_pool.shutdown(wait=False, cancel_futures=False)

    def wake(self) -> None:
        loop, wake = self.loop, self._wake
        if loop is None or wake is None:
            return
        try:
            if _in_loop(loop):
                wake.set()
            else:
                loop.call_soon_threadsafe(wake.set)
        except RuntimeError:
            pass  # the loop is closed: shutting down

    # ------------------------------------------------------------------ computing
    def compute(self, key: Key, now: str | None = None) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]] | None:
        reg = self.reg
        facts = reg.facts.get(key)
        body = reg.resource(key)
        if facts is None or body is None:
            return None
        meta = body.get("metadata") or {}
        if meta.get("deletionTimestamp") and facts.deleting is None:
            return None  # the deletion handler says what happens (only resources with clean-up have one)
        uid = meta.get("uid")
        old = reg.status_of(key, body)
        job = None if facts.invalid or facts.waiting or facts.blocked else reg.job(key[1], facts.job_name, uid)
        pods = reg.pods(key[1], facts.job_name, uid) if job else []
        new = compute_status(
            kind=key[0], old=old, generation=meta.get("generation"), spec=body.get("spec") or {}, facts=facts,
            job=job, pods=pods, storage=reg.storage.get(key), now=now or now_rfc3339(),
            kueue_workload=reg.workload(key[1], facts.job_name) if job and facts.queue else None,
        )
        return body, old, new

    # ------------------------------------------------------------------ writing
    def write_record(self, key: Key, workload: dict[str, Any]) -> None:
        """Synchronously merge `workload` into status.workload: the record of the Job, durable
        before the Job exists (a restart then knows a Job was created and never makes another)."""
        assert self.kube is not None
        kind, ns, name = key
        resp = self.kube.merge_patch(path_for(kind, ns, name, "status"), {"status": {"workload": workload}})
        with self.reg.lock:
            self.reg.written[key] = (resource_version(resp), resp.get("status") or {})

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
        with self.reg.lock:
            self.reg.written[key] = (resource_version(resp), resp.get("status") or new)
        self.metrics.status_updates.labels(kind).inc()
        added = new_checkpoints(old, new)
        if added:
            self.metrics.checkpoints.labels(kind).inc(added)
        meta = resp.get("metadata") or body.get("metadata") or {}
        events = transitions(old, new)

        def post_all() -> None:  # in order, one object's Events of one change together
            # Creating Jobs comes first: Events wait while children are being created (a burst of
            # new resources posted one Event per transition, 750 of the 6,000 requests the API
            # server served before 1,000 Jobs existed), but never longer than EVENT_MAX_DELAY.
            self.reg.no_creations.wait(EVENT_MAX_DELAY)
            for type_, reason, message in events:
                self.post_event(kind, meta, type_, reason, message)

        if events:
            try:
                self.event_pool.submit(post_all)
            except RuntimeError:  # shutting down
                post_all()

    def post_event(self, kind: str, meta: dict[str, Any], type_: str, reason: str, message: str) -> bool:
        """Post (or aggregate into) an Event on a resource; False when the apiserver refused it (e.g.
        its namespace is terminating, where nothing new can be created)."""
        assert self.events is not None
        return self.events.post(kind, meta, type_, reason, short(message, 1024))

    def post_operator_event(self, type_: str, reason: str, message: str) -> bool:
        """An Event on the operator's own pod (`kubectl get events -n <operator namespace>`): where a
        message goes when the resource's namespace no longer takes any (it is being deleted)."""
        ns, pod = os.environ.get("POD_NAMESPACE"), os.environ.get("POD_NAME")
        if not ns or not pod:
            return False
        return self._event(ns, {"apiVersion": "v1", "kind": "Pod", "name": pod, "namespace": ns}, type_, reason, message)

    def _event(self, ns: str | None, involved: dict[str, Any], type_: str, reason: str, message: str) -> bool:
        assert self.kube is not None
        ts = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{involved.get('name')}.", "namespace": ns},
            "involvedObject": involved,
            "type": type_,
            "reason": reason,
            "message": short(message, 1024),
            "source": {"component": MANAGED_BY},
            "reportingComponent": MANAGED_BY,
            "reportingInstance": self.instance[:128],
            "firstTimestamp": ts,
            "lastTimestamp": ts,
            "count": 1,
        }
        try:
            self.kube.create(path_for("Event", ns), event)
            self.metrics.events.labels(type_).inc()
            return True
        except ApiError as err:
            log.warning("cannot post Event %s on %s %s/%s: %s", reason, involved.get("kind"), ns, involved.get("name"), err)
            return False

    # ------------------------------------------------------------------ the loop
    async def run(self) -> None:
        assert self._wake is not None and self.loop is not None
        backlog = False
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not backlog:
                await asyncio.sleep(self.config.status_batch_interval)  # coalesce a burst of events
            if not self.reg.ready:
                continue
            backlog = self._dispatch()

    def _dispatch(self) -> bool:
        """Hand the due resources whose status changed to the pool, oldest write first, no more than
        it has free threads; return whether changed ones are left waiting for a thread.

        Nothing waits queued inside the pool: a write recomputes its status when a thread takes it,
        so a resource that changed five times while the API server was slow gets one write of its
        newest state, not five writes of stale ones; and a burst of Job creations is not slowed by
        a queue of status writes in front of it."""
        reg, loop = self.reg, self.loop
        assert loop is not None and self._wake is not None
        soon = time.monotonic() - self.config.status_min_interval
        now = now_rfc3339()
        with reg.lock:
            # Creating Jobs comes first: while reconciles create children, status writes use at most
            # a third of their threads (they coalesce meanwhile, so nothing is lost by waiting).
            workers = self.config.status_workers if not reg.creating else max(1, self.config.status_workers // 3)
            room = workers - len(reg.inflight)
            if room <= 0:
                # Every thread is busy: _written wakes the loop when one is free. Scanning and sorting
                # every dirty resource here, on each watch event, under the registry's lock, was 9 %
                # of the operator's CPU samples with 1,000 resources (bench/README.md).
                return any(k not in reg.inflight for k in reg.dirty)
            # the oldest-written first; a few more than there are threads, as some have not changed
            ready, more = reg.take_due(soon, 4 * room + 16)
        backlog = False
        for i, key in enumerate(ready):
            with reg.lock:
                reg.dirty.discard(key)  # before computing: a change from now on marks it again
            result = self._compute_or_log(key, now)
            changed = result is not None and merge_patch(result[1], result[2]) is not None
            if changed and room <= 0:
                for later in ready[i:]:
                    reg.mark(later, wake=False)  # waits for a thread; _written wakes the loop when one is free
                backlog = True
                break
            if changed:
                with reg.lock:
                    reg.inflight.add(key)
                    reg.last_write[key] = time.monotonic()
                room -= 1
                fut = loop.run_in_executor(self.api_pool, self.refresh, key)
                fut.add_done_callback(lambda f, key=key: self._written(key, f))
        if not backlog and more:
            backlog = True  # more are due than this round looked at
            if room > 0:
                self._wake.set()  # the ones it looked at had not changed: look at the next ones now
        with reg.lock:
            deferred = any(k not in reg.inflight for k in reg.dirty)
        if deferred and not backlog:
            # written less than status_min_interval ago: coalesce further changes into one write
            loop.call_later(self.config.status_min_interval, self._wake.set)
        return backlog

    def _compute_or_log(self, key: Key, now: str | None = None):
        try:
            return self.compute(key, now)
        except Exception:  # noqa: BLE001 - one resource must not stop the others
            log.exception("computing the status of %s %s/%s failed", *key)
            return None

    def refresh(self, key: Key) -> None:
        """Compute a resource's status from the newest facts and write what changed (a pool thread)."""
        result = self._compute_or_log(key)
        if result is not None:
            body, old, new = result
            self.write_status(key, body, old, new)

    def _written(self, key: Key, fut: asyncio.Future) -> None:
        with self.reg.lock:
            self.reg.inflight.discard(key)
            if key in self.reg.dirty:
                self.reg.mark(key, wake=False)  # changed while written: file it again (take_due skipped it)
        exc = fut.exception() if not fut.cancelled() else None
        if exc is not None:
            status = getattr(exc, "status", "exception")
            self.metrics.reconcile_errors.labels(key[0], f"status-{status}").inc()
            log.warning("writing the status of %s %s/%s failed: %s (retrying)", *key, exc)
            if self.loop is not None:
                self.loop.call_later(2.0, self.reg.mark, key)
            return
        with self.reg.lock:
            pending = bool(self.reg.dirty)
        if pending and self._wake is not None:
            self._wake.set()  # a thread is free: the next waiting write (or this one, changed again)
