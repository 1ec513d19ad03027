"""The Helm chart: lint-clean, namespaced by default, least privilege, values checked at install time.

Needs the helm binary that `make cluster-bins` builds (hence the `cluster` marker).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "tinv"

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def helm() -> str:
    from harness.binaries import find_binaries

    return find_binaries(("helm",)).require("helm")


def _template(helm: str, *sets: str, check: bool = True) -> subprocess.CompletedProcess:
    args = [helm, "template", "tinv", str(CHART), "-n", "team-a", "--kube-version", "1.33.0"]
    for s in sets:
        args += ["--set", s]
    return subprocess.run(args, capture_output=True, text=True, check=False)


def _docs(result: subprocess.CompletedProcess) -> list[dict]:
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def test_lint_is_clean(helm):
    r = subprocess.run([helm, "lint", "--strict", str(CHART)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_crds_in_chart_are_the_generated_ones():
    for path in (REPO / "deploy" / "crds").glob("*.yaml"):
        assert (CHART / "crds" / path.name).read_text() == path.read_text()


def test_namespaced_install_has_no_cluster_role_and_no_secret_access(helm):
    docs = _docs(_template(helm))
    kinds = [d["kind"] for d in docs]
    assert "ClusterRole" not in kinds and "ClusterRoleBinding" not in kinds
    role = next(d for d in docs if d["kind"] == "Role")
    assert role["metadata"]["namespace"] == "team-a"
    for rule in role["rules"]:
        assert "secrets" not in rule["resources"], "the operator must not read Secrets"
        assert "*" not in rule["verbs"] and "*" not in rule["resources"]
    deploy = next(d for d in docs if d["kind"] == "Deployment")
    # 2 replicas with leader election (one active): a rolling update is safe (tests/deploy/test_ops_chart.py)
    assert deploy["spec"]["replicas"] == 2 and deploy["spec"]["strategy"]["type"] == "RollingUpdate"
    pod = deploy["spec"]["template"]["spec"]
    c = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["TINV_NAMESPACES"] == "team-a"
    assert c["securityContext"]["allowPrivilegeEscalation"] is False and c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert c["livenessProbe"] and c["readinessProbe"] and c["resources"]["limits"]["memory"]


def test_watch_list_and_cluster_wide_modes(helm):
    docs = _docs(_template(helm, "watchNamespaces={team-a,team-b}"))
    roles = sorted(d["metadata"]["namespace"] for d in docs if d["kind"] == "Role")
    bindings = [d for d in docs if d["kind"] == "RoleBinding"]
    assert roles == ["team-a", "team-b"] and len(bindings) == 2
    assert all(b["subjects"][0]["namespace"] == "team-a" for b in bindings)
    docs = _docs(_template(helm, "clusterWide=true"))
    assert {"ClusterRole", "ClusterRoleBinding"} <= {d["kind"] for d in docs}


def test_secrets_reach_the_operator_only_by_reference(helm):
    docs = _docs(_template(helm, "defaults.storage.credentialsSecret=tinv-s3"))
    c = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]
    aws = {e["name"]: e for e in c["env"] if e["name"].startswith("AWS_")}
    assert aws["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "tinv-s3"
    assert "value" not in aws["AWS_ACCESS_KEY_ID"]


def test_sdxl_defaults_reach_the_operator_and_the_operator_reads_them(helm):
    from tinv.operator.config import from_args

    def operator_env(*settings):
        docs = _docs(_template(helm, *settings))
        c = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]
        return {e["name"]: e["value"] for e in c["env"] if "value" in e}

    env = operator_env()
    assert (env["TINV_SDXL_MEMORY"], env["TINV_SDXL_SHARED_MEMORY"]) == ("64Gi", "16Gi")
    c = from_args([], env=operator_env("defaults.sdxl.memory=96Gi", "defaults.sdxl.sharedMemory=none"))
    assert (c.sdxl_memory, c.sdxl_shared_memory) == ("96Gi", None)


@pytest.mark.parametrize(
    "setting,fragment",
    [
        ("pollIntervalSeconds=0", "pollIntervalSeconds"),
        ("defaults.storage.addressingStyle=sideways", "addressingStyle"),
        ("defaults.gpuClass=A100 80GB", "gpuClass"),
        ("defaults.storage.uri=gs://bucket", "uri"),
        ("watchNamespaces={Team_A}", "watchNamespaces"),
        ("unknownValue=1", "unknownValue"),
        ("defaults.sdxl.memory=lots", "memory"),
    ],
)
def test_wrong_values_fail_with_a_clear_message(helm, setting, fragment):
    r = _template(helm, setting)
    assert r.returncode != 0
    assert fragment in r.stderr, r.stderr


def test_real_install_per_namespace_and_rbac_holds(control_plane, tinv_crds):
    """`helm install` into two fresh namespaces; each operator account is confined to its own."""
    ns_a, ns_b = control_plane.new_namespace("team-a"), control_plane.new_namespace("team-b")
    for ns in (ns_a, ns_b):
        r = control_plane.helm("install", "tinv", str(CHART), "-n", ns, "--skip-crds", "--wait=false")
        assert "kubectl -n %s apply -f examples/det-logo-job.yaml" % ns in r.stdout and "get tijobs" in r.stdout
    sa = f"system:serviceaccount:{ns_a}:tinv"

    def can(verb: str, resource: str, ns: str) -> bool:
        r = control_plane.kubectl("auth", "can-i", verb, resource, "-n", ns, "--as", sa, check=False)
        return r.stdout.strip() == "yes"

    assert can("create", "jobs.batch", ns_a) and can("patch", "textualinversionjobs.tinv.io/status", ns_a)
    assert can("watch", "generationgrids.tinv.io", ns_a) and can("create", "configmaps", ns_a)
    assert not can("get", "secrets", ns_a), "the operator must not read Secrets"
    assert not can("create", "jobs.batch", ns_b), "a namespaced install must not reach another namespace"
    assert not can("list", "textualinversionjobs.tinv.io", ns_b)
    assert not can("create", "clusterroles.rbac.authorization.k8s.io", ns_a)
