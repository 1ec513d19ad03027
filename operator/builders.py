"""Pure builders of the child objects: the resource document, the headless Service and the
batch/v1 Job (with the whole pod spec). No I/O, no clock, no kopf: same input, same output, so they
are unit-tested directly and creation can be retried safely.

The resource document travels inside the Job: a pod-template annotation that a downward-API volume
mounts at DOC_PATH, so a resource costs the apiserver one object, not two (a Job's pod template
never changes, and a new generation gets a new Job, so the copy is never stale). Only a document
too large for an annotation (a grid of thousands of prompts) gets a ConfigMap of its own, mounted
at the same path.

Names are deterministic (`<name>-train`, `<name>-grid`, shortened with a hash when the resource
name is long), every child carries an ownerReference to its resource (controller, blocking
deletion) and the same labels, so `kubectl get all -l tinv.io/owner-uid=<uid>` lists them and
deleting the resource deletes them.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from tinv.api.models import API_VERSION, GRID_KIND, PLURALS, RESOURCES, TIJOB_KIND, Annotation, ExitCode, Model, sdxl_sized
from tinv.api.storage import pvc_claims

from . import kueue as K
from .config import OperatorConfig

# kinds, plurals, annotation keys and exit codes are tinv.api's; the short names are re-exported here
TIJOB = TIJOB_KIND
GRID = GRID_KIND
MODELS: dict[str, type[Model]] = dict(RESOURCES)
SUFFIX = {TIJOB: "train", GRID: "grid"}
COMPONENT = {TIJOB: "trainer", GRID: "generator"}

GPU_RESOURCE = "nvidia.com/gpu"
MANAGED_BY = "tinv-operator"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_NAME = "app.kubernetes.io/name"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_KIND = "tinv.io/kind"
LABEL_OWNER_UID = "tinv.io/owner-uid"
LABEL_QUEUE = K.QUEUE_LABEL
ANNOTATION_SPEC_HASH = Annotation.SPEC_HASH
ANNOTATION_GENERATION = Annotation.RESOURCE_GENERATION
ANNOTATION_DOCUMENT = Annotation.RESOURCE_DOCUMENT
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"

DOC_DIR = "/etc/tinv"
DOC_KEY = "resource.yaml"
DOC_PATH = f"{DOC_DIR}/{DOC_KEY}"
#: The apiserver refuses an object whose annotations (keys and values) exceed 256 KiB in all. The
#: document travels in the pod template while it is at most DOC_INLINE_LIMIT bytes and leaves
#: ANNOTATION_HEADROOM for what the Job controller and admission add to each pod.
ANNOTATIONS_LIMIT = 256 * 1024
DOC_INLINE_LIMIT = 128 * 1024
ANNOTATION_HEADROOM = 16 * 1024
CACHE_DIR = "/cache"
PVC_ROOT = "/mnt/pvc"
TERMINATION_LOG = "/dev/termination-log"

#: The exit-code contract (tinv.api.models.ExitCode): 2 = bad config or input, never retried;
#: 75 = SIGTERM/pre-emption after a checkpoint was written, retried without counting.
EXIT_INVALID = ExitCode.INVALID
EXIT_PREEMPTED = ExitCode.PREEMPTED

#: activeDeadlineSeconds of a GPU workload whose spec sets none: a hung run (a stuck collective, a
#: dead storage mount) releases its GPUs after a day instead of holding them for ever. Textual
#: Inversion at SD 1.5/SDXL scale takes minutes to a few hours; set spec.runPolicy to go longer.
DEFAULT_GPU_DEADLINE_SECONDS = 24 * 3600

# Job names: the Job controller copies them into a label (<= 63) and, for Indexed Jobs, into pod
# hostnames `<job>-<index>` (a DNS label <= 63, index up to 127): keep them <= 56.
MAX_JOB_NAME = 56


class SpecError(ValueError):
    """The resource cannot be turned into a workload (a permanent, user-fixable problem)."""


# --------------------------------------------------------------------------- names and metadata


def _hash(text: str, n: int = 8) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def dns_label(name: str, limit: int = 63) -> str:
    """A DNS-1035 label derived from a resource name: '.' -> '-', starts with a letter, <= limit
    (long names keep a prefix plus a hash of the whole name, so they stay unique)."""
    base = re.sub(r"[^a-z0-9-]", "-", name.lower()).strip("-") or "x"
    if not base[0].isalpha():
        base = "t" + base
    if base != name or len(base) > limit:
        # changed or cut: a hash of the original keeps two names from mapping to one child
        base = f"{base[: limit - 9].rstrip('-')}-{_hash(name)}"
    return base


def child_name(kind: str, name: str) -> str:
    """The Job (and Service, ConfigMap) name of a resource: `<name>-train` / `<name>-grid`."""
    suffix = SUFFIX[kind]
    return f"{dns_label(name, MAX_JOB_NAME - len(suffix) - 1)}-{suffix}"


def label_value(value: str) -> str:
    if len(value) <= 63 and re.fullmatch(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?", value):
        return value
    return dns_label(value, 63)


def labels(kind: str, name: str, uid: str) -> dict[str, str]:
    return {
        LABEL_NAME: "tinv",
        LABEL_COMPONENT: COMPONENT[kind],
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_INSTANCE: label_value(name),
        LABEL_KIND: kind,
        LABEL_OWNER_UID: uid,
    }


def owner_reference(kind: str, name: str, uid: str) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": kind, "name": name, "uid": uid, "controller": True, "blockOwnerDeletion": True}


def _meta(kind: str, model: Model, name: str | None = None, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    m = model.metadata  # type: ignore[attr-defined]
    out: dict[str, Any] = {
        "name": name or child_name(kind, m.name),
        "namespace": m.namespace,
        "labels": labels(kind, m.name, m.uid or ""),
        "ownerReferences": [owner_reference(kind, m.name, m.uid or "")],
    }
    if annotations:
        out["annotations"] = annotations
    return out


# --------------------------------------------------------------------------- the resource document


@dataclass(frozen=True)
class Effective:
    """A resource with the operator's defaults filled in, and which fields came from defaults."""

    model: Any
    defaulted: frozenset[str] = field(default_factory=frozenset)
    spec_hash: str = ""


def effective(model: Any, config: OperatorConfig) -> Effective:
    """Fill the operator's defaults into a validated resource; raise SpecError when it cannot run."""
    doc = model.to_doc()
    spec = doc["spec"]
    defaulted: set[str] = set()
    storage = spec.setdefault("storage", {})
    if not storage.get("uri"):
        if not config.storage_uri:
            raise SpecError("spec.storage.uri: not set, and the operator has no default storage (--storage-uri); set spec.storage.uri")
        storage["uri"] = config.storage_uri
        defaulted.add("storage.uri")
    if not storage["uri"].startswith(("s3://", "pvc://", "file:///")):
        raise SpecError(
            f"spec.storage.uri: {storage['uri']!r} is a local path, which only works with `tinv run`; "
            "in a cluster use s3://bucket/prefix, pvc://claim/path or file:///absolute/path"
        )
    if not storage.get("endpoint") and config.storage_endpoint and storage["uri"].startswith("s3://"):
        storage["endpoint"] = config.storage_endpoint
        defaulted.add("storage.endpoint")
        if storage.get("addressingStyle", "auto") == "auto" and config.storage_addressing_style:
            storage["addressingStyle"] = config.storage_addressing_style
        if not storage.get("region") and config.storage_region:
            storage["region"] = config.storage_region
    if not storage.get("credentialsSecret") and config.storage_secret:
        storage["credentialsSecret"] = {
            "name": config.storage_secret,
            "accessKeyIdKey": config.storage_secret_access_key_id_key,
            "secretAccessKeyKey": config.storage_secret_secret_access_key_key,
        }
        defaulted.add("storage.credentialsSecret")
    resources = spec.setdefault("resources", {})
    gpus = resources.get("gpusPerWorker", 1)
    if not resources.get("gpuClass") and config.gpu_class and gpus > 0:
        resources["gpuClass"] = config.gpu_class
        defaulted.add("resources.gpuClass")
    if not resources.get("region") and config.region:
        resources["region"] = config.region
        defaulted.add("resources.region")
    if not resources.get("image"):
        resources["image"] = config.image
        defaulted.add("resources.image")
    if gpus > 0 and sdxl_sized(spec["model"]["source"]):
        for field_, value in (("memory", config.sdxl_memory), ("sharedMemory", config.sdxl_shared_memory)):
            if not resources.get(field_) and value:
                resources[field_] = value
                defaulted.add(f"resources.{field_}")
    run_policy = spec.setdefault("runPolicy", {})
    if run_policy.get("activeDeadlineSeconds") is None and gpus > 0:
        run_policy["activeDeadlineSeconds"] = DEFAULT_GPU_DEADLINE_SECONDS
        defaulted.add("runPolicy.activeDeadlineSeconds")
    model_src = spec.setdefault("model", {})
    if not model_src.get("cacheClaim") and config.model_cache_claim:
        model_src["cacheClaim"] = config.model_cache_claim
        defaulted.add("model.cacheClaim")
    try:
        filled = type(model).model_validate(doc)
    except Exception as err:  # a default the schema refuses (bad operator flag)
        raise SpecError(f"the operator's defaults make the resource invalid: {err}") from None
    return Effective(filled, frozenset(defaulted), spec_hash(model, config))


def spec_hash(model: Any, config: OperatorConfig) -> str:
    """Hash of what shapes the workload and may change after creation: the user's spec without
    spec.runPolicy (applied in place) plus the annotations copied to pods. Operator defaults are
    left out, so upgrading the operator does not flag every running Job as changed."""
    spec = model.spec.to_doc()
    spec.pop("runPolicy", None)
    annotations = {k: v for k, v in (model.metadata.annotations or {}).items() if any(k.startswith(p) for p in config.pod_annotation_prefixes)}
    return _hash(json.dumps({"spec": spec, "annotations": annotations}, sort_keys=True, separators=(",", ":")), 16)


def resource_document(kind: str, eff: Effective, resolved: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """What the pod runs: the validated, defaulted spec plus {name, namespace, uid, generation};
    for grids also status.resolvedEmbeddings. Only Secret *references*, never a secret value."""
    m = eff.model.metadata
    doc: dict[str, Any] = {
        "apiVersion": API_VERSION,
        "kind": kind,
        "metadata": {k: v for k, v in {"name": m.name, "namespace": m.namespace, "uid": m.uid, "generation": m.generation}.items() if v is not None},
        "spec": eff.model.spec.to_doc(),
    }
    if kind == GRID:
        doc["status"] = {"resolvedEmbeddings": list(resolved or [])}
    return doc


def resource_text(kind: str, eff: Effective, resolved: list[dict[str, Any]] | None = None) -> str:
    """The resource document as the file the pod reads (YAML)."""
    return yaml.safe_dump(resource_document(kind, eff, resolved), sort_keys=False, width=1000)


def fits_annotation(text: str, annotations: dict[str, str]) -> bool:
    """Whether the document can travel as one more pod annotation beside `annotations`."""
    size = len(text.encode())
    used = sum(len(k) + len(v.encode()) for k, v in annotations.items())
    return size <= DOC_INLINE_LIMIT and used + len(ANNOTATION_DOCUMENT) + size <= ANNOTATIONS_LIMIT - ANNOTATION_HEADROOM


def build_config_map(kind: str, eff: Effective, text: str) -> dict[str, Any]:
    """The ConfigMap of a document too large for a pod annotation (`text`: resource_text)."""
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(kind, eff.model), "data": {DOC_KEY: text}}


def config_map_of(job: dict[str, Any]) -> str | None:
    """The ConfigMap a built Job mounts the document from, or None (it carries the document)."""
    for vol in job["spec"]["template"]["spec"]["volumes"]:
        if vol["name"] == "resource":
            return (vol.get("configMap") or {}).get("name")
    return None


def build_service(kind: str, eff: Effective, config: OperatorConfig) -> dict[str, Any]:
    """Headless Service giving Indexed worker pods stable DNS names `<job>-<i>.<service>`."""
    m = eff.model.metadata
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(kind, eff.model),
        "spec": {
            "clusterIP": "None",
            "selector": {LABEL_OWNER_UID: m.uid or "", LABEL_COMPONENT: COMPONENT[kind]},
            "publishNotReadyAddresses": True,
            "ports": [{"name": "rendezvous", "port": config.master_port, "targetPort": config.master_port, "protocol": "TCP"}],
        },
    }


def needs_service(kind: str, model: Any) -> bool:
    return kind == TIJOB and model.spec.resources.workers > 1


# --------------------------------------------------------------------------- the Job


RENDEZVOUS_WRAPPER = """\
set -eu
if [ "${JOB_COMPLETION_INDEX:-0}" != "0" ]; then
  # Wait for the master's DNS record (the headless Service publishes it once pod 0 exists)
  # instead of crashing on the race; exit 69 (unavailable, retried) after the timeout.
  waited=0
  until python -c 'import socket, sys; socket.getaddrinfo(sys.argv[1], None)' "$MASTER_ADDR" 2>/dev/null; do
    if [ "$waited" -ge "$TINV_RENDEZVOUS_TIMEOUT" ]; then
      echo "tinv: master $MASTER_ADDR not resolvable after ${waited}s" | tee /dev/termination-log >&2
      exit 69
    fi
    sleep 2
    waited=$((waited + 2))
  done
fi
# tinv.trainer.launch, not torchrun: it keeps the trainer's exit code (2, 75, ...) for the
# podFailurePolicy and stops every pod's ranks when one fails (ops2, issue 14 item 5)
exec python -m tinv.trainer.launch --nnodes="$TINV_NNODES" --nproc-per-node="$TINV_NPROC_PER_NODE" \\
  --node-rank="$JOB_COMPLETION_INDEX" --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT" \\
  train "$TINV_RESOURCE_FILE"
"""


def command(kind: str, model: Any) -> list[str]:
    """The container command. A job: `tinv train` (torchrun for several GPUs or workers); a grid:
    `tinv generate --shard $(JOB_COMPLETION_INDEX)/<workers>` (Kubernetes expands $(VAR))."""
    r = model.spec.resources
    if kind == GRID:
        return ["tinv", "generate", DOC_PATH, "--shard", f"$(JOB_COMPLETION_INDEX)/{r.workers}"]
    if r.workers > 1:
        return ["/bin/sh", "-c", RENDEZVOUS_WRAPPER]
    if r.gpus_per_worker > 1:
        return ["python", "-m", "tinv.trainer.launch", f"--nproc-per-node={r.gpus_per_worker}", "train", DOC_PATH]
    return ["tinv", "train", DOC_PATH]


def pod_failure_policy(container: str) -> dict[str, Any]:
    """Exit-code classification: bad config (2) fails the Job at once; pre-emption (exit 75 after a
    checkpoint, or a pod with the DisruptionTarget condition) is retried without counting against
    backoffLimit; every other failure is retried and counted."""
    return {
        "rules": [
            {"action": "FailJob", "onExitCodes": {"containerName": container, "operator": "In", "values": [EXIT_INVALID]}},
            {"action": "Ignore", "onExitCodes": {"containerName": container, "operator": "In", "values": [EXIT_PREEMPTED]}},
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        ]
    }


def _secret_env(name: str, secret: str, key: str, optional: bool) -> dict[str, Any]:
    ref: dict[str, Any] = {"name": secret, "key": key}
    if optional:
        ref["optional"] = True
    return {"name": name, "valueFrom": {"secretKeyRef": ref}}


def _env(kind: str, eff: Effective, config: OperatorConfig, job: str) -> list[dict[str, Any]]:
    spec = eff.model.spec
    env: list[dict[str, Any]] = [
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "TINV_RESOURCE_FILE", "value": DOC_PATH},
        {"name": "TINV_TERMINATION_MESSAGE_PATH", "value": TERMINATION_LOG},
        {"name": "TINV_PVC_ROOT", "value": PVC_ROOT},
        {"name": "HF_HOME", "value": f"{CACHE_DIR}/huggingface"},
        {"name": "HF_HUB_DISABLE_TELEMETRY", "value": "1"},
        {"name": "TINV_POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "TINV_NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
    ]
    creds = spec.storage.credentials_secret
    if creds is not None:
        optional = "storage.credentialsSecret" in eff.defaulted
        env.append(_secret_env("AWS_ACCESS_KEY_ID", creds.name, creds.access_key_id_key, optional))
        env.append(_secret_env("AWS_SECRET_ACCESS_KEY", creds.name, creds.secret_access_key_key, optional))
    token = spec.model.token_secret_ref
    if token is not None:
        env.append(_secret_env("HF_TOKEN", token.name, token.key, False))
    elif config.hf_token_secret:
        env.append(_secret_env("HF_TOKEN", config.hf_token_secret, config.hf_token_key, True))
    r = spec.resources
    if kind == TIJOB and r.workers > 1:
        env += [
            {"name": "MASTER_ADDR", "value": f"{job}-0.{job}"},
            {"name": "MASTER_PORT", "value": str(config.master_port)},
            {"name": "TINV_NNODES", "value": str(r.workers)},
            {"name": "TINV_NPROC_PER_NODE", "value": str(max(1, r.gpus_per_worker))},
            {"name": "TINV_RENDEZVOUS_TIMEOUT", "value": str(config.rendezvous_timeout)},
        ]
    return env


def _uris(kind: str, spec: Any) -> list[str | None]:
    uris: list[str | None] = [spec.storage.uri, spec.model.source]
    if kind == TIJOB:
        uris += [c.images for c in spec.concepts]
        if spec.resume_from is not None:
            uris.append(spec.resume_from.checkpoint)
    else:
        uris += [e.uri for e in spec.embeddings]
    return uris


def _volumes(kind: str, eff: Effective, cm: str | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The pod's volumes and mounts; the document from the ConfigMap `cm`, or (None) from the pod's
    own annotation."""
    spec = eff.model.spec
    r = spec.resources
    shm: dict[str, Any] = {"medium": "Memory"}
    if r.shared_memory:
        shm["sizeLimit"] = r.shared_memory
    if cm is None:
        field_path = f"metadata.annotations['{ANNOTATION_DOCUMENT}']"
        document: dict[str, Any] = {"downwardAPI": {"items": [{"path": DOC_KEY, "fieldRef": {"fieldPath": field_path}}]}}
    else:
        document = {"configMap": {"name": cm, "items": [{"key": DOC_KEY, "path": DOC_KEY}]}}
    volumes: list[dict[str, Any]] = [
        {"name": "resource", **document},
        {"name": "dshm", "emptyDir": shm},
        {"name": "tmp", "emptyDir": {}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "resource", "mountPath": DOC_DIR, "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    if spec.model.cache_claim:
        volumes.append({"name": "model-cache", "persistentVolumeClaim": {"claimName": spec.model.cache_claim}})
    else:
        volumes.append({"name": "model-cache", "emptyDir": {}})
    mounts.append({"name": "model-cache", "mountPath": CACHE_DIR})
    for claim in pvc_claims(*_uris(kind, spec)):
        vol = f"pvc-{dns_label(claim, 59)}"
        volumes.append({"name": vol, "persistentVolumeClaim": {"claimName": claim}})
        mounts.append({"name": vol, "mountPath": f"{PVC_ROOT}/{claim}"})
    return volumes, mounts


def _affinity(eff: Effective, config: OperatorConfig) -> dict[str, Any] | None:
    r = eff.model.spec.resources
    exprs = []
    if r.gpu_class:
        exprs.append({"key": config.gpu_class_label, "operator": "In", "values": [r.gpu_class]})
    if r.region:
        exprs.append({"key": config.region_label, "operator": "In", "values": [r.region]})
    if not exprs:
        return None
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": exprs}]}}}


def _resources(eff: Effective) -> dict[str, Any]:
    r = eff.model.spec.resources
    amounts: dict[str, str] = {}
    if r.gpus_per_worker > 0:
        amounts[GPU_RESOURCE] = str(r.gpus_per_worker)
    if r.cpu:
        amounts["cpu"] = r.cpu
    if r.memory:
        amounts["memory"] = r.memory
    return {"requests": dict(amounts), "limits": dict(amounts)} if amounts else {}


def pod_annotations(model: Any, config: OperatorConfig, container: str) -> dict[str, str]:
    out = {"kubectl.kubernetes.io/default-container": container}
    for key, value in sorted((model.metadata.annotations or {}).items()):
        if any(key.startswith(p) for p in config.pod_annotation_prefixes):
            out[key] = value
    return out


def build_pod_template(kind: str, eff: Effective, config: OperatorConfig, document: str) -> dict[str, Any]:
    """The pod template; `document` (resource_text) rides along as an annotation where it fits."""
    model = eff.model
    m = model.metadata
    spec = model.spec
    r = spec.resources
    job = child_name(kind, m.name)
    container_name = COMPONENT[kind]
    annotations = pod_annotations(model, config, container_name)
    inline = fits_annotation(document, annotations)
    if inline:
        annotations[ANNOTATION_DOCUMENT] = document
    volumes, mounts = _volumes(kind, eff, None if inline else job)
    uid = config.run_as_user
    container: dict[str, Any] = {
        "name": container_name,
        "image": r.image or config.image,
        "imagePullPolicy": config.image_pull_policy,
        "command": command(kind, model),
        "env": _env(kind, eff, config, job),
        "resources": _resources(eff),
        "volumeMounts": mounts,
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "capabilities": {"drop": ["ALL"]},
            "runAsNonRoot": True,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    if kind == TIJOB and r.workers > 1:
        container["ports"] = [{"name": "rendezvous", "containerPort": config.master_port, "protocol": "TCP"}]
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": config.termination_grace_seconds,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": uid,
            "runAsGroup": uid,
            "fsGroup": uid,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }
    if config.worker_service_account:
        pod["serviceAccountName"] = config.worker_service_account
    if config.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": s} for s in config.image_pull_secrets]
    affinity = _affinity(eff, config)
    if affinity:
        pod["affinity"] = affinity
    if r.node_selector:
        pod["nodeSelector"] = dict(r.node_selector)
    tolerations = [t.to_doc() for t in r.tolerations]
    if r.gpus_per_worker > 0 and config.gpu_toleration:
        gpu_tol = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}
        if gpu_tol not in tolerations:
            tolerations.append(gpu_tol)
    if tolerations:
        pod["tolerations"] = tolerations
    if r.priority_class_name:
        pod["priorityClassName"] = r.priority_class_name
    if r.scheduler_name:
        pod["schedulerName"] = r.scheduler_name
    if kind == TIJOB and r.workers > 1:
        pod["subdomain"] = job
    return {
        "metadata": {"labels": labels(kind, m.name, m.uid or ""), "annotations": annotations},
        "spec": pod,
    }


def desired_suspend(model: Any) -> bool:
    """Whether the Job should be suspended: the user asked, or a Kueue queue admits it (Kueue
    expects queued Jobs to be created suspended and unsuspends them itself)."""
    return bool(model.spec.run_policy.suspend or model.spec.resources.queue_name)


def build_job(kind: str, eff: Effective, config: OperatorConfig, resolved: list[dict[str, Any]] | None = None,
              document: str | None = None) -> dict[str, Any]:
    """The batch/v1 Job of a resource. One worker: a plain Job; several workers (or any grid): an
    Indexed Job whose completion index is the worker rank (job) or the shard (grid). `document`:
    resource_text(kind, eff, resolved), when the caller has it already."""
    model = eff.model
    spec = model.spec
    r = spec.resources
    rp = spec.run_policy
    template = build_pod_template(kind, eff, config, resource_text(kind, eff, resolved) if document is None else document)
    indexed = kind == GRID or r.workers > 1
    annotations = {ANNOTATION_SPEC_HASH: eff.spec_hash, ANNOTATION_GENERATION: str(model.metadata.generation or 0)}
    meta = _meta(kind, model, annotations=annotations)
    meta["labels"].update(K.queue_label(r.queue_name, bool(rp.suspend)))  # Kueue hook: see operator/kueue.py
    job_spec: dict[str, Any] = {
        "completions": r.workers,
        "parallelism": r.workers,
        "completionMode": "Indexed" if indexed else "NonIndexed",
        "podFailurePolicy": pod_failure_policy(COMPONENT[kind]),
        "podReplacementPolicy": "Failed",
        "suspend": desired_suspend(model),
        "template": template,
    }
    if kind == GRID:
        job_spec["backoffLimitPerIndex"] = rp.backoff_limit  # a failed shard retries alone
    else:
        job_spec["backoffLimit"] = rp.backoff_limit
    if rp.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = rp.active_deadline_seconds
    if rp.ttl_seconds_after_finished is not None:
        job_spec["ttlSecondsAfterFinished"] = rp.ttl_seconds_after_finished
    if rp.managed_by:  # MultiKueue and other Job managers (ops2, issue 14 item 12)
        job_spec["managedBy"] = rp.managed_by
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": job_spec}


def job_run_policy_patch(kind: str, model: Any) -> dict[str, Any]:
    """The mutable run-policy fields of an existing Job, as a merge patch of its spec."""
    rp = model.spec.run_policy
    out: dict[str, Any] = {
        "activeDeadlineSeconds": rp.active_deadline_seconds,
        "ttlSecondsAfterFinished": rp.ttl_seconds_after_finished,
    }
    out["backoffLimitPerIndex" if kind == GRID else "backoffLimit"] = rp.backoff_limit
    return out


def children(kind: str, eff: Effective, config: OperatorConfig, resolved: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Every child object in creation order: the ConfigMap (only for a document too large for a pod
    annotation), the Service (several workers), the Job."""
    text = resource_text(kind, eff, resolved)
    job = build_job(kind, eff, config, document=text)
    out = [build_config_map(kind, eff, text)] if config_map_of(job) else []
    if needs_service(kind, eff.model):
        out.append(build_service(kind, eff, config))
    out.append(job)
    return out
