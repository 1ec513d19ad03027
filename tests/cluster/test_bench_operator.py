"""bench/operator.py itself, small: both modes run on a fresh control plane and print rows a reader
can trust (every Job created by the operator or, in floor mode, by the script; the request mix and
CPU figures present). The real figures come from `--n 1000` runs (bench/README.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def _bench(tmp_path, *args: str) -> tuple[dict, dict]:
    res = subprocess.run([sys.executable, str(REPO / "bench" / "operator.py"), "--n", "6", "--timeout", "120", *args],
                         capture_output=True, text=True, timeout=400, cwd=REPO, env={**os.environ, "TMPDIR": str(tmp_path)})
    assert res.returncode == 0, res.stderr[-4000:]
    rows = {r["name"]: r for r in map(json.loads, res.stdout.splitlines())}
    config = json.loads(next(line for line in res.stderr.splitlines() if line.startswith("config: "))[len("config: "):])
    return rows, config


def test_the_floor_mode_creates_the_operators_children_itself(tmp_path):
    rows, config = _bench(tmp_path, "--mode", "floor")
    assert set(rows) == {"operator_resources_created_by_client_seconds", "operator_jobs_created_seconds",
                         "operator_jobs_created_after_last_resource_seconds"}
    mix = config["requests_until_jobs"]  # what the API server counted: the script's creates, nobody else's
    assert mix["POST textualinversionjobs"] == mix["POST jobs"] == 6 and mix.get("POST configmaps", 0) == 0  # the document rides in the Job
    assert "PATCH textualinversionjobs/status" not in mix
    assert config["cpu_seconds_until_jobs"]["kube-apiserver"] > 0 and "operator" not in config["cpu_seconds_until_jobs"]


def test_the_live_mode_measures_the_operator(tmp_path):
    rows, config = _bench(tmp_path, "--poll-interval", "2")
    for name in ("operator_jobs_created_seconds", "operator_status_from_pods_seconds", "operator_checkpoints_in_status_seconds",
                 "operator_cpu_seconds", "operator_peak_rss_mib", "operator_api_requests_per_resource"):
        assert rows[name]["value"] > 0, name
    assert config["operator_requests_by_kind"]["POST jobs"] == 6  # one Job per resource, never two
    assert config["requests_until_jobs"]["POST jobs"] == 6
    assert config["cpu_seconds_until_jobs"]["operator"] > 0
    assert config["phases"] == {"Running": 6}
