"""A GenerationGrid that references a TextualInversionJob waits for it (condition Waiting naming the
job), then resolves `latest` to the job's final checkpoint uuid, records it in status and in the
document its Indexed Job runs (in the pod template, or a ConfigMap when too large), and shards over
its workers."""

from __future__ import annotations

import json

import pytest
import yaml

from operator_helpers import OpEnv, close_env, condition, grid, make_env, tijob, write_checkpoint, write_progress
from tinv.api.models import Annotation
from tinv.api.models import ConditionType as C
from tinv.api.models import Reason as R

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def env(control_plane, tmp_path_factory):
    e = make_env(control_plane, tmp_path_factory, "op-grid")
    yield e
    close_env(e)


def test_grid_waits_for_its_job_then_resolves_latest(env: OpEnv):
    env.create(grid("gallery", job="src", workers=2))
    obj = env.wait_status("generationgrid", "gallery", lambda s: s.get("phase") == "Waiting", 30, "Waiting")
    waiting = condition(obj, C.WAITING)
    assert waiting["status"] == "True" and waiting["reason"] == R.WAITING_FOR_JOB and "src" in waiting["message"]
    assert not env.cp.get_json("jobs", "-n", env.ns, "-l", f"tinv.io/owner-uid={obj['metadata']['uid']}")["items"]
    # the job appears and trains: 'latest' waits for its final checkpoint
    env.create(tijob("src"))
    job = env.wait_status("tijob", "src", lambda s: s.get("phase") == "Running", 60)
    root = env.root(job)
    ck1 = write_checkpoint(root, 10, 0.4)
    write_progress(root, 10, 100, 0.4, [ck1])
    env.wait_status("tijob", "src", lambda s: (s.get("latestCheckpoint") or {}).get("uuid") == ck1["uuid"], 30)
    obj = env.wait_status("generationgrid", "gallery", lambda s: "finish" in condition({"status": s}, C.WAITING).get("message", ""), 30)
    assert obj["status"]["phase"] == "Waiting" and "src" in condition(obj, C.WAITING)["message"]
    ck2 = write_checkpoint(root, 100, 0.2)
    pod = env.running_pods("src-train")[0]["metadata"]["name"]
    env.cp.finish_pod(env.ns, pod, 0, message=json.dumps({"state": "succeeded", "exit_code": 0, "latest_checkpoint": {"uuid": ck2["uuid"], "step": 100, "uri": ck2["uri"]}}))
    env.wait_status("tijob", "src", lambda s: s.get("phase") == "Succeeded", 60)
    # resolved: the grid's Indexed Job runs with the concrete uuid
    obj = env.wait_status("generationgrid", "gallery", lambda s: s.get("phase") == "Running", 60, "Running")
    assert obj["status"]["resolvedEmbeddings"] == [{"job": "src", "checkpoint": ck2["uuid"], "uri": ck2["uri"]}]
    resolved = condition(obj, C.WAITING)
    assert resolved["status"] == "False" and ck2["uuid"] in resolved["message"]
    gjob = env.get("job", "gallery-grid")
    assert gjob["spec"]["completionMode"] == "Indexed" and gjob["spec"]["completions"] == 2 and gjob["spec"]["parallelism"] == 2
    cmd = gjob["spec"]["template"]["spec"]["containers"][0]["command"]
    assert cmd == ["tinv", "generate", "/etc/tinv/resource.yaml", "--shard", "$(JOB_COMPLETION_INDEX)/2"]
    pods = env.wait(lambda: (p := env.running_pods("gallery-grid")) and len(p) == 2 and p, 60, "2 shards running")
    # each pod carries the document it runs (mounted from its own annotation by the downward API)
    for p in pods:
        doc = yaml.safe_load(p["metadata"]["annotations"][Annotation.RESOURCE_DOCUMENT])
        assert doc["status"]["resolvedEmbeddings"][0]["checkpoint"] == ck2["uuid"]
    assert env.cp.kubectl("get", "configmap", "gallery-grid", "-n", env.ns, check=False).returncode != 0
    assert sorted(p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] for p in pods) == ["0", "1"]
    # progress of a grid is images done/total
    write_progress_grid(env.root(obj), 3, 8)
    obj = env.wait_status("generationgrid", "gallery", lambda s: (s.get("progress") or {}).get("summary") == "3/8 (37%)", 30)
    for p in pods:
        env.cp.finish_pod(env.ns, p["metadata"]["name"], 0)
    obj = env.wait_status("generationgrid", "gallery", lambda s: s.get("phase") == "Succeeded", 60)
    assert obj["status"]["galleryUri"].endswith("/images/index.html")
    table = env.cp.kubectl("get", "ggrids", "-n", env.ns).stdout
    assert "gallery" in table and "Succeeded" in table


def test_grid_with_a_uri_embedding_runs_at_once(env: OpEnv):
    g = grid("direct", workers=1)
    g["spec"]["embeddings"] = [{"uri": "file:///data/det-logo.safetensors"}]
    env.create(g)
    obj = env.wait_status("generationgrid", "direct", lambda s: s.get("phase") == "Running", 60)
    assert obj["status"]["resolvedEmbeddings"] == [{"uri": "file:///data/det-logo.safetensors"}]
    assert not condition(obj, C.WAITING)


def test_a_grid_too_large_for_an_annotation_gets_its_document_in_a_config_map(env: OpEnv):
    """~150 KB of prompts (the CRD allows 256 x 2,000 characters): past what a pod annotation
    takes, so the document is a ConfigMap the real apiserver stores and the Job mounts."""
    g = grid("wide", workers=1)
    g["spec"]["embeddings"] = [{"uri": "file:///data/det-logo.safetensors"}]
    g["spec"]["prompts"] = [f"a det-logo, take {i}: " + "detailed " * 166 for i in range(100)]
    env.create(g)
    obj = env.wait_status("generationgrid", "wide", lambda s: s.get("phase") == "Running", 60)
    assert obj["status"]["workload"]["configMapName"] == "wide-grid"
    doc = yaml.safe_load(env.get("configmap", "wide-grid")["data"]["resource.yaml"])
    assert doc["spec"]["prompts"] == g["spec"]["prompts"] and doc["metadata"]["uid"] == obj["metadata"]["uid"]
    pod = env.running_pods("wide-grid")[0]
    assert Annotation.RESOURCE_DOCUMENT not in pod["metadata"]["annotations"]
    vol = next(v for v in pod["spec"]["volumes"] if v["name"] == "resource")
    assert vol["configMap"]["name"] == "wide-grid"


def write_progress_grid(root, done: int, total: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "progress.json").write_text(json.dumps({"state": "running", "images_done": done, "images_total": total, "images_per_second": 0.5}))


def _finish(env: OpEnv, job: str, code: int) -> None:
    env.cp.finish_pod(env.ns, env.running_pods(f"{job}-train")[0]["metadata"]["name"], code)


def _refused(env: OpEnv, name: str, reason: str) -> dict:
    """The grid failed for `reason`, said so in its conditions and with a Warning Event."""
    obj = env.wait_status("generationgrid", name, lambda s: s.get("phase") == "Failed", 60, f"Failed ({reason})")
    failed = condition(obj, C.FAILED)
    assert failed["reason"] == reason and condition(obj, C.WAITING)["reason"] == reason, obj["status"]["conditions"]
    assert any(e["reason"] == reason and e["type"] == "Warning" for e in env.events(name))
    assert not env.cp.get_json("jobs", "-n", env.ns, "-l", f"tinv.io/owner-uid={obj['metadata']['uid']}")["items"]
    return obj


def test_grid_references_that_can_never_resolve_fail_with_a_reason(env: OpEnv):
    # a checkpoint uuid that fell out of the job's newest checkpointsKept
    env.create(tijob("pruned", kept=1))
    job = env.wait_status("tijob", "pruned", lambda s: s.get("phase") == "Running", 60)
    root = env.root(job)
    ck1 = write_checkpoint(root, 10, 0.4)
    write_progress(root, 10, 100, 0.4, [ck1])
    env.wait_status("tijob", "pruned", lambda s: (s.get("latestCheckpoint") or {}).get("uuid") == ck1["uuid"], 30)
    ck2 = write_checkpoint(root, 20, 0.3)
    import shutil
    shutil.rmtree(root / "checkpoints" / ck1["uuid"])  # the trainer keeps only the newest one
    write_progress(root, 20, 100, 0.3, [ck2])
    env.wait_status("tijob", "pruned", lambda s: [c["uuid"] for c in s.get("checkpoints") or []] == [ck2["uuid"]], 30)
    env.create(grid("old-ck", job="pruned", checkpoint=ck1["uuid"], workers=1))
    obj = env.wait_status("generationgrid", "old-ck", lambda s: condition({"status": s}, C.WAITING).get("reason") == R.WAITING_FOR_CHECKPOINT, 30)
    msg = condition(obj, C.WAITING)["message"]
    assert ck1["uuid"] in msg and "keeps the newest 1" in msg and "fails when the job finishes" in msg, msg
    _finish(env, "pruned", 0)
    obj = _refused(env, "old-ck", R.CHECKPOINT_NOT_FOUND)
    assert "spec.embeddings[0].checkpoint" in condition(obj, C.FAILED)["message"] and ck2["uuid"] in condition(obj, C.FAILED)["message"]
    # 'latest' of a failed job: refused, naming the checkpoint one could use instead
    env.create(tijob("broken", run_policy={"backoffLimit": 0}))
    job = env.wait_status("tijob", "broken", lambda s: s.get("phase") == "Running", 60)
    ck = write_checkpoint(env.root(job), 30, 0.5)
    write_progress(env.root(job), 30, 100, 0.5, [ck])
    env.wait_status("tijob", "broken", lambda s: (s.get("latestCheckpoint") or {}).get("uuid") == ck["uuid"], 30)
    _finish(env, "broken", 1)
    env.wait_status("tijob", "broken", lambda s: s.get("phase") == "Failed", 60)
    env.create(grid("after-broken", job="broken", workers=1))
    obj = _refused(env, "after-broken", R.REFERENCED_JOB_FAILED)
    assert ck["uuid"] in condition(obj, C.FAILED)["message"]
    # 'latest' of a job that succeeded without writing any checkpoint
    env.create(tijob("nockpt"))
    env.wait_status("tijob", "nockpt", lambda s: s.get("phase") == "Running", 60)
    _finish(env, "nockpt", 0)
    env.wait_status("tijob", "nockpt", lambda s: s.get("phase") == "Succeeded", 60)
    env.create(grid("after-nockpt", job="nockpt", workers=1))
    obj = _refused(env, "after-nockpt", R.NO_CHECKPOINT)
    assert "nockpt" in condition(obj, C.FAILED)["message"]
