"""Status and Events a Kubeflow/KubeRay user expects, on the real control plane (issue 14, item 12):
worker counts, one aggregated CheckpointRecorded Event (count N) instead of N Events, and the
Scheduled condition cleared while the workload is suspended."""

from __future__ import annotations

import pytest

from cluster.operator_helpers import close_env, make_env, tijob, write_checkpoint, write_progress

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


@pytest.fixture
def env(control_plane, tmp_path_factory, request):
    e = make_env(control_plane, tmp_path_factory, "ops-status", poll_interval=1.0)
    yield e
    close_env(e, request)


def test_worker_counts_aggregated_events_and_scheduled_after_suspend(env):
    obj = env.create(tijob("counted", workers=2))
    st = env.wait_status("tijob", "counted", lambda s: (s.get("workers") or {}).get("active") == 2 and s.get("phase") == "Running",
                         60, "2 active workers")["status"]
    assert st["workers"]["failed"] == 0 and st["workers"]["succeeded"] == 0
    root = env.root(obj)
    cks = []
    for step in (10, 20, 30, 40):
        cks.append(write_checkpoint(root, step, 1.0 / step))
        write_progress(root, step, 100, 1.0 / step, cks)
        env.wait_status("tijob", "counted", lambda s: (s.get("latestCheckpoint") or {}).get("uuid") == cks[-1]["uuid"], 30, f"checkpoint {step}")
    recorded = env.wait(lambda: [e for e in env.events("counted") if e["reason"] == "CheckpointRecorded" and e.get("count") == 4], 30,
                        "one CheckpointRecorded Event with count 4")
    assert len([e for e in env.events("counted") if e["reason"] == "CheckpointRecorded"]) == 1
    assert cks[-1]["uuid"] in recorded[0]["message"]  # the newest message
    sched = next(c for c in st["conditions"] if c["type"] == "Scheduled")
    assert sched["status"] == "True"
    env.patch("tijob", "counted", {"spec": {"runPolicy": {"suspend": True}}})
    st = env.wait_status("tijob", "counted", lambda s: s.get("phase") == "Suspended", 60, "suspended")["status"]
    sched = next(c for c in st["conditions"] if c["type"] == "Scheduled")
    assert sched["status"] == "False" and sched["reason"] == "SuspendedByUser"
