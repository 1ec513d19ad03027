"""Pure builders: names, the resource document (in the pod template, or a ConfigMap when too large), Service and the Job's pod spec."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tinv.api.validation import load_resource, validate_document
from tinv.operator import builders as B
from tinv.operator.config import OperatorConfig

REPO = Path(__file__).resolve().parents[2]
UID = "0eae2594-1111-2222-3333-444455556666"
CFG = OperatorConfig(
    namespaces=("team-a",),
    image="registry.example/tinv-trainer:1.0",
    storage_uri="s3://tinv-runs/prod",
    storage_endpoint="https://cwobject.com",
    storage_addressing_style="virtual",
    storage_secret="tinv-s3",
    hf_token_secret="hf",
    gpu_class="A40",
    region="LAS1",
    pod_annotation_prefixes=("kwok.tinv.io/",),
)


def job_doc(**spec_overrides) -> dict:
    spec = {
        "model": {"source": "runwayml/stable-diffusion-v1-5"},
        "concepts": [{"token": "det-logo", "initializer": "brain logo", "images": "s3://tinv-data/det-logo/"}],
        "resources": {"gpusPerWorker": 1, "gpuClass": "A100_PCIE_80GB", "region": "ORD1"},
    }
    for key, value in spec_overrides.items():
        spec[key] = value
    return {
        "apiVersion": "tinv.io/v1alpha1",
        "kind": "TextualInversionJob",
        "metadata": {"name": "det-logo", "namespace": "team-a", "uid": UID, "generation": 3,
                     "annotations": {"kwok.tinv.io/exit-code": "0", "other.io/x": "y"}},
        "spec": spec,
    }


def grid_doc(**spec_overrides) -> dict:
    spec = {
        "model": {"source": "builtin:tiny"},
        "embeddings": [{"job": "det-logo", "checkpoint": "latest"}, {"uri": "s3://b/x.safetensors"}],
        "prompts": ["a det-logo"],
        "resources": {"workers": 3},
        **spec_overrides,
    }
    return {"apiVersion": "tinv.io/v1alpha1", "kind": "GenerationGrid",
            "metadata": {"name": "det-logo-grid", "namespace": "team-a", "uid": UID, "generation": 1}, "spec": spec}


def model(doc: dict):
    resource, problems = validate_document(doc)
    assert resource is not None, problems
    return resource


def eff(doc: dict, config: OperatorConfig = CFG) -> B.Effective:
    return B.effective(model(doc), config)


def container(job: dict) -> dict:
    return job["spec"]["template"]["spec"]["containers"][0]


def env(job: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container(job)["env"]}


# --------------------------------------------------------------------------- names


def test_child_names_are_deterministic_and_valid_dns_labels():
    assert B.child_name(B.TIJOB, "det-logo") == "det-logo-train"
    assert B.child_name(B.GRID, "det-logo") == "det-logo-grid"
    long = "a" * 200
    name = B.child_name(B.TIJOB, long)
    assert name == B.child_name(B.TIJOB, long) and len(name) <= B.MAX_JOB_NAME
    assert B.child_name(B.TIJOB, "a" * 199 + "b") != name
    # a name with dots or a leading digit still gives a valid Service/hostname, without collisions
    dotted = B.child_name(B.TIJOB, "v1.2")
    assert "." not in dotted and dotted[0].isalpha()
    assert dotted != B.child_name(B.TIJOB, "v1-2")
    assert B.child_name(B.TIJOB, "1abc")[0].isalpha()


def test_labels_and_owner_reference():
    job = B.build_job(B.TIJOB, eff(job_doc()), CFG)
    meta = job["metadata"]
    assert meta["name"] == "det-logo-train" and meta["namespace"] == "team-a"
    assert meta["labels"][B.LABEL_MANAGED_BY] == "tinv-operator"
    assert meta["labels"][B.LABEL_OWNER_UID] == UID
    assert meta["ownerReferences"] == [{"apiVersion": "tinv.io/v1alpha1", "kind": "TextualInversionJob", "name": "det-logo",
                                        "uid": UID, "controller": True, "blockOwnerDeletion": True}]
    assert job["spec"]["template"]["metadata"]["labels"][B.LABEL_OWNER_UID] == UID
    assert len(B.labels(B.TIJOB, "x" * 253, UID)[B.LABEL_INSTANCE]) <= 63


def test_builders_are_pure():
    e = eff(job_doc())
    assert B.children(B.TIJOB, e, CFG) == B.children(B.TIJOB, e, CFG)
    assert json.dumps(B.build_job(B.TIJOB, e, CFG), sort_keys=True) == json.dumps(B.build_job(B.TIJOB, eff(job_doc()), CFG), sort_keys=True)


# --------------------------------------------------------------------------- defaults and document


def test_operator_defaults_fill_the_document_but_never_a_secret_value():
    e = eff(job_doc(resources={"gpusPerWorker": 1}))
    doc = B.resource_document(B.TIJOB, e)
    spec = doc["spec"]
    assert doc["metadata"] == {"name": "det-logo", "namespace": "team-a", "uid": UID, "generation": 3}
    assert spec["storage"]["uri"] == "s3://tinv-runs/prod"
    assert spec["storage"]["endpoint"] == "https://cwobject.com"
    assert spec["storage"]["addressingStyle"] == "virtual"
    assert spec["storage"]["credentialsSecret"]["name"] == "tinv-s3"
    assert spec["resources"]["gpuClass"] == "A40" and spec["resources"]["region"] == "LAS1"
    assert spec["resources"]["image"] == "registry.example/tinv-trainer:1.0"
    # the document is a valid resource the trainer can load
    resource, problems = validate_document(doc)
    assert resource is not None, problems
    text = document_of(B.build_job(B.TIJOB, e, CFG))
    assert yaml.safe_load(text) == doc
    assert "secretAccessKey" not in text.replace("secretAccessKeyKey", "")
    assert "AWS_SECRET_ACCESS_KEY" in text  # only the key *name* of the reference


def document_of(job: dict) -> str:
    """The file a pod of `job` reads at DOC_PATH, resolved as the kubelet does (downward API)."""
    template = job["spec"]["template"]
    vol = next(v for v in template["spec"]["volumes"] if v["name"] == "resource")
    (item,) = vol["downwardAPI"]["items"]
    assert item["path"] == B.DOC_KEY
    key = item["fieldRef"]["fieldPath"].removeprefix("metadata.annotations['").removesuffix("']")
    assert {"name": "resource", "mountPath": B.DOC_DIR, "readOnly": True} in container(job)["volumeMounts"]
    return template["metadata"]["annotations"][key]


def test_the_document_travels_in_the_pod_template_with_no_config_map():
    e = eff(grid_doc())
    resolved = [{"job": "det-logo", "checkpoint": "6f1c4a52-0d3e-4d7c-9c1a-3b2f6a1e9d10", "uri": "s3://x/ck"}]
    objs = B.children(B.GRID, e, CFG, resolved)
    assert [o["kind"] for o in objs] == ["Job"] and B.config_map_of(objs[0]) is None
    assert yaml.safe_load(document_of(objs[0])) == B.resource_document(B.GRID, e, resolved)
    assert document_of(objs[0]) == B.resource_text(B.GRID, e, resolved)


def test_a_document_too_large_for_an_annotation_gets_a_config_map():
    # 100 prompts of 1,500 characters (the CRD allows 256 of 2,000): ~150 KB, over DOC_INLINE_LIMIT
    big = eff(grid_doc(prompts=[f"a det-logo {i} " + "x" * 1500 for i in range(100)]))
    cm, job = B.children(B.GRID, big, CFG)
    assert cm["kind"] == "ConfigMap" and cm["metadata"]["name"] == job["metadata"]["name"] == B.config_map_of(job)
    assert yaml.safe_load(cm["data"][B.DOC_KEY]) == B.resource_document(B.GRID, big)
    assert B.ANNOTATION_DOCUMENT not in job["spec"]["template"]["metadata"]["annotations"]
    vol = next(v for v in job["spec"]["template"]["spec"]["volumes"] if v["name"] == "resource")
    assert vol == {"name": "resource", "configMap": {"name": cm["metadata"]["name"], "items": [{"key": B.DOC_KEY, "path": B.DOC_KEY}]}}
    assert cm["metadata"]["ownerReferences"] == job["metadata"]["ownerReferences"]
    # a small document beside large copied annotations: the pod's annotations would pass 256 KiB
    doc = job_doc()
    doc["metadata"]["annotations"]["kwok.tinv.io/blob"] = "y" * (240 * 1024)
    assert [o["kind"] for o in B.children(B.TIJOB, eff(doc), CFG)] == ["ConfigMap", "Job"]
    assert [o["kind"] for o in B.children(B.TIJOB, eff(job_doc()), CFG)] == ["Job"]


def test_spec_values_win_over_operator_defaults():
    e = eff(job_doc(storage={"uri": "file:///data/runs", "addressingStyle": "path"}))
    spec = B.resource_document(B.TIJOB, e)["spec"]
    assert spec["storage"]["uri"] == "file:///data/runs"
    assert "endpoint" not in spec["storage"]  # the S3 endpoint default only applies to s3:// storage
    assert spec["resources"]["gpuClass"] == "A100_PCIE_80GB" and spec["resources"]["region"] == "ORD1"


def test_no_storage_anywhere_is_a_spec_error():
    with pytest.raises(B.SpecError, match="storage.uri"):
        B.effective(model(job_doc()), OperatorConfig(namespaces=("x",)))


def test_a_relative_local_path_is_refused_in_a_cluster():
    with pytest.raises(B.SpecError, match="only works with `tinv run`"):
        B.effective(model(job_doc(storage={"uri": "tinv-runs"})), CFG)


def test_cpu_only_jobs_get_no_default_gpu_class():
    spec = B.resource_document(B.TIJOB, eff(job_doc(resources={"gpusPerWorker": 0})))["spec"]
    assert "gpuClass" not in spec["resources"]
    job = B.build_job(B.TIJOB, eff(job_doc(resources={"gpusPerWorker": 0})), CFG)
    assert B.GPU_RESOURCE not in json.dumps(container(job)["resources"])
    assert "tolerations" not in job["spec"]["template"]["spec"]


def test_grid_document_carries_resolved_embeddings():
    resolved = [{"job": "det-logo", "checkpoint": "6f1c4a52-0d3e-4d7c-9c1a-3b2f6a1e9d10", "uri": "s3://x/ck"}, {"uri": "s3://b/x.safetensors"}]
    doc = B.resource_document(B.GRID, eff(grid_doc()), resolved)
    assert doc["status"] == {"resolvedEmbeddings": resolved}
    resource, problems = validate_document(doc)
    assert resource is not None, problems


# --------------------------------------------------------------------------- the pod spec


def test_pod_spec_placement_resources_and_security():
    doc = job_doc(resources={"gpusPerWorker": 2, "gpuClass": "A100_PCIE_80GB", "region": "ORD1", "cpu": "8", "memory": "48Gi",
                             "sharedMemory": "16Gi", "priorityClassName": "gpu-high", "schedulerName": "volcano",
                             "queueName": "team-a", "nodeSelector": {"disk": "nvme"},
                             "tolerations": [{"key": "spot", "operator": "Exists", "effect": "NoSchedule"}]})
    job = B.build_job(B.TIJOB, eff(doc), CFG)
    pod = job["spec"]["template"]["spec"]
    c = container(job)
    assert c["resources"] == {"requests": {"nvidia.com/gpu": "2", "cpu": "8", "memory": "48Gi"},
                              "limits": {"nvidia.com/gpu": "2", "cpu": "8", "memory": "48Gi"}}
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms == [{"matchExpressions": [
        {"key": "gpu.nvidia.com/class", "operator": "In", "values": ["A100_PCIE_80GB"]},
        {"key": "topology.kubernetes.io/region", "operator": "In", "values": ["ORD1"]},
    ]}]
    assert {"key": "spot", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["nodeSelector"] == {"disk": "nvme"}
    assert pod["priorityClassName"] == "gpu-high" and pod["schedulerName"] == "volcano"
    assert job["metadata"]["labels"][B.LABEL_QUEUE] == "team-a"
    assert job["spec"]["suspend"] is True  # Kueue admits queued Jobs by unsuspending them
    # /dev/shm is memory, sized
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    # security
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert c["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert c["terminationMessagePath"] == "/dev/termination-log"
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert pod["restartPolicy"] == "Never" and pod["enableServiceLinks"] is False


def test_custom_placement_labels():
    cfg = CFG.replace(gpu_class_label="node.coreweave.cloud/gpu", region_label="node.coreweave.cloud/region", gpu_toleration=False)
    pod = B.build_job(B.TIJOB, eff(job_doc(), cfg), cfg)["spec"]["template"]["spec"]
    keys = [e["key"] for e in pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]["matchExpressions"]]
    assert keys == ["node.coreweave.cloud/gpu", "node.coreweave.cloud/region"]
    assert "tolerations" not in pod


def test_secrets_only_by_reference():
    doc = job_doc(model={"source": "runwayml/stable-diffusion-v1-5", "tokenSecretRef": {"name": "hf-gated", "key": "tok"}},
                  storage={"uri": "s3://b/p", "credentialsSecret": {"name": "my-s3", "accessKeyIdKey": "id", "secretAccessKeyKey": "secret"}})
    job = B.build_job(B.TIJOB, eff(doc), CFG)
    e = env(job)
    assert e["AWS_ACCESS_KEY_ID"]["valueFrom"] == {"secretKeyRef": {"name": "my-s3", "key": "id"}}
    assert e["AWS_SECRET_ACCESS_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "my-s3", "key": "secret"}}
    assert e["HF_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "hf-gated", "key": "tok"}}
    assert all("value" not in v for k, v in e.items() if k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "HF_TOKEN"))
    # operator defaults are optional references: a namespace without them still runs public models
    e = env(B.build_job(B.TIJOB, eff(job_doc()), CFG))
    assert e["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {"name": "tinv-s3", "key": "AWS_ACCESS_KEY_ID", "optional": True}
    assert e["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "token", "optional": True}


def test_model_cache_and_pvc_mounts():
    doc = job_doc(model={"source": "pvc://models/sd15", "cacheClaim": "tinv-cache"},
                  concepts=[{"token": "tok", "initializer": "dog", "images": "pvc://data/dog"}],
                  storage={"uri": "pvc://runs/out"})
    job = B.build_job(B.TIJOB, eff(doc), CFG)
    pod = job["spec"]["template"]["spec"]
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert claims == {"tinv-cache", "runs", "models", "data"}
    mounts = {m["mountPath"] for m in container(job)["volumeMounts"]}
    assert {"/cache", "/mnt/pvc/runs", "/mnt/pvc/models", "/mnt/pvc/data", "/etc/tinv", "/dev/shm"} <= mounts
    no_cache = B.build_job(B.TIJOB, eff(job_doc(), CFG.replace(model_cache_claim=None)), CFG.replace(model_cache_claim=None))
    assert next(v for v in no_cache["spec"]["template"]["spec"]["volumes"] if v["name"] == "model-cache") == {"name": "model-cache", "emptyDir": {}}
    with_default = eff(job_doc(), CFG.replace(model_cache_claim="shared-cache"))
    vols = B.build_job(B.TIJOB, with_default, CFG)["spec"]["template"]["spec"]["volumes"]
    assert {"name": "model-cache", "persistentVolumeClaim": {"claimName": "shared-cache"}} in vols


def test_single_worker_single_gpu_runs_tinv_train():
    job = B.build_job(B.TIJOB, eff(job_doc()), CFG)
    assert container(job)["command"] == ["tinv", "train", "/etc/tinv/resource.yaml"]
    assert job["spec"]["completionMode"] == "NonIndexed"
    assert job["spec"]["completions"] == 1 and job["spec"]["parallelism"] == 1


def test_single_worker_several_gpus_runs_the_launcher():
    # tinv.trainer.launch, not torchrun: it keeps the trainer's exit code (ops2, issue 14 item 5)
    job = B.build_job(B.TIJOB, eff(job_doc(resources={"gpusPerWorker": 4})), CFG)
    cmd = container(job)["command"]
    assert cmd == ["python", "-m", "tinv.trainer.launch", "--nproc-per-node=4", "train", "/etc/tinv/resource.yaml"]


def test_several_workers_are_an_indexed_job_with_a_headless_service():
    e = eff(job_doc(resources={"gpusPerWorker": 2, "workers": 3}))
    objs = B.children(B.TIJOB, e, CFG)
    assert [o["kind"] for o in objs] == ["Service", "Job"]
    svc, job = objs
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"] == {B.LABEL_OWNER_UID: UID, B.LABEL_COMPONENT: "trainer"}
    assert svc["metadata"]["name"] == "det-logo-train"
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == 3 and job["spec"]["parallelism"] == 3
    pod = job["spec"]["template"]["spec"]
    assert pod["subdomain"] == "det-logo-train"
    e2 = env(job)
    assert e2["MASTER_ADDR"]["value"] == "det-logo-train-0.det-logo-train"
    assert e2["TINV_NNODES"]["value"] == "3" and e2["TINV_NPROC_PER_NODE"]["value"] == "2"
    script = container(job)["command"][2]
    assert container(job)["command"][:2] == ["/bin/sh", "-c"]
    assert "tinv.trainer.launch" in script and '--node-rank="$JOB_COMPLETION_INDEX"' in script and "getaddrinfo" in script


@pytest.mark.parametrize("index,resolvable", [("0", False), ("1", True)])
def test_rendezvous_wrapper_waits_for_the_master_then_execs(tmp_path, index, resolvable):
    """Run the wrapper with sh: rank 0 never waits; others wait for DNS (here: localhost resolves)."""
    fake = tmp_path / "bin"
    fake.mkdir()
    # python -m (the launcher) echoes its arguments; python -c (the DNS check) is the real one
    (fake / "python").write_text(f'#!/bin/sh\nif [ "$1" = -m ]; then echo python "$@"; else exec {sys.executable} "$@"; fi\n')
    (fake / "python").chmod(0o755)
    env_ = {"PATH": f"{fake}:/usr/bin:/bin", "JOB_COMPLETION_INDEX": index, "MASTER_ADDR": "localhost", "MASTER_PORT": "29500",
            "TINV_NNODES": "2", "TINV_NPROC_PER_NODE": "1", "TINV_RENDEZVOUS_TIMEOUT": "4", "TINV_RESOURCE_FILE": "/etc/tinv/resource.yaml"}
    r = subprocess.run(["/bin/sh", "-c", B.RENDEZVOUS_WRAPPER], env=env_, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert f"--node-rank={index}" in r.stdout and "--master-addr=localhost" in r.stdout and "tinv.trainer.launch" in r.stdout
    assert r.stdout.rstrip().endswith("train /etc/tinv/resource.yaml")


def test_rendezvous_wrapper_gives_up_with_exit_69(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python").symlink_to(sys.executable)
    env_ = {"PATH": f"{fake}:/usr/bin:/bin", "JOB_COMPLETION_INDEX": "1", "MASTER_ADDR": "master.invalid", "MASTER_PORT": "1",
            "TINV_NNODES": "2", "TINV_NPROC_PER_NODE": "1", "TINV_RENDEZVOUS_TIMEOUT": "2", "TINV_RESOURCE_FILE": "x"}
    script = B.RENDEZVOUS_WRAPPER.replace("/dev/termination-log", str(tmp_path / "term"))
    r = subprocess.run(["/bin/sh", "-c", script], env=env_, capture_output=True, text=True, timeout=30)
    assert r.returncode == 69 and "not resolvable" in r.stderr


def test_grid_is_an_indexed_job_sharded_by_completion_index():
    job = B.build_job(B.GRID, eff(grid_doc()), CFG)
    assert job["metadata"]["name"] == "det-logo-grid-grid"
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == 3 and job["spec"]["parallelism"] == 3
    assert container(job)["command"] == ["tinv", "generate", "/etc/tinv/resource.yaml", "--shard", "$(JOB_COMPLETION_INDEX)/3"]
    assert container(job)["name"] == "generator"
    assert job["spec"]["backoffLimitPerIndex"] == 3 and "backoffLimit" not in job["spec"]
    assert [o["kind"] for o in B.children(B.GRID, eff(grid_doc()), CFG)] == ["Job"]


def test_run_policy_and_exit_code_classification():
    doc = job_doc(runPolicy={"suspend": True, "backoffLimit": 5, "activeDeadlineSeconds": 3600, "ttlSecondsAfterFinished": 600})
    job = B.build_job(B.TIJOB, eff(doc), CFG)
    spec = job["spec"]
    assert spec["suspend"] is True and spec["backoffLimit"] == 5
    assert spec["activeDeadlineSeconds"] == 3600 and spec["ttlSecondsAfterFinished"] == 600
    assert spec["podReplacementPolicy"] == "Failed"
    rules = spec["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "FailJob", "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [2]}}
    assert rules[1]["action"] == "Ignore" and rules[1]["onExitCodes"]["values"] == [75]
    assert rules[2] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    assert B.job_run_policy_patch(B.TIJOB, eff(doc).model) == {"activeDeadlineSeconds": 3600, "ttlSecondsAfterFinished": 600, "backoffLimit": 5}


def test_pod_annotations_copied_by_prefix_only():
    ann = B.build_job(B.TIJOB, eff(job_doc()), CFG)["spec"]["template"]["metadata"]["annotations"]
    assert ann["kwok.tinv.io/exit-code"] == "0" and "other.io/x" not in ann
    assert ann["kubectl.kubernetes.io/default-container"] == "trainer"


def test_spec_hash_ignores_run_policy_and_operator_defaults():
    base = eff(job_doc()).spec_hash
    assert eff(job_doc(runPolicy={"suspend": True, "backoffLimit": 9})).spec_hash == base
    assert eff(job_doc(), CFG.replace(image="other:2")).spec_hash == base
    assert eff(job_doc(resources={"gpusPerWorker": 2, "gpuClass": "A100_PCIE_80GB", "region": "ORD1"})).spec_hash != base
    job = B.build_job(B.TIJOB, eff(job_doc()), CFG)
    assert job["metadata"]["annotations"][B.ANNOTATION_SPEC_HASH] == base


def test_example_resources_build(repo=REPO):
    for path, kind in (("examples/det-logo-job.yaml", B.TIJOB), ("examples/det-logo-grid.yaml", B.GRID)):
        m = load_resource(REPO / path)
        m.metadata.namespace, m.metadata.uid, m.metadata.generation = "team-a", UID, 1
        objs = B.children(kind, B.effective(m, CFG), CFG)
        assert objs[-1]["kind"] == "Job"
        json.dumps(objs)  # serialisable as is
        assert copy.deepcopy(objs) == objs


# --------------------------------------------------------------------------- issue 14

def test_gpu_workloads_get_a_default_deadline_and_keep_their_own():
    job = B.build_job(B.TIJOB, eff(job_doc()), CFG)
    assert job["spec"]["activeDeadlineSeconds"] == B.DEFAULT_GPU_DEADLINE_SECONDS
    assert B.job_run_policy_patch(B.TIJOB, eff(job_doc()).model)["activeDeadlineSeconds"] == B.DEFAULT_GPU_DEADLINE_SECONDS
    own = B.build_job(B.TIJOB, eff(job_doc(runPolicy={"activeDeadlineSeconds": 600})), CFG)
    assert own["spec"]["activeDeadlineSeconds"] == 600
    cpu = job_doc(resources={"gpusPerWorker": 0})
    assert "activeDeadlineSeconds" not in B.build_job(B.TIJOB, eff(cpu), CFG)["spec"]
    grid = B.build_job(B.GRID, eff(grid_doc()), CFG)
    assert grid["spec"]["activeDeadlineSeconds"] == B.DEFAULT_GPU_DEADLINE_SECONDS
    # a default is not a spec change: the spec hash (what flags a running Job as changed) ignores it
    assert eff(job_doc()).spec_hash == eff(job_doc(runPolicy={"activeDeadlineSeconds": 600})).spec_hash


@pytest.mark.parametrize("uri", ["s3:/bad", "s3://", "s3:bucket/x", "file://relative", "pvc://", "http://host/x", "gs://b/x"])
def test_uris_that_can_never_work_are_refused_naming_the_field(uri):
    _, problems = validate_document(job_doc(storage={"uri": uri}))
    assert [p.path for p in problems] == ["spec.storage.uri"], problems
    doc = job_doc()
    doc["spec"]["concepts"][0]["images"] = uri
    assert [p.path for p in validate_document(doc)[1]] == ["spec.concepts[0].images"]


@pytest.mark.parametrize("uri", ["s3://bucket", "s3://bucket/x", "file:///abs", "pvc://claim/p", "tinv-runs", "./runs", "C:/data", "/abs/path"])
def test_uris_that_can_work_pass(uri):
    assert validate_document(job_doc(storage={"uri": uri}))[1] == []


# --------------------------------------------------------------------------- issue 16: SDXL defaults

SDXL = {"source": "stabilityai/stable-diffusion-xl-base-1.0"}


def test_sdxl_gpu_jobs_get_memory_and_shared_memory_defaults():
    job = B.build_job(B.TIJOB, eff(job_doc(model=SDXL)), CFG)
    limits = container(job)["resources"]["limits"]
    assert limits["memory"] == CFG.sdxl_memory == "64Gi"
    shm = next(v for v in job["spec"]["template"]["spec"]["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
    assert {"resources.memory", "resources.sharedMemory"} <= eff(job_doc(model=SDXL)).defaulted
    grid = B.build_job(B.GRID, eff(grid_doc(model={"source": "builtin:sdxl-random"})), CFG)
    assert container(grid)["resources"]["limits"]["memory"] == "64Gi"


def test_sdxl_defaults_leave_the_resources_own_values_sd_cpu_and_toy_models_alone():
    own = {"gpusPerWorker": 1, "memory": "100Gi", "sharedMemory": "32Gi"}
    job = B.build_job(B.TIJOB, eff(job_doc(model=SDXL, resources=own)), CFG)
    assert container(job)["resources"]["limits"]["memory"] == "100Gi"
    assert next(v for v in job["spec"]["template"]["spec"]["volumes"] if v["name"] == "dshm")["emptyDir"]["sizeLimit"] == "32Gi"
    for doc in (job_doc(), job_doc(model=SDXL, resources={"gpusPerWorker": 0}), job_doc(model={"source": "builtin:tiny-xl"})):
        job = B.build_job(B.TIJOB, eff(doc), CFG)
        assert "memory" not in json.dumps(container(job)["resources"])
        assert "sizeLimit" not in json.dumps(job["spec"]["template"]["spec"]["volumes"])
    off = B.build_job(B.TIJOB, eff(job_doc(model=SDXL), CFG.replace(sdxl_memory=None, sdxl_shared_memory=None)), CFG)
    assert "memory" not in json.dumps(container(off)["resources"])
    # an operator default is not a spec change
    assert eff(job_doc(model=SDXL)).spec_hash == eff(job_doc(model=SDXL), CFG.replace(sdxl_memory="80Gi")).spec_hash


@pytest.mark.parametrize("source, sized", [
    ("stabilityai/stable-diffusion-xl-base-1.0", True), ("stabilityai/sdxl-turbo", True),
    ("RunDiffusion/Juggernaut-XL-v9", True), ("SG161222/RealVisXL_V4.0", True), ("s3://models/team/sdxl-base/", True),
    ("builtin:sdxl-random?seed=2", True), ("runwayml/stable-diffusion-v1-5", False), ("builtin:tiny-xl", False),
    ("s3://xl-bucket/models/sd15", False), ("file:///data/excel/pixlart", False),
])
def test_sdxl_sized_models_are_recognised_by_name(source, sized):
    from tinv.api.models import sdxl_sized

    assert sdxl_sized(source) is sized
