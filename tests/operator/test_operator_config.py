"""Operator configuration (flags > environment > defaults), the CLI entry point, and imports."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tinv.operator.config import DEFAULT_GPU_CLASS_LABEL, DEFAULT_REGION_LABEL, from_args

REPO = Path(__file__).resolve().parents[2]


def test_defaults():
    c = from_args([], env={"POD_NAMESPACE": "team-a"})
    assert c.namespaces == ("team-a",)
    assert c.poll_interval == 15.0
    assert c.gpu_class_label == DEFAULT_GPU_CLASS_LABEL == "gpu.nvidia.com/class"
    assert c.region_label == DEFAULT_REGION_LABEL == "topology.kubernetes.io/region"
    assert c.metrics_port == 9090 and c.health_port == 8080
    assert c.storage_uri is None and c.gpu_class is None and not c.cluster_wide


def test_environment_of_the_helm_chart():
    env = {
        "TINV_NAMESPACES": "a, b", "POD_NAMESPACE": "ignored", "TINV_CLUSTER_WIDE": "false",
        "TINV_TRAINER_IMAGE": "ghcr.io/x/trainer:1", "TINV_TRAINER_IMAGE_PULL_POLICY": "Always",
        "TINV_DEFAULT_GPU_CLASS": "A40", "TINV_DEFAULT_REGION": "LAS1",
        "TINV_GPU_CLASS_LABEL": "node.coreweave.cloud/class", "TINV_REGION_LABEL": "node.coreweave.cloud/region",
        "TINV_DEFAULT_STORAGE_URI": "s3://runs", "TINV_DEFAULT_STORAGE_ENDPOINT": "https://cwobject.com",
        "TINV_DEFAULT_ADDRESSING_STYLE": "virtual", "TINV_DEFAULT_STORAGE_SECRET": "s3",
        "TINV_HF_TOKEN_SECRET": "hf", "TINV_HF_TOKEN_KEY": "tok", "TINV_MODEL_CACHE_CLAIM": "cache",
        "TINV_POLL_INTERVAL": "5", "TINV_METRICS_PORT": "9191", "TINV_HEALTH_PORT": "8181", "TINV_LOG_LEVEL": "info",
    }
    c = from_args([], env=env)
    assert c.namespaces == ("a", "b")
    assert c.image == "ghcr.io/x/trainer:1" and c.image_pull_policy == "Always"
    assert (c.gpu_class, c.region) == ("A40", "LAS1")
    assert (c.gpu_class_label, c.region_label) == ("node.coreweave.cloud/class", "node.coreweave.cloud/region")
    assert (c.storage_uri, c.storage_endpoint, c.storage_addressing_style, c.storage_secret) == ("s3://runs", "https://cwobject.com", "virtual", "s3")
    assert (c.hf_token_secret, c.hf_token_key, c.model_cache_claim) == ("hf", "tok", "cache")
    assert (c.poll_interval, c.metrics_port, c.health_port, c.log_level) == (5.0, 9191, 8181, "INFO")


def test_empty_chart_values_mean_unset():
    c = from_args([], env={"POD_NAMESPACE": "n", "TINV_DEFAULT_GPU_CLASS": "", "TINV_DEFAULT_STORAGE_URI": "", "TINV_HF_TOKEN_SECRET": ""})
    assert c.gpu_class is None and c.storage_uri is None and c.hf_token_secret is None


def test_flags_win_over_environment():
    c = from_args(["-n", "x", "--namespace", "y,z", "--poll-interval", "2", "--hf-token-secret", "gated:token2",
                   "--pod-annotation-prefix", "kwok.tinv.io/", "--cluster-wide"],
                  env={"TINV_NAMESPACES": "ignored", "TINV_POLL_INTERVAL": "9"})
    assert c.namespaces == ("x", "y", "z") and c.poll_interval == 2.0
    assert (c.hf_token_secret, c.hf_token_key) == ("gated", "token2")
    assert c.pod_annotation_prefixes == ("kwok.tinv.io/",) and c.cluster_wide


def test_bad_flags_exit_2():
    with pytest.raises(SystemExit) as e:
        from_args(["--poll-interval", "0"], env={})
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        from_args(["--storage-addressing-style", "sideways"], env={})


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("TINV_", "POD_NAMESPACE"))}
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "tinv.api.cli", *args], capture_output=True, text=True, env=full, cwd=REPO, timeout=120)


def test_cli_help_and_missing_namespace():
    r = _run("operator", "--help")
    assert r.returncode == 0 and "--namespace" in r.stdout and "TINV_DEFAULT_STORAGE_URI" in r.stdout
    r = _run("operator")
    assert r.returncode == 2 and "no namespace" in r.stderr


def test_operator_never_imports_torch():
    code = (
        "import sys, tinv.operator.main, tinv.operator.handlers, tinv.operator.controller, tinv.operator.builders, "
        "tinv.operator.status, tinv.operator.poller, tinv.operator.kube, tinv.operator.metrics;"
        "bad = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]; assert not bad, bad"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    assert not (REPO / "operator" / "__init__.py").exists()


def test_sdxl_defaults_from_the_chart_flags_or_none():
    assert (from_args(["-n", "a"], env={}).sdxl_memory, from_args(["-n", "a"], env={}).sdxl_shared_memory) == ("64Gi", "16Gi")
    c = from_args(["-n", "a", "--sdxl-memory", "96Gi"], env={"TINV_SDXL_SHARED_MEMORY": "none"})
    assert (c.sdxl_memory, c.sdxl_shared_memory) == ("96Gi", None)
    with pytest.raises(SystemExit):
        from_args(["-n", "a", "--sdxl-memory", "lots"], env={})


def _body_with_history() -> dict:
    """A resource as the watch delivers it after a few status writes: status, managedFields,
    kopf's and kubectl's annotations, a finalizer, an owner."""
    return {
        "apiVersion": "tinv.io/v1alpha1", "kind": "TextualInversionJob",
        "metadata": {
            "name": "demo", "namespace": "team", "uid": "u-1", "resourceVersion": "812", "generation": 2,
            "managedFields": [{"manager": "tinv-operator", "fieldsV1": {"f:status": {}}}],
            "labels": {"team": "a"}, "finalizers": ["tinv.io/cleanup-outputs"],
            "ownerReferences": [{"kind": "Project", "name": "p", "uid": "o-1"}],
            "annotations": {"tinv.io/last-handled-configuration": '{"spec":{"concepts":[]}}\n', "tinv.io/create": '{"retries":1}',
                            "kubectl.kubernetes.io/last-applied-configuration": "{}", "note": "kept"},
        },
        "spec": {"model": {"source": "builtin:tiny"}, "concepts": [{"token": "det-logo", "images": ["a.png"]}]},
        "status": {"phase": "Running", "conditions": [{"type": "Running", "status": "True"}]},
    }


class _NoCopy(dict):
    def __deepcopy__(self, memo):
        raise AssertionError("the diff-base must not deep-copy the status")


def test_the_lean_diff_base_is_kopfs_essence_without_copying_the_status():
    """kopf compares this essence on every watch event; ours must equal kopf's (or kopf would tell
    create / update / resume apart differently) without deep-copying the parts it drops (12 % of the
    operator's busy CPU at 1,000 resources)."""
    import copy

    import kopf

    from tinv.operator.handlers import DiffBaseMemory

    ours = DiffBaseMemory()
    kopfs = kopf.AnnotationsDiffBaseStorage(prefix="tinv.io", key="last-handled-configuration")
    full = _body_with_history()
    bare = {"apiVersion": full["apiVersion"], "kind": full["kind"], "metadata": {"name": "x", "namespace": "team"}, "spec": {}}
    for body in (full, bare):
        assert ours.build(body=kopf.Body(copy.deepcopy(body))) == kopfs.build(body=kopf.Body(copy.deepcopy(body)))
    assert ours.build(body=kopf.Body(full)) == {"spec": full["spec"], "metadata": {"labels": {"team": "a"}, "annotations": {"note": "kept", "tinv.io/create": '{"retries":1}'}}}
    heavy = {**full, "status": _NoCopy(full["status"])}
    ours.build(body=kopf.Body(heavy))
    with pytest.raises(AssertionError, match="must not deep-copy"):
        kopfs.build(body=kopf.Body(heavy))


def test_the_diff_base_lives_in_memory_and_costs_no_patch():
    """kopf's annotation storage PATCHes every resource once handled (a request and a watch event per
    resource); in memory, nothing is sent, and a new process takes every resource for a new one."""
    import kopf

    from tinv.operator.handlers import DiffBaseMemory

    store = DiffBaseMemory()
    body = kopf.Body(_body_with_history())
    assert store.fetch(body=body) is None  # a new process: kopf runs the create handler (the same reconcile)
    essence = store.build(body=body)
    patch = kopf.Patch()
    store.store(body=body, patch=patch, essence=essence)
    assert not patch, "nothing to send: no PATCH of the resource"
    assert store.fetch(body=body) == essence and len(store) == 1
    kopfs = kopf.AnnotationsDiffBaseStorage(prefix="tinv.io", key="last-handled-configuration")
    kopfs.store(body=body, patch=patch, essence=essence)
    assert patch, "kopf's own storage patches the resource"
    store.forget("u-1")
    assert store.fetch(body=body) is None and len(store) == 0


def test_a_handler_that_succeeds_at_once_leaves_no_progress_patch():
    """kopf records the handler's progress, then deletes the record in the same patch once it
    succeeded; its marker annotation would remain and cost a PATCH per resource."""
    import kopf

    from tinv.operator.handlers import ProgressAnnotations

    body = kopf.Body(_body_with_history() | {"metadata": {"name": "demo", "namespace": "team", "uid": "u-1", "annotations": {}}})
    for storage, expected in ((ProgressAnnotations(prefix="tinv.io"), {}), (kopf.AnnotationsProgressStorage(prefix="tinv.io"), {"metadata": {"annotations": {"tinv.io/kopf-managed": "yes"}}})):
        patch = kopf.Patch()
        storage.store(key=kopf.HandlerId("create"), record={"started": "2026-12-03T00:00:00", "success": True}, body=body, patch=patch)
        assert patch  # while it runs, the record is in the patch
        storage.purge(key=kopf.HandlerId("create"), body=body, patch=patch)
        assert dict(patch) == expected
