"""Fixtures for the generation layer: concept files, grid documents, a shared tiny engine."""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

# One thread: the tiny model gains nothing from more, and on a busy 2-core machine OpenMP's
# spin-waiting makes two threads much slower. Subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

TOKEN = "<blob>"
WIDTH = 32  # the tiny model's text width


@pytest.fixture(autouse=True)
def _isolated(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("TINV_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "tinv-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("JOB_COMPLETION_INDEX", raising=False)
    monkeypatch.delenv("TINV_SHARDS", raising=False)
    logging.getLogger("tinv.trainer").setLevel(logging.INFO)


def vectors(n: int = 2, width: int = WIDTH, seed: int = 0) -> "torch.Tensor":
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, width, generator=g) * 0.4 / width**0.5 * 4


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
    from tinv.trainer import generate as G

    return G.load_engine("builtin:tiny", [str(concept_file)], device="cpu", precision="fp32")


GRID = {
    "apiVersion": "tinv.io/v1alpha1",
    "kind": "GenerationGrid",
    "metadata": {"name": "g", "namespace": "ns"},
    "spec": {
        "model": {"source": "builtin:tiny"},
        "embeddings": [{"uri": "CONCEPT"}],
        "prompts": [f"a photo of a {TOKEN}", f"a {TOKEN} in the style of van gogh"],
        "negativePrompt": "blurry",
        "grid": {
            "guidanceScales": [1, 5],
            "steps": [2],
            "schedulers": ["ddim"],
            "seeds": [0, 1],
            "sizes": [{"width": 64, "height": 64}],
        },
        "imagesPerCell": 1,
        "batchSize": 3,
        "precision": "fp32",
        "resources": {"workers": 1, "gpusPerWorker": 0},
    },
}


def merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


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
    import yaml

    def write(name: str = "grid.yaml", **kw) -> Path:
        grid = make_grid(**kw)
        p = tmp_path / name
        p.write_text(yaml.safe_dump(grid.to_doc(), sort_keys=False))
        return p

    return write


def pngs(folder: Path) -> list[Path]:
    return sorted(Path(folder).glob("*.png"))
