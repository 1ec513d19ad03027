"""The operator against the real control plane: a TextualInversionJob becomes a Job with the right pod
spec, KWOK runs it, and the status shows what the pods and storage say (progress, checkpoints, the
scheduler's reasons, missing Secrets, exit-code classification) with an Event per transition.

The operator runs as a subprocess (`tinv operator --namespace NS`); the trainer is simulated by
writing progress.json and checkpoint manifests into a file:// storage root, as it would."""

from __future__ import annotations

import json
import time
import urllib.request

import pytest

from operator_helpers import (
    OpEnv,
    close_env,
    condition,
    elapsed,
    kubelet_says,
    make_env,
    metric_value,
    static_node,
    tijob,
    write_checkpoint,
    write_progress,
)
from tinv.api.models import Annotation
from tinv.api.models import ConditionType as C
from tinv.api.models import Reason as R
from tinv.api.validation import validate_document

pytestmark = pytest.mark.cluster
POLL = 1.0


@pytest.fixture(scope="module")
def env(control_plane, tmp_path_factory):
    e = make_env(control_plane, tmp_path_factory, "op-work", extra=["--cleanup-retries", "2"], poll_interval=POLL)
    yield e
    close_env(e)


def test_job_gets_the_pod_spec_runs_and_reports_progress_and_checkpoints(env: OpEnv):
    t0 = time.monotonic()
    env.create(tijob("life", gpus=2, kept=3))
    obj = env.get("tijob", "life")
    uid = obj["metadata"]["uid"]
    job = env.wait(lambda: env.cp.get_json("jobs", "-n", env.ns, "-l", f"tinv.io/owner-uid={uid}")["items"], 30, "the Job")[0]
    created = elapsed(t0)
    assert job["metadata"]["name"] == "life-train"
    assert job["metadata"]["ownerReferences"][0] | {} == {"apiVersion": "tinv.io/v1alpha1", "kind": "TextualInversionJob", "name": "life",
                                                         "uid": uid, "controller": True, "blockOwnerDeletion": True}
    spec = job["spec"]
    assert spec["completionMode"] == "NonIndexed" and spec["backoffLimit"] == 3
    assert spec["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"] == [2]
    pod = spec["template"]["spec"]
    c = pod["containers"][0]
    assert c["command"][:4] == ["python", "-m", "tinv.trainer.launch", "--nproc-per-node=2"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "2"
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]["matchExpressions"]
    assert {t["key"]: t["values"] for t in terms} == {"gpu.nvidia.com/class": ["A100_PCIE_80GB"], "topology.kubernetes.io/region": ["ORD1"]}
    assert pod["automountServiceAccountToken"] is False and pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]} and c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in pod["volumes"]
    # the pod template carries the resource document the pod runs: valid, defaulted, with the uid;
    # a downward-API volume mounts it where the command reads it, and no ConfigMap is made
    vol = next(v for v in pod["volumes"] if v["name"] == "resource")
    assert vol["downwardAPI"]["items"] == [{"path": "resource.yaml", "fieldRef": {"apiVersion": "v1", "fieldPath": f"metadata.annotations['{Annotation.RESOURCE_DOCUMENT}']"}}]
    assert env.cp.kubectl("get", "configmap", "life-train", "-n", env.ns, check=False).returncode != 0
    doc = __import__("yaml").safe_load(spec["template"]["metadata"]["annotations"][Annotation.RESOURCE_DOCUMENT])
    assert doc["metadata"]["uid"] == uid and doc["spec"]["storage"]["uri"] == env.storage_uri
    assert validate_document(doc)[0] is not None
    # KWOK runs the pod on an A100 node in ORD1; the status says so
    obj = env.wait_status("tijob", "life", lambda s: s.get("phase") == "Running", 60, "Running")
    assert condition(obj, C.SCHEDULED)["status"] == "True" and "a100-ord1" in condition(obj, C.SCHEDULED)["message"]
    assert condition(obj, C.RUNNING)["reason"] == R.TRAINING
    assert obj["status"]["observedGeneration"] == obj["metadata"]["generation"]
    assert obj["status"]["startTime"]
    # the trainer writes a checkpoint and progress: the status shows them within a poll interval
    root = env.root(obj)
    ck1 = write_checkpoint(root, 10, 0.3123456)
    write_progress(root, 12, 100, 0.29876, [ck1])
    t1 = time.monotonic()
    obj = env.wait_status("tijob", "life", lambda s: (s.get("latestCheckpoint") or {}).get("uuid") == ck1["uuid"]
                          and (s.get("progress") or {}).get("step") == 12, 30, "checkpoint recorded")
    seen_after = elapsed(t1)
    assert seen_after < POLL + 5, f"checkpoint took {seen_after} s to show (poll interval {POLL} s)"
    st = obj["status"]
    assert st["progress"]["summary"] == "12/100 (12%)" and st["progress"]["loss"] == 0.2988
    assert st["checkpoints"][-1] == {"uuid": ck1["uuid"], "step": 10, "uri": ck1["uri"], "createdAt": ck1["createdAt"], "loss": 0.3123}
    table = env.cp.kubectl("get", "tijobs", "-n", env.ns, "life").stdout
    assert "Running" in table and "12/100 (12%)" in table and ck1["uuid"] in table and "A100_PCIE_80GB" in table
    # the pod ends with the trainer's JSON summary as termination message
    ck2 = write_checkpoint(root, 100, 0.11)
    summary = {"state": "succeeded", "exit_code": 0, "reason": "Completed", "message": "training finished", "step": 100, "total_steps": 100,
               "loss": 0.11, "latest_checkpoint": {"uuid": ck2["uuid"], "step": 100, "uri": ck2["uri"]}}
    pod_name = env.running_pods("life-train")[0]["metadata"]["name"]
    env.cp.finish_pod(env.ns, pod_name, 0, message=json.dumps(summary))
    obj = env.wait_status("tijob", "life", lambda s: s.get("phase") == "Succeeded", 60, "Succeeded")
    st = obj["status"]
    assert condition(obj, C.SUCCEEDED)["status"] == "True" and condition(obj, C.SUCCEEDED)["reason"] == R.COMPLETED
    assert "training finished" in st["message"] and ck2["uuid"] in st["message"]
    assert st["completionTime"] and st["latestCheckpoint"]["uuid"] == ck2["uuid"]
    assert [c["uuid"] for c in st["checkpoints"]] == [ck1["uuid"], ck2["uuid"]]
    # an Event per transition, visible in kubectl describe
    reasons = [e["reason"] for e in env.events("life") for _ in range(e.get("count") or 1)]  # aggregated Events count repeats
    assert R.TRAINING in reasons and R.COMPLETED in reasons and reasons.count("CheckpointRecorded") == 2, reasons
    described = env.cp.kubectl("describe", "tijob", "life", "-n", env.ns).stdout
    assert "CheckpointRecorded" in described and "tinv-operator" in described
    print(f"\n[operator] Job created {created} s after the resource; checkpoint in status {seen_after} s after it was written")


def test_unschedulable_gpu_class_shows_the_schedulers_reason(env: OpEnv):
    env.create(tijob("nogpu", gpu_class="H100_NVLINK_80GB", region="ORD1"))
    env.create(tijob("toobig", gpus=16))
    obj = env.wait_status("tijob", "nogpu", lambda s: condition({"status": s}, C.SCHEDULED).get("reason") == R.UNSCHEDULABLE, 60, "Unschedulable")
    sched = condition(obj, C.SCHEDULED)
    assert sched["status"] == "False" and obj["status"]["phase"] == "Pending"
    assert "node affinity" in sched["message"] or "didn't match" in sched["message"], sched["message"]
    assert "H100_NVLINK_80GB" in sched["message"] and "ORD1" in sched["message"]
    assert condition(obj, C.RUNNING)["reason"] == R.UNSCHEDULABLE
    obj = env.wait_status("tijob", "toobig", lambda s: condition({"status": s}, C.SCHEDULED).get("reason") == R.UNSCHEDULABLE, 60, "Unschedulable")
    assert "nvidia.com/gpu" in condition(obj, C.SCHEDULED)["message"]
    warnings = [e for e in env.events("nogpu") if e["type"] == "Warning"]
    assert warnings and warnings[0]["reason"] == R.UNSCHEDULABLE
    wide = env.cp.kubectl("get", "tijobs", "-n", env.ns, "nogpu", "-o", "wide").stdout
    assert "Unschedulable" in wide


def test_missing_secret_and_image_pull_errors_are_conditions(env: OpEnv):
    static_node(env.cp, "static-gpu-0", "STATIC_TEST")
    tolerate_all = {"tolerations": [{"operator": "Exists"}]}
    env.create(tijob("nosecret", gpu_class="STATIC_TEST", region="TST1", resources=tolerate_all,
                     storage={"uri": env.storage_uri, "credentialsSecret": {"name": "missing-s3"}}))
    env.create(tijob("badimage", gpu_class="STATIC_TEST", region="TST1", resources={**tolerate_all, "image": "registry.invalid/nope:1"}))
    for name, reason, message, expect in (
        ("nosecret", "CreateContainerConfigError", 'secret "missing-s3" not found', R.SECRET_MISSING),
        ("badimage", "ImagePullBackOff", 'Back-off pulling image "registry.invalid/nope:1"', R.IMAGE_PULL_BACK_OFF),
    ):
        pod = env.wait(lambda: next((p for p in env.pods(f"{name}-train") if p["spec"].get("nodeName") == "static-gpu-0"), None), 60, f"{name} bound")
        env.cp.kubectl("get", "pod", pod["metadata"]["name"], "-n", env.ns)
        kubelet_says(env.cp, env.ns, pod, reason, message)
        obj = env.wait_status("tijob", name, lambda s: condition({"status": s}, C.RUNNING).get("reason") == expect, 30, expect)
        running = condition(obj, C.RUNNING)
        assert obj["status"]["phase"] == "Pending" and running["status"] == "False"
        assert ("missing-s3" if name == "nosecret" else "registry.invalid/nope:1") in running["message"]
        assert any(e["reason"] == expect and e["type"] == "Warning" for e in env.events(name))
    # missing key of an existing Secret
    env.cp.kubectl("create", "secret", "generic", "half-s3", "-n", env.ns, "--from-literal=AWS_ACCESS_KEY_ID=x")
    env.create(tijob("nokey", gpu_class="STATIC_TEST", region="TST1", resources=tolerate_all,
                     storage={"uri": env.storage_uri, "credentialsSecret": {"name": "half-s3"}}))
    pod = env.wait(lambda: next((p for p in env.pods("nokey-train") if p["spec"].get("nodeName")), None), 60, "nokey bound")
    kubelet_says(env.cp, env.ns, pod, "CreateContainerConfigError", f"couldn't find key AWS_SECRET_ACCESS_KEY in Secret {env.ns}/half-s3")
    obj = env.wait_status("tijob", "nokey", lambda s: condition({"status": s}, C.RUNNING).get("reason") == R.SECRET_MISSING, 30)
    assert "AWS_SECRET_ACCESS_KEY" in condition(obj, C.RUNNING)["message"]


def test_secret_values_never_reach_jobs_status_events_or_logs(env: OpEnv):
    value = "s3cr3t-VALUE-must-not-leak-42"
    env.cp.kubectl("create", "secret", "generic", "tinv-s3", "-n", env.ns,
                   f"--from-literal=AWS_ACCESS_KEY_ID=id-{value}", f"--from-literal=AWS_SECRET_ACCESS_KEY={value}")
    env.cp.kubectl("create", "secret", "generic", "hf", "-n", env.ns, f"--from-literal=token=hf-{value}")
    env.create(tijob("secretive", model={"source": "builtin:tiny", "tokenSecretRef": {"name": "hf", "key": "token"}},
                     storage={"uri": env.storage_uri, "credentialsSecret": {"name": "tinv-s3"}}))
    env.wait_status("tijob", "secretive", lambda s: s.get("phase") == "Running", 60)
    job = env.get("job", "secretive-train")
    envs = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert envs["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "tinv-s3", "key": "AWS_SECRET_ACCESS_KEY"}
    assert envs["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "token"}
    everything = json.dumps([job, env.running_pods("secretive-train"), env.get("tijob", "secretive"), env.events("secretive")])  # the document is in the Job
    assert value not in everything
    assert value not in env.op.logs(10_000)


def test_exit_codes_are_classified(env: OpEnv):
    # 2 = bad config: FailJob at once, not retried
    env.create(tijob("badcfg", annotations={"kwok.tinv.io/exit-code": "2", "kwok.tinv.io/message": '{"reason": "InvalidSpec", "message": "no images found in file:///data/images"}'}))
    obj = env.wait_status("tijob", "badcfg", lambda s: s.get("phase") == "Failed", 60, "Failed")
    failed = condition(obj, C.FAILED)
    assert failed["reason"] == R.NON_RETRYABLE_EXIT and "no images found" in failed["message"], failed
    assert len(env.pods("badcfg-train")) == 1
    # 1 = a crash: retried up to backoffLimit (0 here), then BackoffLimitExceeded
    env.create(tijob("crash", run_policy={"backoffLimit": 0}, annotations={"kwok.tinv.io/exit-code": "1"}))
    obj = env.wait_status("tijob", "crash", lambda s: s.get("phase") == "Failed", 60, "Failed")
    assert condition(obj, C.FAILED)["reason"] == R.BACKOFF_LIMIT_EXCEEDED
    # 75 = pre-empted after a checkpoint: retried without counting, even with backoffLimit 0
    env.create(tijob("preempt", run_policy={"backoffLimit": 0},
                     annotations={"kwok.tinv.io/exit-code": "75", "kwok.tinv.io/run-for": "1s",
                                  "kwok.tinv.io/message": '{"state": "running", "exit_code": 75, "reason": "Preempted", "message": "SIGTERM: checkpoint written", "step": 40}'}))
    seen: set[str] = set()

    def two_attempts():
        seen.update(p["metadata"]["name"] for p in env.pods("preempt-train"))
        return len(seen) >= 2

    env.wait(two_attempts, 90, "a second attempt after exit 75")
    job = env.get("job", "preempt-train")
    assert not any(c["type"] == "Failed" and c["status"] == "True" for c in job["status"].get("conditions") or [])
    assert env.status("tijob", "preempt").get("phase") != "Failed"
    env.cp.kubectl("delete", "tijob", "preempt", "-n", env.ns, "--wait=false")


def test_several_workers_get_an_indexed_job_and_a_headless_service(env: OpEnv):
    env.create(tijob("multi", workers=2, gpus=4))
    obj = env.wait_status("tijob", "multi", lambda s: s.get("phase") == "Running", 60, "Running")
    job = env.get("job", "multi-train")
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["parallelism"] == 2
    svc = env.get("service", "multi-train")
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["metadata"]["ownerReferences"][0]["uid"] == obj["metadata"]["uid"]
    pods = env.running_pods("multi-train")
    assert len(pods) == 2
    assert {p["spec"]["subdomain"] for p in pods} == {"multi-train"}
    assert sorted(p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] for p in pods) == ["0", "1"]
    job_uid = job["metadata"]["uid"]
    assert obj["status"]["workload"] == {"jobName": "multi-train", "serviceName": "multi-train",
                                         "jobGeneration": 1, "jobUid": job_uid}


def test_invalid_spec_is_a_condition_not_a_retry_loop(env: OpEnv):
    env.create(tijob("relative", storage={"uri": "tinv-runs"}))
    obj = env.wait_status("tijob", "relative", lambda s: s.get("phase") == "Failed", 30, "Failed")
    accepted = condition(obj, C.ACCEPTED)
    assert accepted["status"] == "False" and accepted["reason"] == R.INVALID_SPEC and "tinv run" in accepted["message"]
    assert not env.cp.get_json("jobs", "-n", env.ns, "-l", f"tinv.io/owner-uid={obj['metadata']['uid']}")["items"]
    before = metric_value(env.op.metrics(), "tinv_operator_reconcile_total", kind="TextualInversionJob", result="invalid")
    time.sleep(3 * POLL)
    after = metric_value(env.op.metrics(), "tinv_operator_reconcile_total", kind="TextualInversionJob", result="invalid")
    assert after == before >= 1
    warnings = [e for e in env.events("relative") if e["type"] == "Warning"]
    assert len(warnings) == 1 and warnings[0]["reason"] == R.INVALID_SPEC


def test_metrics_and_health(env: OpEnv):
    assert env.op.healthy()
    text = env.op.metrics()
    assert metric_value(text, "tinv_operator_reconcile_total") >= 1
    assert metric_value(text, "tinv_operator_status_updates_total") >= 1
    assert metric_value(text, "tinv_operator_checkpoints_recorded_total") >= 1
    assert "tinv_operator_resources{" in text and "tinv_operator_reconcile_duration_seconds_bucket" in text
    assert "tinv_operator_status_read_failures_total" in text and "process_resident_memory_bytes" in text
    assert metric_value(text, "tinv_operator_resources", kind="TextualInversionJob") >= 3
    with urllib.request.urlopen(f"http://127.0.0.1:{env.op.health_port}/healthz", timeout=5) as r:
        assert r.status == 200
