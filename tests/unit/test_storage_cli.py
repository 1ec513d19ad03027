"""tinv.api.storage on local paths, and `tinv checkpoints` / `tinv fetch` reading it."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml

from tinv.api.storage import MANIFEST_FILE, Store, checkpoint_uri, join, list_checkpoints, run_root


def _job(tmp_path, storage_uri):
    return {
        "apiVersion": "tinv.io/v1alpha1",
        "kind": "TextualInversionJob",
        "metadata": {"name": "det-logo", "namespace": "team-a", "uid": "0123456789abcdef"},
        "spec": {
            "model": {"source": "builtin:tiny"},
            "concepts": [{"token": "det-logo", "initializer": "logo", "images": str(tmp_path)}],
            "storage": {"uri": storage_uri},
        },
    }


def test_layout_and_complete_checkpoints_only(tmp_path):
    root = run_root(f"file://{tmp_path}", "team-a", "det-logo", "0123456789abcdef")
    assert root == f"file://{tmp_path}/team-a/det-logo-01234567"
    store = Store()
    for step, uuid, complete in [(200, "bbbb", True), (100, "aaaa", True), (300, "cccc", False)]:
        store.write_bytes(join(checkpoint_uri(root, uuid), "learned_embeds.safetensors"), b"x")
        if complete:
            store.write_json(join(checkpoint_uri(root, uuid), MANIFEST_FILE), {"uuid": uuid, "step": step, "loss": 0.1})
    found = list_checkpoints(store, root)
    assert [c["uuid"] for c in found] == ["aaaa", "bbbb"], "incomplete checkpoint listed or wrong order"
    assert found[1]["uri"] == f"{root}/checkpoints/bbbb"
    assert not any(p.name.startswith(".") for p in tmp_path.rglob("*")), "temp files left behind"
    assert list_checkpoints(store, join(root, "nothing-here")) == []


def test_cli_checkpoints_and_fetch(tmp_path):
    runs = tmp_path / "runs"
    doc = _job(tmp_path, f"file://{runs}")
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(doc))
    root = run_root(f"file://{runs}", "team-a", "det-logo", "0123456789abcdef")
    store = Store()
    uuid = "5f0c7a52-1b7e-4c55-9f6e-6f1c2b7a9d10"
    store.write_bytes(join(checkpoint_uri(root, uuid), "learned_embeds.safetensors"), b"weights")
    store.write_json(join(checkpoint_uri(root, uuid), MANIFEST_FILE), {"uuid": uuid, "step": 100, "loss": 0.123456, "created_at": "2026-11-25T00:00:00Z"})
    r = subprocess.run([sys.executable, "-m", "tinv.api.cli", "checkpoints", str(job_file)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert uuid in r.stdout and "0.1235" in r.stdout
    r = subprocess.run([sys.executable, "-m", "tinv.api.cli", "checkpoints", str(job_file), "--json"], capture_output=True, text=True)
    assert json.loads(r.stdout)[0]["step"] == 100
    dest = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "tinv.api.cli", "fetch", uuid[:8], str(dest), "--job", str(job_file)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (dest / "learned_embeds.safetensors").read_bytes() == b"weights" and (dest / MANIFEST_FILE).exists()
    r = subprocess.run([sys.executable, "-m", "tinv.api.cli", "fetch", "ffff", str(dest), "--job", str(job_file)], capture_output=True, text=True)
    assert r.returncode == 2 and "no complete checkpoint matches" in r.stderr and "Traceback" not in r.stderr
