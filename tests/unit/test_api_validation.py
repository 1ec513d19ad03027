"""tinv.api validation: the examples pass, each broken resource gets a field-named message."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tinv.api import GenerationGrid, TextualInversionJob, validate_document
from tinv.api.validation import InvalidResource, load_resource

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))

JOB = {
    "apiVersion": "tinv.io/v1alpha1",
    "kind": "TextualInversionJob",
    "metadata": {"name": "det-logo"},
    "spec": {
        "model": {"source": "builtin:tiny"},
        "concepts": [{"token": "det-logo", "initializer": "brain logo, sharp lines", "images": "s3://bucket/det-logo/"}],
    },
}
GRID = {
    "apiVersion": "tinv.io/v1alpha1",
    "kind": "GenerationGrid",
    "metadata": {"name": "grid"},
    "spec": {"model": {"source": "builtin:tiny"}, "embeddings": [{"job": "det-logo"}], "prompts": ["a det-logo"]},
}


def test_examples_exist_and_validate():
    assert EXAMPLES, "examples/ holds no resources"
    for path in EXAMPLES:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc.get("kind") in ("Secret", "ConfigMap"):
                continue
            resource, problems = validate_document(doc)
            assert problems == [], f"{path.name}: {problems}"
            assert resource is not None


def test_defaults_fill_the_determined_values():
    job, problems = validate_document(JOB)
    assert problems == []
    t = job.spec.training
    assert (t.steps, t.batch_size, t.gradient_accumulation, t.learning_rate, t.scale_lr, t.optimizer, t.checkpoint_every) == (
        500, 1, 4, 5e-4, True, "adam", 100)
    assert job.spec.concepts[0].property == "object"
    assert job.spec.resources.workers == 1 and job.spec.resources.gpus_per_worker == 1
    doc = job.to_doc()
    assert doc["spec"]["training"]["gradientAccumulation"] == 4  # camelCase on the wire
    grid, problems = validate_document(GRID)
    assert problems == []
    assert grid.spec.grid.guidance_scales == [7.5] and grid.spec.embeddings[0].checkpoint == "latest"


def _set(doc, path, value):
    node = doc
    *parents, last = path
    for key in parents:
        node = node[key]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value


_DELETE = object()

BROKEN = [
    # (base, path to change, new value, expected field path, expected message fragment)
    (JOB, ("spec", "concepts"), [], "spec.concepts", "at least 1"),
    (JOB, ("spec", "concepts", 0, "token"), "det logo", "spec.concepts[0].token", "whitespace"),
    (JOB, ("spec", "concepts", 0, "token"), "", "spec.concepts[0].token", "at least 1"),
    (JOB, ("spec", "concepts", 0, "initializer"), "   ", "spec.concepts[0].initializer", "must not be blank"),
    (JOB, ("spec", "concepts", 0, "property"), "person", "spec.concepts[0].property", "'object' or 'style'"),
    (JOB, ("spec", "concepts", 0, "images"), "http://example.com/x", "spec.concepts[0].images", "s3://bucket/prefix"),
    (JOB, ("spec", "concepts", 0, "templates"), ["a photo"], "spec.concepts[0].templates", "'{}'"),
    (JOB, ("spec", "concepts", 0, "vectors"), 0, "spec.concepts[0].vectors", "greater than or equal to 1"),
    (JOB, ("spec", "concepts"), [
        {"token": "det-logo", "initializer": "a", "images": "/a"}, {"token": "det-logo", "initializer": "b", "images": "/b"}],
     "spec.concepts", "unique"),
    (JOB, ("spec", "concepts"), [
        {"token": "det-logo", "initializer": "a", "images": "/a"}, {"token": "det-logo-demo", "initializer": "b", "images": "/b"}],
     "spec.concepts", "contain another"),
    (JOB, ("spec", "model", "source"), "builtin:huge", "spec.model.source", "builtin:tiny"),
    (JOB, ("spec", "model"), _DELETE, "spec.model", "required"),
    (JOB, ("spec", "training"), {"resolution": 500}, "spec.training.resolution", "multiple of 8"),
    (JOB, ("spec", "training"), {"learningRate": 0}, "spec.training.learningRate", "greater than 0"),
    (JOB, ("spec", "training"), {"optimiser": "adam"}, "spec.training.optimiser", "unknown field"),
    (JOB, ("spec", "training"), {"mixedPrecision": "fp8"}, "spec.training.mixedPrecision", "must be one of"),
    (JOB, ("spec", "training"), {"flipP": 1.5}, "spec.training.flipP", "less than or equal to 1"),
    (JOB, ("spec", "resources"), {"workers": 0}, "spec.resources.workers", "greater than or equal to 1"),
    (JOB, ("spec", "resources"), {"memory": "lots"}, "spec.resources.memory", "quantity"),
    (JOB, ("spec", "resources"), {"gpuClass": "A100 80GB"}, "spec.resources.gpuClass", "label value"),
    (JOB, ("spec", "resources"), {"tolerations": [{"operator": "Maybe"}]}, "spec.resources.tolerations[0].operator", "must be one of"),
    (JOB, ("spec", "storage"), {"uri": "gs://bucket"}, "spec.storage.uri", "s3://bucket/prefix"),
    (JOB, ("spec", "storage"), {"endpoint": "object.ord1.coreweave.com"}, "spec.storage.endpoint", "http"),
    (JOB, ("spec", "resumeFrom"), {"mode": "fork"}, "spec.resumeFrom", "needs a checkpoint"),
    (JOB, ("spec", "runPolicy"), {"backoffLimit": -1}, "spec.runPolicy.backoffLimit", "greater than or equal to 0"),
    (JOB, ("metadata", "name"), "Det_Logo", "metadata.name", "DNS name"),
    (JOB, ("metadata",), {}, "metadata.name", "required"),
    (JOB, ("apiVersion",), "tinv.io/v1", "apiVersion", "tinv.io/v1alpha1"),
    (JOB, ("kind",), "TIJob", "kind", "must be one of"),
    (GRID, ("spec", "prompts"), [], "spec.prompts", "at least one prompt"),
    (GRID, ("spec", "prompts"), ["  "], "spec.prompts", "must not be blank"),
    (GRID, ("spec", "grid"), {"seeds": []}, "spec.grid", "every grid axis"),
    (GRID, ("spec", "grid"), {"schedulers": ["karras-magic"]}, "spec.grid.schedulers[0]", "must be one of"),
    (GRID, ("spec", "grid"), {"guidanceScales": [60]}, "spec.grid.guidanceScales[0]", "less than or equal to 50"),
    (GRID, ("spec", "grid"), {"sizes": [{"width": 500, "height": 512}]}, "spec.grid.sizes[0]", "multiples of 8"),
    (GRID, ("spec", "embeddings"), [{"job": "a", "uri": "s3://b/c"}], "spec.embeddings[0]", "either a job or a uri"),
    (GRID, ("spec", "embeddings"), [{}], "spec.embeddings[0]", "either a job or a uri"),
    (GRID, ("spec", "embeddings"), [{"job": "a", "checkpoint": "newest"}], "spec.embeddings[0].checkpoint", "'latest' or a checkpoint uuid"),
    (GRID, ("spec", "embeddings"), [{"uri": "/a.pt", "token": "x"}, {"uri": "/b.pt", "token": "x"}], "spec.embeddings", "unique"),
    (GRID, ("spec", "imagesPerCell"), 0, "spec.imagesPerCell", "greater than or equal to 1"),
]


@pytest.mark.parametrize("base,path,value,where,fragment", BROKEN, ids=[f"{b['kind'][:4]}:{w}:{f}" for b, _, _, w, f in BROKEN])
def test_broken_resource_names_field(base, path, value, where, fragment):
    doc = copy.deepcopy(base)
    _set(doc, path, value)
    resource, problems = validate_document(doc)
    assert resource is None
    matching = [p for p in problems if p.path == where and fragment.lower() in p.message.lower()]
    assert matching, f"expected '{where}: …{fragment}…' in {[str(p) for p in problems]}"


def test_transition_rules_run_with_an_old_document():
    old = copy.deepcopy(JOB)
    new = copy.deepcopy(JOB)
    new["spec"]["concepts"][0]["initializer"] = "something else"
    _, problems = validate_document(new, old=old)
    assert [str(p) for p in problems] == ["spec.concepts: spec.concepts is immutable once the resource exists; create a new resource instead"]
    new = copy.deepcopy(JOB)
    new["spec"]["runPolicy"] = {"suspend": True}  # run policy may change
    _, problems = validate_document(new, old=old)
    assert problems == []


def test_load_resource_reports_every_problem(tmp_path):
    path = tmp_path / "job.yaml"
    doc = copy.deepcopy(JOB)
    doc["spec"]["training"] = {"resolution": 500, "steps": 0}
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(InvalidResource) as err:
        load_resource(path)
    text = str(err.value)
    assert "spec.training.steps" in text
    (tmp_path / "ok.yaml").write_text(yaml.safe_dump(JOB))
    assert isinstance(load_resource(tmp_path / "ok.yaml"), TextualInversionJob)
    with pytest.raises(InvalidResource, match="expected GenerationGrid"):
        load_resource(tmp_path / "ok.yaml", GenerationGrid)
    (tmp_path / "bad.yaml").write_text("spec: [unclosed")
    with pytest.raises(InvalidResource, match="not valid YAML"):
        load_resource(tmp_path / "bad.yaml")
    with pytest.raises(InvalidResource, match="cannot read"):
        load_resource(tmp_path / "missing.yaml")


def _tinv(*args, **kw):
    return subprocess.run([sys.executable, "-m", "tinv.api.cli", *args], capture_output=True, text=True, **kw)


def test_cli_validate(tmp_path):
    ok = _tinv("validate", *map(str, EXAMPLES))
    assert ok.returncode == 0, ok.stderr
    assert "valid TextualInversionJob 'det-logo'" in ok.stdout
    doc = copy.deepcopy(JOB)
    doc["spec"]["concepts"][0]["token"] = "det logo"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(doc))
    bad = _tinv("validate", str(tmp_path / "bad.yaml"))
    assert bad.returncode == 2
    assert "spec.concepts[0].token: must not contain whitespace" in bad.stderr
    assert "Traceback" not in bad.stderr
    missing = _tinv("validate", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "cannot read" in missing.stderr and "Traceback" not in missing.stderr
    unknown = _tinv("frobnicate")
    assert unknown.returncode == 2 and "tinv --help" in unknown.stderr
    helped = _tinv("--help")
    assert helped.returncode == 0 and "validate" in helped.stdout and "exit codes" in helped.stdout
