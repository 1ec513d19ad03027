"""The web UI against the real thing: helm install with ui.enabled -> the operator (as its
ServiceAccount) -> a job whose token and prompts are hostile HTML trains for real on the tiny model
against the S3 server -> a grid renders from it -> `tinv ui --kube`, started exactly as the chart's
UI Deployment runs it (its args, its env with the Secret resolved as the kubelet would, and only
the UI ServiceAccount's token), is read in headless Chromium.

Checked in the browser: the runs list shows both resources; the job page draws as many loss points
as the trainer wrote to TensorBoard in S3 and its checkpoints table is status.checkpoints; the grid
page shows every image of index.json; Events are listed; each worker pod has a log section; no
hostile string ran and nothing was loaded from outside the UI. A job whose storage endpoint is dead
shows that on its page.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from cluster.operator_helpers import OperatorProcess, free_port
from harness.nodeagent import NodeAgent
from test_end_to_end import _succeeded, _wait

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "tinv"
IMAGES = REPO / "examples" / "images" / "det-logo"
sys.path.insert(0, str(REPO / "tests" / "ui"))
from uikit import HOSTILE_TEXT, HOSTILE_TOKEN, Page, assert_local_only, browser, needs_chromium  # noqa: E402

pytestmark.append(needs_chromium)


class KubeletLogs:
    """The kubelet's log endpoint for the fake nodes, serving what the node agent's containers printed.

    KWOK plays the kubelet's status part and NodeAgent runs the containers (tests/harness); neither
    serves `GET /containerLogs/<ns>/<pod>/<container>`, which is where the apiserver proxies pods/log.
    This serves each pod's captured output there over HTTPS (the apiserver does not verify kubelet
    certificates unless --kubelet-certificate-authority is set), and points the nodes' status at it
    (InternalIP 127.0.0.1, kubeletEndpoint port), so `pods/log` through the real apiserver works.
    """

    def __init__(self, cp, agent: NodeAgent, workdir: Path):
        self.cp, self.agent, self.workdir = cp, agent, workdir
        self.saved: dict[str, dict] = {}

    def __enter__(self) -> "KubeletLogs":
        import http.server
        import ssl
        from urllib.parse import parse_qs, urlparse

        from harness.pki import PKI

        agent = self.agent

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - the stdlib's name
                url = urlparse(self.path)
                parts = url.path.strip("/").split("/")
                log = agent.workdir / "pods" / parts[2] / "log.txt" if len(parts) == 4 and parts[0] == "containerLogs" else None
                if log is None or not log.is_file():
                    self.send_error(404, "no such container log")
                    return
                lines = log.read_text().splitlines(keepends=True)
                tail = parse_qs(url.query).get("tailLines")
                body = "".join(lines[-int(tail[0]):] if tail else lines).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        kp = PKI(self.workdir / "kubelet-pki").issue("kubelet", "kubelet", server=True, ips=("127.0.0.1",))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(kp.cert, kp.key)
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        port = self.server.server_address[1]
        for node in self.cp.nodes:
            st = self.cp.get_json("node", node.name)["status"]
            self.saved[node.name] = {"addresses": st.get("addresses"), "daemonEndpoints": st.get("daemonEndpoints")}
            self._patch(node.name, {"addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
                                    "daemonEndpoints": {"kubeletEndpoint": {"Port": port}}})
        return self

    def _patch(self, node: str, status: dict) -> None:
        self.cp.kubectl("patch", "node", node, "--subresource=status", "--type=merge", "-p", json.dumps({"status": status}))

    def __exit__(self, *exc) -> None:
        for node, status in self.saved.items():
            self._patch(node, status)
        self.server.shutdown()


def _chart_container(cp, agent: NodeAgent, ns: str, deployment: str) -> tuple[dict, dict[str, str]]:
    """The container of one of the installed chart's Deployments and its env, with secretKeyRef and
    fieldRef values resolved the kubelet's way (by the node agent, for a pod named after it)."""
    manifest = cp.helm("get", "manifest", "tinv", "-n", ns).stdout
    deploy = next(d for d in yaml.safe_load_all(manifest) if d and d["kind"] == "Deployment" and d["metadata"]["name"] == deployment)
    pod = {"metadata": {"namespace": ns, "name": f"{deployment}-0"}, "spec": deploy["spec"]["template"]["spec"]}
    container = pod["spec"]["containers"][0]
    assert pod["spec"]["serviceAccountName"] == deployment
    return container, agent._env(pod, container)


def _ui_process(cp, agent: NodeAgent, ns: str, workdir: Path) -> tuple[subprocess.Popen, str]:
    """`tinv ui` as the chart's UI Deployment runs it: its args, its env, the UI account's token."""
    container, env = _chart_container(cp, agent, ns, "tinv-ui")
    port = free_port()
    args = [a for a in container["args"]]
    args[args.index("--port") + 1] = str(port)
    args[args.index("--host") + 1] = "127.0.0.1"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "TINV_", "KUBECONFIG"))}
    full_env.update(env)
    full_env.update({"KUBECONFIG": cp.token_kubeconfig(ns, "tinv-ui"), "PYTHONUNBUFFERED": "1"})
    log = open(workdir / "ui.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "tinv.api.cli", *args], env=full_env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(base + "/healthz", timeout=2):
                return proc, base
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("tinv ui did not start:\n" + (workdir / "ui.log").read_text()[-3000:]) from None
            time.sleep(0.3)


def _tb_loss_steps(s3, bucket: str, key_prefix: str) -> list[int]:
    """The train/loss steps the trainer wrote to TensorBoard in S3, read with tensorboard itself."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with tempfile.TemporaryDirectory() as tmp:
        objs = s3.list_objects_v2(Bucket=bucket, Prefix=key_prefix + "/tensorboard/")["Contents"]
        for o in objs:
            if "tfevents" in o["Key"] and o["Key"].count("/") == key_prefix.count("/") + 2:
                s3.download_file(bucket, o["Key"], str(Path(tmp) / o["Key"].rsplit("/", 1)[1]))
        acc = EventAccumulator(tmp, size_guidance={"scalars": 0})
        acc.Reload()
        return [e.step for e in acc.Scalars("train/loss")]


def test_ui_shows_the_cluster_run(control_plane, tinv_crds, s3_server, tmp_path):
    cp = control_plane
    ns = cp.new_namespace("e2e-ui")
    bucket = s3_server.make_bucket("tinv-ui")
    s3 = s3_server.client()
    for png in sorted(IMAGES.glob("*.png")):
        s3.upload_file(str(png), bucket, f"data/det-logo/{png.name}")
    cp.kubectl("create", "secret", "generic", "tinv-s3", "-n", ns,
               f"--from-literal=AWS_ACCESS_KEY_ID={s3_server.access_key}",
               f"--from-literal=AWS_SECRET_ACCESS_KEY={s3_server.secret_key}")
    cp.helm(
        "install", "tinv", str(CHART), "-n", ns, "--skip-crds",
        "--set", f"defaults.storage.uri=s3://{bucket}/runs",
        "--set", f"defaults.storage.endpoint={s3_server.endpoint_url}",
        "--set", "defaults.storage.addressingStyle=path",
        "--set", "defaults.storage.credentialsSecret=tinv-s3",
        "--set", "defaults.gpuClass=A100_PCIE_80GB", "--set", "defaults.region=ORD1",
        "--set", "pollIntervalSeconds=1", "--set", "ui.enabled=true",
    )

    agent = NodeAgent(cp, ns, tmp_path / "node", timeout=900)
    container, env = _chart_container(cp, agent, ns, "tinv")
    assert container["args"] == ["operator"]
    env.update({"KUBECONFIG": cp.token_kubeconfig(ns, "tinv"), "TINV_METRICS_PORT": str(free_port()), "TINV_HEALTH_PORT": str(free_port())})
    env.pop("TINV_TERMINATION_MESSAGE_PATH", None)
    op = OperatorProcess(cp, [ns], tmp_path / "operator", env=env)
    op.args = [sys.executable, "-m", "tinv.api.cli", "operator"]
    op.env = {k: v for k, v in {**os.environ, **env, "PYTHONUNBUFFERED": "1"}.items() if not k.startswith(("AWS_ENDPOINT", "TINV_CACHE"))}
    stop = threading.Event()
    serve = threading.Thread(target=agent.serve, args=("tinv.io/kind", stop), daemon=True)

    def diagnostics() -> str:
        runs = "\n".join(f"--- pod {r.name} exit {r.exit_code}\n{r.log[-3000:]}" for r in agent.runs)
        objs = cp.kubectl("get", "tijobs,ggrids,jobs,pods", "-n", ns, "-o", "wide", check=False).stdout
        ui_log = (tmp_path / "ui.log").read_text()[-3000:] if (tmp_path / "ui.log").exists() else ""
        return f"{objs}\n{op.logs(120)}\n{runs}\n--- ui\n{ui_log}"

    ui = None
    with op, KubeletLogs(cp, agent, tmp_path):
        serve.start()
        try:
            job = {
                "apiVersion": "tinv.io/v1alpha1", "kind": "TextualInversionJob", "metadata": {"name": "det-logo"},
                "spec": {
                    "model": {"source": "builtin:tiny"},
                    "concepts": [{"token": HOSTILE_TOKEN, "initializer": HOSTILE_TEXT, "images": f"s3://{bucket}/data/det-logo/"}],
                    "training": {"steps": 30, "batchSize": 2, "gradientAccumulation": 1, "resolution": 64,
                                 "checkpointEvery": 10, "checkpointsKept": 2, "logEvery": 5,
                                 "validation": {"prompts": [HOSTILE_TEXT], "steps": 4}},
                    "resources": {"gpusPerWorker": 1},
                },
            }
            cp.kubectl("apply", "-f", "-", "-n", ns, input=yaml.safe_dump(job))
            # a job whose storage is unreachable: its page must say so, the others must not break
            dead = {**job, "metadata": {"name": "dead-storage"},
                    "spec": {**job["spec"], "storage": {"uri": f"s3://{bucket}/dead", "endpoint": f"http://127.0.0.1:{free_port()}"},
                             "runPolicy": {"suspend": True}}}
            cp.kubectl("apply", "-f", "-", "-n", ns, input=yaml.safe_dump(dead))
            done = _wait(cp, _succeeded(cp, ns, "tijob", "det-logo", "latestCheckpoint", diagnostics), 600, "the job to succeed", diagnostics)
            grid = {
                "apiVersion": "tinv.io/v1alpha1", "kind": "GenerationGrid", "metadata": {"name": "det-logo-grid"},
                "spec": {
                    "model": {"source": "builtin:tiny"},
                    "embeddings": [{"job": "det-logo", "checkpoint": "latest"}],
                    "prompts": [f"{HOSTILE_TEXT} {HOSTILE_TOKEN}", f"a watercolor of {HOSTILE_TOKEN}"],
                    "grid": {"guidanceScales": [1, 5], "steps": [4], "schedulers": ["ddim"], "seeds": [0, 1], "sizes": [{"width": 64, "height": 64}]},
                    "batchSize": 4, "precision": "fp32", "resources": {"workers": 2, "gpusPerWorker": 1},
                },
            }
            cp.kubectl("apply", "-f", "-", "-n", ns, input=yaml.safe_dump(grid))
            gdone = _wait(cp, _succeeded(cp, ns, "ggrid", "det-logo-grid", "galleryUri", diagnostics), 600, "the grid to succeed", diagnostics)
        finally:
            stop.set()
            serve.join(30)

        status = done["status"]
        ui, base = _ui_process(cp, agent, ns, tmp_path)
        try:
            with browser() as b:
                _check_pages(b, base, tmp_path, ns, s3, bucket, status, gdone["status"], agent)
        except Exception as err:  # noqa: BLE001 - add every log that explains the failure
            raise AssertionError(f"{type(err).__name__}: {err}\n{diagnostics()}") from None
        finally:
            ui.terminate()
            ui.wait(10)


def _check_pages(b, base, tmp_path, ns, s3, bucket, status, gstatus, agent) -> None:
    p = Page(b, base, tmp_path)
    try:
        _pages(p, base, ns, s3, bucket, status, gstatus, agent)
    except Exception:
        p.screenshot("ui-cluster-failure")
        print("page text at the failure:\n" + p.page.inner_text("body")[:3000])
        raise
    finally:
        p.close()


def _pages(p: Page, base, ns, s3, bucket, status, gstatus, agent) -> None:
    # the runs list: both resources with their phases, the newest checkpoint
    p.goto("/")
    row = p.page.locator("tr[data-name='det-logo']")
    assert row.get_attribute("data-phase") == "Succeeded"
    assert status["latestCheckpoint"]["uuid"][:8] in row.inner_text() and "30/30" in row.inner_text()
    assert p.page.locator("tr[data-name='det-logo-grid']").get_attribute("data-phase") == "Succeeded"
    assert p.page.locator("tr[data-name='dead-storage']").count() == 1
    p.screenshot("ui-cluster-runs")

    # the job page: loss points as in TensorBoard, checkpoints as in status, Events, worker logs
    assert p.goto("/jobs/" + ns + "/det-logo").status == 200
    p.wait_js("document.getElementById('loss-chart').data !== undefined")
    key_prefix = status["outputUri"][len(f"s3://{bucket}/"):]
    steps = _tb_loss_steps(s3, bucket, key_prefix)
    drawn = p.page.evaluate("document.getElementById('loss-chart').data[0].x")
    assert drawn == steps and len(steps) == 30
    table = p.page.eval_on_selector_all("table.ckpts tbody tr", "rs => rs.map(r => [r.dataset.uuid, Number(r.dataset.step)])")
    assert table == [[c["uuid"], c["step"]] for c in reversed(status["checkpoints"])]
    uris = p.page.eval_on_selector_all("table.ckpts tbody tr td.uri", "ts => ts.map(t => t.textContent.trim())")
    assert uris == [c["uri"] for c in reversed(status["checkpoints"])]
    href = p.page.locator("table.ckpts tbody tr").first.locator("a.dl", has_text="learned_embeds.safetensors").get_attribute("href")
    with urllib.request.urlopen(base + href) as r:
        latest = status["latestCheckpoint"]["uri"][len(f"s3://{bucket}/"):]
        assert r.read() == s3.get_object(Bucket=bucket, Key=f"{latest}/learned_embeds.safetensors")["Body"].read()
    conditions = p.page.inner_text("#conditions")
    assert "Succeeded" in conditions and "Accepted" in conditions
    events = p.page.locator("#events tbody tr")
    assert events.count() >= 1
    (run,) = [r for r in agent.runs if r.name.startswith("det-logo-train")] or [r for r in agent.runs if r.name.startswith("det-logo") and "grid" not in r.name]
    worker = p.page.locator(f".worker[data-pod='{run.name}']")
    assert worker.count() == 1, "a log section for the trainer's pod"
    log_text = worker.inner_text()
    trainer_lines = [ln for ln in run.log.splitlines() if "step 30/30" in ln]
    assert trainer_lines and trainer_lines[-1].strip() in log_text, "the trainer's own lines, through pods/log"
    assert "log unavailable" not in log_text
    p.scroll_through()
    assert all(w > 0 for w in p.page.eval_on_selector_all("table.val img", "is => is.map(i => i.naturalWidth)"))
    assert HOSTILE_TOKEN in p.page.inner_text("#hyperparameters")
    p.screenshot("ui-cluster-job")

    # the grid page: every image of index.json, decoded, with its reproduce command
    index = json.loads(s3.get_object(Bucket=bucket, Key=gstatus["indexUri"][len(f"s3://{bucket}/"):])["Body"].read())
    p.goto("/grids/" + ns + "/det-logo-grid")
    p.scroll_through()
    files = p.page.eval_on_selector_all("figure.image", "fs => fs.map(f => f.dataset.file)")
    assert sorted(files) == sorted(i["file"] for i in index["images"]) and len(files) == 8
    assert p.page.eval_on_selector_all("figure.image img", "is => is.filter(i => i.naturalWidth === 64).length") == 8
    assert p.page.locator("#shards table.shards tbody tr").count() == 2, "two shards, two workers"
    assert f"tinv reproduce s3://{bucket}/" in p.page.text_content("#gallery")
    assert p.page.locator("#logs .worker").count() == 2
    p.screenshot("ui-cluster-grid")

    # dead storage: a message on that run's page, the page itself fine
    assert p.goto("/jobs/" + ns + "/dead-storage").status == 200
    assert "unreachable" in p.page.inner_text("#storage-problem")

    assert not p.dialogs and p.pwned() == [], "hostile input ran as script"
    assert_local_only(p.requests, base)
    assert not p.errors, p.errors
