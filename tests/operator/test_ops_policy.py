"""The operator's policy (operator/policy.py): allowed images, PriorityClasses, schedulers, Secrets,
tolerations, nodeSelector keys and storage endpoints; violations name every field."""

from __future__ import annotations

import pytest

from tinv.api.validation import validate_document
from tinv.operator import builders as B
from tinv.operator import policy
from tinv.operator.config import OperatorConfig, from_args

BASE = OperatorConfig(namespaces=("team-a",), image="ghcr.io/tinv-io/tinv-trainer:1.0", storage_uri="s3://runs/x",
                      storage_endpoint="https://object.ord1.coreweave.com", storage_secret="tinv-s3", hf_token_secret="hf")
STRICT = BASE.replace(
    allowed_images=("ghcr.io/tinv-io/*",), allowed_priority_classes=("tinv-*",), allowed_schedulers=("default-scheduler",),
    allowed_secrets=("tinv-s3", "team-hf"), allowed_toleration_keys=("nvidia.com/gpu",), allowed_node_selector_keys=("gpu.nvidia.com/*",),
    allowed_storage_endpoints=("https://object.ord1.coreweave.com", "cwobject.com"),
)


def job(**spec) -> B.Effective:
    doc = {"apiVersion": "tinv.io/v1alpha1", "kind": "TextualInversionJob",
           "metadata": {"name": "j", "namespace": "team-a", "uid": "u-1", "generation": 1},
           "spec": {"model": {"source": "builtin:tiny"},
                    "concepts": [{"token": "det-logo", "initializer": "logo", "images": "s3://data/x/"}], **spec}}
    resource, problems = validate_document(doc)
    assert resource is not None, problems
    return B.effective(resource, STRICT)


def fields(eff: B.Effective, config: OperatorConfig = STRICT) -> list[str]:
    return [v.field for v in policy.violations(eff, config)]


def test_defaults_and_allowed_values_pass():
    assert fields(job()) == []  # the operator's own default image, Secret and endpoint are always fine
    assert fields(job(resources={"image": "ghcr.io/tinv-io/tinv-trainer:2.0", "priorityClassName": "tinv-high",
                                 "schedulerName": "default-scheduler", "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
                                 "nodeSelector": {"gpu.nvidia.com/model": "H100"}},
                      storage={"uri": "s3://b/p", "endpoint": "https://cwobject.com", "credentialsSecret": {"name": "tinv-s3"}},
                      model={"source": "org/m", "tokenSecretRef": {"name": "team-hf", "key": "token"}})) == []


def test_every_violation_is_named():
    eff = job(resources={"image": "evil.example/miner:latest", "priorityClassName": "system-node-critical",
                         "schedulerName": "my-scheduler", "tolerations": [{"operator": "Exists"}, {"key": "nvidia.com/gpu"}],
                         "nodeSelector": {"kubernetes.io/hostname": "control-plane"}},
              storage={"uri": "s3://b/p", "endpoint": "http://169.254.169.254", "credentialsSecret": {"name": "admin-token"}},
              model={"source": "org/m", "tokenSecretRef": {"name": "db-password", "key": "password"}})
    assert fields(eff) == [
        "spec.resources.image", "spec.resources.priorityClassName", "spec.resources.schedulerName",
        "spec.resources.tolerations[0].key",  # key-less Exists tolerates every taint: needs "*"
        "spec.resources.nodeSelector[kubernetes.io/hostname]", "spec.storage.credentialsSecret.name",
        "spec.model.tokenSecretRef.name", "spec.storage.endpoint",
    ]
    with pytest.raises(B.SpecError) as err:  # reconcile's existing InvalidSpec path takes it
        policy.enforce(eff, STRICT)
    msg = str(err.value)
    assert "spec.resources.image: 'evil.example/miner:latest' is not allowed by the operator's policy" in msg
    assert "allowed: ghcr.io/tinv-io/*; chart value policy.allowedImages" in msg
    assert "spec.storage.credentialsSecret.name: 'admin-token'" in msg and "storage.allowedEndpoints" in msg


def test_no_policy_allows_anything():
    eff = job(resources={"image": "evil.example/miner:latest", "tolerations": [{"operator": "Exists"}]},
              storage={"uri": "s3://b/p", "endpoint": "http://169.254.169.254", "credentialsSecret": {"name": "admin-token"}})
    assert fields(eff, BASE) == []


def test_flags_and_environment():
    c = from_args(["-n", "a", "--allowed-image", "ghcr.io/tinv-io/*", "--allowed-image", "registry.example/*"],
                  env={"TINV_POLICY_ALLOWED_SECRETS": "tinv-s3,hf", "TINV_POLICY_ALLOWED_TOLERATION_KEYS": "*"})
    assert c.allowed_images == ("ghcr.io/tinv-io/*", "registry.example/*")
    assert c.allowed_secrets == ("tinv-s3", "hf") and c.allowed_toleration_keys == ("*",)
    assert policy.describe(c) == {"allowedImages": ["ghcr.io/tinv-io/*", "registry.example/*"], "allowedSecrets": ["tinv-s3", "hf"],
                                  "allowedTolerationKeys": ["*"]}
