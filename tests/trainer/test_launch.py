"""`python -m tinv.trainer.launch`: the trainer's exit code survives several ranks and several pods
(torchrun reports every failure as 1), and one failed rank stops the others at once.

Real processes throughout: the real `tinv train` on the tiny model with 2 gloo ranks, and for the
several-pods case two launchers on loopback, as two pods of an Indexed Job run them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.procs import free_port, free_port_pair

pytestmark = pytest.mark.slow

# A rank that fails on cue while the others are stuck, as ranks in an NCCL collective are until its
# timeout (gloo notices a dead peer's closed socket; NCCL and a hung peer do not).
# A negative code: the rank dies of that signal (the OOM killer's SIGKILL).
RANK_SCRIPT = """\
import os, sys, time
import torch.distributed as dist
dist.init_process_group("gloo")
if dist.get_rank() == int(sys.argv[1]):
    time.sleep(1)
    code = int(sys.argv[2])
    if code < 0:
        os.kill(os.getpid(), -code)
    sys.exit(code)
time.sleep(600)
"""




def launch(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **kw.pop("env", {})}
    return subprocess.Popen([sys.executable, "-m", "tinv.trainer.launch", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_bad_input_exits_2_from_two_ranks(job_yaml, tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.png").write_text("not an image")
    bad = job_yaml("bad.yaml", concepts=[{"token": "cat", "initializer": "cat", "images": str(tmp_path / "junk")}])
    p = launch("--nproc-per-node", "2", "--master-port", str(free_port_pair()), "train", str(bad), "--no-progress", "--device", "cpu")
    _, err = p.communicate(timeout=240)
    assert p.returncode == 2, err[-3000:]  # torchrun: 1, and the Job's FailJob rule never matches
    assert "no usable images" in err


def test_sigterm_reaches_every_rank_checkpoint_then_75(job_yaml, tmp_path):
    job = job_yaml(training={"steps": 100000, "checkpointEvery": 100000, "logEvery": 1, "batchSize": 1, "gradientAccumulation": 1})
    term = tmp_path / "term.json"
    p = launch("--nproc-per-node", "2", "--master-port", str(free_port_pair()), "train", str(job), "--no-progress", "--device", "cpu",
               "--termination-message-path", str(term))
    deadline = time.monotonic() + 240
    step = 0
    while time.monotonic() < deadline and p.poll() is None and step < 2:
        for prog in (tmp_path / "runs").glob("*/*/progress.json"):
            try:
                step = json.loads(prog.read_text()).get("step", 0)
            except ValueError:
                pass
        time.sleep(0.3)
    assert step >= 2, p.communicate()[1][-3000:]
    p.send_signal(signal.SIGTERM)  # the kubelet signals the container's main process only
    _, err = p.communicate(timeout=180)
    assert p.returncode == 75, err[-3000:]
    msg = json.loads(term.read_text())
    assert msg["exit_code"] == 75 and msg["latest_checkpoint"]["step"] >= 2
    manifest = json.loads((Path(msg["latest_checkpoint"]["uri"]) / "manifest.json").read_text())
    assert manifest["world_size"] == 2


@pytest.fixture
def rank_module(tmp_path) -> dict[str, str]:
    (tmp_path / "tinv_rank_probe.py").write_text(RANK_SCRIPT)
    return {"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


@pytest.mark.parametrize("code", [2, 75])
def test_one_failed_rank_on_one_pod_stops_every_pod_with_its_code(rank_module, code):
    port = free_port()
    common = ["--nnodes", "2", "--nproc-per-node", "2", "--master-port", str(port), "--control-port", str(free_port()),
              "-m", "tinv_rank_probe", "3", str(code)]  # rank 3 = node 1's second rank fails
    t0 = time.monotonic()
    pods = [launch("--node-rank", str(i), *common, env=rank_module) for i in (0, 1)]
    results = [p.communicate(timeout=120) for p in pods]
    took = time.monotonic() - t0
    assert [p.returncode for p in pods] == [code, code], results
    assert "rank 3 on node 1 failed" in results[0][1] and "rank 3 exited with code" in results[1][1]
    assert took < 60, f"the other ranks were stopped only after {took:.0f}s"  # they would sleep for 600 s


def test_a_killed_rank_is_128_plus_its_signal_and_its_sibling_is_stopped(rank_module):
    t0 = time.monotonic()
    p = launch("--nproc-per-node", "2", "--master-port", str(free_port_pair()), "--stop-grace", "3",
               "-m", "tinv_rank_probe", "1", str(-signal.SIGKILL), env=rank_module)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGKILL, err
    assert "rank 1 exited with code 137" in err and time.monotonic() - t0 < 40
