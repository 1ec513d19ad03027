"""The UI's pure builders and its HTTP surface, without a browser: run folders written in the storage
layout of tinv.api.storage (progress.json, checkpoints/<uuid>/manifest.json, images/index.json),
served by the real app on loopback."""

from __future__ import annotations

import datetime as dt
import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from uikit import HOSTILE_TEXT, HOSTILE_TOKEN, serve

from tinv.ui import views as V
from tinv.ui.sources import LocalSource, Run

UUID = "0283da21-39cf-473a-aa8b-953680b48ed2"


def _job_folder(root: Path, name: str, step: int, loss: float, state: str = "running") -> Path:
    folder = root / "default" / f"{name}-local"
    ck = folder / "checkpoints" / UUID
    ck.mkdir(parents=True)
    (ck / "learned_embeds.safetensors").write_bytes(b"embeds-" + name.encode())
    (ck / "manifest.json").write_text(json.dumps({
        "uuid": UUID, "step": step, "loss": loss, "created_at": "2026-12-01T22:05:46Z",
        "files": {"learned_embeds.safetensors": "x"}, "hyperparameters": {"steps": 200, "learningRate": 0.005},
        "concepts": [{"token": HOSTILE_TOKEN, "initializer": HOSTILE_TEXT, "property": "object", "vectors": 2}],
        "model": {"source": "builtin:tiny", "revision": None},
    }))
    (folder / "progress.json").write_text(json.dumps({
        "state": state, "step": step, "total_steps": 200, "loss": loss, "summary": f"{step}/200",
        "started_at": "2026-12-01T22:00:00Z", "job": {"name": name},
        "latest_checkpoint": {"uuid": UUID, "step": step, "uri": str(ck)},
    }))
    return folder


@pytest.fixture
def runs_root(tmp_path) -> Path:
    root = tmp_path / "tinv-runs"
    _job_folder(root, "alpha", 50, 0.9)
    _job_folder(root, "beta", 150, 0.3, state="succeeded")
    grid = root / "default" / "gamma-local"
    (grid / "images").mkdir(parents=True)
    (grid / "images" / "a.png").write_bytes(b"\x89PNG fake")
    (grid / "progress.json").write_text(json.dumps({"kind": "GenerationGrid", "state": "running", "images_done": 0, "images_total": 4}))
    (grid / "images" / "index.json").write_text(json.dumps({"images": [{"file": "a.png", "prompt": HOSTILE_TEXT, "seed": 0}]}))
    return root


def test_local_source_reads_kinds_phases_and_names(runs_root):
    runs = {r.name: r for r in LocalSource(runs_root).runs()}
    assert set(runs) == {"alpha", "beta", "gamma"}
    assert (runs["alpha"].kind, runs["alpha"].phase) == ("job", "Running")
    assert (runs["beta"].kind, runs["beta"].phase) == ("job", "Succeeded")
    assert (runs["gamma"].kind, runs["gamma"].phase) == ("grid", "Running")
    assert runs["beta"].latest_checkpoint["uuid"] == UUID


def test_filter_and_sort(runs_root):
    now = dt.datetime(2026, 12, 1, 23, 0, tzinfo=dt.timezone.utc)
    rows = [V.row(r, now) for r in LocalSource(runs_root).runs()]
    assert [r["name"] for r in V.filter_sort(rows, sort="loss")] == ["beta", "alpha", "gamma"], "no loss sorts last"
    assert [r["name"] for r in V.filter_sort(rows, sort="loss", desc=True)] == ["alpha", "beta", "gamma"]
    assert [r["name"] for r in V.filter_sort(rows, kind="grid")] == ["gamma"]
    assert [r["name"] for r in V.filter_sort(rows, phase="Succeeded")] == ["beta"]
    assert [r["name"] for r in V.filter_sort(rows, q="ALP")] == ["alpha"]
    assert [r["name"] for r in V.filter_sort(rows, sort="progress")] == ["gamma", "alpha", "beta"]
    assert V.row(LocalSource(runs_root).run("job", "default", "alpha"), now)["age"] == "1h00m"


@pytest.mark.parametrize("seconds,text", [(None, "-"), (5, "5s"), (75, "1m15s"), (900, "15m"), (3 * 3600 + 120, "3h02m"), (5 * 86400, "5d")])
def test_duration_text(seconds, text):
    assert V.duration_text(seconds) == text


def test_resume_snippet_is_a_valid_job(runs_root):
    from tinv.api.validation import validate_document
    from tinv.ui.storage_view import StorageView

    doc = {"apiVersion": "tinv.io/v1alpha1", "kind": "TextualInversionJob", "metadata": {"name": "alpha"},
           "spec": {"model": {"source": "builtin:tiny"}, "concepts": [{"token": HOSTILE_TOKEN, "initializer": HOSTILE_TEXT, "images": "s3://b/i"}],
                    "resumeFrom": {"job": "older"}}}
    run = Run(kind="job", namespace="team-a", name="alpha", doc=doc)
    for mode in ("continue", "fork"):
        text = V.resume_snippet(run, StorageView(), UUID, mode)
        out = yaml.safe_load(text)
        model, problems = validate_document(out)
        assert not problems, problems
        assert out["spec"]["resumeFrom"] == {"job": "alpha", "checkpoint": UUID, "mode": mode}
        assert out["metadata"] == {"name": f"alpha-{mode}-{UUID[:8]}", "namespace": "team-a"}
        assert out["spec"]["concepts"] == doc["spec"]["concepts"]
    assert doc["spec"]["resumeFrom"] == {"job": "older"}, "the run's own document is not changed"


def _get(url: str) -> tuple[int, bytes, dict]:
    try:
        with urllib.request.urlopen(url) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as err:
        return err.code, err.read(), dict(err.headers)


def test_http_surface_escapes_confines_files_and_sets_a_strict_csp(runs_root):
    with serve(LocalSource(runs_root)) as base:
        status, body, headers = _get(base + "/jobs/default/alpha")
        assert status == 200
        html = body.decode()
        assert "script-src 'self'" in headers["content-security-policy"] and headers["x-content-type-options"] == "nosniff"
        assert HOSTILE_TEXT not in html and HOSTILE_TOKEN not in html, "user strings only ever escaped"
        assert "&lt;script&gt;pwn(3)&lt;/script&gt;" in html and "&#34;&gt;&lt;b&gt;det&lt;script&gt;" in html
        assert "http://" not in html and "https://" not in html, "no external URL in the page"
        assert _get(base + f"/jobs/default/alpha/checkpoints/{UUID}/learned_embeds.safetensors")[1] == b"embeds-alpha"
        for bad in (f"/jobs/default/alpha/checkpoints/{UUID}/manifest.json",  # not a listed file
                    f"/jobs/default/alpha/checkpoints/{UUID}/..%2F..%2Fprogress.json",
                    "/grids/default/gamma/images/..%2Fprogress.json", "/grids/default/gamma/images/.hidden.png",
                    "/jobs/default/nope", "/grids/default/alpha"):
            assert _get(base + bad)[0] == 404, bad
        status, body, headers = _get(base + "/grids/default/gamma/images/a.png")
        assert (status, body, headers["content-type"]) == (200, b"\x89PNG fake", "image/png")
        assert _get(base + "/static/plotly.min.js")[1].startswith(b"/**"), "plotly.js served from the plotly package"
        status, body, _ = _get(base + "/partials/runs?kind=grid")
        assert status == 200 and b"gamma" in body and b"alpha" not in body
        assert _get(base + "/healthz")[1] == b"ok\n"


def test_tinv_api_does_not_import_the_ui_stack_and_tinv_ui_is_dispatched():
    import subprocess
    import sys

    probe = "import sys, tinv.api.cli; print(sorted(m for m in sys.modules if m.split('.')[0] in ('starlette', 'uvicorn', 'plotly', 'jinja2', 'tinv')))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert "starlette" not in out and "uvicorn" not in out and "plotly" not in out and "tinv.ui" not in out, out
    top = subprocess.run([sys.executable, "-m", "tinv.api.cli", "--help"], capture_output=True, text=True)
    assert "  ui " in top.stdout
    help_ = subprocess.run([sys.executable, "-m", "tinv.api.cli", "ui", "--help"], capture_output=True, text=True)
    assert help_.returncode == 0 and "--kube" in help_.stdout


def test_templates_and_static_files_ship_with_the_package():
    from importlib.resources import files

    pkg = files("tinv.ui")
    for name in ("templates/base.html", "templates/job.html", "templates/grid.html", "templates/runs.html", "static/app.js", "static/app.css"):
        assert pkg.joinpath(name).is_file(), name
    import tomllib

    project = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    assert project["tool"]["setuptools"]["package-data"]["tinv.ui"] == ["templates/*.html", "static/*"]
