"""High availability (issue 14, item 10): two operator replicas, exactly one active (the holder of
the leader Lease); the active one is SIGKILLed mid-burst and the standby takes over within 30 s,
with no duplicate Jobs and no checkpoint lost from status. A normal stop hands over at once.

Real control plane, real operator processes (as the chart's 2 replicas run them).
"""

from __future__ import annotations

import time

import pytest

from cluster.operator_helpers import (
    OperatorProcess,
    apply_crds,
    metric_value,
    run_root,
    tijob,
    wait,
    write_checkpoint,
    write_progress,
)

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

BURST = 40
LEASE = ["--leader-election", "--lease-duration", "15", "--renew-deadline", "10", "--retry-period", "2"]


def holder(cp, ns: str) -> str | None:
    r = cp.kubectl("get", "lease", "tinv-operator", "-n", ns, "-o", "jsonpath={.spec.holderIdentity}", check=False)
    return r.stdout.strip() or None if r.returncode == 0 else None


@pytest.fixture
def ha(workload_cluster, tmp_path):
    cp = workload_cluster
    apply_crds(cp)
    ns = cp.new_namespace("ops-ha")
    store = tmp_path / "store"
    store.mkdir()
    ops = {
        name: OperatorProcess(cp, [ns], tmp_path / name, storage_uri=f"file://{store}", poll_interval=1.0,
                              extra=[*LEASE, "--leader-election-namespace", ns], env={"POD_NAME": name})
        for name in ("op-a", "op-b")
    }
    yield cp, ns, store, ops
    for op in ops.values():
        op.stop()
    cp.delete_namespace(ns)


def test_standby_takes_over_within_30s_without_duplicates_or_lost_checkpoints(ha):
    cp, ns, store, ops = ha
    a, b = ops["op-a"], ops["op-b"]
    a.start()
    wait(cp, lambda: holder(cp, ns) == "op-a", 60, "op-a to lead", a)
    b.start()
    wait(cp, b.healthy, 60, "the standby's /healthz", b)  # the liveness probe passes on standby too
    assert metric_value(b.metrics(), "tinv_operator_leader") == 0

    from kubernetes import client

    api = client.CustomObjectsApi(cp.api_client())
    names = [f"burst-{i:02d}" for i in range(BURST)]
    created = {}
    for i, name in enumerate(names):
        created[name] = api.create_namespaced_custom_object("tinv.io", "v1alpha1", ns, "textualinversionjobs", tijob(name))
        if i == BURST // 2:
            # mid-burst: some Jobs exist, most do not yet; the leader dies without a word
            wait(cp, lambda: len(cp.get_json("jobs", "-n", ns)["items"]) >= 3, 60, "the first Jobs", a)
            jobs_before = {j["metadata"]["name"]: j["metadata"]["uid"] for j in cp.get_json("jobs", "-n", ns)["items"]}
            # a checkpoint recorded before the kill ...
            first = created[names[0]]
            root = run_root(f"file://{store}", first)
            ck1 = write_checkpoint(root, 10, 0.5)
            write_progress(root, 10, 100, 0.5, [ck1])
            wait(cp, lambda: (cp.get_json("tijob", names[0], "-n", ns).get("status") or {}).get("latestCheckpoint", {}).get("uuid") == ck1["uuid"],
                 30, "checkpoint 1 in status", a)
            a.kill()
            killed = time.monotonic()
            # ... and one written while nobody leads
            ck2 = write_checkpoint(root, 20, 0.4)
            write_progress(root, 20, 100, 0.4, [ck1, ck2])
    # the standby did nothing while it waited: no API requests but those of the election
    text = b.metrics()
    assert metric_value(text, "tinv_operator_api_requests_total") == metric_value(text, "tinv_operator_api_requests_total", resource="leases") > 0
    wait(cp, lambda: holder(cp, ns) == "op-b", 40, "op-b to take the Lease", b)
    took = time.monotonic() - killed
    assert took < 30, f"takeover after {took:.1f}s"

    def all_reconciled():
        jobs = cp.get_json("jobs", "-n", ns)["items"]
        return jobs if len(jobs) == BURST else None

    jobs = wait(cp, all_reconciled, 120, f"{BURST} Jobs", b)
    owners = [j["metadata"]["ownerReferences"][0]["uid"] for j in jobs]
    assert sorted(owners) == sorted(o["metadata"]["uid"] for o in created.values())  # one Job per resource
    after = {j["metadata"]["name"]: j["metadata"]["uid"] for j in jobs}
    assert all(after[n] == uid for n, uid in jobs_before.items())  # none deleted and created again

    def both_checkpoints():
        st = cp.get_json("tijob", names[0], "-n", ns).get("status") or {}
        return st if [c["uuid"] for c in st.get("checkpoints") or []] == [ck1["uuid"], ck2["uuid"]] else None

    st = wait(cp, both_checkpoints, 30, "both checkpoints in status after the takeover", b)
    assert st["latestCheckpoint"]["uuid"] == ck2["uuid"]
    assert metric_value(b.metrics(), "tinv_operator_leader") == 1



def test_a_normal_stop_hands_over_at_once(ha):
    cp, ns, store, ops = ha
    a, b = ops["op-a"], ops["op-b"]
    b.start()
    wait(cp, lambda: holder(cp, ns) == "op-b", 60, "op-b to lead", b)
    a.start()
    wait(cp, a.healthy, 60, "op-a on standby", a)
    t0 = time.monotonic()
    b.stop()  # SIGTERM, as a rolling update or a drain does: the leader releases the Lease
    stopped = time.monotonic() - t0
    wait(cp, lambda: holder(cp, ns) == "op-a", 20, "op-a to take over after a normal stop", a)
    took = time.monotonic() - t0
    assert took < 10, f"handover after {took:.1f}s (the stop took {stopped:.1f}s)\n{b.logs(40)}"
    assert "released Lease" in b.logs(40)
