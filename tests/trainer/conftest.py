"""Fixtures for the trainer layer: det-logo images, job documents, the tiny model."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from testkit import merge, write_resource  # noqa: F401  (used by the fixtures below)

# The suite needs the trainer extra (`make setup` installs it): fail loudly, never skip a layer.
import diffusers  # noqa: E402,F401
import torch  # noqa: E402

# One thread: the tiny model gains nothing from more, and on a busy 2-core machine OpenMP's
# spin-waiting makes two threads ~20x slower. Subprocesses (CLI, torchrun) inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("TINV_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "tinv-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    logging.getLogger("tinv.trainer").setLevel(logging.INFO)


@pytest.fixture(scope="session")
def logo_dir(tmp_path_factory) -> Path:
    from tinv.trainer.samples import write_samples

    d = tmp_path_factory.mktemp("det-logo")
    write_samples(d, count=6, size=64)
    return d


@pytest.fixture(scope="session")
def logo_dir2(tmp_path_factory) -> Path:
    from tinv.trainer.samples import write_samples

    d = tmp_path_factory.mktemp("det-logo-2")
    write_samples(d, count=4, size=80, seed=7)
    return d


BASE = {
    "apiVersion": "tinv.io/v1alpha1",
    "kind": "TextualInversionJob",
    "metadata": {"name": "t", "namespace": "ns"},
    "spec": {
        "model": {"source": "builtin:tiny"},
        "concepts": [{"token": "det-logo", "initializer": "brain logo, sharp lines", "images": "IMAGES"}],
        "training": {
            "steps": 10,
            "batchSize": 1,
            "gradientAccumulation": 2,
            "learningRate": 5.0e-3,
            "resolution": 64,
            "checkpointEvery": 5,
            "logEvery": 5,
            "mixedPrecision": "no",
        },
    },
}


@pytest.fixture
def make_job(logo_dir, tmp_path):
    """make_job(training={...}, spec={...}) -> a validated TextualInversionJob writing under tmp_path."""
    from tinv.api.models import TextualInversionJob

    def make(doc: dict | None = None, *, training: dict | None = None, storage: str | None = None, **spec):
        d = merge(BASE, {"spec": {"storage": {"uri": storage or str(tmp_path / "runs")}}})
        d["spec"]["concepts"][0]["images"] = str(logo_dir)
        if training:
            d = merge(d, {"spec": {"training": training}})
        if spec:
            d = merge(d, {"spec": spec})
        if doc:
            d = merge(d, doc)
        return TextualInversionJob.model_validate(d)

    return make


@pytest.fixture
def job_yaml(make_job, tmp_path):
    """job_yaml(**make_job kwargs) -> path of the job written as YAML."""
    def write(name: str = "job.yaml", **kw) -> Path:
        return write_resource(tmp_path / name, make_job(**kw))

    return write
