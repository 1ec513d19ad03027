"""Offline validation: the same checks the apiserver makes, before `kubectl apply`.

A document is checked in two passes, exactly as Kubernetes would: the schema (types, bounds,
enums, required and unknown fields — via the pydantic model) and then the CEL rules
(`x-kubernetes-validations` in the generated CRD, evaluated here with cel-python). Every
problem names its field path, e.g. `spec.concepts[1].token: concept tokens must be unique`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ._base import CEL_KEY, Model
from .models import API_VERSION, DNS_LABEL, DNS_SUBDOMAIN, LABEL_VALUE, QUANTITY, RESOURCES, GenerationGrid, TextualInversionJob

Resource = TextualInversionJob | GenerationGrid


@dataclass(frozen=True)
class Problem:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class InvalidResource(ValueError):
    """A resource that fails validation; str() lists every problem, one per line."""

    def __init__(self, source: str, problems: list[Problem]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source} is not a valid tinv resource:\n{lines}")


# ---------------------------------------------------------------------------- schema pass

_PYDANTIC_MESSAGES = {
    "missing": "required field is missing",
    "extra_forbidden": "unknown field (not in the schema); check its spelling against `kubectl explain`",
}


_PATTERN_MESSAGES = {
    r"^\S+$": "must not contain whitespace",
    DNS_SUBDOMAIN: "must be a lower-case DNS name (a-z, 0-9, '-' and '.'), as Kubernetes object names are",
    DNS_LABEL: "must be a lower-case DNS label (a-z, 0-9 and '-')",
    QUANTITY: "must be a Kubernetes quantity such as '8', '500m' or '48Gi'",
    LABEL_VALUE: "must be a label value (letters, digits, '-', '_' and '.'), e.g. A100_PCIE_80GB",
    r"^https?://": "must be an http:// or https:// URL",
}


def _path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif str(part).startswith(("function-", "literal[", "list[", "dict[")):
            continue  # pydantic's union-branch labels are noise to a user
        else:
            out += f".{part}" if out else str(part)
    return out


def _schema_problems(model: type[Model], doc: dict[str, Any]) -> tuple[Model | None, list[Problem]]:
    try:
        return model.model_validate(doc), []
    except ValidationError as err:
        problems = []
        seen = set()
        for e in err.errors(include_url=False):
            path = _path(e["loc"])
            message = _PYDANTIC_MESSAGES.get(e["type"], e["msg"])
            if e["type"] == "string_pattern_mismatch":
                message = _PATTERN_MESSAGES.get(e["ctx"]["pattern"], message)
            if e["type"] == "literal_error":
                message = f"must be one of {e['ctx']['expected']}"
            if (path, message) not in seen:
                seen.add((path, message))
                problems.append(Problem(path, message))
        return None, problems


# ---------------------------------------------------------------------------- CEL pass


@functools.cache
def _schemas(kind: str) -> dict[str, dict[str, Any]]:
    from .crdgen import schema_for

    model = RESOURCES[kind]
    return {"spec": schema_for(model, part="spec")}


@functools.cache
def _program(rule: str):
    import celpy

    env = celpy.Environment()
    return env.program(env.compile(rule))


def _cel_value(value: Any):
    import celpy

    return celpy.json_to_cel(value)


def evaluate_rule(rule: str, value: Any, old: Any = None) -> bool:
    """Evaluate one CEL rule with `self` (and `oldSelf`) bound; errors count as failures."""
    activation = {"self": _cel_value(value)}
    if old is not None:
        activation["oldSelf"] = _cel_value(old)
    try:
        result = _program(rule).evaluate(activation)
    except Exception:  # noqa: BLE001 - an evaluation error refuses the object, as in the apiserver
        return False
    return bool(result) if isinstance(result, (bool, int)) or type(result).__name__ == "BoolType" else False


def evaluate_message(rule: dict[str, Any], value: Any) -> str:
    """A refused rule's message: its messageExpression evaluated on `self` when it has one (as the
    apiserver does), else -- or when that fails -- the fixed message."""
    expr = rule.get("messageExpression")
    if expr:
        try:
            text = _program(expr).evaluate({"self": _cel_value(value)})
            if str(text).strip():
                return str(text)
        except Exception:  # noqa: BLE001 - the apiserver falls back to `message` too
            pass
    return rule["message"]


def _walk(schema: dict[str, Any], value: Any, old: Any, path: str, problems: list[Problem]) -> None:
    for rule in schema.get(CEL_KEY, []):
        transition = "oldSelf" in rule["rule"]
        if transition and old is None:
            continue
        if not evaluate_rule(rule["rule"], value, old if transition else None):
            where = path + rule.get("fieldPath", "")
            problems.append(Problem(where, evaluate_message(rule, value)))
    if isinstance(value, dict):
        for name, sub in schema.get("properties", {}).items():
            if name in value:
                _walk(sub, value[name], old.get(name) if isinstance(old, dict) else None, f"{path}.{name}", problems)
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for name, item in value.items():
                _walk(extra, item, None, f"{path}.{name}", problems)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            # Kubernetes pairs list items with their old values only for map-type lists; so do we.
            _walk(schema["items"], item, None, f"{path}[{i}]", problems)


def _cel_problems(resource: Model, old: dict[str, Any] | None) -> list[Problem]:
    doc = resource.to_doc()
    if old is not None:
        # The apiserver compares against the stored object, which was defaulted when written.
        try:
            old = type(resource).model_validate(old).to_doc()
        except ValidationError:
            pass
    problems: list[Problem] = []
    for part, schema in _schemas(doc["kind"]).items():
        _walk(schema, doc.get(part, {}), (old or {}).get(part) if old else None, part, problems)
    return problems


# ---------------------------------------------------------------------------- entry points


def validate_document(doc: Any, *, old: dict[str, Any] | None = None) -> tuple[Resource | None, list[Problem]]:
    """Validate one parsed document. Returns the defaulted model (or None) and every problem found."""
    if not isinstance(doc, dict):
        return None, [Problem("", "a tinv resource is a YAML mapping with apiVersion, kind, metadata and spec")]
    kind = doc.get("kind")
    if doc.get("apiVersion") != API_VERSION:
        return None, [Problem("apiVersion", f"must be {API_VERSION} (got {doc.get('apiVersion')!r})")]
    if kind not in RESOURCES:
        return None, [Problem("kind", f"must be one of {sorted(RESOURCES)} (got {kind!r})")]
    model, problems = _schema_problems(RESOURCES[kind], doc)
    if model is None:
        return None, problems
    if not model.metadata.name:
        problems.append(Problem("metadata.name", "required field is missing"))
    problems += _cel_problems(model, old)
    return (model if not problems else None), problems  # type: ignore[return-value]


def load_documents(path: str | Path) -> list[Any]:
    """Parse every YAML document in a file ('-' reads standard input)."""
    import sys

    text = sys.stdin.read() if str(path) == "-" else Path(path).read_text()
    try:
        return [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as err:
        raise InvalidResource(str(path), [Problem("", f"not valid YAML: {err}")]) from None


def load_resource(path: str | Path, kind: type[Model] | None = None) -> Resource:
    """Load and validate the single tinv resource in a file; raise InvalidResource naming every problem."""
    try:
        docs = load_documents(path)
    except OSError as err:
        raise InvalidResource(str(path), [Problem("", f"cannot read the file: {err.strerror}")]) from None
    docs = [d for d in docs if not (isinstance(d, dict) and d.get("kind") in ("Secret", "ConfigMap"))]
    if len(docs) != 1:
        raise InvalidResource(str(path), [Problem("", f"expected exactly one tinv resource, found {len(docs)} documents")])
    resource, problems = validate_document(docs[0])
    if resource is None:
        raise InvalidResource(str(path), problems)
    if kind is not None and not isinstance(resource, kind):
        raise InvalidResource(str(path), [Problem("kind", f"expected {kind.__name__}, got {resource.kind}")])
    return resource
