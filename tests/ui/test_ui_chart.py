"""The chart's web UI (ui.enabled): rendered only when asked for, ClusterIP only, and an account that
can read the two kinds, Jobs, pods, pods/log and Events of its namespace and nothing else, checked
with `kubectl auth can-i` against the real apiserver of tests/harness."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "tinv"

pytestmark = pytest.mark.cluster

READS = ["textualinversionjobs.tinv.io", "generationgrids.tinv.io", "jobs.batch", "pods", "pods/log", "events"]


@pytest.fixture(scope="module")
def helm() -> str:
    from harness.binaries import find_binaries

    return find_binaries(("helm",)).require("helm")


def _docs(helm: str, *sets: str) -> list[dict]:
    args = [helm, "template", "tinv", str(CHART), "-n", "team-a", "--kube-version", "1.33.0"]
    for s in sets:
        args += ["--set", s]
    r = subprocess.run(args, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


def _ui(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d["metadata"]["name"] == "tinv-ui"]


def test_ui_is_off_by_default(helm):
    assert _ui(_docs(helm)) == []


def test_ui_renders_a_deployment_a_clusterip_service_and_a_read_only_role(helm):
    docs = _ui(_docs(helm, "ui.enabled=true", "defaults.storage.credentialsSecret=tinv-s3", "defaults.storage.endpoint=https://object.ord1.coreweave.com",
                     "policy.allowedStorageEndpoints={https://object.ord1.coreweave.com,cwobject.com}"))
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["Deployment", "Role", "RoleBinding", "Service", "ServiceAccount"]
    by = {d["kind"]: d for d in docs}
    assert by["Service"]["spec"]["type"] == "ClusterIP"
    pod = by["Deployment"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "tinv-ui"
    assert by["Service"]["spec"]["selector"] == by["Deployment"]["spec"]["template"]["metadata"]["labels"]
    (container,) = pod["containers"]
    assert container["args"][:2] == ["ui", "--kube"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    env = {e["name"]: e for e in container["env"]}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "tinv-s3", "the operator's credentials, by reference"
    assert env["TINV_DEFAULT_STORAGE_ENDPOINT"]["value"] == "https://object.ord1.coreweave.com"
    assert env["TINV_ALLOWED_STORAGE_ENDPOINTS"]["value"] == "https://object.ord1.coreweave.com,cwobject.com", "the operator's storage policy"
    rules = by["Role"]["rules"]
    assert all(set(r["verbs"]) <= {"get", "list", "watch"} for r in rules)
    resources = {res for r in rules for res in r["resources"]}
    assert resources == {"textualinversionjobs", "generationgrids", "jobs", "pods", "pods/log", "events"}


def test_values_schema_checks_the_ui_block(helm):
    r = subprocess.run([helm, "template", "tinv", str(CHART), "--set", "ui.port=80"], capture_output=True, text=True)
    assert r.returncode != 0 and "ui.port" in r.stderr.replace("/", "."), r.stderr
    r = subprocess.run([helm, "template", "tinv", str(CHART), "--set", "ui.bogus=1"], capture_output=True, text=True)
    assert r.returncode != 0 and "bogus" in r.stderr


def test_ui_account_reads_only_and_never_secrets(control_plane, tinv_crds):
    cp = control_plane
    ns, other = cp.new_namespace("ui-rbac"), cp.new_namespace("ui-other")
    cp.helm("install", "tinv", str(CHART), "-n", ns, "--skip-crds", "--wait=false", "--set", "ui.enabled=true")
    sa = f"system:serviceaccount:{ns}:tinv-ui"

    def can(verb: str, resource: str, namespace: str = ns) -> bool:
        r = cp.kubectl("auth", "can-i", verb, resource, "-n", namespace, "--as", sa, check=False)
        return r.stdout.strip() == "yes"

    for resource in READS:
        assert can("get", resource), resource
        if resource != "pods/log":
            assert can("list", resource) and can("watch", resource), resource
    for verb in ("create", "update", "patch", "delete", "deletecollection"):
        for resource in READS + ["textualinversionjobs.tinv.io/status", "configmaps"]:
            assert not can(verb, resource), f"the UI must not {verb} {resource}"
    for verb in ("get", "list", "watch"):
        assert not can(verb, "secrets"), "the UI must not read Secrets"
        assert not can(verb, "configmaps")
    assert not can("create", "pods/exec") and not can("create", "pods/portforward")
    assert not can("list", "textualinversionjobs.tinv.io", other), "namespaced: nothing in another namespace"
    assert not can("list", "pods", other)
