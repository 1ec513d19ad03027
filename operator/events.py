"""Events, aggregated the way the kubelet and controllers do (issue 14, item 12): the same reason
on the same object within `window` seconds updates ONE Event (count + 1, lastTimestamp, newest
message) instead of posting another, so a job that records 200 checkpoints has one
CheckpointRecorded Event with count 200, not 200 Events. A different reason, or the same reason
after the window, starts a new Event. At most `max_series` series are remembered (oldest dropped).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections import OrderedDict
from typing import Any

from .builders import API_VERSION, MANAGED_BY
from .kube import ApiError, Kube, path_for

log = logging.getLogger("tinv.operator")


class EventRecorder:
    def __init__(self, kube: Kube, instance: str, metrics: Any = None, window: float = 600.0, max_series: int = 10000):
        self.kube = kube
        self.instance = instance[:128]
        self.metrics = metrics
        self.window = window
        self.max_series = max_series
        self._series: OrderedDict[tuple[str, str, str, str], tuple[str, int, float]] = OrderedDict()  # -> (event name, count, first seen)
        self._locks: dict[tuple[str, str, str, str], threading.Lock] = {}
        self._lock = threading.Lock()

    def post(self, kind: str, meta: dict[str, Any], type_: str, reason: str, message: str) -> bool:
        """Post or update the Event; False when the apiserver refused it."""
        ns, uid = meta.get("namespace") or "", meta.get("uid") or meta.get("name") or ""
        key = (ns, uid, type_, reason)
        with self._lock:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:  # one series at a time: two status writes must not both create its first Event
            now = time.monotonic()
            ts = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            with self._lock:
                series = self._series.get(key)
            if series is not None and now - series[2] < self.window:
                name, count, first = series
                try:
                    self.kube.merge_patch(path_for("Event", ns, name), {"count": count + 1, "lastTimestamp": ts, "message": message})
                    self._remember(key, (name, count + 1, first))
                    self._count(type_)
                    return True
                except ApiError as err:
                    if not err.not_found:
                        log.warning("cannot update Event %s on %s %s/%s: %s", reason, kind, ns, meta.get("name"), err)
                        return False
                    # expired (the apiserver's event TTL): start a new series
            event = {
                "apiVersion": "v1",
                "kind": "Event",
                "metadata": {"generateName": f"{meta.get('name')}.", "namespace": ns},
                "involvedObject": {"apiVersion": API_VERSION, "kind": kind, "name": meta.get("name"), "namespace": ns,
                                   "uid": meta.get("uid"), "resourceVersion": meta.get("resourceVersion")},
                "type": type_,
                "reason": reason,
                "message": message,
                "source": {"component": MANAGED_BY},
                "reportingComponent": MANAGED_BY,
                "reportingInstance": self.instance,
                "firstTimestamp": ts,
                "lastTimestamp": ts,
                "count": 1,
            }
            try:
                created = self.kube.create(path_for("Event", ns), event)
            except ApiError as err:
                log.warning("cannot post Event %s on %s %s/%s: %s", reason, kind, ns, meta.get("name"), err)
                return False
            name = (created.get("metadata") or {}).get("name")
            if name:
                self._remember(key, (name, 1, now))
            self._count(type_)
            return True

    def _remember(self, key: tuple[str, str, str, str], value: tuple[str, int, float]) -> None:
        with self._lock:
            self._series[key] = value
            self._series.move_to_end(key)
            while len(self._series) > self.max_series:
                old, _ = self._series.popitem(last=False)
                self._locks.pop(old, None)

    def _count(self, type_: str) -> None:
        if self.metrics is not None:
            self.metrics.events.labels(type_).inc()
