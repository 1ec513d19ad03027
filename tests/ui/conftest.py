"""Fixtures of the UI tests: a real local run (tiny job + grid trained and rendered by `tinv run`)
whose user-written strings are hostile, served by the real app."""

from __future__ import annotations

import pytest
import yaml

from uikit import GRID_NAME, JOB_NAME, grid_doc, job_doc, tinv


@pytest.fixture(scope="session")
def local_run(tmp_path_factory) -> dict:
    """A real local job (40 steps, 2 checkpoints kept, validation images) and a grid from it, in a
    fresh folder: {'dir', 'root', 'job_file', 'grid_file', 'job_root', 'grid_root'}."""
    work = tmp_path_factory.mktemp("ui-local")
    job_file, grid_file = work / "job.yaml", work / "grid.yaml"
    job_file.write_text(yaml.safe_dump(job_doc(), sort_keys=False))
    grid_file.write_text(yaml.safe_dump(grid_doc(), sort_keys=False))
    tinv(["run", str(job_file), "--fresh"], work)
    tinv(["run", str(grid_file)], work)
    root = work / "tinv-runs"
    return {
        "dir": work, "root": root, "job_file": job_file, "grid_file": grid_file,
        "job_root": root / "default" / f"{JOB_NAME}-local", "grid_root": root / "default" / f"{GRID_NAME}-local",
    }
