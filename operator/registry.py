"""The registry of facts: everything the operator knows about its resources, in one place.

kopf's indexes (the resources) and the operator's own watches (watch.py: their Jobs and pods) hold
what the cluster shows; the registry adds what the operator decided (`Facts`, per resource), what
storage said (`StorageView`), what it wrote last (newer than the watch may show yet), the Jobs it
created before the watch shows them, and the last view of each finished Job (so a Job removed by
`ttlSecondsAfterFinished: 0` still tells its outcome). Thread-safe: reconcile, status, polling and
watch threads all read and write it.

Marking a resource *dirty* asks the status writer to recompute its status soon (`on_mark`).
"""

from __future__ import annotations

import heapq
import itertools
import json
import sys
import threading
import time
from typing import Any, Callable

from tinv.api.models import Annotation

from .status import Facts, StorageView

Key = tuple[str, str, str]  # (kind, namespace, name)

#: index ids the registry reads: kopf's (handler ids) for the resources and Workloads, watch.Children for Jobs and pods.
IDX_RESOURCES = {"TextualInversionJob": "tinv_tijobs", "GenerationGrid": "tinv_grids"}
IDX_JOBS = "tinv_jobs"
IDX_PODS = "tinv_pods"
IDX_WORKLOADS = "tinv_kueue_workloads"  # Kueue Workloads of queued Jobs, by (namespace, job name)

FINISHED = ("Complete", "SuccessCriteriaMet", "Failed", "FailureTarget")

_SHARED_UP_TO = 64  # strings up to this length are interned: keys, phases, reasons, images, URIs


def compact(value: Any) -> Any:
    """A deep copy of a JSON value whose keys and short strings are shared (interned). Every decoded
    document carries its own copies of "metadata", "conditions", "True", "Running" ...: with thousands
    of resources kept in memory those copies were a large part of the operator's memory. Interned
    strings are freed when nothing uses them any more (CPython's interning is not immortal)."""
    if isinstance(value, dict):
        return {sys.intern(k) if type(k) is str else k: compact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [compact(v) for v in value]
    if type(value) is str and len(value) <= _SHARED_UP_TO:
        return sys.intern(value)
    return value


def slim(body: Any) -> bytes:
    """The part of a resource the operator keeps in memory, as compact JSON: one block in the C heap
    instead of a few hundred small objects in Python's arenas. Those arenas are shared with the
    transient objects of every watch event and reconcile, and one long-lived object keeps a whole
    arena resident: at 2,000 resources, 67 MiB of the operator's arenas were free space held that way
    (bench/README.md). Without managedFields and the diff-base annotation (the spec again, as a
    string) that operators before handlers.DiffBaseMemory wrote on every resource.
    `Registry.resource` decodes it into a fresh dict on each read."""
    meta = body.get("metadata", {}) or {}
    keep = ("name", "namespace", "uid", "generation", "resourceVersion", "deletionTimestamp", "creationTimestamp", "labels", "annotations")
    kept = {k: meta[k] for k in keep if k in meta}
    if Annotation.DIFF_BASE in (kept.get("annotations") or {}):
        kept["annotations"] = {k: v for k, v in kept["annotations"].items() if k != Annotation.DIFF_BASE}
    doc = {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"), "metadata": kept,
           "spec": body.get("spec") or {}, "status": body.get("status") or {}}
    return json.dumps(doc, separators=(",", ":")).encode()


def resource_version(body: dict[str, Any] | None) -> int:
    try:
        return int(((body or {}).get("metadata") or {}).get("resourceVersion") or 0)
    except (TypeError, ValueError):
        return 0


def job_finished(job: dict[str, Any] | None) -> bool:
    """Whether a job view (status.job_view) carries a terminal condition."""
    conds = (job or {}).get("conditions") or {}
    return any((conds.get(t) or {}).get("status") == "True" for t in FINISHED)


def live(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pods whose containers may still run, deleting or not (a terminating pod can still write)."""
    return [p for p in pods if p.get("phase") in ("Pending", "Running")]


def _one(index: Any, key: Any) -> Any:
    """The single value of an index key, or None (safe to call from a worker thread)."""
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


class Registry:
    def __init__(self) -> None:
        self.indices: dict[str, Any] = {}
        self.facts: dict[Key, Facts] = {}
        self.storage: dict[Key, StorageView] = {}
        self.written: dict[Key, tuple[int, dict[str, Any]]] = {}
        self.created_jobs: dict[tuple[str, str], dict[str, Any]] = {}
        self.finished_jobs: dict[tuple[str, str], dict[str, Any]] = {}
        self.replaced: dict[tuple[str, str], str | None] = {}  # Job uid the operator deleted to replace it
        self.waiting: dict[tuple[str, str], set[Key]] = {}
        self.job_owner: dict[tuple[str, str], Key] = {}
        self.last_write: dict[Key, float] = {}
        self.final_sweeps: dict[Key, int] = {}
        self.missing_since: dict[Key, float] = {}
        self.dirty: set[Key] = set()
        # the dirty resources by their last write, for the status writer (`take_due`): a heap, so
        # that a round takes the oldest few in O(log n) instead of scanning every dirty resource --
        # that scan, once per watch event, was a third of the operator's CPU with 5,000 resources
        self._due: list[tuple[float, int, Key]] = []
        self._filed: set[Key] = set()  # keys with an entry in _due
        self._seq = itertools.count()
        self.inflight: set[Key] = set()
        self.creating = 0  # reconciles creating children right now (status writes and Events give way to them)
        self.no_creations = threading.Event()  # set while `creating` is 0
        self.no_creations.set()
        self.ready = False
        self.lock = threading.RLock()
        self.on_mark: Callable[[], None] | None = None

    # ------------------------------------------------------------------ what the cluster shows
    def resource(self, key: Key) -> dict[str, Any] | None:
        kind, ns, name = key
        raw = _one(self.indices.get(IDX_RESOURCES[kind]), (ns, name))
        return json.loads(raw) if raw is not None else None  # a fresh copy: callers may change it

    def job(self, ns: str, job_name: str, uid: str | None = None) -> dict[str, Any] | None:
        """The resource's Job: from the watch, else the one just created, else the last view of a
        finished Job that has since been removed (`removed: True`)."""
        job = _one(self.indices.get(IDX_JOBS), (ns, job_name))
        if job is None:
            job = self.created_jobs.get((ns, job_name))
        elif (ns, job_name) in self.created_jobs:
            with self.lock:
                self.created_jobs.pop((ns, job_name), None)
        if job is None and (ns, job_name) in self.finished_jobs:
            job = {**self.finished_jobs[(ns, job_name)], "removed": True}
        if job is not None and uid and job.get("ownerUid") not in (None, uid):
            return None  # a Job of a deleted resource with the same name, not yet collected
        return job

    def pods(self, ns: str, job_name: str, uid: str | None = None) -> list[dict[str, Any]]:
        pods = _all(self.indices.get(IDX_PODS), (ns, job_name))
        return [p for p in pods if not uid or p.get("ownerUid") in (None, uid)]

    def workload(self, ns: str, job_name: str) -> dict[str, Any] | None:
        """The Kueue Workload view (kueue.workload_view) of a queued Job; None without one or without Kueue."""
        return _one(self.indices.get(IDX_WORKLOADS), (ns, job_name))

    def status_of(self, key: Key, body: dict[str, Any]) -> dict[str, Any]:
        """The freshest status: our last write when the watch has not shown it yet. Once the watch has
        shown it, the copy is dropped (the index holds the same status)."""
        written = self.written.get(key)
        if written and written[0] > resource_version(body):
            return written[1]
        if written:
            with self.lock:
                if self.written.get(key) is written:
                    del self.written[key]
        return body.get("status") or {}

    # ------------------------------------------------------------------ what the operator decided
    def mark(self, key: Key, wake: bool = True) -> None:
        """Recompute this resource's status soon (thread-safe)."""
        with self.lock:
            self.dirty.add(key)
            if key not in self._filed:
                heapq.heappush(self._due, (self.last_write.get(key, 0.0), next(self._seq), key))
                self._filed.add(key)
        if wake and self.on_mark is not None:
            self.on_mark()

    def take_due(self, soon: float, limit: int) -> tuple[list[Key], bool]:
        """Up to `limit` dirty resources not being written and last written no later than `soon`,
        the oldest write first, and whether more are due. Entries of resources no longer dirty, or
        being written (their write's end files them again), are dropped on the way; an entry whose
        resource was written since it was filed goes back under its new time."""
        out: list[Key] = []
        taken: set[Key] = set()
        with self.lock:
            due = self._due
            while due and len(out) < limit:
                when, _, key = due[0]
                if key not in self.dirty or key in self.inflight or key in taken:
                    heapq.heappop(due)
                    self._filed.discard(key)
                    continue
                last = self.last_write.get(key, 0.0)
                if last != when:
                    heapq.heapreplace(due, (last, next(self._seq), key))
                    continue
                if when > soon:
                    break
                heapq.heappop(due)
                self._filed.discard(key)
                taken.add(key)
                out.append(key)
            more = bool(due) and due[0][0] <= soon
        return out, more

    def set_facts(self, key: Key, facts: Facts) -> None:
        with self.lock:
            if key not in self.facts:
                # the first write waits status_min_interval too: Pending -> scheduled -> Running
                # within that time is one write (and one Event), not three
                self.last_write.setdefault(key, time.monotonic())
            self.facts[key] = facts
            self.job_owner[(key[1], facts.job_name)] = key
            self.missing_since.pop(key, None)
        self.mark(key)

    def begin_creating(self) -> None:
        with self.lock:
            self.creating += 1
            self.no_creations.clear()

    def end_creating(self) -> None:
        with self.lock:
            self.creating -= 1
            if self.creating <= 0:
                self.creating = 0
                self.no_creations.set()

    def owner_of(self, ns: str, job_name: str) -> Key | None:
        return self.job_owner.get((ns, job_name))

    def remember_created(self, ns: str, job: dict[str, Any]) -> None:
        with self.lock:
            self.created_jobs[(ns, job["name"])] = job

    def forget_created(self, ns: str, job_name: str) -> None:
        with self.lock:
            self.created_jobs.pop((ns, job_name), None)

    def saw_job(self, ns: str, job_name: str, view: dict[str, Any] | None) -> None:
        """A Job event: keep the last view of a finished Job, so its outcome survives its removal."""
        if view is None:
            return
        with self.lock:
            self.created_jobs.pop((ns, job_name), None)  # the watch shows it now
            if job_finished(view):
                self.finished_jobs[(ns, job_name)] = view

    def wait_for(self, grid: Key, jobs: list[str]) -> None:
        with self.lock:
            for waiting in self.waiting.values():
                waiting.discard(grid)
            for job in jobs:
                self.waiting.setdefault((grid[1], job), set()).add(grid)

    def forget(self, key: Key) -> None:
        with self.lock:
            facts = self.facts.pop(key, None)
            if facts is not None:
                self.job_owner.pop((key[1], facts.job_name), None)
                self.finished_jobs.pop((key[1], facts.job_name), None)
                self.created_jobs.pop((key[1], facts.job_name), None)
                self.replaced.pop((key[1], facts.job_name), None)
            self.storage.pop(key, None)
            self.written.pop(key, None)
            self.last_write.pop(key, None)
            self.final_sweeps.pop(key, None)
            self.missing_since.pop(key, None)
            self.dirty.discard(key)
            self._filed.discard(key)  # its entry in _due is dropped when reached
            for waiting in self.waiting.values():
                waiting.discard(key)
