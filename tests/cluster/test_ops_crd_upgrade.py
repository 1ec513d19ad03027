"""CRD upgrades on `helm upgrade` (issue 14, item 12): Helm never upgrades crds/, so the chart's
NOTES (and README) give one upgrade step; this runs it against the real apiserver. An install with
last release's CRDs refuses a field the new chart's resources use; `helm upgrade` alone does not
change that; the documented step does."""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path

import pytest
import yaml

from cluster.operator_helpers import tijob

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "tinv"
CRD = CHART / "crds" / "tinv.io_textualinversionjobs.yaml"


def _older_crd() -> dict:
    """The TextualInversionJob CRD as it was before spec.runPolicy.managedBy and status.workers."""
    crd = copy.deepcopy(yaml.safe_load(CRD.read_text()))
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
    del schema["spec"]["properties"]["runPolicy"]["properties"]["managedBy"]
    del schema["status"]["properties"]["workers"]
    return crd


def _apply(cp, text: str) -> subprocess.CompletedProcess:
    return cp.kubectl("apply", "--server-side", "--force-conflicts", "--field-manager=helm", "-f", "-", input=text, check=False)


def test_documented_crd_upgrade_step(control_plane, tinv_crds):
    cp = control_plane
    ns = cp.new_namespace("ops-crd-upgrade")
    notes = (CHART / "templates" / "NOTES.txt").read_text()
    step = "kubectl apply --server-side --force-conflicts -f deploy/helm/tinv/crds/"
    assert step in notes and step in (REPO / "README.md").read_text()
    job = tijob("multikueue", run_policy={"managedBy": "kueue.x-k8s.io/multikueue"})
    try:
        assert _apply(cp, yaml.safe_dump(_older_crd())).returncode == 0
        cp.wait_for(lambda: "managedBy" not in json.dumps(cp.get_json("crd", "textualinversionjobs.tinv.io")), 30, what="the old CRD")
        cp.helm("install", "tinv", str(CHART), "-n", ns, "--wait=false", "--set", "replicaCount=1", "--set", "leaderElection.enabled=false")
        r = cp.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(job), check=False)
        assert r.returncode != 0 and "managedBy" in r.stderr  # the old schema does not know the field
        cp.helm("upgrade", "tinv", str(CHART), "-n", ns, "--reuse-values", "--wait=false")
        assert "managedBy" not in json.dumps(cp.get_json("crd", "textualinversionjobs.tinv.io"))  # Helm left crds/ alone
        # the documented step, exactly as written (run from the repository root)
        r = subprocess.run([cp.kubectl_path, *step.split()[1:]], cwd=REPO, env=cp.env(), capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        cp.wait_for(lambda: "managedBy" in json.dumps(cp.get_json("crd", "textualinversionjobs.tinv.io")), 30, what="the new CRD")
        created = cp.wait_for(lambda: cp.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(job), check=False).returncode == 0,
                              30, what="the new field accepted")
        assert created
        assert cp.get_json("tijob", "multikueue", "-n", ns)["spec"]["runPolicy"]["managedBy"] == "kueue.x-k8s.io/multikueue"
    finally:
        cp.apply_crds()  # leave the session's control plane with the current CRDs
        cp.helm("uninstall", "tinv", "-n", ns, check=False)
        cp.delete_namespace(ns)
