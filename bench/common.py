"""What every benchmark shares: one JSON line per result, its provenance, and `--record`.

A result line is {"name", "value", "unit", "config", "git_revision", "device", "timestamp", ...};
`Results(kind, record=True)` also appends the lines to bench/results/<kind>.jsonl when closed.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"


def git_revision() -> str:
    """Short revision of the checkout, with -dirty when it has uncommitted changes."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        return (rev or "unknown") + ("-dirty" if dirty else "")
    except OSError:
        return "unknown"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str = "cpu") -> str:
    """The GPU's name for cuda devices; else the CPU model, cores and torch threads (if torch is loaded)."""
    torch = sys.modules.get("torch")
    if device.startswith("cuda") and torch is not None:
        return torch.cuda.get_device_name(0)
    threads = f", {torch.get_num_threads()} torch threads" if torch is not None else ""
    return f"cpu: {cpu_model()}, {os.cpu_count()} cores{threads}"


class Results:
    """Collects result rows, prints each as one JSON line, and appends them to bench/results/<kind>.jsonl
    when `record` is set."""

    def __init__(self, kind: str, *, record: bool = False, device: str = "cpu"):
        self.path = RESULTS_DIR / f"{kind}.jsonl"
        self.record = record
        self.device = device
        self.revision = git_revision()
        self.rows: list[dict[str, Any]] = []

    def emit(self, name: str, value: float, unit: str, config: dict[str, Any], *, digits: int = 4, **extra: Any) -> dict[str, Any]:
        row = {
            "name": name,
            "value": round(value, digits),
            "unit": unit,
            "config": config,
            "git_revision": self.revision,
            "device": device_name(self.device),
            "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            **extra,
        }
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        return row

    def close(self) -> None:
        if not (self.record and self.rows):
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            for row in self.rows:
                f.write(json.dumps(row) + "\n")
        print(f"appended {len(self.rows)} results to {self.path.relative_to(REPO)}", file=sys.stderr)
