"""What can never work is refused early, and deletion always ends (issue 14, items 9, 13 and 14):

* the apiserver refuses storage URIs that can never work (`s3:/bad`), naming the field;
* a missing default credentials Secret is found before any GPU Job exists (condition
  SecretMissing, metadata-only check), and GPU Jobs get a default activeDeadlineSeconds;
* deleting a namespace whose resource cleans up on deletion, with storage that does not answer,
  is bounded, and the give-up lands where a user can still read it (the operator's namespace),
  while the resource's own status never says "creating Job" during the deletion.
"""

from __future__ import annotations

import json
import time

import pytest

from harness import KubectlError
from operator_helpers import OpEnv, close_env, condition, make_env, tijob, write_checkpoint, write_progress
from tinv.api.models import ConditionType as C
from tinv.api.models import Reason as R
from tinv.operator.builders import DEFAULT_GPU_DEADLINE_SECONDS

pytestmark = pytest.mark.cluster

NOWHERE = {"uri": "s3://tinv-nowhere/runs", "endpoint": "http://127.0.0.1:9"}


@pytest.fixture(scope="module")
def home(control_plane):
    """The namespace the operator 'runs' in (POD_NAMESPACE), apart from the watched one."""
    ns = control_plane.new_namespace("op-home")
    yield ns
    control_plane.delete_namespace(ns)


@pytest.fixture(scope="module")
def env(control_plane, tmp_path_factory, home):
    e = make_env(control_plane, tmp_path_factory, "op-admit", extra=["--cleanup-retries", "2", "--storage-secret", "tinv-s3"],
                 env={"POD_NAMESPACE": home, "POD_NAME": "tinv-operator-test"})
    yield e
    close_env(e)


@pytest.mark.parametrize("field, value", [
    ("storage", {"uri": "s3:/bad"}),
    ("storage", {"uri": "s3://"}),
    ("storage", {"uri": "file://relative/path"}),
    ("images", "http://example.com/images"),
])
def test_uris_that_can_never_work_are_refused_by_the_apiserver(env: OpEnv, field, value):
    doc = tijob("baduri", storage=value) if field == "storage" else tijob("baduri", images=value)
    with pytest.raises(KubectlError) as refused:
        env.create(doc)
    where = "spec.storage.uri" if field == "storage" else "spec.concepts[0].images"
    assert where in str(refused.value) and "s3://bucket/prefix" in str(refused.value), str(refused.value)


def test_a_local_path_still_passes_the_crd_and_is_refused_with_a_condition(env: OpEnv):
    env.create(tijob("localpath", storage={"uri": "./tinv-runs"}))
    obj = env.wait_status("tijob", "localpath", lambda s: s.get("phase") == "Failed", 30)
    assert condition(obj, C.ACCEPTED)["reason"] == R.INVALID_SPEC and "tinv run" in condition(obj, C.ACCEPTED)["message"]


def test_a_missing_default_credentials_secret_is_found_before_the_job_is_created(env: OpEnv):
    env.create(tijob("nocreds", storage=NOWHERE))
    obj = env.wait_status("tijob", "nocreds", lambda s: condition({"status": s}, C.RUNNING).get("reason") == R.SECRET_MISSING, 30, "SecretMissing")
    running = condition(obj, C.RUNNING)
    assert obj["status"]["phase"] == "Pending" and "tinv-s3" in running["message"] and "AWS_ACCESS_KEY_ID" in running["message"]
    assert not env.cp.get_json("jobs", "-n", env.ns, "--field-selector", "metadata.name=nocreds-train")["items"], "no GPU Job without its Secret"
    assert any(e["reason"] == R.SECRET_MISSING and e["type"] == "Warning" for e in env.events("nocreds"))
    env.cp.kubectl("create", "secret", "generic", "tinv-s3", "-n", env.ns, "--from-literal=AWS_ACCESS_KEY_ID=x", "--from-literal=AWS_SECRET_ACCESS_KEY=y")
    job = env.wait(lambda: (j := env.cp.get_json("jobs", "-n", env.ns, "--field-selector", "metadata.name=nocreds-train")["items"]) and j[0],
                   60, "the Job once the Secret exists")
    assert job["spec"]["activeDeadlineSeconds"] == DEFAULT_GPU_DEADLINE_SECONDS, "a GPU Job gets a default deadline"
    env.cp.kubectl("delete", "tijob", "nocreds", "-n", env.ns, "--wait=false")


def test_a_resource_that_sets_its_deadline_keeps_it(env: OpEnv):
    env.create(tijob("ownlimit", run_policy={"activeDeadlineSeconds": 600}))
    job = env.wait(lambda: (j := env.cp.get_json("jobs", "-n", env.ns, "--field-selector", "metadata.name=ownlimit-train")["items"]) and j[0], 30, "Job")
    assert job["spec"]["activeDeadlineSeconds"] == 600


def test_deleting_a_namespace_with_unreachable_storage_is_bounded_and_the_give_up_is_readable(control_plane, tmp_path_factory, home):
    env = make_env(control_plane, tmp_path_factory, "op-doomed", extra=["--cleanup-retries", "2"],
                   env={"POD_NAMESPACE": home, "POD_NAME": "tinv-operator-test"})
    try:
        env.create(tijob("stuck", storage={**NOWHERE, "cleanupOnDelete": True}))
        env.wait_status("tijob", "stuck", lambda s: s.get("phase") == "Running", 60, "Running")
        t0 = time.monotonic()
        env.cp.kubectl("delete", "namespace", env.ns, "--wait=false")
        seen: list[str] = []

        def gone() -> bool:
            items = env.cp.get_json("tijobs", "-n", env.ns)["items"]
            for o in items:  # while it is deleted, the status never says the Job is being created
                seen.append(condition(o, C.RUNNING).get("message", ""))
            return not items

        env.wait(gone, 60, "the resource gone with its namespace")
        took = time.monotonic() - t0
        assert not [m for m in seen if "creating Job" in m], seen
        events = env.cp.get_json("events", "-n", home)["items"]
        kept = [e for e in events if e["reason"] == R.OUTPUTS_KEPT and f"{env.ns}/stuck" in e["message"]]
        assert kept and kept[0]["type"] == "Warning" and "kept" in kept[0]["message"], [e["message"] for e in events]
        print(f"\n[operator] namespace with unreachable cleanup storage: resource gone after {took:.1f} s")
        assert took < 45
    finally:
        close_env(env)


def test_values_from_storage_the_crd_would_refuse_never_freeze_the_status(env: OpEnv):
    """progress.json and manifests are written by user code: a value the CRD refuses (a step over
    2^63, a summary over 64 characters, a negative rate) must not turn every status write into a 422."""
    env.create(tijob("hostile"))
    obj = env.wait_status("tijob", "hostile", lambda s: s.get("phase") == "Running", 60, "Running")
    root = env.root(obj)
    write_checkpoint(root, 2**64, 0.4)  # outside int64: never in status
    good = write_checkpoint(root, 10, 0.3)
    (root / "progress.json").write_text(json.dumps({
        "state": "running", "step": 10**40, "total_steps": 10**41, "loss": 0.5, "samples_per_second": -3.0,
        "images_per_second": -1.0, "eta_seconds": 10**30, "updated_at": "2026-01-01T00:00:00Z"}))
    obj = env.wait_status("tijob", "hostile", lambda s: (s.get("latestCheckpoint") or {}).get("uuid") == good["uuid"], 30, "checkpoint in status")
    progress = obj["status"]["progress"]
    assert progress["loss"] == 0.5 and "step" not in progress and "samplesPerSecond" not in progress and len(progress.get("summary", "")) <= 64
    assert [c["uuid"] for c in obj["status"]["checkpoints"]] == [good["uuid"]]
    write_progress(root, 20, 100, 0.25, [good])  # and later writes still land
    env.wait_status("tijob", "hostile", lambda s: (s.get("progress") or {}).get("step") == 20, 30, "progress after the hostile values")
    assert "422" not in env.op.logs(5000)
