"""The images' install step (deploy/docker/install.sh), run for real in a fresh virtualenv.

No container engine runs here, so the Dockerfiles themselves are not built; what they run is.
The trainer variant installs PyTorch (from pip's cache after `make setup`), hence `slow`.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
INSTALL = REPO / "deploy" / "docker" / "install.sh"

pytestmark = pytest.mark.slow


def _dockerfile_runs_install(path: Path, extra: str) -> None:
    text = path.read_text()
    assert f"install.sh /opt/tinv {extra} /src" in text
    assert "USER" in text and "ENTRYPOINT [\"tinv\"]" in text
    for secret_word in ("AWS_SECRET_ACCESS_KEY=", "HF_TOKEN=", "hf_"):
        assert secret_word not in text


@pytest.mark.parametrize("extra", ["operator", "trainer"])
def test_install_step_works_in_a_fresh_virtualenv(tmp_path, extra):
    dockerfile = REPO / ("Dockerfile.trainer" if extra == "trainer" else "deploy/docker/Dockerfile.operator")
    _dockerfile_runs_install(dockerfile, extra)
    venv = tmp_path / "venv"
    r = subprocess.run(["sh", str(INSTALL), str(venv), extra, str(REPO)], capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    tinv = venv / "bin" / "tinv"
    help_ = subprocess.run([str(tinv), "--help"], capture_output=True, text=True)
    assert help_.returncode == 0 and "train" in help_.stdout
    probe = "import sys, tinv.api; import tinv.operator.main" if extra == "operator" else "import torch, diffusers, tinv.trainer.train"
    check = subprocess.run([str(venv / "bin" / "python"), "-c", probe + "; print('torch' in sys.modules if 'sys' in dir() else '')"],
                           capture_output=True, text=True, cwd=tmp_path)
    assert check.returncode == 0, check.stderr[-3000:]
    if extra == "operator":
        assert check.stdout.strip() == "False", "the operator image must not import torch"
        assert subprocess.run([str(venv / "bin" / "python"), "-c", "import torch"], capture_output=True).returncode != 0
