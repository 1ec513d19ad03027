"""Operator-level policy: what a TextualInversionJob or GenerationGrid may put into its pods.

Whoever may create these resources may otherwise choose any image, PriorityClass, scheduler,
toleration and nodeSelector, any object-storage endpoint (called with the operator's own
credentials), and any Secret of the namespace to be exposed as an env var — a way to read
Secrets one cannot `get`. The chart's `policy:` values (flags `--allowed-*`) restrict each:

    allowedImages             spec.resources.image            glob patterns, e.g. ghcr.io/tinv-io/*
    allowedPriorityClasses    spec.resources.priorityClassName names or globs
    allowedSchedulers         spec.resources.schedulerName    names or globs
    allowedSecrets            spec.storage.credentialsSecret.name, spec.model.tokenSecretRef.name
    allowedTolerationKeys     spec.resources.tolerations[i].key (a key-less toleration, which
                              tolerates every taint, needs the pattern "*")
    allowedNodeSelectorKeys   spec.resources.nodeSelector keys
    storage.allowedEndpoints  spec.storage.endpoint           URLs, or host names (any scheme/port)

An empty list allows anything (the default: an install behaves as before). Values the operator
filled in itself (its default image, default Secrets, default endpoint) are never refused. A
violation is permanent until the spec changes: the resource gets Accepted=False / Failed=True
(reason InvalidSpec) and a Warning Event whose message names every offending field; no Job is
created. Pure functions; the reconcile hook is one call of `enforce()`.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Iterable
from urllib.parse import urlparse

from .builders import Effective, SpecError
from .config import OperatorConfig


class PolicyViolation(SpecError):
    """The resource asks for something the operator's policy does not allow."""


@dataclass(frozen=True)
class Violation:
    field: str  # the spec path, e.g. spec.resources.image
    value: str
    allowed: tuple[str, ...]
    setting: str  # the chart value that allows it

    def __str__(self) -> str:
        return (f"{self.field}: {self.value!r} is not allowed by the operator's policy "
                f"(allowed: {', '.join(self.allowed)}; chart value {self.setting})")


def matches(value: str, patterns: Iterable[str]) -> bool:
    """True when `value` matches one of the glob patterns (case-sensitive, like Kubernetes names)."""
    return any(fnmatchcase(value, p) for p in patterns)


def endpoint_allowed(endpoint: str | None, allowed: Iterable[str]) -> bool:
    """An allow-list entry is an endpoint URL (`https://object.ord1.coreweave.com`, matched without
    a trailing slash) or a host name (`cwobject.com`, any scheme and port). None is the
    operator's own default endpoint: always allowed. An empty list allows every endpoint."""
    allowed = tuple(allowed)
    if not allowed or not endpoint:
        return True
    url = endpoint.rstrip("/")
    host = (urlparse(url).hostname or "").lower()
    return any(url == a.rstrip("/") or ("://" not in a and host == a.lower()) for a in allowed)


def violations(eff: Effective, config: OperatorConfig) -> list[Violation]:
    """Every field of the (defaulted) resource that the policy refuses, in spec order."""
    spec = eff.model.spec
    r = spec.resources
    own = eff.defaulted
    out: list[Violation] = []

    def check(field: str, value: str | None, allowed: tuple[str, ...], setting: str, default_key: str | None = None) -> None:
        if value is None or not allowed or (default_key is not None and default_key in own):
            return
        if not matches(value, allowed):
            out.append(Violation(field, value, allowed, setting))

    check("spec.resources.image", r.image, config.allowed_images, "policy.allowedImages", "resources.image")
    check("spec.resources.priorityClassName", r.priority_class_name, config.allowed_priority_classes, "policy.allowedPriorityClasses")
    check("spec.resources.schedulerName", r.scheduler_name, config.allowed_schedulers, "policy.allowedSchedulers")
    for i, t in enumerate(r.tolerations):
        check(f"spec.resources.tolerations[{i}].key", t.key or "*", config.allowed_toleration_keys, "policy.allowedTolerationKeys")
    for key in r.node_selector:
        check(f"spec.resources.nodeSelector[{key}]", key, config.allowed_node_selector_keys, "policy.allowedNodeSelectorKeys")
    creds = spec.storage.credentials_secret
    check("spec.storage.credentialsSecret.name", creds.name if creds else None, config.allowed_secrets, "policy.allowedSecrets",
          "storage.credentialsSecret")
    token = spec.model.token_secret_ref
    check("spec.model.tokenSecretRef.name", token.name if token else None, config.allowed_secrets, "policy.allowedSecrets")
    endpoint = spec.storage.endpoint
    if "storage.endpoint" not in own and not endpoint_allowed(endpoint, config.allowed_storage_endpoints):
        out.append(Violation("spec.storage.endpoint", endpoint or "", tuple(config.allowed_storage_endpoints), "storage.allowedEndpoints"))
    return out


def enforce(eff: Effective, config: OperatorConfig) -> None:
    """Raise PolicyViolation naming every refused field (reconcile turns it into the condition and Event)."""
    found = violations(eff, config)
    if found:
        raise PolicyViolation("; ".join(str(v) for v in found))


def describe(config: OperatorConfig) -> dict[str, Any]:
    """The active policy, for the operator's start-up log."""
    return {k: list(v) for k, v in {
        "allowedImages": config.allowed_images, "allowedPriorityClasses": config.allowed_priority_classes,
        "allowedSchedulers": config.allowed_schedulers, "allowedSecrets": config.allowed_secrets,
        "allowedTolerationKeys": config.allowed_toleration_keys, "allowedNodeSelectorKeys": config.allowed_node_selector_keys,
        "storage.allowedEndpoints": config.allowed_storage_endpoints,
    }.items() if v}
