"""The examples work as their comments say: the notebook end to end, and tiny-job -> tiny-grid -> reproduce.

Both train the real concept with the trainer (`tinv train examples/tiny-job.yaml`), so they are slow.
They run in a copy of examples/ so the repository stays clean.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _workdir(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    shutil.copytree(REPO / "examples", work / "examples")
    return work


def _env() -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["HF_HUB_OFFLINE"] = "1"
    env.pop("JOB_COMPLETION_INDEX", None)
    return env


def test_notebook_runs_end_to_end(tmp_path):
    """Every code cell of examples/notebook.ipynb, in order, in one fresh interpreter (as a kernel would)."""
    nb = json.loads((REPO / "examples" / "notebook.ipynb").read_text())
    assert nb["nbformat"] == 4
    code = [("".join(c["source"])) for c in nb["cells"] if c["cell_type"] == "code"]
    assert not any(line.lstrip().startswith(("!", "%")) for cell in code for line in cell.splitlines()), "plain Python only"
    script = "\n\n".join(f"# --- cell {i}\n{src}\nprint('[cell {i} ok]')" for i, src in enumerate(code))
    work = _workdir(tmp_path)
    (work / "notebook.py").write_text(script)
    r = subprocess.run([sys.executable, "notebook.py"], cwd=work, env=_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"stdout:\n{r.stdout[-4000:]}\nstderr:\n{r.stderr[-4000:]}"
    for i in range(len(code)):
        assert f"[cell {i} ok]" in r.stdout
    out = r.stdout
    assert out.count("same pixels: True") == 5, out
    assert "ConfigError: embedding 'det-logo'" in out and "is 768 wide" in out
    assert "identical pixels" in out
    assert (work / "tinv-runs/default/tiny-det-logo-grid-local/images/index.html").is_file()


def test_tiny_job_then_tiny_grid_then_reproduce(tmp_path):
    work = _workdir(tmp_path)
    tinv = [sys.executable, "-m", "tinv.api.cli"]

    def sh(*args: str) -> subprocess.CompletedProcess:
        r = subprocess.run([*tinv, *args], cwd=work, env=_env(), capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, f"tinv {' '.join(args)}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        return r

    sh("train", "examples/tiny-job.yaml", "--no-progress")
    # the operator's two workers: shard 0 then shard 1 of the same grid
    sh("generate", "examples/tiny-grid.yaml", "--shard", "0/2", "--no-progress")
    r = sh("generate", "examples/tiny-grid.yaml", "--shard", "1/2", "--no-progress")
    assert "(complete)" in r.stdout
    images = work / "tinv-runs/default/tiny-det-logo-grid-local/images"
    pngs = sorted(images.glob("*.png"))
    assert len(pngs) == 36
    index = json.loads((images / "index.json").read_text())
    assert index["complete"] and index["embeddings"][0]["token"] == "det-logo" and index["embeddings"][0]["job"] == "tiny-det-logo"
    ckpt = index["embeddings"][0]["checkpoint"]
    assert (work / f"tinv-runs/default/tiny-det-logo-local/checkpoints/{ckpt}/manifest.json").is_file()
    r = sh("reproduce", str(pngs[7]), "--out", str(tmp_path / "again.png"), "--check")
    assert "identical pixels" in r.stdout
    # a re-run after everything is done renders nothing
    r = sh("generate", "examples/tiny-grid.yaml", "--no-progress")
    assert "0 rendered, 36 already there" in r.stdout
