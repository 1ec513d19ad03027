"""Leader election on a coordination.k8s.io Lease, so that of several operator replicas exactly one
is active (issue 14, item 10).

Why a Lease and not kopf's peering: peering pauses kopf's handlers, but not the operator's own
status writer, storage poller and sweep (which recreates vanished Jobs), and replicas of one
Deployment share one priority, which makes kopf pause *every* replica. With a Lease, a replica
that is not the leader never starts kopf or the controller at all: it serves /healthz (so the
liveness probe passes) and the metric tinv_operator_leader 0, and waits.

The algorithm is client-go's: the holder renews `renewTime` every `retry_period`; a candidate takes
the Lease over when the record it last observed has not changed for `lease_duration` seconds by
its OWN clock (no clock agreement between nodes needed); every write carries the observed
resourceVersion, so of two racing candidates exactly one wins (the other gets 409). A leader that
cannot renew for `renew_deadline` (< lease_duration) stops at once: its `on_lost` callback stops
kopf and the process exits 1, to be restarted as a candidate. A leader that stops normally
releases the Lease (holderIdentity cleared), so the standby takes over within `retry_period`.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from .kube import ApiError, Kube

log = logging.getLogger("tinv.operator.leader")


def lease_path(namespace: str, name: str | None = None) -> str:
    base = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
    return f"{base}/{name}" if name else base


def micro_time(t: dt.datetime | None = None) -> str:
    return (t or dt.datetime.now(dt.timezone.utc)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class LeaseSettings:
    namespace: str
    name: str = "tinv-operator"
    identity: str = ""
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0


class LeaderElector:
    def __init__(self, kube: Kube, settings: LeaseSettings, on_lost: Callable[[], None] | None = None):
        self.kube = kube
        self.s = settings
        self.on_lost = on_lost
        self.leading = threading.Event()
        self.stopped = threading.Event()
        self._observed: tuple[str, float] | None = None  # (resourceVersion, when we saw it change), our clock
        self._rv: str | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ one attempt
    def try_acquire_or_renew(self) -> bool:
        """One round of client-go's tryAcquireOrRenew. True when we hold the Lease afterwards."""
        s = self.s
        now = micro_time()
        spec = {"holderIdentity": s.identity, "leaseDurationSeconds": int(round(s.lease_duration)), "renewTime": now}
        try:
            lease = self.kube.get(lease_path(s.namespace, s.name))
        except ApiError as err:
            if not err.not_found:
                raise
            body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": s.name, "namespace": s.namespace},
                    "spec": {**spec, "acquireTime": now, "leaseTransitions": 0}}
            try:
                created = self.kube.create(lease_path(s.namespace), body)
            except ApiError as err2:
                if err2.status == 409:
                    return False  # another candidate created it first
                raise
            self._seen(created)
            return True
        held = lease.get("spec") or {}
        holder = held.get("holderIdentity") or ""
        rv = (lease.get("metadata") or {}).get("resourceVersion") or ""
        observed_at = self._seen(lease)
        if holder and holder != s.identity:
            duration = float(held.get("leaseDurationSeconds") or s.lease_duration)
            if time.monotonic() - observed_at < duration:
                return False  # held, and renewed within its duration as far as we have seen
            log.info("Lease %s/%s of %s expired: taking it over", s.namespace, s.name, holder)
        patch_spec = dict(spec)
        if holder != s.identity:
            patch_spec["acquireTime"] = now
            patch_spec["leaseTransitions"] = int(held.get("leaseTransitions") or 0) + 1
        try:
            # resourceVersion makes the write conditional: of two candidates exactly one wins
            updated = self.kube.merge_patch(lease_path(s.namespace, s.name), {"metadata": {"resourceVersion": rv}, "spec": patch_spec})
        except ApiError as err:
            if err.status == 409:
                return False
            raise
        self._seen(updated)
        return True

    def _seen(self, lease: dict[str, Any]) -> float:
        rv = (lease.get("metadata") or {}).get("resourceVersion") or ""
        if self._observed is None or self._observed[0] != rv:
            self._observed = (rv, time.monotonic())
        self._rv = rv
        return self._observed[1]

    # ------------------------------------------------------------------ the loops
    def acquire(self, stop: threading.Event | None = None) -> bool:
        """Block until this replica leads (True) or `stop` is set (False)."""
        stop = stop or self.stopped
        announced = False
        while not stop.is_set():
            try:
                if self.try_acquire_or_renew():
                    log.info("leading: holding Lease %s/%s as %s", self.s.namespace, self.s.name, self.s.identity)
                    self.leading.set()
                    return True
            except ApiError as err:
                log.warning("leader election: %s", err)
            if not announced:
                log.info("standby: another replica holds Lease %s/%s; waiting to take over", self.s.namespace, self.s.name)
                announced = True
            stop.wait(self.s.retry_period)
        return False

    def start_renewing(self) -> None:
        self._thread = threading.Thread(target=self._renew_loop, name="tinv-leader", daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        last_ok = time.monotonic()
        while not self.stopped.wait(self.s.retry_period):
            try:
                if self.try_acquire_or_renew():
                    last_ok = time.monotonic()
                    continue
                reason = "another replica holds the Lease"
            except ApiError as err:
                reason = str(err)
            if time.monotonic() - last_ok >= self.s.renew_deadline or reason.startswith("another"):
                log.error("lost the leadership (%s): stopping", reason)
                self.leading.clear()
                self.stopped.set()
                if self.on_lost is not None:
                    self.on_lost()
                return

    def release(self) -> None:
        """Give the Lease up (a normal stop): the standby takes over without waiting for expiry."""
        was_leading = self.leading.is_set()
        self.stopped.set()
        self.leading.clear()
        if not was_leading:
            return
        try:
            lease = self.kube.get(lease_path(self.s.namespace, self.s.name))
            if (lease.get("spec") or {}).get("holderIdentity") != self.s.identity:
                return
            self.kube.merge_patch(lease_path(self.s.namespace, self.s.name),
                                  {"metadata": {"resourceVersion": lease["metadata"]["resourceVersion"]},
                                   "spec": {"holderIdentity": None, "renewTime": None, "acquireTime": None}})
            log.info("released Lease %s/%s", self.s.namespace, self.s.name)
        except ApiError as err:
            log.warning("could not release the Lease (the standby takes over when it expires): %s", err)


class StandbyHealth:
    """/healthz while this replica waits for the Lease (kopf serves it once leading)."""

    def __init__(self, port: int):
        self.port = port
        self._server: Any = None

    def __enter__(self) -> "StandbyHealth":
        if not self.port:
            return self
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                body = b'{"standby": true}'
                self.send_response(200 if self.path.startswith("/healthz") else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: Any) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("0.0.0.0", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, name="tinv-standby-health", daemon=True).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
