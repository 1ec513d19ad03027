"""Prometheus metrics of the operator (served on --metrics-port at /metrics).

    tinv_operator_resources{kind,phase}                    resources by phase (gauge)
    tinv_operator_reconcile_total{kind,result}             reconciles: ok | waiting | retry | invalid | error
    tinv_operator_reconcile_errors_total{kind,reason}      reconcile errors by cause (api status, exception)
    tinv_operator_reconcile_duration_seconds{kind}         reconcile latency (histogram)
    tinv_operator_status_updates_total{kind}               status patches written
    tinv_operator_events_total{type}                       Events posted
    tinv_operator_checkpoints_recorded_total{kind}         new checkpoints put into status
    tinv_operator_status_read_failures_total{kind}         progress/manifest reads that failed
    tinv_operator_storage_poll_duration_seconds            one poll round over all resources (histogram)
    tinv_operator_storage_poll_targets                     resources read in the last poll round
    tinv_operator_leader                                   1 while this replica holds the leader Lease, else 0
    tinv_operator_storage_reads_in_flight                  storage reads still running (slow endpoints)
    tinv_operator_api_requests_total{verb,resource,code}   API requests the operator's own client made
                                                           (kopf's watches and its annotation patches excluded)

Plus the client library's process_* metrics (CPU seconds, resident memory).
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, start_http_server


@dataclass
class Metrics:
    resources: Gauge
    reconciles: Counter
    reconcile_errors: Counter
    reconcile_seconds: Histogram
    status_updates: Counter
    events: Counter
    checkpoints: Counter
    read_failures: Counter
    poll_seconds: Histogram
    poll_targets: Gauge
    api_requests: Counter
    leader: Gauge
    reads_in_flight: Gauge

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None) -> "Metrics":
        reg = registry if registry is not None else REGISTRY
        p = "tinv_operator_"
        return cls(
            resources=Gauge(f"{p}resources", "Resources by kind and phase", ["kind", "phase"], registry=reg),
            reconciles=Counter(f"{p}reconcile", "Reconciles by kind and result", ["kind", "result"], registry=reg),
            reconcile_errors=Counter(f"{p}reconcile_errors", "Reconcile errors by kind and cause", ["kind", "reason"], registry=reg),
            reconcile_seconds=Histogram(
                f"{p}reconcile_duration_seconds", "Reconcile latency", ["kind"], registry=reg,
                buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            ),
            status_updates=Counter(f"{p}status_updates", "Status patches written", ["kind"], registry=reg),
            events=Counter(f"{p}events", "Events posted", ["type"], registry=reg),
            checkpoints=Counter(f"{p}checkpoints_recorded", "Checkpoints recorded in status", ["kind"], registry=reg),
            read_failures=Counter(f"{p}status_read_failures", "Failed reads of progress.json or manifests", ["kind"], registry=reg),
            poll_seconds=Histogram(
                f"{p}storage_poll_duration_seconds", "Duration of one storage poll round", registry=reg,
                buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            ),
            poll_targets=Gauge(f"{p}storage_poll_targets", "Resources read in the last poll round", registry=reg),
            api_requests=Counter(f"{p}api_requests", "Kubernetes API requests made by the operator's client", ["verb", "resource", "code"], registry=reg),
            leader=Gauge(f"{p}leader", "1 while this replica holds the leader Lease (or runs without leader election)", registry=reg),
            reads_in_flight=Gauge(f"{p}storage_reads_in_flight", "Storage reads still running", registry=reg),
        )


_default: Metrics | None = None


def default() -> Metrics:
    """The process-wide metrics on the default registry (created once)."""
    global _default
    if _default is None:
        _default = Metrics.create()
    return _default


def serve(port: int) -> None:
    if port:
        start_http_server(port)
