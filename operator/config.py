"""Operator configuration: command-line flags, each with an environment-variable fallback.

    tinv operator --namespace team-a --image ghcr.io/tinv/trainer:0.1.0 --gpu-class A100_PCIE_80GB --region ORD1 \
                  --storage-uri s3://tinv-runs --storage-endpoint https://object.ord1.coreweave.com \
                  --storage-secret tinv-s3

Precedence: flag > environment variable > default. Every flag is listed by `tinv operator --help`
(with its variable). The operator's OWN object-storage credentials (used only to read
progress.json and checkpoint manifests) come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY;
pods never get them: pods get the resource's (or the default) credentials Secret by reference.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields
import re
from typing import Any, Mapping

from tinv.api.models import QUANTITY

DEFAULT_GPU_CLASS_LABEL = "gpu.nvidia.com/class"
DEFAULT_REGION_LABEL = "topology.kubernetes.io/region"


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("tinv")
    except Exception:  # noqa: BLE001 - not installed
        return "latest"


DEFAULT_IMAGE = f"ghcr.io/tinv/trainer:{_version()}"


@dataclass(frozen=True)
class OperatorConfig:
    """Everything the operator is configured with. Pure data: builders read it, never the environment."""

    namespaces: tuple[str, ...] = ()
    image: str = DEFAULT_IMAGE
    image_pull_policy: str = "IfNotPresent"
    image_pull_secrets: tuple[str, ...] = ()
    # placement (CoreWeave): defaults for spec.resources.gpuClass / region and the node label keys
    gpu_class: str | None = None
    region: str | None = None
    gpu_class_label: str = DEFAULT_GPU_CLASS_LABEL
    region_label: str = DEFAULT_REGION_LABEL
    gpu_toleration: bool = True
    # storage defaults filled into the resource document
    storage_uri: str | None = None
    storage_endpoint: str | None = None
    storage_addressing_style: str | None = None
    storage_region: str | None = None
    storage_secret: str | None = None
    storage_secret_access_key_id_key: str = "AWS_ACCESS_KEY_ID"
    storage_secret_secret_access_key_key: str = "AWS_SECRET_ACCESS_KEY"
    # model defaults
    hf_token_secret: str | None = None
    hf_token_key: str = "token"
    model_cache_claim: str | None = None
    # SDXL-sized models (tinv.api.models.sdxl_sized) on GPUs: memory per worker and /dev/shm size when
    # the resource sets none. Loading SDXL's ~7 GB of weights and its data loader's workers need more
    # than a node's default share; None leaves the resource's values (or none) as they are.
    sdxl_memory: str | None = "64Gi"
    sdxl_shared_memory: str | None = "16Gi"
    # pods
    worker_service_account: str | None = None
    run_as_user: int = 1000
    termination_grace_seconds: int = 120
    rendezvous_timeout: int = 600
    master_port: int = 29500
    pod_annotation_prefixes: tuple[str, ...] = ()
    # the operator process
    poll_interval: float = 15.0
    poll_workers: int = 16
    # storage reads of the poller (issue 14 item 6): one namespace must not stall or exhaust them
    storage_read_timeout: float = 10.0
    storage_max_object_bytes: int = 1 << 20
    storage_max_clients: int = 32
    allowed_storage_endpoints: tuple[str, ...] = ()
    # operator-level policy (operator/policy.py; issue 14 item 8): glob patterns, empty = anything
    allowed_images: tuple[str, ...] = ()
    allowed_priority_classes: tuple[str, ...] = ()
    allowed_schedulers: tuple[str, ...] = ()
    allowed_secrets: tuple[str, ...] = ()
    allowed_toleration_keys: tuple[str, ...] = ()
    allowed_node_selector_keys: tuple[str, ...] = ()
    api_workers: int = 16
    status_workers: int = 6
    status_batch_interval: float = 0.5
    status_min_interval: float = 2.0
    metrics_port: int = 9090
    health_port: int = 8080
    cleanup_retries: int = 5
    cluster_scan: bool = False
    # high availability (operator/leader.py): one active replica, the others on standby
    leader_election: bool = False
    leader_election_namespace: str | None = None
    leader_election_lease: str = "tinv-operator"
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0
    cluster_wide: bool = False
    log_level: str = "INFO"
    extra: Mapping[str, Any] = field(default_factory=dict)

    def replace(self, **changes: Any) -> "OperatorConfig":
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return OperatorConfig(**values)


# flag -> (attribute, environment variable, type, help)
_FLAGS: list[tuple[str, str, str, Any, str]] = [
    ("--image", "image", "TINV_TRAINER_IMAGE", str, "trainer image the worker pods run (spec.resources.image overrides)"),
    ("--image-pull-policy", "image_pull_policy", "TINV_TRAINER_IMAGE_PULL_POLICY", str, "imagePullPolicy of worker pods"),
    ("--gpu-class", "gpu_class", "TINV_DEFAULT_GPU_CLASS", str, "default GPU class (node label value) when a resource names none"),
    ("--region", "region", "TINV_DEFAULT_REGION", str, "default region (node label value) when a resource names none"),
    ("--gpu-class-label", "gpu_class_label", "TINV_GPU_CLASS_LABEL", str, "node label key of the GPU class"),
    ("--region-label", "region_label", "TINV_REGION_LABEL", str, "node label key of the region"),
    ("--storage-uri", "storage_uri", "TINV_DEFAULT_STORAGE_URI", str, "default storage.uri (s3://bucket/prefix, file:///path, pvc://claim/path)"),
    ("--storage-endpoint", "storage_endpoint", "TINV_DEFAULT_STORAGE_ENDPOINT", str, "default S3 endpoint URL"),
    ("--storage-addressing-style", "storage_addressing_style", "TINV_DEFAULT_ADDRESSING_STYLE", str, "default S3 addressing style (auto, path, virtual)"),
    ("--storage-region", "storage_region", "TINV_DEFAULT_STORAGE_REGION", str, "default S3 region name"),
    ("--storage-secret", "storage_secret", "TINV_DEFAULT_STORAGE_SECRET", str, "default Secret with S3 credentials for pods (keys AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)"),
    ("--hf-token-secret", "hf_token_secret", "TINV_HF_TOKEN_SECRET", str, "default Secret with a Hugging Face token for pods, NAME or NAME:KEY (key default 'token')"),
    ("--hf-token-key", "hf_token_key", "TINV_HF_TOKEN_KEY", str, "key of the Hugging Face token in that Secret"),
    ("--model-cache-claim", "model_cache_claim", "TINV_MODEL_CACHE_CLAIM", str, "default PersistentVolumeClaim mounted as the model cache"),
    ("--sdxl-memory", "sdxl_memory", "TINV_SDXL_MEMORY", str, "memory per worker for SDXL-sized models on GPUs when resources.memory is unset ('none': no default)"),
    ("--sdxl-shared-memory", "sdxl_shared_memory", "TINV_SDXL_SHARED_MEMORY", str, "/dev/shm size for SDXL-sized models on GPUs when resources.sharedMemory is unset ('none': no default)"),
    ("--worker-service-account", "worker_service_account", "TINV_WORKER_SERVICE_ACCOUNT", str, "ServiceAccount of worker pods (its token is never mounted)"),
    ("--run-as-user", "run_as_user", "TINV_RUN_AS_USER", int, "uid (and gid) worker pods run as"),
    ("--termination-grace-seconds", "termination_grace_seconds", "TINV_TERMINATION_GRACE_SECONDS", int, "time a worker gets to checkpoint after SIGTERM"),
    ("--rendezvous-timeout", "rendezvous_timeout", "TINV_RENDEZVOUS_TIMEOUT", int, "seconds a worker waits for the master's DNS name before exiting 69 (retried)"),
    ("--master-port", "master_port", "TINV_MASTER_PORT", int, "port of rank 0's rendezvous in multi-worker jobs (the launchers' control store uses the next one)"),
    ("--poll-interval", "poll_interval", "TINV_POLL_INTERVAL", float, "seconds between reads of progress.json and checkpoint manifests"),
    ("--poll-workers", "poll_workers", "TINV_POLL_WORKERS", int, "threads reading object storage (one pool for all resources)"),
    ("--storage-read-timeout", "storage_read_timeout", "TINV_STORAGE_READ_TIMEOUT", float, "seconds one read of progress.json or a manifest may take (one attempt; retried next round)"),
    ("--storage-max-object-bytes", "storage_max_object_bytes", "TINV_STORAGE_MAX_OBJECT_BYTES", int, "largest progress.json or manifest.json the operator reads; a larger one is refused by name"),
    ("--storage-max-clients", "storage_max_clients", "TINV_STORAGE_MAX_CLIENTS", int, "S3 clients (endpoints) kept at once; the least recently used is closed"),
    ("--api-workers", "api_workers", "TINV_API_WORKERS", int, "threads reconciling resources into Jobs (kopf's handler pool)"),
    ("--status-workers", "status_workers", "TINV_STATUS_WORKERS", int, "threads writing status and Events (fewer than --api-workers: creating Jobs comes first)"),
    ("--status-min-interval", "status_min_interval", "TINV_STATUS_MIN_INTERVAL", float, "least seconds between two status writes of one resource (changes in between are merged)"),
    ("--metrics-port", "metrics_port", "TINV_METRICS_PORT", int, "Prometheus /metrics port (0: off)"),
    ("--health-port", "health_port", "TINV_HEALTH_PORT", int, "kopf liveness endpoint port, http://:PORT/healthz (0: off)"),
    ("--cleanup-retries", "cleanup_retries", "TINV_CLEANUP_RETRIES", int, "attempts to delete outputs (storage.cleanupOnDelete) before giving up with a warning"),
    ("--leader-election-namespace", "leader_election_namespace", "TINV_LEADER_ELECTION_NAMESPACE", str, "namespace of the leader Lease (default: POD_NAMESPACE, else the first watched namespace)"),
    ("--leader-election-lease", "leader_election_lease", "TINV_LEADER_ELECTION_LEASE", str, "name of the leader Lease"),
    ("--lease-duration", "lease_duration", "TINV_LEASE_DURATION", float, "seconds a standby waits after the leader's last renewal before taking over"),
    ("--renew-deadline", "renew_deadline", "TINV_RENEW_DEADLINE", float, "seconds the leader keeps trying to renew before it stops (less than --lease-duration)"),
    ("--retry-period", "retry_period", "TINV_RETRY_PERIOD", float, "seconds between renewals and between a standby's attempts"),
    ("--log-level", "log_level", "TINV_LOG_LEVEL", str, "DEBUG, INFO, WARNING or ERROR"),
]


# repeatable list flags: flag -> (attribute, environment variable (comma-separated), help)
_LIST_FLAGS: list[tuple[str, str, str, str]] = [
    ("--allowed-storage-endpoint", "allowed_storage_endpoints", "TINV_ALLOWED_STORAGE_ENDPOINTS",
     "the only spec.storage.endpoint values allowed (URL, or host name for any scheme/port)"),
    ("--allowed-image", "allowed_images", "TINV_POLICY_ALLOWED_IMAGES", "glob pattern of images spec.resources.image may name"),
    ("--allowed-priority-class", "allowed_priority_classes", "TINV_POLICY_ALLOWED_PRIORITY_CLASSES", "PriorityClass (glob) spec.resources.priorityClassName may name"),
    ("--allowed-scheduler", "allowed_schedulers", "TINV_POLICY_ALLOWED_SCHEDULERS", "scheduler (glob) spec.resources.schedulerName may name"),
    ("--allowed-secret", "allowed_secrets", "TINV_POLICY_ALLOWED_SECRETS", "Secret (glob) a resource may expose to its pods (credentials, Hugging Face token)"),
    ("--allowed-toleration-key", "allowed_toleration_keys", "TINV_POLICY_ALLOWED_TOLERATION_KEYS", "taint key (glob) spec.resources.tolerations may tolerate ('*' allows a key-less toleration)"),
    ("--allowed-node-selector-key", "allowed_node_selector_keys", "TINV_POLICY_ALLOWED_NODE_SELECTOR_KEYS", "node label key (glob) spec.resources.nodeSelector may use"),
]


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def _split(value: str | None) -> tuple[str, ...]:
    return tuple(v.strip() for v in (value or "").replace(";", ",").split(",") if v.strip())


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tinv operator",
        description="Run the tinv operator (kopf): reconcile TextualInversionJobs and GenerationGrids into GPU Jobs.",
        epilog="Each flag falls back to the environment variable in brackets. The operator's own object-storage "
        "credentials (to read progress) come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.",
    )
    p.add_argument(
        "-n", "--namespace", action="append", dest="namespaces", metavar="NS",
        help="namespace to watch; repeat or comma-separate for several [TINV_NAMESPACES, else POD_NAMESPACE]",
    )
    for flag, attr, env, typ, help_ in _FLAGS:
        p.add_argument(flag, dest=attr, type=typ, default=None, help=f"{help_} [{env}]")
    p.add_argument("--image-pull-secret", action="append", dest="image_pull_secrets", metavar="NAME",
                   help="imagePullSecret of worker pods; repeatable [TINV_IMAGE_PULL_SECRETS]")
    p.add_argument("--pod-annotation-prefix", action="append", dest="pod_annotation_prefixes", metavar="PREFIX",
                   help="copy the resource's annotations with this key prefix to its pods; repeatable [TINV_POD_ANNOTATION_PREFIXES]")
    for flag, attr, env, help_ in _LIST_FLAGS:
        p.add_argument(flag, action="append", dest=attr, metavar="VALUE", help=f"{help_}; repeatable; none given: anything [{env}]")
    p.add_argument("--no-gpu-toleration", action="store_true", default=None,
                   help="do not add the toleration nvidia.com/gpu:NoSchedule to GPU pods [TINV_NO_GPU_TOLERATION]")
    p.add_argument("--leader-election", action="store_true", default=None,
                   help="run several replicas: the one holding the leader Lease is active, the others wait [TINV_LEADER_ELECTION]")
    p.add_argument("--cluster-wide", action="store_true", default=None,
                   help="watch every namespace (needs a ClusterRole) instead of --namespace [TINV_CLUSTER_WIDE]")
    p.add_argument("--cluster-scan", action="store_true", default=None,
                   help="let kopf watch namespaces and CRDs cluster-wide (needs cluster RBAC) [TINV_CLUSTER_SCAN]")
    return p


def from_args(argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> OperatorConfig:
    """Build the configuration from flags (argv without the command name) and the environment."""
    env = dict(os.environ if env is None else env)
    args = parser().parse_args(argv or [])
    values: dict[str, Any] = {}
    for _flag, attr, var, typ, _help in _FLAGS:
        value = getattr(args, attr)
        if value is None and env.get(var) not in (None, ""):
            value = typ(env[var])
        if value is not None:
            values[attr] = value
    namespaces: list[str] = []
    for item in args.namespaces or []:
        namespaces += _split(item)
    if not namespaces:
        namespaces = list(_split(env.get("TINV_NAMESPACES"))) or list(_split(env.get("POD_NAMESPACE")))
    values["namespaces"] = tuple(dict.fromkeys(namespaces))
    values["image_pull_secrets"] = tuple(args.image_pull_secrets or _split(env.get("TINV_IMAGE_PULL_SECRETS")))
    for _flag, attr, var, _help in _LIST_FLAGS:
        values[attr] = tuple(getattr(args, attr) or _split(env.get(var)))
    values["pod_annotation_prefixes"] = tuple(args.pod_annotation_prefixes or _split(env.get("TINV_POD_ANNOTATION_PREFIXES")))
    if args.no_gpu_toleration or _truthy(env.get("TINV_NO_GPU_TOLERATION")):
        values["gpu_toleration"] = False
    if args.leader_election or _truthy(env.get("TINV_LEADER_ELECTION")):
        values["leader_election"] = True
        values.setdefault("leader_election_namespace", env.get("POD_NAMESPACE") or (values["namespaces"][:1] or (None,))[0])
    if args.cluster_wide or _truthy(env.get("TINV_CLUSTER_WIDE")):
        values["cluster_wide"] = True
    if args.cluster_scan or _truthy(env.get("TINV_CLUSTER_SCAN")):
        values["cluster_scan"] = True
    if values.get("log_level"):
        values["log_level"] = str(values["log_level"]).upper()
    for attr in ("sdxl_memory", "sdxl_shared_memory"):
        if str(values.get(attr, "")).lower() == "none":
            values[attr] = None
    hf = values.get("hf_token_secret")
    if hf and ":" in hf:
        values["hf_token_secret"], values["hf_token_key"] = hf.split(":", 1)
    config = OperatorConfig(**values)
    problems = check(config)
    if problems:
        parser().error("; ".join(problems))
    return config


def check(config: OperatorConfig) -> list[str]:
    problems = []
    if config.poll_interval <= 0:
        problems.append("--poll-interval must be positive")
    if config.storage_read_timeout <= 0 or config.storage_max_object_bytes < 1024 or config.storage_max_clients < 1:
        problems.append("--storage-read-timeout must be positive, --storage-max-object-bytes at least 1024, --storage-max-clients at least 1")
    if config.poll_workers < 1 or config.api_workers < 1 or config.status_workers < 1:
        problems.append("--poll-workers, --api-workers and --status-workers must be at least 1")
    if config.storage_addressing_style not in (None, "auto", "path", "virtual"):
        problems.append("--storage-addressing-style must be auto, path or virtual")
    if config.leader_election and not (0 < config.retry_period < config.renew_deadline < config.lease_duration):
        problems.append("leader election needs 0 < --retry-period < --renew-deadline < --lease-duration")
    if config.leader_election and not config.leader_election_namespace:
        problems.append("--leader-election needs --leader-election-namespace (or POD_NAMESPACE)")
    for flag, value in (("--sdxl-memory", config.sdxl_memory), ("--sdxl-shared-memory", config.sdxl_shared_memory)):
        if value is not None and not re.fullmatch(QUANTITY, value):
            problems.append(f"{flag} must be a Kubernetes quantity such as 64Gi, or 'none'")
    if config.image_pull_policy not in ("Always", "IfNotPresent", "Never"):
        problems.append("--image-pull-policy must be Always, IfNotPresent or Never")
    return problems
