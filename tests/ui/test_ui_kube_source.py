"""`tinv ui --kube`'s source against the real apiserver, as the chart's UI ServiceAccount: the
LIST + WATCH copy of both kinds follows creates, status updates and deletes; Jobs' pods, Events
and the storage settings the operator would use are read with that account's RBAC."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "tinv"


def _until(predicate, what: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.fixture
def ui_namespace(control_plane, tinv_crds):
    ns = control_plane.new_namespace("ui-src")
    control_plane.helm("install", "tinv", str(CHART), "-n", ns, "--skip-crds", "--wait=false", "--set", "ui.enabled=true")
    yield ns
    control_plane.delete_namespace(ns)


def test_watch_follows_creates_status_and_deletes_with_the_ui_account(control_plane, ui_namespace):
    from kubernetes import client

    from tinv.ui.sources import kube_source

    cp, ns = control_plane, ui_namespace
    kubeconfig = cp.token_kubeconfig(ns, "tinv-ui")
    env = {"TINV_DEFAULT_STORAGE_URI": "s3://team-bucket/tinv", "TINV_DEFAULT_STORAGE_ENDPOINT": "https://object.ord1.coreweave.com"}
    source = kube_source(ns, kubeconfig, env=env)
    try:
        _until(lambda: source.synced, f"both watches to list ({source.watch_errors})")
        assert source.runs() == []
        job = {"apiVersion": "tinv.io/v1alpha1", "kind": "TextualInversionJob", "metadata": {"name": "watched"},
               "spec": {"model": {"source": "builtin:tiny"}, "concepts": [{"token": "det-logo", "initializer": "logo", "images": "s3://b/i"}],
                        "resources": {"gpuClass": "A40"}}}
        cp.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(job))
        (run,) = _until(lambda: source.runs(), "the new job in the list")
        assert (run.kind, run.name, run.phase, run.gpu_class) == ("job", "watched", "Pending", "A40")

        admin = client.CustomObjectsApi(cp.api_client())
        admin.patch_namespaced_custom_object_status("tinv.io", "v1alpha1", ns, "textualinversionjobs", "watched",
                                                    {"status": {"phase": "Running", "progress": {"step": 7, "totalSteps": 10, "loss": 0.5}}})
        run = _until(lambda: next((r for r in source.runs() if r.phase == "Running"), None), "the status update")
        assert run.progress == {"step": 7, "total_steps": 10, "loss": 0.5}
        assert source.synced, "served from the watch, not by LIST"

        # a detail read: the storage the operator would fill in from its defaults
        detail = source.run("job", ns, "watched")
        assert detail.storage["uri"] == "s3://team-bucket/tinv" and detail.storage["endpoint"] == "https://object.ord1.coreweave.com"
        assert detail.root.startswith(f"s3://team-bucket/tinv/{ns}/watched-")
        assert source.events(detail) == [] and source.logs(detail, 10) == []
        assert source.run("job", ns, "nope") is None and source.run("job", "other-namespace", "watched") is None

        # pvc:// storage is mounted only in the run's pods: the run says so instead of showing nothing
        pvc = {**job, "metadata": {"name": "on-a-claim"}, "spec": {**job["spec"], "storage": {"uri": "pvc://team-claim/runs"}}}
        cp.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(pvc))
        on_claim = source.run("job", ns, "on-a-claim")
        assert on_claim.root.startswith("pvc://team-claim/runs/") and "cannot read pvc://" in on_claim.problem
        cp.kubectl("delete", "tijob", "on-a-claim", "-n", ns)

        # an endpoint outside the operator's storage policy is never called with the UI's credentials
        policed = kube_source(ns, kubeconfig, env={**env, "TINV_ALLOWED_STORAGE_ENDPOINTS": "https://object.ord1.coreweave.com"})
        elsewhere = {**job, "metadata": {"name": "elsewhere"}, "spec": {**job["spec"], "storage": {"uri": "s3://b/r", "endpoint": "https://attacker.example"}}}
        cp.kubectl("apply", "-n", ns, "-f", "-", input=yaml.safe_dump(elsewhere))
        from tinv.api.storage import StorageError

        with pytest.raises(StorageError, match="not in the operator's allowed endpoints"):
            policed.store(policed.run("job", ns, "elsewhere"))
        policed.store(policed.run("job", ns, "watched"))  # the default endpoint is allowed
        policed.close()
        cp.kubectl("delete", "tijob", "elsewhere", "-n", ns)

        cp.kubectl("delete", "tijob", "watched", "-n", ns)
        _until(lambda: source.runs() == [], "the delete")
        assert not source.watch_errors, source.watch_errors
    finally:
        source.close()
