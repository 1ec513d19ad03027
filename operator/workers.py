"""Worker counts and failed grid shards for status (issue 14, item 12): what users of Kubeflow
Trainer (replicaStatuses) and KubeRay expect to read off a resource without looking at pods.

Pure functions over the Job view (status.job_view) and the resource's previous status.
"""

from __future__ import annotations

from typing import Any

from .builders import GRID

COUNTS = ("active", "ready", "succeeded", "failed", "terminating")


def parse_indexes(text: str | None) -> set[int]:
    """A Job's index list ("1,3-5") as a set of ints; malformed parts are ignored."""
    out: set[int] = set()
    for part in (text or "").split(","):
        part = part.strip()
        lo, _, hi = part.partition("-")
        if lo.isdigit() and (not hi or hi.isdigit()):
            out.update(range(int(lo), int(hi or lo) + 1))
    return out


def worker_status(kind: str, job: dict[str, Any] | None, old: dict[str, Any]) -> dict[str, Any]:
    """status.workers (the Job's pod counts) and, for a grid, status.failedShards: the indexes the
    Job gave up on (backoffLimitPerIndex exhausted). Without a Job (finished and removed) the last
    recorded values stay."""
    out: dict[str, Any] = {}
    if job is None:
        for key in ("workers", "failedShards"):
            if old.get(key):
                out[key] = old[key]
        return out
    out["workers"] = {k: int(job.get(k) or 0) for k in COUNTS}
    if kind == GRID:
        failed = parse_indexes(job.get("failedIndexes")) | {int(i) for i in old.get("failedShards") or [] if isinstance(i, int)}
        failed -= parse_indexes(job.get("completedIndexes"))
        if failed:
            out["failedShards"] = sorted(failed)[:128]
    return out
