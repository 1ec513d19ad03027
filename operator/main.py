"""`tinv operator`: run the kopf operator for one or more namespaces.

    tinv operator --namespace team-a [--namespace team-b] [flags]    (see `tinv operator --help`)

Reads KUBECONFIG (or the in-cluster service account), serves Prometheus metrics on --metrics-port
and kopf's liveness probe on --health-port (/healthz), and stops cleanly on SIGTERM/SIGINT.
Exit codes: 0 stopped, 2 bad flags, 1 the operator failed.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading

from .config import from_args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "operator":
        argv = argv[1:]
    try:
        config = from_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or bad flags (2)
        return int(exc.code or 0)
    if not config.namespaces and not config.cluster_wide:
        print("tinv operator: no namespace to watch: pass --namespace NS (or set TINV_NAMESPACES / POD_NAMESPACE)", file=sys.stderr)
        return 2

    try:
        import kopf
    except ModuleNotFoundError as err:
        print(f"tinv operator: needs the 'operator' extra ({err.name} is not installed).\nhint: pip install 'tinv[operator]'", file=sys.stderr)
        return 3

    from .controller import Controller
    from .handlers import register
    from .kube import Kube
    from .metrics import default, serve
    from .policy import describe

    logging.basicConfig(
        level=getattr(logging, config.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("kopf.objects").setLevel(max(logging.WARNING, logging.getLogger().level))
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    logging.getLogger("botocore").setLevel(logging.WARNING)
    metrics = default()
    try:
        serve(config.metrics_port)
    except OSError as err:
        print(f"tinv operator: cannot serve metrics on port {config.metrics_port}: {err}", file=sys.stderr)
        return 2
    kube = Kube.from_environment(metrics=metrics, pool_size=2 * config.api_workers)
    log = logging.getLogger("tinv.operator")
    lost = threading.Event()  # the leadership was lost: exit 1 after kopf stopped
    elector = None
    if config.leader_election:
        from .leader import LeaderElector, LeaseSettings, StandbyHealth

        identity = os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"
        elector = LeaderElector(kube, LeaseSettings(
            namespace=config.leader_election_namespace or "", name=config.leader_election_lease, identity=identity,
            lease_duration=config.lease_duration, renew_deadline=config.renew_deadline, retry_period=config.retry_period,
        ), on_lost=lambda: _stop_now(lost, config.lease_duration - config.renew_deadline))
        metrics.leader.set(0)
        with StandbyHealth(config.health_port):
            elector.acquire()
        elector.start_renewing()
    metrics.leader.set(1)
    controller = Controller(config, kube, metrics)
    registry = kopf.OperatorRegistry()
    register(registry, controller, config)
    liveness = f"http://0.0.0.0:{config.health_port}/healthz" if config.health_port else None
    policy = describe(config)
    if policy:
        log.info("policy: %s", policy)
    try:
        kopf.run(
            registry=registry,
            clusterwide=config.cluster_wide,
            namespaces=[] if config.cluster_wide else list(config.namespaces),
            standalone=True,  # exclusion is the leader Lease's job (kopf's peering would pause every replica)
            liveness_endpoint=liveness,
        )
    except Exception:  # noqa: BLE001
        log.exception("the operator failed")
        return 1
    finally:
        metrics.leader.set(0)
        if elector is not None and not lost.is_set():
            elector.release()  # a normal stop (or a crash): the standby takes over at once
    return 1 if lost.is_set() else 0  # lost the Lease: exit 1 so the pod restarts as a candidate


def _stop_now(lost: threading.Event, margin: float) -> None:
    """The Lease is lost: stop kopf as SIGTERM does (kopf's stop_flag would be waited for in a thread
    of the loop's default executor, which blocks the exit), and leave the process before the
    standby may act (it can take the Lease `margin` seconds after we gave up), whatever still runs."""
    lost.set()
    os.kill(os.getpid(), signal.SIGTERM)
    timer = threading.Timer(max(0.5, margin - 0.5), os._exit, (1,))
    timer.daemon = True
    timer.start()


if __name__ == "__main__":
    sys.exit(main())
