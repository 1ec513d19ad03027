"""The chart's high-availability, policy and storage-polling values (issue 14, items 6, 8, 10)."""

from __future__ import annotations

import pytest

from deploy.test_chart import _docs, _template, helm  # noqa: F401 - the helm fixture

pytestmark = pytest.mark.cluster


def _deploy(docs):
    return next(d for d in docs if d["kind"] == "Deployment")


def _env(docs) -> dict[str, object]:
    c = _deploy(docs)["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}


def test_two_replicas_elect_a_leader_by_default(helm):
    docs = _docs(_template(helm))
    env = _env(docs)
    assert env["TINV_LEADER_ELECTION"] == "true" and env["TINV_LEADER_ELECTION_LEASE"] == "tinv"
    assert (env["TINV_LEASE_DURATION"], env["TINV_RENEW_DEADLINE"], env["TINV_RETRY_PERIOD"]) == ("15", "10", "2")
    assert env["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    spec = _deploy(docs)["spec"]
    assert spec["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    anti = spec["template"]["spec"]["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]
    assert anti["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    pdb = next(d for d in docs if d["kind"] == "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    role = next(d for d in docs if d["kind"] == "Role")
    lease = next(r for r in role["rules"] if r["apiGroups"] == ["coordination.k8s.io"])
    assert lease["resources"] == ["leases"] and set(lease["verbs"]) == {"get", "create", "patch"}


def test_one_replica_without_election_recreates(helm):
    docs = _docs(_template(helm, "replicaCount=1", "leaderElection.enabled=false"))
    spec = _deploy(docs)["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    assert "PodDisruptionBudget" not in {d["kind"] for d in docs} and "affinity" not in spec["template"]["spec"]
    r = _template(helm, "replicaCount=2", "leaderElection.enabled=false")
    assert r.returncode != 0 and "replicaCount > 1 needs leaderElection.enabled=true" in r.stderr
    r = _template(helm, "leaderElection.renewDeadlineSeconds=20")
    assert r.returncode != 0 and "renewDeadlineSeconds must be less than" in r.stderr


def test_policy_and_storage_limits_reach_the_operator(helm):
    docs = _docs(_template(helm, "policy.allowedImages={ghcr.io/tinv-io/*,registry.example/*}", "policy.allowedSecrets={tinv-s3}",
                           "policy.allowedStorageEndpoints={https://object.ord1.coreweave.com,cwobject.com}",
                           "storagePolling.maxObjectBytes=2097152", "storagePolling.readTimeoutSeconds=5"))
    env = _env(docs)
    assert env["TINV_POLICY_ALLOWED_IMAGES"] == "ghcr.io/tinv-io/*,registry.example/*"
    assert env["TINV_POLICY_ALLOWED_SECRETS"] == "tinv-s3" and env["TINV_POLICY_ALLOWED_PRIORITY_CLASSES"] == ""
    assert env["TINV_ALLOWED_STORAGE_ENDPOINTS"] == "https://object.ord1.coreweave.com,cwobject.com"
    assert env["TINV_STORAGE_MAX_OBJECT_BYTES"] == "2097152" and env["TINV_STORAGE_READ_TIMEOUT"] == "5"
    # the operator parses exactly what the chart sets
    from tinv.operator.config import from_args

    config = from_args([], env={k: v for k, v in env.items() if isinstance(v, str)} | {"POD_NAMESPACE": "team-a"})
    assert config.allowed_images == ("ghcr.io/tinv-io/*", "registry.example/*") and config.allowed_secrets == ("tinv-s3",)
    assert config.leader_election and config.leader_election_namespace == "team-a" and config.storage_max_object_bytes == 2097152


@pytest.mark.parametrize("setting,fragment", [
    ("policy.allowedStorageEndpoints={ftp://x}", "allowedStorageEndpoints"),
    ("storagePolling.maxObjectBytes=10", "maxObjectBytes"),
    ("replicaCount=0", "replicaCount"),
    ("policy.allowedImage={x}", "allowedImage"),
])
def test_wrong_policy_values_fail_clearly(helm, setting, fragment):
    r = _template(helm, setting)
    assert r.returncode != 0 and fragment in r.stderr, r.stderr
