"""Packaging: folders map to tinv.* names, the stdlib is never shadowed, and the wheel imports."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _py(code: str, cwd: Path, executable: str = sys.executable) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([executable, "-c", code], cwd=cwd, capture_output=True, text=True, env=env)


def test_operator_folder_does_not_shadow_the_stdlib():
    assert not (REPO / "operator" / "__init__.py").exists(), "operator/__init__.py shadows the stdlib `operator`"
    # From the repo root, '' is first on sys.path: the stdlib modules must still win.
    r = _py("import operator, collections, functools; assert hasattr(operator, 'itemgetter'), operator.__file__; print(operator.__file__)", REPO)
    assert r.returncode == 0, r.stderr
    assert "/operator/" not in r.stdout.replace("operator.py", "")


def test_venv_can_be_created_from_the_repo_root(tmp_path):
    r = subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "v")], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_tinv_api_imports_neither_torch_nor_kopf():
    code = (
        "import sys, tinv.api, tinv.api.crdgen, tinv.api.validation, tinv.api.storage, tinv.api.cli;"
        "bad = [m for m in ('torch', 'kopf', 'kubernetes', 'diffusers', 'boto3') if m in sys.modules];"
        "assert not bad, bad"
    )
    r = _py(code, REPO)
    assert r.returncode == 0, r.stderr


def test_editable_install_maps_the_folders():
    r = _py("import tinv.api, tinv.trainer; print(tinv.api.__file__); print(list(tinv.trainer.__path__)[0])", Path("/"))
    assert r.returncode == 0, r.stderr
    api_file, trainer_dir = r.stdout.split()
    assert Path(api_file).parent == REPO / "api"
    assert Path(trainer_dir) == REPO / "trainer"


@pytest.mark.slow
def test_built_wheel_installs_and_imports_without_torch(tmp_path):
    build = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path / "dist"), str(REPO)],
        capture_output=True, text=True,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    wheel = next((tmp_path / "dist").glob("tinv-*.whl"))
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    assert "tinv/api/models.py" in names and any(n.startswith("tinv/trainer/") for n in names)
    assert any(n.startswith("tinv/operator/") for n in names) or not any((REPO / "operator").glob("*.py"))
    assert not any(n.startswith(("operator/", "api/", "trainer/")) for n in names), "folders leaked as top-level packages"
    assert "tinv/operator/__init__.py" not in names
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = str(env_dir / "bin" / "python")
    pip = subprocess.run([py, "-m", "pip", "install", "-q", str(wheel)], capture_output=True, text=True)
    assert pip.returncode == 0, pip.stderr[-3000:]
    r = _py(
        "import sys, tinv.api; from tinv.api.cli import main; "
        "assert 'torch' not in sys.modules; print(tinv.api.__file__)",
        tmp_path, executable=py,
    )
    assert r.returncode == 0, r.stderr
    assert str(env_dir) in r.stdout
    cli = subprocess.run([str(env_dir / "bin" / "tinv"), "validate", *map(str, sorted((REPO / "examples").glob("det-logo-*.yaml")))],
                         capture_output=True, text=True, cwd=tmp_path)
    assert cli.returncode == 0, cli.stderr
    missing = subprocess.run([str(env_dir / "bin" / "tinv"), "train", "job.yaml"], capture_output=True, text=True, cwd=tmp_path)
    assert missing.returncode == 3 and "pip install 'tinv[trainer]'" in missing.stderr, missing.stderr
