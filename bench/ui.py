#!/usr/bin/env python
"""Web UI list page at scale: the runs list's server time with N resources.

    python bench/ui.py                       # 1,000 resources: --kube (real control plane) and local folders
    python bench/ui.py --n 1000 --source kube --record   # also append the rows to bench/results/ui.jsonl

kube: the harness's real etcd + kube-apiserver, the CRDs, N resources (80 % TextualInversionJobs,
20 % GenerationGrids) each with a status as the operator writes it (phase, progress, newest
checkpoint, conditions), then `tinv ui --kube`'s app served by uvicorn on loopback, with
both kinds kept in memory by a LIST + WATCH per kind, as `tinv ui --kube` runs; then again with
no watch and no cache, every request LISTing both kinds from the apiserver.
local: N run folders with a progress.json each, read on every request.

For each source: ``ui_list_page_seconds`` (GET /, the whole page) and ``ui_list_partial_seconds``
(GET /partials/runs, what the page polls every 2 s), median and p95 of --requests requests, plus
``ui_list_page_bytes``. The time is measured around the HTTP request from loopback, so it is the
server's time plus a loopback round trip. Target (the UI issue): list page under 1 s at 1,000.
One JSON line per result, like every bench/ script.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "cluster"), str(REPO / "tests" / "ui")]

from common import Results, device_name  # noqa: E402

PHASES = ["Running", "Succeeded", "Pending", "Failed", "Suspended"]


def status_for(i: int, kind: str) -> dict:
    """A status like the operator's, different per resource so sorting and filtering have work to do."""
    now = dt.datetime.now(dt.timezone.utc).isoformat().replace("+00:00", "Z")
    phase = PHASES[i % len(PHASES)]
    if kind == "grid":
        done = (i * 7) % 37
        progress = {"imagesDone": done, "imagesTotal": 36 if done <= 36 else done, "imagesPerSecond": 1.5, "summary": f"{done}/36", "updatedAt": now}
        return {"phase": phase, "progress": progress, "conditions": [{"type": "Running", "status": "True", "reason": "Generating", "message": "", "lastTransitionTime": now}]}
    step = (i * 13) % 500
    uuid = f"{i:08x}-0000-4000-8000-{i:012x}"
    ckpt = {"uuid": uuid, "step": step, "uri": f"s3://bench/runs/bench/job-{i}/checkpoints/{uuid}", "createdAt": now, "loss": 0.1 + (i % 17) / 100}
    return {
        "phase": phase,
        "progress": {"step": step, "totalSteps": 500, "loss": 0.1 + (i % 23) / 100, "samplesPerSecond": 12.5, "etaSeconds": 600 - step, "summary": f"{step}/500 ({step // 5}%)", "updatedAt": now},
        "latestCheckpoint": ckpt,
        "checkpoints": [ckpt],
        "conditions": [{"type": "Running", "status": "True", "reason": "Training", "message": "", "lastTransitionTime": now}],
    }


def timed_gets(base: str, path: str, n: int) -> tuple[list[float], int]:
    times, size = [], 0
    for _ in range(n):
        t0 = time.perf_counter()
        with urllib.request.urlopen(base + path, timeout=60) as r:
            body = r.read()
        times.append(time.perf_counter() - t0)
        size = len(body)
    return times, size


def measure(results: Results, source, config: dict, requests: int, expect_rows: int) -> None:
    from uikit import serve

    with serve(source) as base:
        _, size = timed_gets(base, "/", 1)  # warm-up: imports, templates, first connection
        page, size = timed_gets(base, "/", requests)
        partial, _ = timed_gets(base, "/partials/runs?sort=loss&desc=1", requests)
        with urllib.request.urlopen(base + "/partials/runs?q=bench-00001") as r:
            assert b"bench-00001" in r.read()
        with urllib.request.urlopen(base + "/") as r:
            html = r.read().decode()
        shown = html.count("<tr data-kind=")
        assert shown == expect_rows, f"the page lists {shown} rows, expected {expect_rows}"
    for name, ts in (("ui_list_page_seconds", page), ("ui_list_partial_seconds", partial)):
        results.emit(name, statistics.median(ts), "s", {**config, "stat": "median", "requests": requests})
        results.emit(name, sorted(ts)[max(0, int(round(0.95 * len(ts))) - 1)], "s", {**config, "stat": "p95", "requests": requests})
    results.emit("ui_list_page_bytes", size, "bytes", config)


def bench_kube(results: Results, n: int, requests: int) -> None:
    from harness import ControlPlane
    from kubernetes import client
    from operator_helpers import apply_crds, grid, tijob

    from tinv.ui.sources import KubeSource

    with ControlPlane(nodes=[]) as cp:
        apply_crds(cp)
        ns = cp.new_namespace("bench-ui")
        api = client.CustomObjectsApi(cp.api_client())
        n_grids = n // 5

        def create(i: int) -> None:
            kind, plural = ("grid", "generationgrids") if i < n_grids else ("job", "textualinversionjobs")
            name = f"bench-{i:05d}"
            body = grid(name, job="bench-00999") if kind == "grid" else tijob(name, storage={"uri": "s3://bench/runs"})
            api.create_namespaced_custom_object("tinv.io", "v1alpha1", ns, plural, body)
            api.patch_namespaced_custom_object_status("tinv.io", "v1alpha1", ns, plural, name, {"status": status_for(i, kind)})

        t0 = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(create, range(n)))
        print(f"created {n} resources with status in {time.monotonic() - t0:.1f} s", file=sys.stderr)
        config = {"n": n, "source": "kube", "grids": n_grids, "harness": "etcd+kube-apiserver"}
        # as `tinv ui --kube` runs: both kinds kept in memory by LIST + WATCH
        source = KubeSource(ns, cp.api_client()).watch()
        deadline = time.monotonic() + 60
        while not source.synced and time.monotonic() < deadline:
            time.sleep(0.1)
        assert source.synced, f"the watches did not list: {source.watch_errors}"
        measure(results, source, {**config, "list": "watch"}, requests, n)
        source.close()
        # and without the watch, cache off: every request LISTs both kinds from the apiserver
        measure(results, KubeSource(ns, cp.api_client(), ttl=0), {**config, "list": "LIST per request"}, requests, n)


def bench_local(results: Results, n: int, requests: int) -> None:
    from tinv.ui.sources import LocalSource, snake

    with tempfile.TemporaryDirectory(prefix="tinv-bench-ui-") as tmp:
        root = Path(tmp) / "tinv-runs"
        for i in range(n):
            kind = "grid" if i < n // 5 else "job"
            folder = root / "default" / f"bench-{i:05d}-local"
            folder.mkdir(parents=True)
            st = status_for(i, kind)["progress"]
            prog = {"state": "running", "job": {"name": f"bench-{i:05d}"}, **{snake(k): v for k, v in st.items()}}
            if kind == "grid":
                prog["kind"] = "GenerationGrid"
            (folder / "progress.json").write_text(json.dumps(prog))
        measure(results, LocalSource(root), {"n": n, "source": "local", "grids": n // 5}, requests, n)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, action="append", help="resources (repeatable; default 1000)")
    p.add_argument("--source", choices=["kube", "local", "both"], default="both")
    p.add_argument("--requests", type=int, default=15, help="timed requests per page (default 15)")
    p.add_argument("--record", action="store_true", help="append the rows to bench/results/ui.jsonl")
    args = p.parse_args()
    results = Results("ui", record=args.record)
    print(f"device: {device_name('cpu')}", file=sys.stderr)
    for n in args.n or [1000]:
        if args.source in ("local", "both"):
            bench_local(results, n, args.requests)
        if args.source in ("kube", "both"):
            bench_kube(results, n, args.requests)
    results.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
