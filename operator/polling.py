"""Polling storage and sweeping: the operator's periodic round, every `poll_interval` seconds.

`poll_once` reads every active resource's progress.json and checkpoint manifests through the
shared `poller.StorageReader` (its own bounded threads, time-boxed) and marks changed resources dirty. `sweep`
then recomputes every status (cheap, catches missed events), counts phases for the metrics,
re-checks waiting grids, and re-reconciles a resource whose Job the watch no longer shows (the
reconciler decides: a recorded Job is never created again).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import time

from tinv.api.models import GRID_KIND, TIJOB_KIND

from .config import OperatorConfig
from .metrics import Metrics
from .poller import StorageReader, Target, not_running
from .reconciler import Reconciler
from .registry import Key, Registry
from .status import TERMINAL, Facts

log = logging.getLogger("tinv.operator")

PHASES = ("Pending", "Waiting", "Running", "Suspended", "Succeeded", "Failed")


def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # the C library already loaded: no library search at start-up
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


_TRIM = _malloc_trim()


def trim_heap() -> None:
    """Give the C heap's free pages back to the system. A burst (thousands of resources created at
    once) decodes and drops many large objects; glibc keeps the freed pages resident until told,
    which the operator's memory limit counts (bench/README.md, 2026-12-03)."""
    if _TRIM is not None:
        _TRIM(0)


class Polling:
    def __init__(self, config: OperatorConfig, metrics: Metrics, registry: Registry, reader: StorageReader, reconciler: Reconciler):
        self.config = config
        self.metrics = metrics
        self.reg = registry
        self.reader = reader
        self.reconciler = reconciler
        self.rounds = 0

    def targets(self) -> list[tuple[Key, Facts]]:
        out = []
        for key, facts in list(self.reg.facts.items()):
            if facts.invalid or facts.waiting or facts.blocked or not facts.output_uri:
                continue
            body = self.reg.resource(key)
            if body is None:
                continue
            phase = (body.get("status") or {}).get("phase")
            if phase in TERMINAL or not_running(phase, self.reg.job(key[1], facts.job_name, (body.get("metadata") or {}).get("uid"))):
                # a couple of final reads catch the last checkpoint and progress after the end (or
                # before a suspension / while queued: nothing writes there until pods run again)
                n = self.reg.final_sweeps.get(key, 0)
                if n >= 2:
                    continue
                self.reg.final_sweeps[key] = n + 1
            else:
                self.reg.final_sweeps.pop(key, None)
            out.append((key, facts))
        return out

    async def poll_once(self) -> int:
        """One storage round (poller.StorageReader.poll: time-boxed, size-capped, resources isolated
        from each other; a slow resource's result arrives in a later round)."""
        targets = self.targets()
        t0 = time.monotonic()
        reads = [Target(key, facts.output_uri or "", facts.storage, key[0] == TIJOB_KIND) for key, facts in targets]
        changed = 0
        for key, view in await self.reader.poll(reads, budget=max(0.05, 0.8 * self.config.poll_interval)):
            if view.error:
                self.metrics.read_failures.labels(key[0]).inc()
            if key not in self.reg.facts:
                continue
            if self.reg.storage.get(key) != view:
                self.reg.storage[key] = view
                changed += 1
                self.reg.mark(key)
        self.metrics.poll_seconds.observe(time.monotonic() - t0)
        self.metrics.poll_targets.set(len(targets))
        self.metrics.reads_in_flight.set(self.reader.inflight)
        self.rounds += 1
        return changed

    def sweep(self) -> None:
        counts: dict[tuple[str, str], int] = {}
        now = time.monotonic()
        reg = self.reg
        for key, facts in list(reg.facts.items()):
            body = reg.resource(key)
            if body is None:
                continue
            phase = (body.get("status") or {}).get("phase") or "Pending"
            counts[(key[0], phase)] = counts.get((key[0], phase), 0) + 1
            reg.mark(key)
            if facts.waiting:
                self.reconciler.schedule(key)
            elif facts.invalid or facts.blocked or facts.job_gone or facts.deleting is not None or phase in TERMINAL:
                continue
            else:
                uid = (body.get("metadata") or {}).get("uid")
                job = reg.job(key[1], facts.job_name, uid)
                if job is None:
                    first = reg.missing_since.setdefault(key, now)
                    if now - first > max(30.0, 2 * self.config.poll_interval):
                        reg.missing_since.pop(key, None)
                        log.info("%s %s/%s: no Job %s in the watch; reconciling", *key, facts.job_name)
                        self.reconciler.schedule(key)
                else:
                    reg.missing_since.pop(key, None)
                    if job.get("suspend") and not job.get("active") and job.get("specHash") not in (None, facts.spec_hash):
                        self.reconciler.schedule(key)  # a pending spec change can be applied now
        for kind in (TIJOB_KIND, GRID_KIND):
            for phase in PHASES:
                self.metrics.resources.labels(kind, phase).set(counts.get((kind, phase), 0))

    async def run(self) -> None:
        interval = self.config.poll_interval
        while True:
            t0 = time.monotonic()
            if self.reg.ready:
                try:
                    await self.poll_once()
                    self.sweep()
                except Exception:  # noqa: BLE001 - keep polling
                    log.exception("storage poll round failed")
                await asyncio.to_thread(trim_heap)
            await asyncio.sleep(max(0.05, interval - (time.monotonic() - t0)))
