"""`tinv operator`: run the kopf operator for one or more namespaces.

    tinv operator --namespace team-a [--namespace team-b] [flags]    (see `tinv operator --help`)

Reads KUBECONFIG (or the in-cluster service account), serves Prometheus metrics on --metrics-port
and kopf's liveness probe on --health-port (/healthz), and stops cleanly on SIGTERM/SIGINT.
Exit codes: 0 stopped, 2 bad flags, 1 the operator failed.
"""

from __future__ import annotations

import logging
import sys

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
    controller = Controller(config, kube, metrics)
    registry = kopf.OperatorRegistry()
    register(registry, controller, config)
    liveness = f"http://0.0.0.0:{config.health_port}/healthz" if config.health_port else None
    try:
        kopf.run(
            registry=registry,
            clusterwide=config.cluster_wide,
            namespaces=[] if config.cluster_wide else list(config.namespaces),
            standalone=True,
            liveness_endpoint=liveness,
        )
    except Exception:  # noqa: BLE001
        logging.getLogger("tinv.operator").exception("the operator failed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
