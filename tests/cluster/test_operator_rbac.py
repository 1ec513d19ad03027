"""The operator runs with exactly the RBAC it documents (a namespaced Role, nothing on Secrets) and
does everything: create children, read pods, write status and Events, clean outputs on deletion."""

from __future__ import annotations

import json

import pytest

from operator_helpers import OperatorProcess, apply_crds, condition, get, tijob, wait, write_checkpoint, write_progress, run_root
from tinv.api.models import ConditionType as C

pytestmark = pytest.mark.cluster

#: The rules the Helm chart must grant (the operator's report lists the same).
RULES = [
    {"apiGroups": ["tinv.io"], "resources": ["textualinversionjobs", "generationgrids"], "verbs": ["get", "list", "watch", "patch"]},
    {"apiGroups": ["tinv.io"], "resources": ["textualinversionjobs/status", "generationgrids/status"], "verbs": ["get", "patch"]},
    {"apiGroups": ["tinv.io"], "resources": ["textualinversionjobs/finalizers", "generationgrids/finalizers"], "verbs": ["update"]},
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get", "list", "watch", "create", "patch", "delete"]},
    {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "create", "patch"]},
    {"apiGroups": [""], "resources": ["services"], "verbs": ["get", "create"]},
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "patch"]},
    # Kueue hook (operator/kueue.py): queued Jobs are stopped/resumed through their Workload's spec.active
    {"apiGroups": ["kueue.x-k8s.io"], "resources": ["workloads"], "verbs": ["get", "list", "watch", "patch"]},
]


def test_operator_works_with_least_privilege(control_plane, tmp_path):
    cp = control_plane
    if cp.missing_components or not cp.nodes:
        pytest.skip("needs the full harness")
    apply_crds(cp)
    ns = cp.new_namespace("op-rbac")
    try:
        docs = [
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "tinv-operator", "namespace": ns}},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "tinv-operator", "namespace": ns}, "rules": RULES},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "tinv-operator", "namespace": ns},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "tinv-operator"},
             "subjects": [{"kind": "ServiceAccount", "name": "tinv-operator", "namespace": ns}]},
        ]
        for d in docs:
            cp.kubectl("apply", "-f", "-", input=json.dumps(d))
        sa = f"system:serviceaccount:{ns}:tinv-operator"
        assert cp.kubectl("auth", "can-i", "get", "secrets", "-n", ns, f"--as={sa}", check=False).stdout.strip() == "no"
        kubeconfig = cp.token_kubeconfig(ns, "tinv-operator")
        store = tmp_path / "store"
        op = OperatorProcess(cp, [ns], tmp_path / "op", storage_uri=f"file://{store}", env={"KUBECONFIG": kubeconfig},
                             extra=["--cleanup-retries", "2"]).start()
        try:
            cp.create(tijob("least", workers=2, storage={"uri": f"file://{store}", "cleanupOnDelete": True}), ns)
            obj = wait(cp, lambda: (o := get(cp, "tijob", ns, "least")).get("status", {}).get("phase") == "Running" and o, 90, "Running", op)
            assert get(cp, "service", ns, "least-train")["spec"]["clusterIP"] == "None"
            root = run_root(f"file://{store}", obj)
            ck = write_checkpoint(root, 10, 0.5)
            write_progress(root, 10, 100, 0.5, [ck])
            wait(cp, lambda: (get(cp, "tijob", ns, "least").get("status", {}).get("latestCheckpoint") or {}).get("uuid") == ck["uuid"], 30, "checkpoint", op)
            assert condition(get(cp, "tijob", ns, "least"), C.SCHEDULED)["status"] == "True"
            events = cp.get_json("events", "-n", ns, "--field-selector", "involvedObject.name=least")["items"]
            assert any(e["reason"] == "CheckpointRecorded" for e in events)
            cp.kubectl("delete", "tijob", "least", "-n", ns, "--wait=true", timeout=90)
            assert not root.exists()
            logs = op.logs(5000)
            assert "403" not in logs and "Forbidden" not in logs and "forbidden" not in logs, logs[-3000:]
        finally:
            op.stop()
    finally:
        cp.delete_namespace(ns)


def test_the_secret_check_needs_only_get_on_the_one_default_secret(control_plane, tmp_path):
    """The chart's rule for the SecretMissing check (deploy/helm/tinv/templates/_helpers.tpl): `get`
    on the default credentials Secret by name, used as a metadata-only GET; no other Secret readable."""
    from tinv.api.models import Reason as R

    cp = control_plane
    if cp.missing_components or not cp.nodes:
        pytest.skip("needs the full harness")
    apply_crds(cp)
    ns = cp.new_namespace("op-rbac-secret")
    try:
        rules = RULES + [{"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["tinv-s3"], "verbs": ["get"]}]
        docs = [
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "tinv-operator", "namespace": ns}},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "tinv-operator", "namespace": ns}, "rules": rules},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "tinv-operator", "namespace": ns},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "tinv-operator"},
             "subjects": [{"kind": "ServiceAccount", "name": "tinv-operator", "namespace": ns}]},
        ]
        for d in docs:
            cp.kubectl("apply", "-f", "-", input=json.dumps(d))
        sa = f"system:serviceaccount:{ns}:tinv-operator"
        can = lambda what: cp.kubectl("auth", "can-i", "get", what, "-n", ns, f"--as={sa}", check=False).stdout.strip()  # noqa: E731
        assert can("secrets") == "no" and can("secrets/hf-token") == "no" and can("secrets/tinv-s3") == "yes"
        op = OperatorProcess(cp, [ns], tmp_path / "op", storage_uri="s3://tinv-nowhere/runs",
                             env={"KUBECONFIG": cp.token_kubeconfig(ns, "tinv-operator")},
                             extra=["--storage-endpoint", "http://127.0.0.1:9", "--storage-secret", "tinv-s3"]).start()
        try:
            cp.create(tijob("needs-creds"), ns)
            obj = wait(cp, lambda: (o := get(cp, "tijob", ns, "needs-creds")) and condition(o, C.RUNNING).get("reason") == R.SECRET_MISSING and o,
                       60, "SecretMissing", op)
            assert "tinv-s3" in condition(obj, C.RUNNING)["message"]
            assert not cp.get_json("jobs", "-n", ns)["items"]
            cp.kubectl("create", "secret", "generic", "tinv-s3", "-n", ns, "--from-literal=AWS_ACCESS_KEY_ID=x", "--from-literal=AWS_SECRET_ACCESS_KEY=y")
            wait(cp, lambda: cp.get_json("jobs", "-n", ns)["items"], 60, "the Job once the Secret exists", op)
            logs = op.logs(5000)
            assert "403" not in logs and "orbidden" not in logs, logs[-3000:]
        finally:
            op.stop()
    finally:
        cp.delete_namespace(ns)
