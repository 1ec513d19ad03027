#!/usr/bin/env python
"""Operator scale: N TextualInversionJobs in one namespace on the real test control plane.

    python bench/operator.py --n 100 --n 1000            # one control plane per N
    python bench/operator.py --n 1000 --pods suspended   # Jobs created suspended: no pods at all
    python bench/operator.py --n 100 --record            # also append the rows to bench/results/operator.jsonl
    python bench/operator.py --n 1000 --mode floor       # no operator: the script creates the Jobs
    python bench/operator.py --n 1000 --profile-apiserver /tmp/api.pprof   # where the API server's CPU goes

For each N: start the harness (etcd, kube-apiserver, controller-manager, scheduler, KWOK GPU nodes),
apply the CRDs, start `tinv operator` as a subprocess, create N resources as fast as the client can,
then measure

* ``operator_jobs_created_seconds``: from the first create until every child Job exists;
* ``operator_status_running_seconds`` (``--pods run``): until every resource's status has a phase
  from its pods (Running, or Pending with the scheduler's reason when the GPUs are all taken);
* ``operator_checkpoints_in_status_seconds``: after a checkpoint (manifest.json) and progress.json
  are written to every resource's file:// run root, until every status shows that checkpoint;
* ``operator_cpu_seconds`` and ``operator_peak_rss_mib`` of the operator process (/proc);
* ``operator_api_requests_per_resource``: the operator's own client requests (its
  tinv_operator_api_requests_total) plus kopf's requests on the tinv resources (the apiserver's
  apiserver_request_total for textualinversionjobs, which only the operator and this script touch;
  the script's N creates are subtracted), divided by N.

One JSON line per result: {"name", "value", "unit", "config", "git_revision", "device"}.
Targets (issue 14): 1,000 resources to Jobs in < 20 s and 5,000 in < 100 s, operator peak RSS
< 300 MB at 5,000, a new checkpoint in every status within 2 poll intervals at 1,000, every status
reflecting its pods within 30 s of the last resource at 1,000. The client creates the resources
with one asyncio loop (aiohttp, 48 in flight) and follows the Jobs and the resources' status by
watches (`Mirror`), not by LISTs, so that it neither sets the pace nor loads the API server it
measures; the config of each row gives the CPU seconds of every control-plane process and of the
script itself, over the run and until every Job existed, and every client's requests until then
(`requests_until_jobs`, from apiserver_request_total).

`--mode floor` is the yardstick for the Job-creation figure: no operator runs, and the script
creates each resource's Job itself (built by the operator's own builders) right after
the resource, as fast as it can; the time until every Job exists is the least this machine's control
plane needs for the same objects, pods included.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "cluster")]

from common import Results, device_name  # noqa: E402

DEVICE = device_name("cpu") + " (shared with the control plane)"


class ProcWatch:
    """CPU seconds and peak RSS of a process, sampled from /proc (peak also from VmHWM)."""

    def __init__(self, pid: int, interval: float = 0.25):
        self.pid = pid
        self.peak_kib = 0
        self.rss_kib = 0  # the latest sample
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            text = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return
        for key in ("VmHWM", "VmRSS"):
            m = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
            if m:
                self.peak_kib = max(self.peak_kib, int(m.group(1)))
                if key == "VmRSS":
                    self.rss_kib = int(m.group(1))

    def _run(self, interval: float) -> None:
        while not self.stop.wait(interval):
            self._read()

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def close(self) -> None:
        self._read()
        self.stop.set()


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (its threads included) from /proc; 0 when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Mirror:
    """The newest version of every object of one list, kept by a raw watch in a thread (no client
    models, one JSON parse per event). The waits below read it instead of LISTing a thousand
    objects every quarter of a second: those LISTs (megabytes of JSON each, encoded by the
    apiserver and parsed here) loaded the very apiserver whose pace the benchmark measures."""

    def __init__(self, list_fn, *args, **kwargs):
        self.objects: dict[str, dict] = {}
        self.lock = threading.Lock()
        self.events = 0
        self.error: BaseException | None = None
        self._call = (list_fn, args, kwargs)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        from kubernetes.client.rest import ApiException
        from kubernetes.watch.watch import iter_resp_lines

        fn, args, kwargs = self._call
        rv = None  # unset: the watch begins with the current state (an ADDED event per object)
        while not self._stop.is_set():
            try:
                resp = fn(*args, **kwargs, watch=True, _preload_content=False, timeout_seconds=3600,
                          **({"resource_version": rv} if rv else {}))
                for line in iter_resp_lines(resp):
                    if not line:
                        continue
                    event = json.loads(line)
                    obj = event.get("object") or {}
                    if event.get("type") == "ERROR":
                        rv = None if obj.get("code") == 410 else rv  # expired: start again from the state
                        break
                    meta = obj.get("metadata") or {}
                    rv = meta.get("resourceVersion") or rv
                    with self.lock:
                        if event.get("type") == "DELETED":
                            self.objects.pop(meta.get("name"), None)
                        elif event.get("type") in ("ADDED", "MODIFIED"):
                            self.objects[meta.get("name")] = obj
                    self.events += 1
            except ApiException as err:
                if err.status == 410:
                    rv = None
                else:
                    self.error = err
                    time.sleep(0.5)
            except Exception as err:  # noqa: BLE001 - a broken stream: watch again from the last version
                if self._stop.is_set():
                    return
                self.error = err
                time.sleep(0.5)

    def items(self) -> list[dict]:
        with self.lock:
            return list(self.objects.values())

    def __len__(self) -> int:
        return len(self.objects)

    def close(self) -> None:
        # Only the flag: closing the response from here blocks while the thread reads it. The
        # stream ends when the control plane stops, and then the thread sees the flag.
        self._stop.set()


def apiserver_request_mix(cp) -> dict[str, float]:
    """apiserver_request_total of every resource, by "VERB resource[/subresource]" (WATCH and
    WATCHLIST included): who keeps the API server busy, the operator or the rest of the control plane."""
    text = cp.kubectl("get", "--raw", "/metrics").stdout
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        verb = re.search(r'verb="([^"]+)"', line).group(1)
        res = re.search(r'resource="([^"]*)"', line)
        sub = re.search(r'subresource="([^"]*)"', line)
        key = f"{verb} {res.group(1) if res else '?'}{'/' + sub.group(1) if sub and sub.group(1) else ''}"
        out[key] = out.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def requests_of(mix: dict[str, float], resource: str) -> dict[str, float]:
    """One resource's part of `apiserver_request_mix`, by verb (all subresources: "PATCH/status")."""
    out: dict[str, float] = {}
    for key, value in mix.items():
        verb, _, what = key.partition(" ")
        name, _, sub = what.partition("/")
        if name == resource:
            key = verb + (f"/{sub}" if sub else "")
            out[key] = out.get(key, 0.0) + value
    return out


def _mix_delta(after: dict[str, float], before: dict[str, float], least: int = 20) -> dict[str, int]:
    delta = {k: int(v - before.get(k, 0.0)) for k, v in after.items()}
    return {k: v for k, v in sorted(delta.items(), key=lambda kv: -kv[1]) if v >= least}


def _session_settings(kubeconfig: str, tmp: Path):
    """TLS context and headers of the kubeconfig's (first) user, for aiohttp."""
    import base64
    import ssl

    import yaml

    kc = yaml.safe_load(Path(kubeconfig).read_text())
    cluster, user = kc["clusters"][0]["cluster"], kc["users"][0]["user"]
    ctx = ssl.create_default_context(cadata=base64.b64decode(cluster["certificate-authority-data"]).decode())
    headers = {"Content-Type": "application/json"}
    if "client-certificate-data" in user:
        (tmp / "c.pem").write_bytes(base64.b64decode(user["client-certificate-data"]))
        (tmp / "k.pem").write_bytes(base64.b64decode(user["client-key-data"]))
        ctx.load_cert_chain(str(tmp / "c.pem"), str(tmp / "k.pem"))
    elif user.get("token"):
        headers["Authorization"] = f"Bearer {user['token']}"
    return cluster["server"], ctx, headers


def create_all(kubeconfig: str, ns: str, bodies: list[dict], concurrency: int = 48, children=None) -> list[dict]:
    """POST every resource with one asyncio loop and `concurrency` requests in flight (aiohttp, which
    kopf brings): the Python kubernetes client's per-request CPU (~20 ms of model (de)serialisation
    on this machine) set the pace before, not the apiserver. Returns the created objects.

    `children(created)`, when given, returns (API path, object) pairs POSTed in order right after
    each resource is created: `--mode floor` creates what the operator would, without it."""
    import asyncio

    import aiohttp

    tmp = Path(tempfile.mkdtemp(prefix="tinv-bench-tls-"))
    server, ctx, headers = _session_settings(kubeconfig, tmp)
    url = f"{server}/apis/tinv.io/v1alpha1/namespaces/{ns}/textualinversionjobs"

    async def run() -> list[dict]:
        sem = asyncio.Semaphore(concurrency)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx, limit=concurrency), headers=headers) as session:
            async def post(to: str, body: dict) -> dict:
                for attempt in range(5):
                    async with session.post(to, data=json.dumps(body)) as resp:
                        if resp.status == 429 and attempt < 4:  # the apiserver's max-in-flight: back off
                            await asyncio.sleep(0.2 * (attempt + 1))
                            continue
                        if resp.status != 201:
                            raise RuntimeError(f"create {body['metadata']['name']}: {resp.status} {await resp.text()}")
                        return await resp.json()
                raise RuntimeError("unreachable")

            async def one(body: dict) -> dict:
                async with sem:
                    created = await post(url, body)
                    for path, child in children(created) if children else ():
                        await post(server + path, child)
                    return created

            return list(await asyncio.gather(*(one(b) for b in bodies)))

    try:
        return asyncio.run(run())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def operator_children(operator_args: list[str]):
    """`children` for create_all: the objects (a Job) the operator's own builders make for a
    created resource, with the operator's configuration (its command-line flags)."""
    from tinv.api.models import RESOURCES
    from tinv.operator import builders as B
    from tinv.operator.config import from_args
    from tinv.operator.kube import path_for

    config = from_args(operator_args)

    def children(created: dict) -> list[tuple[str, dict]]:
        kind = created["kind"]
        doc = {k: created[k] for k in ("apiVersion", "kind", "metadata", "spec")}
        eff = B.effective(RESOURCES[kind].model_validate(doc), config)
        ns = created["metadata"]["namespace"]
        return [(path_for(obj["kind"], ns), obj) for obj in B.children(kind, eff, config)]

    return children


def start_profiler(pid: int, out: str) -> subprocess.Popen:
    """Sample the running operator with py-spy (collapsed stacks), at a rate low enough not to skew it."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return subprocess.Popen([exe, "record", "--pid", str(pid), "--format", "raw", "--rate", "50", "--nonblocking", "-o", out],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def stop_profiler(spy: subprocess.Popen, out: str, top: int = 15) -> None:
    """Stop py-spy (it writes on SIGINT) and print the functions with the most samples of their own."""
    spy.send_signal(signal.SIGINT)
    try:
        spy.wait(60)
    except subprocess.TimeoutExpired:
        spy.kill()
    own: dict[str, int] = {}
    total = 0
    for line in Path(out).read_text().splitlines() if Path(out).exists() else []:
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue  # py-spy ends the file with a partial line when stopped
        frame = stack.rsplit(";", 1)[-1]
        own[frame] = own.get(frame, 0) + int(count)
        total += int(count)
    print(f"py-spy: {total} samples of the operator in {out}; top functions by own samples:", file=sys.stderr)
    for frame, count in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {100 * count / max(total, 1):5.1f}%  {frame}", file=sys.stderr)


def profile_apiserver(cp, seconds: float, out: str) -> threading.Thread:
    """Fetch a Go CPU profile of the API server (`/debug/pprof/profile`) over the next `seconds`,
    in a thread, into `out`; `print_apiserver_profile` then summarises it with `go tool pprof`."""
    api = cp.api_client()

    def fetch() -> None:
        resp = api.call_api("/debug/pprof/profile", "GET", query_params=[("seconds", int(seconds))],
                            _preload_content=False, _request_timeout=seconds + 60, auth_settings=["BearerToken"])
        Path(out).write_bytes(resp.data)

    thread = threading.Thread(target=fetch, name="apiserver-pprof", daemon=True)
    thread.start()
    return thread


def print_apiserver_profile(out: str, top: int = 25) -> None:
    """The API server's functions by cumulative CPU (`go tool pprof -top -cum`), where Go is installed."""
    go = shutil.which("go") or shutil.which("/usr/local/go/bin/go")
    if not Path(out).exists():
        print(f"apiserver profile: {out} was not written", file=sys.stderr)
        return
    if not go:
        print(f"apiserver profile: {out}; no `go` on PATH to summarise it (go tool pprof -top {out})", file=sys.stderr)
        return
    for flag in ("-flat", "-cum"):
        res = subprocess.run([go, "tool", "pprof", "-top", flag, f"-nodecount={top}", out], capture_output=True, text=True)
        print(f"apiserver profile ({flag[1:]}), {out}:\n{res.stdout[-6000:]}{res.stderr[-500:]}", file=sys.stderr)


def run_one(n: int, args) -> list[dict]:
    from harness import ControlPlane
    from harness.controlplane import CONTROLLER_QPS
    from operator_helpers import OperatorProcess, apply_crds, metric_value, run_root, tijob, write_checkpoint, write_progress

    rows: list[dict] = []
    config = {"n": n, "mode": args.mode, "pods": args.pods, "poll_interval_s": args.poll_interval, "api_workers": args.api_workers,
              "profiled": bool(args.profile or args.profile_apiserver), "namespaces": 1, "harness": "etcd+kube-apiserver+kcm+scheduler+KWOK (5 fake nodes, 32 GPUs)",
              "controller_qps": CONTROLLER_QPS}

    results = Results("operator")

    def row(name: str, value: float, unit: str) -> None:
        rows.append(results.emit(name, value, unit, config, digits=3, device=DEVICE))

    work = Path(tempfile.mkdtemp(prefix="tinv-bench-op-"))
    store = work / "store"
    store.mkdir()
    with ControlPlane() as cp:
        apply_crds(cp)
        ns = cp.new_namespace("bench")
        op = OperatorProcess(cp, [ns], work / "operator", storage_uri=f"file://{store}", poll_interval=args.poll_interval,
                             extra=["--api-workers", str(args.api_workers), "--log-level", "WARNING"])
        watch = None
        from kubernetes import client

        api = client.CustomObjectsApi(cp.api_client())
        suspend = {"suspend": True} if args.pods == "suspended" else None

        bodies = [tijob(f"bench-{i:05d}", gpu_class=None, region=None, run_policy=suspend) for i in range(n)]

        spy = None
        mirrors: tuple = ()

        def start_operator() -> None:
            nonlocal watch, spy
            op.start()
            watch = ProcWatch(op.proc.pid)
            if args.profile:
                spy = start_profiler(op.proc.pid, args.profile)
            deadline = time.monotonic() + 60
            while True:  # up when its metrics endpoint answers
                try:
                    op.metrics()
                    return
                except OSError:
                    if time.monotonic() > deadline or not op.alive():
                        raise RuntimeError(f"operator did not start:\n{op.logs()}")
                    time.sleep(0.2)

        try:
            batch = client.BatchV1Api(cp.api_client())
            jobs_seen = Mirror(batch.list_namespaced_job, ns, label_selector="app.kubernetes.io/managed-by=tinv-operator")
            tijobs_seen = Mirror(api.list_namespaced_custom_object, "tinv.io", "v1alpha1", ns, "textualinversionjobs")
            mirrors = (jobs_seen, tijobs_seen)
            mix0 = apiserver_request_mix(cp)
            tijob_req0 = requests_of(mix0, "textualinversionjobs")
            components = cp.pids()
            client_cpu0 = sum(os.times()[:2])
            comp_cpu0 = {name: cpu_seconds(pid) for name, pid in components.items()}

            def components_cpu() -> dict[str, float]:  # each control-plane process's CPU since the start
                return {name: round(cpu_seconds(pid) - comp_cpu0[name], 1) for name, pid in components.items()}

            def record_totals() -> None:  # the run's CPU (control plane; this script: creates, watches, files) and length
                config["control_plane_cpu_seconds"] = components_cpu()
                config["wall_seconds"] = round(time.monotonic() - t0, 1)
                config["bench_client_cpu_seconds"] = round(sum(os.times()[:2]) - client_cpu0, 1)
            if args.mode == "live":
                start_operator()
            pprof = profile_apiserver(cp, args.profile_seconds, args.profile_apiserver) if args.profile_apiserver else None
            t0 = time.monotonic()
            # floor: the script creates each resource's children (its Job) itself, no operator
            children = operator_children(op.args[4:]) if args.mode == "floor" else None
            created = create_all(cp.kubeconfig, ns, bodies, children=children)
            create_s = time.monotonic() - t0
            if args.mode == "backlog":
                t0 = time.monotonic()  # from the operator's start: N resources wait for it
                start_operator()
            cpu0 = 0.0
            row("operator_resources_created_by_client_seconds", create_s, "s")

            def count_jobs() -> int:
                return len(jobs_seen)

            def list_tijobs() -> list[dict]:
                return tijobs_seen.items()

            while count_jobs() < n:
                if time.monotonic() - t0 > args.timeout:
                    raise RuntimeError(f"only {count_jobs()}/{n} Jobs after {args.timeout} s (watch: {jobs_seen.error})\n{op.logs()}")
                time.sleep(0.25)
            row("operator_jobs_created_seconds", time.monotonic() - t0, "s")
            # every client's requests until then (kinds with at least n/50), and the CPU each process used
            config["requests_until_jobs"] = _mix_delta(apiserver_request_mix(cp), mix0, least=max(1, n // 50))
            config["cpu_seconds_until_jobs"] = components_cpu()
            if watch is not None:
                config["cpu_seconds_until_jobs"]["operator"] = round(watch.cpu_seconds(), 1)
                config["operator_rss_mib"] = {"jobs": round(watch.rss_kib / 1024), "peak_at_jobs": round(watch.peak_kib / 1024)}
            if args.mode != "backlog":
                row("operator_jobs_created_after_last_resource_seconds", time.monotonic() - t0 - create_s, "s")
            if args.mode == "floor":
                time.sleep(1.0)
                record_totals()
                return rows

            want = {"Suspended"} if args.pods == "suspended" else {"Running", "Pending"}
            while True:
                items = list_tijobs()
                done = 0
                for it in items:
                    st = it.get("status") or {}
                    reason = next((c.get("reason") for c in st.get("conditions") or [] if c.get("type") == "Running"), None)
                    if st.get("phase") in want and reason not in (None, "JobCreated", "Starting"):
                        done += 1
                if done >= n:
                    break
                if time.monotonic() - t0 > args.timeout:
                    raise RuntimeError(f"only {done}/{n} statuses reflect their pods after {args.timeout} s")
                time.sleep(0.5)
            row("operator_status_from_pods_seconds", time.monotonic() - t0, "s")
            config["operator_rss_mib"]["status"] = round(watch.rss_kib / 1024)
            if args.mode == "live":
                row("operator_status_from_pods_after_last_resource_seconds", time.monotonic() - t0 - create_s, "s")
            phases: dict[str, int] = {}
            for it in items:
                p = (it.get("status") or {}).get("phase")
                phases[p] = phases.get(p, 0) + 1
            config["phases"] = phases

            # the trainer writes a checkpoint for every resource
            t1 = time.monotonic()
            expected = {}
            for obj in created:
                root = run_root(f"file://{store}", obj)
                ck = write_checkpoint(root, 10, 0.25)
                write_progress(root, 10, 100, 0.25, [ck])
                expected[obj["metadata"]["name"]] = ck["uuid"]
            write_s = time.monotonic() - t1
            while True:
                items = list_tijobs()
                seen = sum(1 for it in items if ((it.get("status") or {}).get("latestCheckpoint") or {}).get("uuid") == expected[it["metadata"]["name"]])
                if seen >= n:
                    break
                if time.monotonic() - t1 > args.timeout:
                    raise RuntimeError(f"only {seen}/{n} checkpoints in status after {args.timeout} s")
                time.sleep(0.5)
            row("operator_checkpoints_in_status_seconds", time.monotonic() - t1, "s")
            row("operator_checkpoints_in_status_poll_intervals", (time.monotonic() - t1) / args.poll_interval, "intervals")
            config["checkpoint_write_seconds"] = round(write_s, 2)
            time.sleep(1.0)
            cpu = watch.cpu_seconds() - cpu0
            watch.close()
            config["operator_rss_mib"]["end"] = round(watch.rss_kib / 1024)
            row("operator_cpu_seconds", cpu, "s")
            # where the machine's CPU went meanwhile: on a small machine the control plane sets the pace
            record_totals()
            config["watch_events"] = {"jobs": jobs_seen.events, "textualinversionjobs": tijobs_seen.events}
            row("operator_peak_rss_mib", watch.peak_kib / 1024, "MiB")
            metrics = op.metrics()
            own = metric_value(metrics, "tinv_operator_api_requests_total")
            by_kind = {}
            for line in metrics.splitlines():
                if line.startswith("tinv_operator_api_requests_total{"):
                    verb = re.search(r'verb="([^"]+)"', line).group(1)
                    res = re.search(r'resource="([^"]+)"', line).group(1)
                    by_kind[f"{verb} {res}"] = by_kind.get(f"{verb} {res}", 0) + float(line.rsplit(" ", 1)[1])
            tijob_req = requests_of(apiserver_request_mix(cp), "textualinversionjobs")
            delta = {k: tijob_req.get(k, 0) - tijob_req0.get(k, 0) for k in tijob_req}
            # kopf's own: everything on textualinversionjobs except our status patches (counted in `own`) and
            # the script's creates and LISTs (the script's polling)
            # kopf's: its annotation PATCHes and its WATCH requests. (GETs of single resources come from the
            # garbage collector checking ownerReferences, LISTs from this script: both not the operator.)
            kopf = sum(v for k, v in delta.items() if k in ("PATCH", "WATCH"))
            config["operator_requests_by_kind"] = {k: int(v) for k, v in sorted(by_kind.items())}
            config["kopf_requests_on_tijobs"] = {k: int(v) for k, v in sorted(delta.items()) if k in ("PATCH", "WATCH")}
            config["other_requests_on_tijobs"] = {k: int(v) for k, v in sorted(delta.items()) if k not in ("PATCH", "WATCH")}
            row("operator_api_requests_per_resource", (own + kopf) / n, "requests")
            if pprof is not None:
                pprof.join(args.profile_seconds + 60)
                print_apiserver_profile(args.profile_apiserver)
        finally:
            for mirror in mirrors:
                mirror.close()
            if watch is not None:
                watch.close()
            if spy is not None:
                stop_profiler(spy, args.profile)
            op.stop()
            if args.keep_logs:
                print(op.logs(100), file=sys.stderr)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, action="append", help="resources per run; repeat for several runs (default: 100)")
    p.add_argument("--pods", choices=("run", "suspended"), default="run",
                   help="run: Jobs start pods (KWOK runs what fits on 32 fake GPUs, the rest stay Pending/Unschedulable); suspended: no pods")
    p.add_argument("--mode", choices=("live", "backlog", "floor"), default="live",
                   help="live: the operator runs while the resources are created; backlog: they exist before it starts (a restart at scale); "
                   "floor: no operator, the script creates each resource's Job itself (the operator's builders) right "
                   "after the resource, as fast as it can: what this machine's control plane allows at best")
    p.add_argument("--poll-interval", type=float, default=15.0, help="the operator's storage poll interval (its default: 15 s)")
    p.add_argument("--api-workers", type=int, default=16, help="the operator's API thread pool")
    p.add_argument("--timeout", type=float, default=600, help="give up after this many seconds per phase")
    p.add_argument("--record", action="store_true", help="append the rows to bench/results/operator.jsonl")
    p.add_argument("--keep-logs", action="store_true", help="print the operator's log tail at the end")
    p.add_argument("--profile", metavar="FILE", help="sample the operator with py-spy (pip install py-spy) into FILE "
                   "(collapsed stacks, for flamegraph tools) and print its top functions by own time")
    p.add_argument("--profile-apiserver", metavar="FILE", help="take a Go CPU profile of the API server over the first "
                   "--profile-seconds of the burst into FILE (starts it with --profiling=true) and print its top functions")
    p.add_argument("--profile-seconds", type=float, default=40.0, help="length of the API server's profile (default: 40 s)")
    args = p.parse_args()
    if args.profile_apiserver:
        os.environ["TINV_APISERVER_PROFILING"] = "1"
    rows: list[dict] = []
    for n in args.n or [100]:
        rows += run_one(n, args)
    for config in {id(r["config"]): r["config"] for r in rows}.values():  # with what was added after the rows were printed
        print("config:", json.dumps(config), file=sys.stderr)
    results = Results("operator", record=args.record)
    results.rows = rows
    results.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
