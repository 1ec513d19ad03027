"""The trainer as the operator runs it: a process, its exit codes, signals, torchrun, S3."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args, env=None, timeout=240, **kw):
    e = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "tinv.trainer", *args], capture_output=True, text=True, env=e, timeout=timeout, **kw)


def test_train_cli_writes_outputs_and_termination_message(job_yaml, tmp_path):
    job = job_yaml(training={"steps": 4, "checkpointEvery": 2})
    term = tmp_path / "term.json"
    r = run_cli("train", str(job), "--termination-message-path", str(term), "--no-progress")
    assert r.returncode == 0, r.stderr
    msg = json.loads(term.read_text())
    assert msg["exit_code"] == 0 and msg["state"] == "succeeded" and msg["step"] == 4
    uri = msg["latest_checkpoint"]["uri"]
    assert (Path(uri) / "manifest.json").exists()
    assert "step 4/4" in r.stderr  # plain log lines when not a TTY
    prog = json.loads((Path(msg["output_uri"]) / "progress.json").read_text())
    assert prog["state"] == "succeeded" and prog["latest_checkpoint"]["uuid"] == msg["latest_checkpoint"]["uuid"]
    # the lead's front door dispatches to the same code
    r2 = subprocess.run([sys.executable, "-c", "import sys; from tinv.api.cli import main; sys.exit(main(sys.argv[1:]))", "train", str(job), "--no-progress"],
                        capture_output=True, text=True, timeout=240)
    assert r2.returncode == 0, r2.stderr


def test_bad_config_and_input_exit_2_with_a_message(job_yaml, tmp_path):
    term = tmp_path / "t.json"
    bad = job_yaml("bad.yaml", concepts=[{"token": "cat", "initializer": "cat", "images": str(tmp_path)}])
    (tmp_path / "x.png").write_text("no")
    r = run_cli("train", str(bad), "--termination-message-path", str(term))
    assert r.returncode == 2 and "no usable images" in r.stderr
    assert json.loads(term.read_text())["exit_code"] == 2
    (tmp_path / "junk.yaml").write_text("apiVersion: tinv.io/v1alpha1\nkind: TextualInversionJob\nmetadata: {name: x}\nspec: {concepts: []}\n")
    r = run_cli("train", str(tmp_path / "junk.yaml"))
    assert r.returncode == 2 and "spec.model" in r.stderr
    hub = job_yaml("hub.yaml", model={"source": "org/not-cached"})
    r = run_cli("train", str(hub), env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert r.returncode == 69 and "cannot reach the Hugging Face hub" in r.stderr


def test_sigterm_checkpoints_then_exits_retryable(job_yaml, tmp_path):
    job = job_yaml(training={"steps": 100000, "checkpointEvery": 100000, "logEvery": 1})
    term = tmp_path / "term.json"
    p = subprocess.Popen([sys.executable, "-m", "tinv.trainer", "train", str(job), "--termination-message-path", str(term), "--no-progress"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    runs = tmp_path / "runs"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        prog = list(runs.glob("*/*/progress.json"))
        if prog:
            try:
                if json.loads(prog[0].read_text())["step"] >= 3:
                    break
            except (ValueError, KeyError):
                pass
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 75, err
    msg = json.loads(term.read_text())
    assert msg["exit_code"] == 75 and msg["latest_checkpoint"] is not None
    last = err.strip().splitlines()[-1]  # one line saying what was saved
    assert "preempted" in last and msg["latest_checkpoint"]["uuid"] in last and "saved" in last, last
    step = msg["step"]
    assert msg["latest_checkpoint"]["step"] == step >= 3
    state = torch.load(Path(msg["latest_checkpoint"]["uri"]) / "optimizer.pt", weights_only=True)
    assert state["step"] == step


def test_two_gloo_processes_match_one_process(job_yaml, tmp_path):
    # One process, 2 x 2 per step  ==  two processes, 1 x 2 each (same global batch of 4).
    one = job_yaml("one.yaml", storage=str(tmp_path / "one"), training={"steps": 6, "batchSize": 2, "gradientAccumulation": 2, "checkpointEvery": 6})
    two = job_yaml("two.yaml", storage=str(tmp_path / "two"), training={"steps": 6, "batchSize": 1, "gradientAccumulation": 2, "checkpointEvery": 6})
    r1 = run_cli("train", str(one), "--no-progress", "--device", "cpu")
    assert r1.returncode == 0, r1.stderr
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r2 = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(port),
         "-m", "tinv.trainer", "train", str(two), "--no-progress", "--device", "cpu"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert r2.returncode == 0, r2.stderr[-3000:]
    from tinv.trainer.formats import read_embeddings

    def final(root):
        (ck,) = [p.parent for p in Path(root).glob("*/*/checkpoints/*/manifest.json")]
        return read_embeddings(str(ck))["det-logo"], json.loads((ck / "manifest.json").read_text())

    a, ma = final(tmp_path / "one")
    b, mb = final(tmp_path / "two")
    assert ma["effective_batch_size"] == mb["effective_batch_size"] == 4 and mb["world_size"] == 2
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    assert abs(ma["loss"] - mb["loss"]) < 1e-5


def test_prometheus_metrics_endpoint():
    import socket

    from tinv.trainer.reporting import Reporter
    from tinv.trainer.storage import Store

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rep = Reporter(enabled=True, store=Store(), run="/tmp/unused-run", total_steps=10, world_size=1, job_meta={}, log_every=5,
                   metrics_port=port, progress_bar=False, tensorboard=False)
    try:
        rep.global_batch = 4
        rep.step(3, 0.5, 1e-3, 12.0, 0.1)
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        assert "tinv_trainer_step 3.0" in body and "tinv_trainer_loss 0.5" in body and "tinv_trainer_total_steps 10.0" in body
    finally:
        rep.close()


def test_images_model_and_outputs_in_object_storage(s3_server, make_job, logo_dir, tmp_path, monkeypatch):
    from tinv.trainer import tiny
    from tinv.trainer.train import Options, train

    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    bucket = s3_server.make_bucket()
    s3 = s3_server.client()
    for p in logo_dir.iterdir():
        s3.upload_file(str(p), bucket, f"images/det-logo/{p.name}")
    model = tiny.save(tmp_path / "m")
    for p in model.rglob("*"):
        if p.is_file():
            s3.upload_file(str(p), bucket, f"models/tiny/{p.relative_to(model).as_posix()}")
    job = make_job(
        storage=f"s3://{bucket}/runs",
        model={"source": f"s3://{bucket}/models/tiny"},
        concepts=[{"token": "det-logo", "initializer": "logo", "images": f"s3://{bucket}/images/det-logo/"}],
        training={"steps": 2, "checkpointEvery": 1, "checkpointsKept": 1},
    )
    job.spec.storage.endpoint = s3_server.endpoint_url
    job.spec.storage.addressing_style = "path"
    res = train(job, Options(validation=False))
    assert res.exit_code == 0 and res.latest.uri.startswith(f"s3://{bucket}/runs/ns/t-")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="runs/")["Contents"]]
    assert sum(k.endswith("manifest.json") for k in keys) == 1  # checkpointsKept: 1
    assert any(k.endswith("progress.json") for k in keys) and any("/tensorboard/" in k for k in keys)
    # resume reads it back from S3
    again = train(job, Options(validation=False, steps=3))
    assert again.step == 3


class _SilentHub:
    """A TCP server that accepts connections and never answers: a model download that hangs."""

    def __init__(self):
        import socket
        import threading

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.conns = []

        def serve():
            while True:
                try:
                    c, _ = self.sock.accept()
                except OSError:
                    return
                self.conns.append(c)
                self.accepted += 1

        threading.Thread(target=serve, daemon=True).start()

    def close(self):
        for c in self.conns:
            c.close()
        self.sock.close()


@pytest.mark.parametrize("with_checkpoint", [False, True])
def test_sigterm_while_starting_exits_75_and_says_what_was_saved(job_yaml, tmp_path, with_checkpoint):
    """Issue 13, bug 10: pre-emption while the model downloads used to exit 143 with nothing printed."""
    job = job_yaml(training={"steps": 10, "checkpointEvery": 2})
    if with_checkpoint:
        r = run_cli("train", str(job), "--steps", "2", "--no-progress")
        assert r.returncode == 0, r.stderr
    hub = _SilentHub()
    term = tmp_path / "term.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{hub.port}"}
    try:
        p = subprocess.Popen([sys.executable, "-m", "tinv.trainer", "train", str(job), "--model", "org/some-model", "--no-progress",
                              "--termination-message-path", str(term)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        deadline = time.monotonic() + 120
        while hub.accepted < 2 and time.monotonic() < deadline and p.poll() is None:  # the probe, then the download
            time.sleep(0.1)
        assert hub.accepted >= 2 and p.poll() is None, p.communicate()[1] if p.poll() is not None else "no download started"
        time.sleep(0.5)
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=60)
    finally:
        hub.close()
    assert p.returncode == 75, err
    last = err.strip().splitlines()[-1]
    msg = json.loads(term.read_text())
    assert msg["exit_code"] == 75 and msg["state"] == "running" and msg["reason"] == "Preempted"
    if with_checkpoint:
        assert "SIGTERM" in last and "(step 2) is kept" in last and "continues from it" in last, last
    else:
        assert "SIGTERM" in last and "nothing saved" in last, last
