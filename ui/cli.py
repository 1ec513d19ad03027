"""`tinv ui`: serve the read-only web UI.

    tinv ui                              # the run folders under ./tinv-runs, on http://127.0.0.1:8765
    tinv ui examples/tiny-job.yaml       # ... plus these resources (their specs exactly as written)
    tinv ui --kube -n team-a             # a namespace of the cluster of your kubeconfig
    tinv ui --kube --host 0.0.0.0        # in a pod (the chart's ui.enabled): the pod's ServiceAccount
"""

from __future__ import annotations

import argparse
import os
import sys


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tinv ui",
        description="Serve a read-only web UI of runs: the runs list, each job's loss curves, checkpoints, "
        "hyperparameters, validation images, conditions, Events and logs, each grid's gallery.",
    )
    p.add_argument("files", nargs="*", help="resource YAML files to show besides the run folders (local mode)")
    p.add_argument("--root", default=os.environ.get("TINV_UI_ROOT", "tinv-runs"), help="local run folders (default ./tinv-runs)")
    p.add_argument("--kube", action="store_true", help="show a namespace of a cluster instead of local run folders")
    p.add_argument("-n", "--namespace", help="namespace (with --kube; default: the kubeconfig's, or the pod's)")
    p.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config, or in-cluster)")
    p.add_argument("--context", help="kubeconfig context")
    p.add_argument("--host", default=os.environ.get("TINV_UI_HOST", "127.0.0.1"), help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=int(os.environ.get("TINV_UI_PORT", "8765")), help="port (default 8765)")
    p.add_argument("--log-level", default="warning", help="uvicorn log level (default warning)")
    return p


def build_source(args: argparse.Namespace):
    from .sources import LocalSource, kube_source

    if args.kube:
        return kube_source(args.namespace, args.kubeconfig, args.context)
    return LocalSource(args.root, args.files)


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv[1:])
    if args.files and args.kube:
        print("tinv ui: resource files are for local mode; with --kube the resources come from the cluster", file=sys.stderr)
        return 2
    import uvicorn

    from .app import create_app

    try:
        source = build_source(args)
    except Exception as err:  # noqa: BLE001 - kubeconfig problems come in many types
        print(f"tinv ui: cannot reach the cluster: {err}\nhint: check --kubeconfig / --context, or drop --kube for local runs", file=sys.stderr)
        return 69
    app = create_app(source)
    print(f"tinv ui: {source.label} on http://{args.host}:{args.port}/  (Ctrl-C stops)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
