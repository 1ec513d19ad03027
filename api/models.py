"""The tinv contract: TextualInversionJob and GenerationGrid, spec and status.

These pydantic models are the single source of truth. From them come the CRD's structural
OpenAPI schema (`tinv.api.crdgen`), the offline validation (`tinv.api.validation`), the
trainer's config and the operator's view of a resource. Field names are snake_case in
Python and camelCase in YAML. Every field's description says what it means and its default.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import ConfigDict, Field

from ._base import Model, Rule, cel, immutable

GROUP = "tinv.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# Kubernetes patterns, RE2- and Rust-regex compatible.
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
QUANTITY = r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
UUID = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"

URI_RULE = Rule(
    # A scheme must be spelled out in full and name what it needs (a bucket, a claim, an absolute
    # path): 's3:/bad', 's3://', 'file://relative' or 'http://x' can never work, in a cluster or
    # locally, so the apiserver refuses them instead of failing after creation. A plain path (no
    # scheme) stays valid for `tinv run`; the operator refuses it with a condition in a cluster.
    # A single-letter "scheme" is a Windows drive (C:/data).
    "self.matches('^(s3://[^/]+|pvc://[^/]+|file:///)') || !self.matches('^[A-Za-z][-A-Za-z0-9+.]+:')",
    "must be s3://bucket/prefix, pvc://claim/path, file:///absolute/path or a local path (a scheme needs '://' and a bucket, claim or absolute path)",
)

SchedulerName = Literal[
    "ddim", "ddpm", "pndm", "lms", "euler", "euler-ancestral", "heun", "dpm-solver++", "dpm-solver++-karras", "unipc"
]
Precision = Literal["auto", "bf16", "fp16", "fp32"]


# --------------------------------------------------------------------------- shared pieces


class SecretKeyRef(Model):
    """A key of a Secret in the resource's namespace; its value reaches pods only as an env var."""

    name: str = Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN, description="Name of the Secret; required.")
    key: str = Field(min_length=1, max_length=253, description="Key inside the Secret; required.")


class ModelSource(Model):
    """Where the base Stable Diffusion weights come from."""

    source: str = Field(
        min_length=1,
        max_length=1024,
        description=(
            "The base model: a Hugging Face id such as 'runwayml/stable-diffusion-v1-5' or "
            "'stabilityai/stable-diffusion-xl-base-1.0', a diffusers folder (SD 1.x, 2.x or SDXL, recognised from its "
            "components) at s3://bucket/prefix, pvc://claim/path or a local path, or 'builtin:tiny' for the tiny random-weight "
            "model built in code (also 'builtin:tiny-v', 'builtin:sd15-random', and the SDXL ones 'builtin:tiny-xl', "
            "'builtin:sdxl-random'), or 'builtin:shapes' for the small model tinv trained on its shapes world; required."
        ),
    )
    revision: str | None = Field(
        default=None, max_length=256, description="Hugging Face revision (branch, tag or commit); default: the hub's main."
    )
    variant: str | None = Field(
        default=None, max_length=64, description="Weights variant to load, e.g. 'fp16'; default: the full-precision files."
    )
    token_secret_ref: SecretKeyRef | None = Field(
        default=None, description="Secret key holding a Hugging Face token for gated models; default: no token."
    )
    vae: str | None = Field(
        default=None,
        max_length=1024,
        description=(
            "A VAE to use instead of the model's: a Hugging Face id or a diffusers AutoencoderKL folder (s3://, pvc:// or a "
            "local path), e.g. 'madebyollin/sdxl-vae-fp16-fix' so that SDXL's VAE runs in fp16 when rendering; default: the "
            "model's own (SDXL's stock VAE then decodes in fp32 under fp16). Training always encodes its cached latents in fp32."
        ),
    )
    cache_claim: str | None = Field(
        default=None,
        max_length=253,
        pattern=DNS_SUBDOMAIN,
        description="PersistentVolumeClaim mounted as the model cache, so weights are fetched once per namespace; default: none (an emptyDir).",
    )

    __cel__ = (
        Rule(
            "self.source.startsWith('builtin:') ? self.source.matches('^builtin:((tiny|tiny-v|sd15-random|tiny-xl|sdxl-random)([?]seed=[0-9]+)?|shapes)$') : true",
            "builtin models are 'builtin:tiny', 'builtin:tiny-v' (v-prediction), 'builtin:sd15-random' (benchmarks), the SDXL ones"
            " 'builtin:tiny-xl' and 'builtin:sdxl-random' (benchmarks), optionally with '?seed=N', and 'builtin:shapes' (the trained shapes model)",
            field_path=".source",
        ),
    )


#: SDXL-sized models recognised by name alone (the operator never reads the weights): SDXL's own
#: ids ('stabilityai/stable-diffusion-xl-base-1.0', 'stabilityai/sdxl-turbo'), the common fine-tunes
#: ('.../Juggernaut-XL-v9', '.../RealVisXL_V4.0', '.../animagine-xl-3.1') and builtin:sdxl-random.
#: builtin:tiny-xl is SDXL's architecture at toy size, so it is not SDXL-sized.
_SDXL_NAME = re.compile(r"sdxl|(?<![a-z])xl(?![a-z])|(?<=[a-z])xl(?=[-_./]|$)", re.IGNORECASE)


def sdxl_sized(source: str) -> bool:
    """Whether a model source names an SDXL-sized model (the operator's SDXL resource defaults)."""
    if source.startswith("builtin:"):
        return source.split("?", 1)[0] == "builtin:sdxl-random"
    # a hub id is owner/name; for a folder only its last two parts name the model (not the bucket)
    return bool(_SDXL_NAME.search("/".join(source.rstrip("/").split("/")[-2:])))


class Toleration(Model):
    """A pod toleration, as in core/v1."""

    key: str | None = Field(default=None, max_length=317, description="Taint key to tolerate; default: all keys (with operator Exists).")
    operator: Literal["Exists", "Equal"] = Field(default="Equal", description="How key and value are compared; default Equal.")
    value: str | None = Field(default=None, max_length=63, description="Taint value to match with operator Equal; default: empty.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to tolerate; default: all effects."
    )
    toleration_seconds: int | None = Field(
        default=None, ge=0, description="How long a NoExecute taint is tolerated; default: forever."
    )


class Resources(Model):
    """What each worker gets and where it may run (CoreWeave placement by GPU class and region)."""

    gpus_per_worker: int = Field(default=1, ge=0, le=16, description="GPUs per worker pod (nvidia.com/gpu); 0 runs on CPU; default 1.")
    workers: int = Field(
        default=1,
        ge=1,
        le=128,
        description="Worker pods: training nodes for a job (torch.distributed), parallel shards for a grid; default 1.",
    )
    gpu_class: str | None = Field(
        default=None,
        max_length=63,
        pattern=LABEL_VALUE,
        description="CoreWeave GPU class (node label gpu.nvidia.com/class), e.g. A100_PCIE_80GB, A40, RTX_A6000; default: the operator's default class, if any.",
    )
    region: str | None = Field(
        default=None,
        max_length=63,
        pattern=LABEL_VALUE,
        description="CoreWeave region (node label topology.kubernetes.io/region), e.g. ORD1, LAS1, LGA1; default: the operator's default region, if any.",
    )
    cpu: str | None = Field(default=None, pattern=QUANTITY, description="CPU request and limit per worker, e.g. '8'; default: unset.")
    memory: str | None = Field(default=None, pattern=QUANTITY, description="Memory request and limit per worker, e.g. '48Gi'; default: unset, or the operator's SDXL default (64Gi) for an SDXL-sized model on GPUs.")
    shared_memory: str | None = Field(
        default=None,
        pattern=QUANTITY,
        description="Size limit of the memory-backed /dev/shm volume, e.g. '16Gi'; default: no limit beyond the pod's memory, or the operator's SDXL default (16Gi) for an SDXL-sized model on GPUs.",
    )
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32, description="Pod tolerations; default none.")
    node_selector: dict[Annotated[str, Field(max_length=317)], Annotated[str, Field(max_length=63)]] = Field(
        default_factory=dict, max_length=32, description="Extra node labels a worker's node must have; default none."
    )
    priority_class_name: str | None = Field(
        default=None, max_length=253, pattern=DNS_SUBDOMAIN, description="PriorityClass of the worker pods; default: the cluster default."
    )
    scheduler_name: str | None = Field(
        default=None, max_length=253, description="Scheduler of the worker pods; default: the cluster's default scheduler."
    )
    queue_name: str | None = Field(
        default=None,
        max_length=63,
        pattern=LABEL_VALUE,
        description="Kueue LocalQueue name, set as label kueue.x-k8s.io/queue-name on the child Job; default: no queue.",
    )
    image: str | None = Field(
        default=None, max_length=512, description="Worker image override; default: the trainer image the operator was installed with."
    )


class StorageCredentials(Model):
    """A Secret with S3 credentials, passed to pods as env vars only."""

    name: str = Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN, description="Name of the Secret; required.")
    access_key_id_key: str = Field(
        default="AWS_ACCESS_KEY_ID", min_length=1, max_length=253, description="Key holding the access key id; default AWS_ACCESS_KEY_ID."
    )
    secret_access_key_key: str = Field(
        default="AWS_SECRET_ACCESS_KEY",
        min_length=1,
        max_length=253,
        description="Key holding the secret access key; default AWS_SECRET_ACCESS_KEY.",
    )


class Storage(Model):
    """Where checkpoints, progress and images are written (see the storage layout in docs/architecture.md)."""

    uri: str | None = Field(
        default=None,
        max_length=1024,
        description="Root for outputs: s3://bucket/prefix, pvc://claim/path or file:///path; default: the operator's default, or ./tinv-runs when run locally.",
        json_schema_extra=cel(URI_RULE),
    )
    endpoint: str | None = Field(
        default=None,
        max_length=1024,
        pattern=r"^https?://",
        description="S3 endpoint URL, e.g. https://object.ord1.coreweave.com or https://cwobject.com; default: the operator's default, else AWS.",
    )
    addressing_style: Literal["auto", "path", "virtual"] = Field(
        default="auto", description="S3 bucket addressing; CoreWeave AI Object Storage needs 'virtual'; default auto."
    )
    region: str | None = Field(default=None, max_length=64, description="S3 region name; default: the client's default.")
    credentials_secret: StorageCredentials | None = Field(
        default=None, description="Secret with S3 credentials; default: the operator's default Secret, if any."
    )
    cleanup_on_delete: bool = Field(
        default=False, description="Delete this resource's outputs from storage when it is deleted; default false (outputs are kept)."
    )


class RunPolicy(Model):
    """How the child workload runs, retries and is cleaned up."""

    suspend: bool = Field(
        default=False, description="Suspend the workload: pods are deleted, checkpoints kept; unsuspending resumes from the newest; default false."
    )
    backoff_limit: int = Field(
        default=3, ge=0, le=100, description="Retries after a retryable failure (pre-emption, node loss, SIGTERM); default 3."
    )
    active_deadline_seconds: int | None = Field(
        default=None, ge=1, description="Wall-clock limit of the whole run in seconds; default: none."
    )
    ttl_seconds_after_finished: int | None = Field(
        default=None, ge=0, description="Delete the finished child Job (not the resource, not outputs) after this many seconds; default: keep."
    )
    managed_by: str | None = Field(
        default=None,
        max_length=63,
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$",
        description="spec.managedBy of the child Job, e.g. kueue.x-k8s.io/multikueue (MultiKueue runs it in a worker cluster); "
        "default: the Job controller of this cluster.",
        json_schema_extra=cel(immutable("spec.runPolicy.managedBy")),
    )


class Condition(Model):
    """A status condition in the metav1.Condition shape."""

    model_config = ConfigDict(extra="ignore")

    type: str = Field(max_length=316, description="Condition type, e.g. Accepted, Waiting, Scheduled, Running, Succeeded, Failed, Suspended.")
    status: Literal["True", "False", "Unknown"] = Field(description="Whether the condition holds.")
    reason: str = Field(default="", max_length=1024, description="CamelCase machine-readable reason.")
    message: str = Field(default="", max_length=32768, description="Human-readable detail a user can act on.")
    last_transition_time: str | None = Field(default=None, description="When the status last changed (RFC 3339).")
    observed_generation: int | None = Field(default=None, ge=0, description="The metadata.generation this condition was computed from.")


class ConditionType:
    """Named condition types, shared by both resources."""

    ACCEPTED = "Accepted"
    WAITING = "Waiting"
    SCHEDULED = "Scheduled"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"
    # queued resources (spec.resources.queueName): mirrored from the Kueue Workload of the child Job
    QUOTA_RESERVED = "QuotaReserved"
    ADMITTED = "Admitted"
    ALL = (ACCEPTED, WAITING, SCHEDULED, RUNNING, SUCCEEDED, FAILED, SUSPENDED, QUOTA_RESERVED, ADMITTED)


class Reason:
    """Named condition reasons a user can act on."""

    VALID = "Valid"
    INVALID_SPEC = "InvalidSpec"
    SECRET_MISSING = "SecretMissing"
    STORAGE_UNREACHABLE = "StorageUnreachable"
    WAITING_FOR_JOB = "WaitingForJob"
    WAITING_FOR_CHECKPOINT = "WaitingForCheckpoint"
    JOB_CREATED = "JobCreated"
    PODS_SCHEDULED = "PodsScheduled"
    UNSCHEDULABLE = "Unschedulable"
    IMAGE_PULL_BACK_OFF = "ImagePullBackOff"
    TRAINING = "Training"
    GENERATING = "Generating"
    COMPLETED = "Completed"
    BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded"
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    NON_RETRYABLE_EXIT = "NonRetryableExit"
    SUSPENDED_BY_USER = "SuspendedByUser"
    RESUMED = "Resumed"
    QUEUED = "Queued"
    PREEMPTED = "Preempted"  # Kueue evicted the Workload for a higher-priority one
    RESOLVED = "Resolved"
    SPEC_CHANGE_PENDING = "SpecChangePending"
    STARTING = "Starting"
    RETRYING = "Retrying"
    CONTAINER_CONFIG_ERROR = "CreateContainerConfigError"
    CHECKPOINT_RECORDED = "CheckpointRecorded"
    OUTPUTS_DELETED = "OutputsDeleted"
    OUTPUTS_KEPT = "OutputsKept"
    # operator issue 14: lost Jobs, terminating pods, deletion, grid references
    JOB_DELETED = "JobDeleted"
    JOB_FAILED = "JobFailed"
    WAITING_FOR_PODS = "WaitingForPods"
    DELETING = "Deleting"
    CHECKPOINT_NOT_FOUND = "CheckpointNotFound"
    NO_CHECKPOINT = "NoCheckpoint"
    REFERENCED_JOB_FAILED = "ReferencedJobFailed"


class ExitCode:
    """The trainer's and generator's process exit codes: the operator's retry policy reads them.

    ==== ============ ==========================================================================
    0    OK           finished (or was already finished); not retried
    1    INTERNAL     an unexpected error (a bug, a device fault, out of memory); retryable
    2    INVALID      bad spec or input (images, tokens, resume source); not retryable
    69   UNAVAILABLE  a dependency could not be reached (model hub, object storage); retryable
    75   PREEMPTED    SIGTERM: stopped at any moment -- in the loop after writing a checkpoint,
                      during start-up with nothing new to save. Retryable and not counted
                      against backoffLimit: a retry continues from the newest complete
                      checkpoint, or starts over when there is none yet. The process prints
                      one line saying what was saved ("nothing" before the first step).
    130  INTERRUPTED  SIGINT (Ctrl-C) on a terminal: same as 75, for a person at a terminal
    ==== ============ ==========================================================================
    """

    OK = 0
    INTERNAL = 1
    INVALID = 2
    UNAVAILABLE = 69
    PREEMPTED = 75
    INTERRUPTED = 130
    RETRYABLE = (INTERNAL, UNAVAILABLE, PREEMPTED)


Phase = Literal["Pending", "Waiting", "Running", "Suspended", "Succeeded", "Failed"]


class Progress(Model):
    """Progress as read from the workload's progress.json."""

    model_config = ConfigDict(extra="ignore")

    step: int | None = Field(default=None, ge=0, description="Optimisation steps done (training).")
    total_steps: int | None = Field(default=None, ge=0, description="Optimisation steps in the run (training).")
    images_done: int | None = Field(default=None, ge=0, description="Images written (generation).")
    images_total: int | None = Field(default=None, ge=0, description="Images in the grid (generation).")
    loss: float | None = Field(default=None, description="Smoothed training loss at the last report.")
    samples_per_second: float | None = Field(default=None, ge=0, description="Training samples per second, all workers together.")
    images_per_second: float | None = Field(default=None, ge=0, description="Generated images per second, all workers together.")
    eta_seconds: int | None = Field(default=None, ge=0, description="Estimated seconds to completion.")
    summary: str | None = Field(default=None, max_length=64, description="Short text for `kubectl get`, e.g. '120/500 (24%)'.")
    updated_at: str | None = Field(default=None, description="When the workload last reported (RFC 3339).")


class Workload(Model):
    """The child objects the operator created for this resource."""

    model_config = ConfigDict(extra="ignore")

    job_name: str | None = Field(default=None, description="Name of the child batch/v1 Job.")
    config_map_name: str | None = Field(
        default=None,
        description="Name of the ConfigMap holding the resource document; set only for a document too large for a pod annotation (it travels in the pod template otherwise).",
    )
    service_name: str | None = Field(default=None, description="Name of the headless Service for multi-worker rendezvous.")
    # The record that makes a finished Job never run twice: written before the Job is created
    # (jobGeneration) and once it exists (jobUid); a Job that disappears while recorded here is
    # not re-created. Cleared only when the operator itself replaces the Job (a spec change
    # applied while suspended).
    job_generation: int | None = Field(
        default=None, ge=0, description="The metadata.generation the child Job was created from (recorded before creating it)."
    )
    job_uid: str | None = Field(default=None, max_length=64, description="uid of the child Job the operator created.")


class WorkerCounts(Model):
    """The child Job's worker pods, as its status counts them (Kubeflow's replicaStatuses)."""

    model_config = ConfigDict(extra="ignore")

    active: int = Field(default=0, ge=0, description="Worker pods pending or running.")
    ready: int = Field(default=0, ge=0, description="Worker pods running and ready.")
    succeeded: int = Field(default=0, ge=0, description="Worker pods that finished successfully.")
    failed: int = Field(default=0, ge=0, description="Worker pods that failed (over every retry).")
    terminating: int = Field(default=0, ge=0, description="Worker pods being stopped.")


class CheckpointRef(Model):
    """A complete checkpoint in storage (its manifest.json exists)."""

    model_config = ConfigDict(extra="ignore")

    uuid: str = Field(description="Checkpoint id, the folder name under checkpoints/.")
    step: int = Field(ge=0, description="Optimisation step the checkpoint was taken at.")
    uri: str = Field(description="URI of the checkpoint folder.")
    created_at: str | None = Field(default=None, description="When its manifest was written (RFC 3339).")
    loss: float | None = Field(default=None, description="Smoothed loss at that step.")


class BaseStatus(Model):
    """Status fields both resources share."""

    model_config = ConfigDict(extra="ignore")

    phase: Phase | None = Field(default=None, description="Pending, Waiting, Running, Suspended, Succeeded or Failed.")
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Latest observations: Accepted, Waiting, Scheduled, Running, Succeeded, Failed, Suspended.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    observed_generation: int | None = Field(default=None, ge=0, description="The metadata.generation the status reflects.")
    start_time: str | None = Field(default=None, description="When the workload first ran (RFC 3339).")
    completion_time: str | None = Field(default=None, description="When the workload finished (RFC 3339).")
    progress: Progress | None = Field(default=None, description="Progress read from progress.json.")
    workload: Workload | None = Field(default=None, description="The child Job, and the Service and ConfigMap where there are any.")
    workers: WorkerCounts | None = Field(default=None, description="Worker pods of the child Job: active, ready, succeeded, failed, terminating.")
    output_uri: str | None = Field(default=None, description="Root of this resource's outputs in storage.")
    message: str | None = Field(default=None, max_length=32768, description="Last workload summary (termination message).")


class ObjectMeta(Model):
    """The part of metadata tinv reads; everything else is kept as is."""

    model_config = ConfigDict(extra="allow", alias_generator=None)

    name: str | None = Field(default=None, max_length=253, pattern=DNS_SUBDOMAIN, description="Resource name.")
    namespace: str | None = Field(default=None, max_length=63, pattern=DNS_LABEL, description="Namespace.")
    uid: str | None = Field(default=None, description="Unique id set by the apiserver.")
    generation: int | None = Field(default=None, description="Spec generation set by the apiserver.")
    labels: dict[str, str] = Field(default_factory=dict, description="Labels.")
    annotations: dict[str, str] = Field(default_factory=dict, description="Annotations.")


# --------------------------------------------------------------------------- TextualInversionJob


# Token rules that need no model (the vocabulary checks need the tokenizer and run in the trainer).
TOKEN_RULES = (
    Rule("self.matches('[a-z]')", "token needs at least one letter a-z (e.g. '<det-logo>', not '***')"),
    Rule(
        "!self.matches('[A-Z]')",
        "token must be lower case: CLIP lower-cases prompts, and diffusers' load_textual_inversion uses only the first "
        "vector of a capitalised multi-vector token (write e.g. '<mycat>' for '<MyCat>')",
    ),
    Rule("!self.contains('/') && !self.contains('\\\\')", "token must not contain '/' or '\\' (it names the embedding files)"),
    Rule("!self.contains('<|') && !self.contains('|>')", "token must not look like a special token of the tokenizer (<|startoftext|>, <|endoftext|>)"),
    Rule("!self.contains('{}')", "token must not contain '{}' (that is the template slot)"),
)
# For the contained-token message: the first token that is part of another concept's token, and
# the first token containing it. Over the list of tokens, not of concepts: the apiserver estimates
# a filter over whole concept objects (templates included) far over its CEL cost budget.
_TOKENS = "self.map(a, a.token)"
_CONTAINED = _TOKENS + ".filter(t, " + _TOKENS + ".exists(u, u != t && u.contains(t)))[0]"
_CONTAINER = _TOKENS + ".filter(u, u != " + _CONTAINED + " && u.contains(" + _CONTAINED + "))[0]"


class Concept(Model):
    """One concept to learn: a new token and the images that show it."""

    token: str = Field(
        min_length=1,
        max_length=64,
        pattern=r"^\S+$",
        description="The new token used in prompts, e.g. 'det-logo'; lower case, no whitespace, at least one letter; required.",
        json_schema_extra=cel(*TOKEN_RULES),
    )
    property: Literal["object", "style"] = Field(
        default="object", description="Whether the images show an object or a style; picks the prompt templates; default object."
    )
    initializer: str = Field(
        min_length=1,
        max_length=512,
        description="A phrase whose CLIP tokens give the initial vectors, e.g. 'brain logo, sharp lines'; required.",
        json_schema_extra=cel(Rule("self.matches('\\\\S')", "initializer must not be blank")),
    )
    vectors: int | None = Field(
        default=None,
        ge=1,
        le=75,
        description="Learned vectors for the token; default: one per initializer token (the initializer is repeated or cut to fit).",
    )
    images: str = Field(
        min_length=1,
        max_length=1024,
        description="Training images: s3://bucket/prefix, pvc://claim/path, file:///path or a local folder; required.",
        json_schema_extra=cel(URI_RULE),
    )
    templates: list[Annotated[str, Field(min_length=2, max_length=512)]] | None = Field(
        default=None,
        min_length=1,
        max_length=256,
        description="Prompt templates with '{}' where the token goes; default: the 27 object or 19 style templates.",
        json_schema_extra=cel(
            Rule("self.all(t, t.contains('{}'))", "every template must contain '{}' where the token goes"),
            # The trainer finds the token on word boundaries (as CLIP splits words): "a {}-style
            # photo" would become "a det-logo-style photo", which never contains the token.
            Rule(
                "self.all(t, !t.matches('[A-Za-z0-9_-][{][}]') && !t.matches('[{][}][A-Za-z0-9_-]'))",
                "a template's '{}' touches a letter, digit, '_' or '-' (e.g. 'a {}-style photo', '{}s'): the token would be "
                "glued into another word and never trained; put a space or punctuation next to '{}'",
            ),
        ),
    )
    caption_from_filename: bool = Field(
        default=False, description="Append words from each image's file name to its prompt (Determined's append_file_name_to_text); default false."
    )
    filename_split_char: str = Field(
        default="_", min_length=1, max_length=4, description="Separator of words in file names used as captions; default '_'."
    )
    num_blank_prompts: int = Field(default=0, ge=0, le=1000, description="Extra '{}' prompts added to the templates; default 0.")
    num_a_prompts: int = Field(default=0, ge=0, le=1000, description="Extra 'a {}' prompts added to the templates; default 0.")


class Noise(Model):
    """Overrides of the model's noise schedule; unset fields come from the model's scheduler config."""

    beta_start: float | None = Field(default=None, gt=0, lt=1, description="First beta; default: the model's (0.00085 for SD 1.x).")
    beta_end: float | None = Field(default=None, gt=0, lt=1, description="Last beta; default: the model's (0.012 for SD 1.x).")
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] | None = Field(
        default=None, description="Beta schedule; default: the model's (scaled_linear for SD 1.x)."
    )
    prediction_type: Literal["epsilon", "v_prediction"] | None = Field(
        default=None, description="What the UNet predicts; default: the model's (epsilon for SD 1.x, v_prediction for SD 2.x 768)."
    )


class Validation(Model):
    """Validation images rendered with fixed seeds while training."""

    prompts: list[Annotated[str, Field(min_length=1, max_length=2000)]] = Field(
        default_factory=list, max_length=16, description="Prompts rendered at each validation; default none (no validation)."
    )
    negative_prompt: str = Field(default="", max_length=2000, description="Negative prompt for validation images; default empty.")
    every: int | None = Field(default=None, ge=1, description="Validate every this many steps; default: at each checkpoint.")
    scheduler: SchedulerName = Field(default="ddim", description="Sampler for validation images; default ddim.")
    steps: int = Field(default=50, ge=1, le=1000, description="Sampling steps per validation image; default 50.")
    guidance_scale: float = Field(default=7.5, ge=0, le=50, description="Classifier-free guidance scale; default 7.5.")
    seed: int = Field(default=0, ge=0, le=2**32 - 1, description="Seed of the validation noise, fixed across steps; default 0.")


class Training(Model):
    """Hyperparameters; defaults are the Determined example's where it has one."""

    steps: int = Field(default=500, ge=1, le=10_000_000, description="Optimisation steps (Determined num_sgd_steps); default 500.")
    batch_size: int = Field(default=1, ge=1, le=1024, description="Images per GPU per micro-batch (train_batch_size); default 1.")
    gradient_accumulation: int = Field(default=4, ge=1, le=1024, description="Micro-batches per optimisation step; default 4.")
    learning_rate: float = Field(default=5e-4, gt=0, le=10, description="Base learning rate; default 5e-4.")
    scale_lr: bool = Field(
        default=True, description="Multiply the learning rate by batch size x accumulation x world size; default true."
    )
    optimizer: Literal["adam", "adamw", "sgd"] = Field(default="adam", description="Optimizer of the new embedding rows; default adam.")
    weight_decay: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="Decoupled weight decay for every optimizer (AdamW's: each step scales the vectors by 1 - lr x weightDecay); default 0.",
    )
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = Field(
        default="constant",
        description="Learning-rate schedule, as diffusers' get_scheduler names it (constant ignores lrWarmupSteps); default constant.",
    )
    lr_warmup_steps: int = Field(default=0, ge=0, description="Linear warm-up steps from 0 (constant_with_warmup, linear, cosine); default 0.")
    resolution: int | None = Field(
        default=None,
        ge=64,
        le=2048,
        description="Training image size in pixels (img_size); default 512, and the native size (1024) for SDXL models.",
        json_schema_extra=cel(Rule("self % 8 == 0", "resolution must be a multiple of 8")),
    )
    interpolation: Literal["bicubic", "bilinear", "lanczos", "nearest"] = Field(
        default="bicubic", description="Resampling filter when resizing images; default bicubic."
    )
    center_crop: bool = Field(default=False, description="Centre-crop images to a square before resizing; default false.")
    transparent_background: Literal["white", "black"] = Field(
        default="white",
        description="Colour transparent pixels are composited on: white, or black (what diffusers' textual_inversion.py gives, as it drops the alpha channel of fully transparent pixels); default white.",
    )
    flip_p: float = Field(default=0.5, ge=0, le=1, description="Probability of a horizontal flip; default 0.5.")
    mixed_precision: Literal["auto", "bf16", "fp16", "no"] = Field(
        default="auto", description="Autocast dtype; auto is bf16 where supported, fp16 with a scaler otherwise, none on CPU; default auto."
    )
    seed: int = Field(default=0, ge=0, le=2**32 - 1, description="Seed for initialisation, data order, noise and timesteps; default 0.")
    norm_reg_weight: float = Field(
        default=0.0, ge=0, description="Weight of the penalty pulling new vectors' norms to the vocabulary's mean norm; default 0."
    )
    hidden_reg_weight: float = Field(
        default=0.0, ge=0, description="Weight of the penalty keeping the text encoder's output near the initializer's; default 0."
    )
    noise: Noise = Field(default_factory=Noise, description="Noise-schedule overrides; default: the model's schedule.")
    checkpoint_every: int = Field(default=100, ge=1, description="Write a checkpoint every this many steps (checkpoint_freq); default 100.")
    checkpoints_kept: int = Field(default=3, ge=1, le=100, description="Newest checkpoints kept in storage; default 3.")
    log_every: int = Field(default=10, ge=1, description="Report loss and throughput every this many steps; default 10.")
    validation: Validation = Field(default_factory=Validation, description="Validation images; default none.")


class ResumeFrom(Model):
    """Start from an earlier checkpoint: continue it, or fork it with new hyperparameters."""

    checkpoint: str | None = Field(
        default=None,
        max_length=1024,
        description="A checkpoint uuid (of this job, or of `job` if set) or the URI of a checkpoint folder or embedding file; default: the newest of `job`.",
    )
    job: str | None = Field(
        default=None,
        max_length=253,
        pattern=DNS_SUBDOMAIN,
        description="Another TextualInversionJob in this namespace to start from; default: none.",
    )
    mode: Literal["continue", "fork"] = Field(
        default="continue",
        description="continue restores step, optimizer and data order exactly; fork takes only the embeddings and starts at step 0; default continue.",
    )

    __cel__ = (Rule("has(self.checkpoint) || has(self.job)", "resumeFrom needs a checkpoint, a job, or both"),)


class TextualInversionJobSpec(Model):
    """What to learn, how, on what hardware and where to write it."""

    model: ModelSource = Field(description="The base model; required.", json_schema_extra=cel(immutable("spec.model")))
    concepts: list[Concept] = Field(
        min_length=1,
        max_length=16,
        description="Concepts learned together in this job; at least one.",
        json_schema_extra=cel(
            immutable("spec.concepts"),
            Rule(
                "self.all(a, self.exists_one(b, b.token == a.token))",
                "concept tokens must be unique",
            ),
            Rule(
                "self.all(a, self.all(b, a.token == b.token || !b.token.contains(a.token)))",
                "no concept token may contain another (e.g. 'det-logo' and 'det-logo-demo'): prompts could not tell them apart",
                message_expression=(
                    "'no concept token may contain another: \\'' + " + _CONTAINER + " + '\\' contains \\'' + " + _CONTAINED
                    + " + '\\', so prompts could not tell them apart; rename one of them'"
                ),
            ),
        ),
    )
    training: Training = Field(
        default_factory=Training, description="Hyperparameters; default: the Determined example's.", json_schema_extra=cel(immutable("spec.training"))
    )
    resources: Resources = Field(default_factory=Resources, description="Workers, GPUs and placement; default one worker with one GPU.")
    storage: Storage = Field(
        default_factory=Storage, description="Where outputs go; default: the operator's default storage.", json_schema_extra=cel(immutable("spec.storage"))
    )
    resume_from: ResumeFrom | None = Field(
        default=None, description="Start from an earlier checkpoint; default: fresh start.", json_schema_extra=cel(immutable("spec.resumeFrom"))
    )
    run_policy: RunPolicy = Field(default_factory=RunPolicy, description="Suspend, retries, deadline and clean-up; default: run, 3 retries.")


class TextualInversionJobStatus(BaseStatus):
    """What the operator observed of a TextualInversionJob."""

    checkpoints: list[CheckpointRef] = Field(default_factory=list, max_length=100, description="Complete checkpoints in storage, oldest first (the newest N kept).")
    latest_checkpoint: CheckpointRef | None = Field(default=None, description="The newest complete checkpoint.")


class PrinterColumn(Model):
    name: str
    type: str
    json_path: str
    description: str = ""
    priority: int = 0
    format: str | None = None

    def to_schema(self) -> dict[str, Any]:
        out = {"name": self.name, "type": self.type, "jsonPath": self.json_path}
        if self.description:
            out["description"] = self.description
        if self.priority:
            out["priority"] = self.priority
        if self.format:
            out["format"] = self.format
        return out


class CrdInfo(Model):
    plural: str
    singular: str
    short_names: list[str]
    categories: list[str]
    columns: list[PrinterColumn]


def _common_columns(progress: str) -> list[PrinterColumn]:
    return [
        PrinterColumn(name="Phase", type="string", json_path=".status.phase", description="Phase of the workload."),
        PrinterColumn(name="Progress", type="string", json_path=".status.progress.summary", description=progress),
    ]


class TextualInversionJob(Model):
    """Learn new tokens for Stable Diffusion from a few images (Textual Inversion)."""

    api_version: Literal["tinv.io/v1alpha1"] = Field(default=API_VERSION, description="tinv.io/v1alpha1.")
    kind: Literal["TextualInversionJob"] = Field(default="TextualInversionJob", description="TextualInversionJob.")
    metadata: ObjectMeta = Field(default_factory=ObjectMeta, description="Standard object metadata.")
    spec: TextualInversionJobSpec = Field(description="The desired job.")
    status: TextualInversionJobStatus | None = Field(default=None, description="What the operator observed.")

    __crd__: ClassVar[CrdInfo] = CrdInfo(
        plural="textualinversionjobs",
        singular="textualinversionjob",
        short_names=["tijob", "tijobs"],
        categories=["tinv"],
        columns=[
            *_common_columns("Steps done of total."),
            PrinterColumn(name="Loss", type="number", json_path=".status.progress.loss", description="Smoothed training loss."),
            PrinterColumn(name="Checkpoint", type="string", json_path=".status.latestCheckpoint.uuid", description="Newest complete checkpoint."),
            PrinterColumn(name="GPU", type="string", json_path=".spec.resources.gpuClass", description="CoreWeave GPU class."),
            PrinterColumn(
                name="Reason",
                type="string",
                json_path='.status.conditions[?(@.type=="Running")].reason',
                description="Why the job is or is not running.",
                priority=1,
            ),
            PrinterColumn(name="Age", type="date", json_path=".metadata.creationTimestamp"),
        ],
    )


# --------------------------------------------------------------------------- GenerationGrid


class EmbeddingRef(Model):
    """A learned concept to load: from a TextualInversionJob's checkpoint, or from a file or folder URI."""

    job: str | None = Field(
        default=None, max_length=253, pattern=DNS_SUBDOMAIN, description="A TextualInversionJob in this namespace; default: none (use uri)."
    )
    checkpoint: str = Field(
        default="latest",
        max_length=64,
        description="With job: a checkpoint uuid, or 'latest' for the job's final checkpoint (the grid waits until the job has finished); default latest.",
        json_schema_extra=cel(
            Rule(f"self == 'latest' || self.matches('{UUID}')", "checkpoint must be 'latest' or a checkpoint uuid")
        ),
    )
    uri: str | None = Field(
        default=None,
        max_length=1024,
        description="An embedding file or checkpoint folder (diffusers safetensors, AUTOMATIC1111 .pt or Determined learned_embeddings_dict.pt); default: none (use job).",
        json_schema_extra=cel(URI_RULE),
    )
    token: str | None = Field(
        default=None,
        max_length=64,
        pattern=r"^\S+$",
        description="Token to register for a single-concept file; default: the token stored in the file (the file name for AUTOMATIC1111 files).",
    )

    __cel__ = (Rule("has(self.job) != has(self.uri)", "an embedding names either a job or a uri, not both"),)


class Size(Model):
    """An image size in pixels."""

    width: int = Field(default=512, ge=64, le=2048, description="Width in pixels, a multiple of 8; default 512.")
    height: int = Field(default=512, ge=64, le=2048, description="Height in pixels, a multiple of 8; default 512.")

    __cel__ = (Rule("self.width % 8 == 0 && self.height % 8 == 0", "width and height must be multiples of 8"),)


class GridAxes(Model):
    """The axes of the grid; every combination is rendered."""

    guidance_scales: list[Annotated[float, Field(ge=0, le=50)]] = Field(
        default_factory=lambda: [7.5], max_length=32, description="Classifier-free guidance scales, each 0 to 50; default [7.5]."
    )
    steps: list[Annotated[int, Field(ge=1, le=1000)]] = Field(
        default_factory=lambda: [50], max_length=16, description="Sampling steps, each 1 to 1000; default [50]."
    )
    schedulers: list[SchedulerName] = Field(default_factory=lambda: ["ddim"], max_length=10, description="Samplers by name; default [ddim].")
    seeds: list[Annotated[int, Field(ge=0, le=2**32 - 1)]] = Field(
        default_factory=lambda: [0], max_length=1024, description="Seeds; image k of a cell uses seed + k; default [0]."
    )
    sizes: list[Size] = Field(default_factory=lambda: [Size()], max_length=8, description="Image sizes; default [512x512].")

    __cel__ = (
        Rule(
            "size(self.guidanceScales) > 0 && size(self.steps) > 0 && size(self.schedulers) > 0 && size(self.seeds) > 0 && size(self.sizes) > 0",
            "every grid axis needs at least one value (guidanceScales, steps, schedulers, seeds, sizes)",
        ),
    )


class GenerationGridSpec(Model):
    """A grid of prompts x parameters x seeds rendered with learned concepts, sharded over workers."""

    model: ModelSource = Field(description="The base model; required.", json_schema_extra=cel(immutable("spec.model")))
    embeddings: list[EmbeddingRef] = Field(
        default_factory=list, max_length=32, description="Learned concepts to load; default none.", json_schema_extra=cel(immutable("spec.embeddings"))
    )
    prompts: list[Annotated[str, Field(max_length=2000)]] = Field(
        max_length=256,
        description="Prompts, mentioning concept tokens; at least one.",
        json_schema_extra=cel(
            immutable("spec.prompts"),
            Rule("size(self) > 0", "a grid needs at least one prompt"),
            Rule("self.all(p, p.matches('\\\\S'))", "prompts must not be blank"),
        ),
    )
    negative_prompt: str = Field(
        default="", max_length=2000, description="Negative prompt for every image; default empty.", json_schema_extra=cel(immutable("spec.negativePrompt"))
    )
    grid: GridAxes = Field(
        default_factory=GridAxes, description="Grid axes; default one cell per prompt.", json_schema_extra=cel(immutable("spec.grid"))
    )
    images_per_cell: int = Field(
        default=1,
        ge=1,
        le=256,
        description="Images per grid cell, with consecutive seeds; default 1.",
        json_schema_extra=cel(immutable("spec.imagesPerCell")),
    )
    batch_size: int = Field(default=2, ge=1, le=64, description="Images rendered together per forward pass; default 2.")
    precision: Precision = Field(default="auto", description="Compute dtype: auto is bf16 on GPUs that have it, fp16 on others, fp32 on CPU; default auto.")
    resources: Resources = Field(default_factory=Resources, description="Parallel workers, GPUs and placement; default one worker with one GPU.")
    storage: Storage = Field(
        default_factory=Storage, description="Where images go; default: the operator's default storage.", json_schema_extra=cel(immutable("spec.storage"))
    )
    run_policy: RunPolicy = Field(default_factory=RunPolicy, description="Suspend, retries, deadline and clean-up; default: run, 3 retries.")

    __cel__ = (
        Rule(
            "self.embeddings.all(e, !has(e.token) || self.embeddings.exists_one(f, has(f.token) && f.token == e.token))",
            "embedding tokens must be unique",
            field_path=".embeddings",
        ),
    )


class ResolvedEmbedding(Model):
    """An embedding as the operator resolved it: a concrete checkpoint and URI."""

    model_config = ConfigDict(extra="ignore")

    job: str | None = Field(default=None, description="The TextualInversionJob it came from.")
    checkpoint: str | None = Field(default=None, description="The concrete checkpoint uuid ('latest' resolved).")
    uri: str = Field(description="URI of the checkpoint folder or file.")


class GenerationGridStatus(BaseStatus):
    """What the operator observed of a GenerationGrid."""

    resolved_embeddings: list[ResolvedEmbedding] = Field(default_factory=list, description="Embeddings with 'latest' resolved to uuids.")
    gallery_uri: str | None = Field(default=None, description="URI of the gallery page (index.html).")
    index_uri: str | None = Field(default=None, description="URI of index.json, listing every image and its parameters.")
    failed_shards: list[Annotated[int, Field(ge=0)]] = Field(
        default_factory=list, max_length=128, description="Shard indexes (JOB_COMPLETION_INDEX) whose worker failed, ascending."
    )


class GenerationGrid(Model):
    """Render a grid of images from learned concepts, sharded over GPU workers."""

    api_version: Literal["tinv.io/v1alpha1"] = Field(default=API_VERSION, description="tinv.io/v1alpha1.")
    kind: Literal["GenerationGrid"] = Field(default="GenerationGrid", description="GenerationGrid.")
    metadata: ObjectMeta = Field(default_factory=ObjectMeta, description="Standard object metadata.")
    spec: GenerationGridSpec = Field(description="The desired grid.")
    status: GenerationGridStatus | None = Field(default=None, description="What the operator observed.")

    __crd__: ClassVar[CrdInfo] = CrdInfo(
        plural="generationgrids",
        singular="generationgrid",
        short_names=["ggrid", "ggrids"],
        categories=["tinv"],
        columns=[
            *_common_columns("Images done of total."),
            PrinterColumn(name="Gallery", type="string", json_path=".status.galleryUri", description="Gallery page.", priority=1),
            PrinterColumn(
                name="Reason",
                type="string",
                json_path='.status.conditions[?(@.type=="Running")].reason',
                description="Why the grid is or is not running.",
                priority=1,
            ),
            PrinterColumn(name="Age", type="date", json_path=".metadata.creationTimestamp"),
        ],
    )


RESOURCES: dict[str, type[Model]] = {"TextualInversionJob": TextualInversionJob, "GenerationGrid": GenerationGrid}


# --------------------------------------------------------------------------- names every part shares
# The operator, the trainer and the CLI read these from here (never from the operator's builders);
# the exit-code contract is `ExitCode` above.

TIJOB_KIND = "TextualInversionJob"
GRID_KIND = "GenerationGrid"
PLURALS: dict[str, str] = {kind: model.__crd__.plural for kind, model in RESOURCES.items()}  # type: ignore[attr-defined]


class Annotation:
    """Annotation keys the operator sets on child objects, and the ones kopf keeps on the resources."""

    SPEC_HASH = "tinv.io/spec-hash"  # on the Job: hash of the spec it was built from
    RESOURCE_GENERATION = "tinv.io/resource-generation"  # on the Job: the resource generation it was built from
    RESOURCE_DOCUMENT = "tinv.io/resource"  # on the pod template: the resource document, mounted by the downward API
    KOPF_PREFIX = "tinv.io"  # on the resource: kopf's progress annotations are "<prefix>/<handler id>"
    DIFF_BASE = "tinv.io/last-handled-configuration"  # on resources of earlier versions: kopf's diff-base (now in memory)
