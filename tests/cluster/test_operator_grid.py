"""A GenerationGrid that references a TextualInversionJob waits for it (condition Waiting naming the
job), then resolves `latest` to the job's final checkpoint uuid, records it in status and in the
document its Indexed Job runs, and shards over its workers."""

from __future__ import annotations

import json

import pytest
import yaml

from operator_helpers import OpEnv, close_env, condition, grid, make_env, tijob, write_checkpoint, write_progress
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
    doc = yaml.safe_load(env.get("configmap", "gallery-grid")["data"]["resource.yaml"])
    assert doc["status"]["resolvedEmbeddings"][0]["checkpoint"] == ck2["uuid"]
    pods = env.wait(lambda: (p := env.running_pods("gallery-grid")) and len(p) == 2 and p, 60, "2 shards running")
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


def write_progress_grid(root, done: int, total: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "progress.json").write_text(json.dumps({"state": "running", "images_done": done, "images_total": total, "images_per_second": 0.5}))
