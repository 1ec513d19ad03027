"""The generated CRDs: current, structural, self-documenting, and their CEL rules compile."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tinv.api.crdgen import outputs
from tinv.api.models import RESOURCES

REPO = Path(__file__).resolve().parents[2]


def test_committed_crds_are_current():
    stale = [str(p.relative_to(REPO)) for p, text in outputs(REPO).items() if not p.exists() or p.read_text() != text]
    assert not stale, f"generated files are stale: {stale}; run `make crds` and commit"
    check = subprocess.run([sys.executable, "-m", "tinv.api.crdgen", "--check"], capture_output=True, text=True, cwd=REPO)
    assert check.returncode == 0, check.stderr


def _crds():
    return [yaml.safe_load(p.read_text()) for p in sorted((REPO / "deploy" / "crds").glob("*.yaml"))]


def _walk(schema, path="spec"):
    yield path, schema
    for name, sub in schema.get("properties", {}).items():
        yield from _walk(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from _walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _walk(schema["additionalProperties"], f"{path}{{}}")


def test_crd_names_and_columns():
    crds = {c["spec"]["names"]["kind"]: c for c in _crds()}
    assert set(crds) == set(RESOURCES)
    job = crds["TextualInversionJob"]["spec"]
    assert job["group"] == "tinv.io" and job["scope"] == "Namespaced"
    assert job["names"]["shortNames"] == ["tijob", "tijobs"] and job["names"]["categories"] == ["tinv"]
    assert crds["GenerationGrid"]["spec"]["names"]["shortNames"] == ["ggrid", "ggrids"]
    version = job["versions"][0]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert {"Phase", "Progress", "Loss", "Checkpoint", "GPU", "Age"} <= set(columns)
    # Conditions are read by type, never by list position.
    assert not any("conditions[0]" in p for p in columns.values())
    assert any("conditions[?(@.type==" in p for p in columns.values())


@pytest.mark.parametrize("kind", sorted(RESOURCES))
def test_schema_is_structural_and_documented(kind):
    crd = next(c for c in _crds() if c["spec"]["names"]["kind"] == kind)
    root = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for part in ("spec", "status"):
        for path, node in _walk(root["properties"][part], part):
            for banned in ("$ref", "anyOf", "oneOf", "allOf", "title", "$defs"):
                assert banned not in node, f"{path} has non-structural {banned}"
            assert "type" in node, f"{path} has no type"
            assert not ("properties" in node and "additionalProperties" in node), f"{path}: properties with additionalProperties"
            if part == "spec" and not path.endswith("[]") and not path.endswith("{}"):
                assert node.get("description"), f"{path} has no description"
            if part == "spec" and node["type"] == "array":
                assert "maxItems" in node, f"{path}: lists need maxItems (CEL cost and a sane bound)"
            if part == "spec" and node["type"] == "string" and "enum" not in node and not path.endswith("{}"):
                assert "maxLength" in node or "pattern" in node, f"{path}: strings need a bound"


def test_every_default_is_stated_in_its_description():
    for crd in _crds():
        spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
        for path, node in _walk(spec):
            if "default" in node and path.count(".") > 0:
                assert "default" in node["description"].lower(), f"{path}: description does not state its default"


def test_cel_rules_compile_and_have_messages():
    import celpy

    env = celpy.Environment()
    count = 0
    for crd in _crds():
        root = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        for path, node in _walk(root["properties"]["spec"]):
            for rule in node.get("x-kubernetes-validations", []):
                env.compile(rule["rule"])
                assert rule["message"] and len(rule["message"]) > 10, f"{path}: rule without a human message"
                count += 1
    assert count >= 12


def test_every_default_passes_its_own_schema_rules():
    """The apiserver validates each `default` against the CEL rules of its node (without applying
    inner defaults), and refuses the whole CRD if one fails: catch that here, offline."""
    from tinv.api.validation import evaluate_rule

    for crd in _crds():
        spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
        for path, node in _walk(spec):
            if "default" not in node:
                continue
            for rule in node.get("x-kubernetes-validations", []):
                if "oldSelf" in rule["rule"]:
                    continue
                assert evaluate_rule(rule["rule"], node["default"]), f"{path}: default {node['default']} fails {rule['rule']}"
            if node["type"] == "object":
                for name in node.get("required", []):
                    assert name in node["default"], f"{path}: default lacks required {name}"


def _default_pairs(model, schema, path):
    from pydantic import TypeAdapter
    from pydantic_core import PydanticUndefined

    from tinv.api._base import Model

    for name, field in model.model_fields.items():
        alias = field.alias or name
        sub = schema.get("properties", {}).get(alias)
        if sub is None:
            continue
        if field.default_factory is not None:
            expected = TypeAdapter(field.annotation).dump_python(field.default_factory(), mode="json", by_alias=True, exclude_none=True)
            yield f"{path}.{alias}", expected, sub.get("default")
        elif field.default is not PydanticUndefined and field.default is not None:
            expected = TypeAdapter(field.annotation).dump_python(field.default, mode="json", by_alias=True)
            yield f"{path}.{alias}", expected, sub.get("default")
        for arg in (field.annotation, *(getattr(field.annotation, "__args__", ()) or ())):
            if isinstance(arg, type) and issubclass(arg, Model):
                target = sub.get("items", sub) if sub.get("type") == "array" else sub
                yield from _default_pairs(arg, target, f"{path}.{alias}")


@pytest.mark.parametrize("kind", sorted(RESOURCES))
def test_the_apiserver_defaults_exactly_what_offline_validation_defaults(kind):
    """A field pydantic defaults but the CRD does not would pass `tinv validate` and then be refused
    (or read differently) in the cluster, e.g. a grid that gives only some of its axes."""
    from tinv.api.crdgen import schema_for

    model = RESOURCES[kind]
    spec_model = model.model_fields["spec"].annotation
    pairs = list(_default_pairs(spec_model, schema_for(model, part="spec"), "spec"))
    assert len(pairs) > 20
    wrong = [(p, e, a) for p, e, a in pairs if e != a]
    assert not wrong, wrong
