"""Fixtures for the generation layer: concept files, grid documents, a shared tiny engine."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from gridkit import GRID, TOKEN, vectors
from testkit import merge, write_resource

# The suite needs the trainer extra (`make setup` installs it): fail loudly, never skip a layer.
import diffusers  # noqa: E402,F401
import torch  # noqa: E402

# One thread: the tiny model gains nothing from more, and on a busy 2-core machine OpenMP's
# spin-waiting makes two threads much slower. Subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")



@pytest.fixture(autouse=True)
def _isolated(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("TINV_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "tinv-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("JOB_COMPLETION_INDEX", raising=False)
    monkeypatch.delenv("TINV_SHARDS", raising=False)
    logging.getLogger("tinv.trainer").setLevel(logging.INFO)


@pytest.fixture(scope="session")
def concept_file(tmp_path_factory) -> Path:
    """A diffusers-format learned_embeds.safetensors with one 2-vector concept '<blob>'."""
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("concept")
    p = d / "learned_embeds.safetensors"
    save_file({TOKEN: vectors()}, str(p))
    return p


@pytest.fixture(scope="session")
def engine(concept_file):
    """One tiny engine (fp32, CPU) with '<blob>' loaded, shared by the tests that only render."""
    from tinv.trainer import engine as E

    return E.load_engine("builtin:tiny", [str(concept_file)], device="cpu", precision="fp32")


@pytest.fixture
def make_grid(concept_file, tmp_path):
    """make_grid(spec={...}, storage=...) -> a validated GenerationGrid writing under tmp_path/runs."""
    from tinv.api.models import GenerationGrid

    def make(spec: dict | None = None, *, storage: str | None = None, doc: dict | None = None):
        d = merge(GRID, {"spec": {"storage": {"uri": storage or str(tmp_path / "runs")}}})
        d["spec"]["embeddings"][0]["uri"] = str(concept_file)
        if spec:
            d = merge(d, {"spec": spec})
        if doc:
            d = merge(d, doc)
        return GenerationGrid.model_validate(d)

    return make


@pytest.fixture
def grid_yaml(make_grid, tmp_path):
    """grid_yaml(**make_grid kwargs) -> path of the grid written as YAML."""
    def write(name: str = "grid.yaml", **kw) -> Path:
        return write_resource(tmp_path / name, make_grid(**kw))

    return write
