"""On the real control plane, with the real operator process (issue 14, items 6 and 8):

* one resource's storage endpoint hangs (a real socket on 127.0.0.1 that accepts and never
  answers); the other resources' status keeps following their progress.json within one poll
  interval; an oversized manifest is refused by name in the resource's condition;
* the operator's policy refuses an image, a Secret and a storage endpoint it does not allow, with a
  condition and a Warning Event naming each field, and creates no Job.
"""

from __future__ import annotations

import json
import time

import pytest
from testkit import SlowEndpoint

from cluster.operator_helpers import close_env, make_env, tijob, write_checkpoint, write_progress

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

POLL = 1.0


@pytest.fixture
def hang():
    h = SlowEndpoint("hang")
    yield h
    h.close()


@pytest.fixture
def env(control_plane, tmp_path_factory, request):
    e = make_env(control_plane, tmp_path_factory, "ops-storage", poll_interval=POLL, extra=[
        "--storage-read-timeout", "30",  # a long time box: isolation, not the timeout, must keep the others fresh
        "--storage-max-object-bytes", "4096", "--allowed-image", "example.invalid/*",
        "--allowed-secret", "tinv-*", "--allowed-storage-endpoint", "127.0.0.1",
    ])
    e.op.env.update({"AWS_ACCESS_KEY_ID": "operator", "AWS_SECRET_ACCESS_KEY": "operator-secret"})
    e.op.stop()
    e.op.start()
    yield e
    close_env(e, request)


def test_a_hanging_endpoint_stalls_only_its_own_resource(env, hang):
    stuck = env.create(tijob("stuck", storage={"uri": "s3://bucket/runs", "endpoint": hang.url, "addressingStyle": "path"}))
    jobs = [env.create(tijob(f"fresh-{i}")) for i in range(4)]
    for obj in jobs:
        env.wait_status("tijob", obj["metadata"]["name"], lambda s: s.get("phase"), 60, "a phase")
    time.sleep(3 * POLL)  # the stuck resource's reads have started and hang
    assert len(hang.conns) >= 1
    for step in (10, 20, 30):
        t0 = time.monotonic()
        for obj in jobs:
            write_progress(env.root(obj), step, 100, 0.5)
        for obj in jobs:
            env.wait_status("tijob", obj["metadata"]["name"], lambda s: (s.get("progress") or {}).get("step") == step, 30, f"step {step}")
        # within one poll interval (plus the status writer's batching, a fraction of a second)
        assert time.monotonic() - t0 < POLL + 2.5, f"step {step} took {time.monotonic() - t0:.1f}s"
    assert "progress" not in (env.status("tijob", "stuck") or {}) or env.status("tijob", "stuck")["progress"].get("step") is None
    assert stuck


def test_an_oversized_manifest_is_refused_by_name(env):
    obj = env.create(tijob("big"))
    root = env.root(obj)
    ok = write_checkpoint(root, 10, 0.5)
    big = write_checkpoint(root, 20, 0.4)
    manifest = root / "checkpoints" / big["uuid"] / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "pad": "x" * 8000}))
    write_progress(root, 20, 100, 0.4)

    def refused(s):
        msg = json.dumps(s.get("conditions") or [])
        return [c["uuid"] for c in s.get("checkpoints") or []] == [ok["uuid"]] and f"{big['uuid']}/manifest.json" in msg and "over the limit of 4096 bytes" in msg

    pods = env.wait(lambda: env.running_pods("big-train"), 60, "the pod running")
    assert pods
    env.wait_status("tijob", "big", refused, 30, "the oversized manifest refused by name")


def test_policy_violations_are_refused_naming_the_field(env):
    env.create(tijob("sneaky", resources={"image": "evil.example/miner:1"},
                     storage={"uri": "s3://bucket/runs", "endpoint": "http://169.254.169.254",
                              "credentialsSecret": {"name": "cluster-admin-token"}}))
    st = env.wait_status("tijob", "sneaky", lambda s: s.get("phase") == "Failed", 30, "refused")["status"]
    accepted = next(c for c in st["conditions"] if c["type"] == "Accepted")
    assert accepted["status"] == "False" and accepted["reason"] == "InvalidSpec"
    for field in ("spec.resources.image", "spec.storage.credentialsSecret.name", "spec.storage.endpoint"):
        assert field in accepted["message"]
    events = env.wait(lambda: [e for e in env.events("sneaky") if e["type"] == "Warning"], 30, "a Warning Event")
    assert "spec.resources.image: 'evil.example/miner:1' is not allowed by the operator's policy" in events[0]["message"]
    assert not env.cp.get_json("jobs", "-n", env.ns)["items"]  # no Job, so no pod ever ran the image
    # within policy: accepted
    env.create(tijob("fine", resources={"image": "example.invalid/tinv-trainer:2"}))
    env.wait(lambda: env.cp.get_json("jobs", "-n", env.ns)["items"], 30, "the allowed resource's Job")
