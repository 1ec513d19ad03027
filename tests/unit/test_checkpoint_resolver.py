"""The one "checkpoints of job X" resolver in tinv.api.storage (issue 13, bug 8): exact run-folder
names, newest by step then time, torch-free."""

from __future__ import annotations

import subprocess
import sys

from tinv.api import storage


def put_checkpoint(root, uuid: str, step: int, created: str, complete: bool = True) -> None:
    folder = root / "checkpoints" / uuid
    folder.mkdir(parents=True)
    if complete:
        storage.Store().write_json(str(folder / storage.MANIFEST_FILE), {"uuid": uuid, "step": step, "created_at": created})


def test_a_job_never_sees_another_jobs_runs_by_prefix(tmp_path):
    ns = tmp_path / "default"
    put_checkpoint(ns / "foo-local", "a", 5, "2026-01-01T00:00:00Z")
    put_checkpoint(ns / "foo-1234abcd", "b", 7, "2026-01-01T00:00:00Z")
    put_checkpoint(ns / "foo-bar-local", "c", 500, "2026-02-01T00:00:00Z")  # another job, further along
    put_checkpoint(ns / "foo-bar-9999ffff", "d", 900, "2026-02-01T00:00:00Z")
    put_checkpoint(ns / "foo-x", "e", 999, "2026-02-01T00:00:00Z")  # not a run folder at all
    st = storage.Store()
    assert [r.rsplit("/", 1)[-1] for r in storage.run_roots(st, str(tmp_path), "default", "foo")] == ["foo-1234abcd", "foo-local"]
    assert storage.newest_checkpoint(st, str(tmp_path), "default", "foo")["uuid"] == "b"
    assert storage.newest_checkpoint(st, str(tmp_path), "default", "foo-bar")["uuid"] == "d"
    assert storage.newest_checkpoint(st, str(tmp_path), "default", "fo") is None
    assert storage.find_checkpoint(st, str(tmp_path), "default", "c", job="foo") is None
    assert storage.find_checkpoint(st, str(tmp_path), "default", "c")["uri"].endswith("foo-bar-local/checkpoints/c")
    assert storage.job_of_run("foo-bar-9999ffff") == "foo-bar" and storage.job_of_run("foo-x") is None


def test_newest_is_by_step_then_time_and_complete_only(tmp_path):
    root = tmp_path / "ns" / "j-local"
    put_checkpoint(root, "old-high", 20, "2026-01-01T00:00:00Z")
    put_checkpoint(root, "new-low", 10, "2026-03-01T00:00:00Z")
    put_checkpoint(root, "same-step-later", 20, "2026-01-02T00:00:00Z")
    put_checkpoint(root, "incomplete", 99, "2026-04-01T00:00:00Z", complete=False)
    st = storage.Store()
    found = storage.job_checkpoints(st, str(tmp_path), "ns", "j")
    assert [m["uuid"] for m in found] == ["new-low", "old-high", "same-step-later"]
    assert storage.newest_checkpoint(st, str(tmp_path), "ns", "j")["uuid"] == "same-step-later"
    # list_checkpoints keeps its signature and order
    assert [m["uuid"] for m in storage.list_checkpoints(st, str(root))] == ["new-low", "old-high", "same-step-later"]


def test_the_resolver_imports_no_torch():
    code = "import sys, tinv.api.storage as s; s.newest_checkpoint(s.Store(), '/nonexistent', 'x', 'y'); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
