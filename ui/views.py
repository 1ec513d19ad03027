"""Pure builders: what each page shows, from a `Run` and its `StorageView`. No I/O here.

Templates render these dicts with autoescaping on, so every string that users wrote (tokens,
prompts, initializers, names, captions, log lines) reaches the browser as text.
"""

from __future__ import annotations

import datetime as dt
import shlex
from typing import Any

import yaml

from tinv.api.models import API_VERSION

from .sources import Run
from .storage_view import StorageView, image_uri

PHASES = ("Pending", "Waiting", "Running", "Suspended", "Succeeded", "Failed")
SORT_KEYS = ("name", "kind", "phase", "progress", "loss", "age", "gpu")


def parse_time(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    try:
        t = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


def duration_text(seconds: float | None) -> str:
    """Like kubectl's ages: 42s, 5m, 3h12m, 4d."""
    if seconds is None or seconds < 0:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s" if s < 600 else f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d"


def fraction(progress: dict[str, Any]) -> float | None:
    done, total = progress.get("step"), progress.get("total_steps")
    if done is None or not total:
        done, total = progress.get("images_done"), progress.get("images_total")
    if done is None or not total:
        return None
    return max(0.0, min(1.0, done / total))


def run_url(run: Run) -> str:
    return f"/{run.kind}s/{run.namespace}/{run.name}"


def row(run: Run, now: dt.datetime) -> dict[str, Any]:
    """One line of the runs list."""
    p = run.progress
    created = parse_time(run.created)
    frac = fraction(p)
    ckpt = run.latest_checkpoint or {}
    loss = p.get("loss")
    return {
        "kind": run.kind,
        "namespace": run.namespace,
        "name": run.name,
        "url": run_url(run),
        "phase": run.phase or "Pending",
        "fraction": frac,
        "percent": None if frac is None else round(100 * frac, 1),
        "summary": p.get("summary") or ("" if frac is None else f"{round(100 * frac)}%"),
        "loss": loss if isinstance(loss, (int, float)) else None,
        "checkpoint": ckpt.get("uuid"),
        "checkpoint_step": ckpt.get("step"),
        "gpu": run.gpu_class or "",
        "age_seconds": (now - created).total_seconds() if created else None,
        "age": duration_text((now - created).total_seconds()) if created else "-",
        "created": run.created or "",
        "problem": run.problem,
        "reason": _running_reason(run.status),
    }


def _running_reason(status: dict[str, Any]) -> str:
    for c in status.get("conditions") or []:
        if c.get("type") == "Running":
            return c.get("reason") or ""
    return ""


def filter_sort(rows: list[dict[str, Any]], q: str = "", kind: str = "", phase: str = "", sort: str = "age", desc: bool = False) -> list[dict[str, Any]]:
    """Filter by text (name, namespace, GPU, checkpoint), kind and phase; sort by one column.

    Age sorts newest first unless `desc`; rows without a value go last either way."""
    q = q.strip().lower()
    out = [
        r
        for r in rows
        if (not q or q in r["name"].lower() or q in r["namespace"].lower() or q in r["gpu"].lower() or q in (r["checkpoint"] or ""))
        and (not kind or r["kind"] == kind)
        and (not phase or r["phase"] == phase)
    ]
    key = {
        "name": lambda r: (r["name"], r["namespace"]),
        "kind": lambda r: (r["kind"], r["name"]),
        "phase": lambda r: (PHASES.index(r["phase"]) if r["phase"] in PHASES else 99, r["name"]),
        "progress": lambda r: r["fraction"],
        "loss": lambda r: r["loss"],
        "age": lambda r: r["age_seconds"],
        "gpu": lambda r: r["gpu"] or None,
    }.get(sort, lambda r: r["age_seconds"])
    present = [r for r in out if key(r) is not None]
    missing = [r for r in out if key(r) is None]
    present.sort(key=key, reverse=desc)
    return present + missing


def counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    out = {p: 0 for p in PHASES}
    for r in rows:
        out[r["phase"]] = out.get(r["phase"], 0) + 1
    return out


# --------------------------------------------------------------------------- job page


def throughput(run: Run, view: StorageView) -> dict[str, Any]:
    p = {**run.progress, **(view.progress or {})}  # storage is fresher than the status copy
    frac = fraction(p)
    return {
        "step": p.get("step"),
        "total_steps": p.get("total_steps"),
        "percent": None if frac is None else round(100 * frac, 1),
        "loss": p.get("loss"),
        "learning_rate": p.get("learning_rate"),
        "samples_per_second": p.get("samples_per_second"),
        "images_done": p.get("images_done"),
        "images_total": p.get("images_total"),
        "images_per_second": p.get("images_per_second"),
        "eta": duration_text(p.get("eta_seconds")) if p.get("eta_seconds") is not None else "-",
        "world_size": p.get("world_size"),
        "updated_at": p.get("updated_at"),
        "state": p.get("state"),
        "stopped": p.get("stopped"),
        "message": p.get("message"),
    }


def checkpoints(run: Run, view: StorageView) -> list[dict[str, Any]]:
    """The checkpoints table, newest first: storage manifests (with their files), else the
    status's list when storage could not be read."""
    if view.checkpoints:
        rows = [
            {
                "uuid": m.get("uuid"),
                "step": m.get("step"),
                "loss": m.get("loss"),
                "created": m.get("created_at"),
                "uri": m.get("uri"),
                "files": sorted((m.get("files") or {}).keys()),
                "sizes": m.get("file_sizes") or {},
            }
            for m in view.checkpoints
        ]
    else:
        rows = [
            {"uuid": c.get("uuid"), "step": c.get("step"), "loss": c.get("loss"), "created": c.get("createdAt"), "uri": c.get("uri"), "files": [], "sizes": {}}
            for c in run.status.get("checkpoints") or []
        ]
    return sorted(rows, key=lambda r: (r["step"] or 0), reverse=True)


def submitted(run: Run, view: StorageView) -> tuple[dict[str, Any], list[dict[str, Any]], str]:
    """Hyperparameters and concepts as submitted, and where they came from."""
    if run.doc:
        spec = run.doc.get("spec") or {}
        return spec.get("training") or {}, spec.get("concepts") or [], "the resource"
    newest = view.checkpoints[-1] if view.checkpoints else {}
    return newest.get("hyperparameters") or {}, newest.get("concepts") or [], "the newest checkpoint's manifest"


def spec_for_resume(run: Run, view: StorageView) -> dict[str, Any]:
    """The job's spec to start a new job from: as submitted, or rebuilt from the newest manifest."""
    if run.doc:
        spec = {k: v for k, v in (run.doc.get("spec") or {}).items() if k != "resumeFrom"}
        return yaml.safe_load(yaml.safe_dump(spec))  # a deep copy
    newest = view.checkpoints[-1] if view.checkpoints else {}
    model = {k: v for k, v in (newest.get("model") or {}).items() if v is not None}
    concepts = [
        {"token": c.get("token"), "initializer": c.get("initializer"), "property": c.get("property"), "images": "CHANGE-ME (the run folder does not record it)"}
        for c in newest.get("concepts") or []
    ]
    return {"model": model, "concepts": concepts, "training": newest.get("hyperparameters") or {}}


def resume_snippet(run: Run, view: StorageView, uuid: str, mode: str) -> str:
    """A ready-to-apply TextualInversionJob that continues or forks from checkpoint `uuid`."""
    spec = spec_for_resume(run, view)
    spec["resumeFrom"] = {"job": run.name, "checkpoint": uuid, "mode": mode}
    doc = {
        "apiVersion": API_VERSION,
        "kind": "TextualInversionJob",
        "metadata": {"name": f"{run.name[:40]}-{mode}-{uuid[:8]}", "namespace": run.namespace},
        "spec": spec,
    }
    return yaml.safe_dump(doc, sort_keys=False, width=120)


def conditions(run: Run) -> list[dict[str, Any]]:
    return [
        {
            "type": c.get("type"),
            "status": c.get("status"),
            "reason": c.get("reason") or "",
            "message": c.get("message") or "",
            "time": c.get("lastTransitionTime") or "",
        }
        for c in run.status.get("conditions") or []
    ]


def validation_steps(view: StorageView, prompts: list[str]) -> dict[str, Any]:
    """Validation images by step: one row per prompt (tag validation/<i>), one column per step."""
    images = view.scalars.images
    tags = sorted(images, key=lambda t: (not t.rsplit("/", 1)[1].isdigit(), int(t.rsplit("/", 1)[1]) if t.rsplit("/", 1)[1].isdigit() else 0, t))
    steps = sorted({s for t in tags for s in images[t]})
    rows = []
    for tag in tags:
        i = tag.rsplit("/", 1)[1]
        if not i.isdigit():
            continue
        prompt = prompts[int(i)] if int(i) < len(prompts) else tag
        rows.append({"tag_index": i, "prompt": prompt, "cells": [s if s in images[tag] else None for s in steps]})
    return {"steps": steps, "rows": rows}


def curves(view: StorageView) -> dict[str, list[list[float]]]:
    """The series the job page draws: [[step, value], ...] per name."""
    from .storage_view import LOSS_TAG, LR_TAG, THROUGHPUT_TAG

    s = view.scalars.series
    return {
        "loss": [[a, b] for a, b in s.get(LOSS_TAG, [])],
        "lr": [[a, b] for a, b in s.get(LR_TAG, [])],
        "throughput": [[a, b] for a, b in s.get(THROUGHPUT_TAG, [])],
    }


# --------------------------------------------------------------------------- grid page


def shard_rows(view: StorageView, run: Run) -> list[dict[str, Any]]:
    rows = []
    for s in view.shards:
        shard = s.get("shard") or {}
        done, total = s.get("images_done"), s.get("images_total")
        rows.append({
            "index": shard.get("index"),
            "count": shard.get("count"),
            "state": s.get("state") or "",
            "done": done,
            "total": total,
            "percent": round(100 * done / total, 1) if done is not None and total else None,
            "ips": s.get("images_per_second"),
            "eta": duration_text(s.get("eta_seconds")) if s.get("eta_seconds") is not None else "-",
            "message": s.get("message") or "",
        })
    if not rows and run.progress.get("images_total"):
        p = run.progress
        rows.append({"index": "all", "count": None, "state": run.phase or "", "done": p.get("images_done"), "total": p.get("images_total"),
                     "percent": (fraction(p) or 0) * 100, "ips": p.get("images_per_second"), "eta": duration_text(p.get("eta_seconds")), "message": ""})
    return rows


def gallery(run: Run, view: StorageView) -> list[dict[str, Any]]:
    """Every image of index.json with its full parameters and its `tinv reproduce` command."""
    out = []
    for img in (view.index or {}).get("images") or []:
        f = img.get("file")
        if not f:
            continue
        uri = image_uri(run.root or "", f)
        params = {k: v for k, v in img.items() if k not in ("file", "present")}
        out.append({
            "file": f,
            "present": img.get("present", True),
            "prompt": img.get("prompt", ""),
            "params": params,
            "caption": f"{img.get('scheduler', '')} · {img.get('steps', '')} steps · guidance {img.get('guidance_scale', '')} · seed {img.get('seed', '')}",
            "reproduce": f"tinv reproduce {shlex.quote(uri)} --check",
        })
    return out


def contact_sheets(view: StorageView) -> list[dict[str, Any]]:
    return [{"file": s.get("file"), "prompt": s.get("prompt", "")} for s in (view.index or {}).get("contact_sheets") or [] if s.get("file")]


def to_yaml(value: Any) -> str:
    return yaml.safe_dump(value, sort_keys=False, width=120) if value else ""
