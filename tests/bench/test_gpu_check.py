"""The one GPU script, run through its CPU path: every step the GPU call makes runs here, so the
script that is sent to a lent H100/H200 is known to work before device time is spent on it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_gpu_check_cpu_path_runs_every_step(tmp_path):
    out = tmp_path / "gpu-check"
    r = subprocess.run(["bash", "bench/gpu-check.sh", str(out), "--cpu"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + (out / "gpu-check.log").read_text()[-3000:]
    steps = {s["step"]: s for s in map(json.loads, (out / "steps.jsonl").read_text().splitlines())}
    assert set(steps) == {"env", "smoke-train", "train", "generate", "train-sdxl"} and all(s["exit"] == 0 for s in steps.values())

    env = json.loads((out / "env.json").read_text())
    assert env["device"] == "cpu" and env["torch"]
    smoke = [json.loads(line) for line in (out / "smoke.jsonl").read_text().splitlines()]
    assert smoke[0]["ok"] is True and smoke[0]["progress"]["state"] == "succeeded"
    train = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    assert {r["config"]["recipe"] for r in train if "recipe" in r.get("config", {})} == {"tinv", "naive"}
    assert any(r["name"] == "speedup" and r["value"] > 0 for r in train)
    gen = [json.loads(line) for line in (out / "generate.jsonl").read_text().splitlines()]
    assert {r["config"].get("impl") for r in gen if r["name"] == "generate_images_per_second"} >= {"tinv", "diffusers"}
    assert any(r["name"] == "grid_images_per_second" for r in gen)
    xl = [json.loads(line) for line in (out / "train-sdxl.jsonl").read_text().splitlines()]
    assert {r["config"]["model"] for r in xl if "model" in r.get("config", {})} == {"tiny-xl"}
    assert {r["config"]["recipe"] for r in xl if "recipe" in r.get("config", {})} == {"tinv", "naive"}
    assert "gpu-check summary" in r.stdout and "all steps passed" in r.stdout
