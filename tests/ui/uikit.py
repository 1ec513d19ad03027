"""What the UI tests share: serving the real app on a free port, and a real headless Chromium.

The browser is Debian's /usr/bin/chromium (installed by `make setup`), driven by playwright through
`executable_path` (playwright's own browser download is never used). Screenshots go to
$TINV_UI_SCREENSHOTS (default: the test's tmp folder) for people to look at.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (make setup, or apt-get install -y chromium)")

# Hostile strings in every user-written field: if any of them were parsed as HTML, pwn() would run.
# (a token may hold neither whitespace nor '/', so it attacks through attributes: a missing space between
# attributes is still parsed as a new attribute)
HOSTILE_TOKEN = '"><b>det<script>pwn(1)"onfocus=pwn(2)"autofocus="'
HOSTILE_TEXT = '<script>pwn(3)</script> "><img src=x onerror=pwn(4)> a det-logo'
INIT_SCRIPT = "window.__pwned = []; window.pwn = (n) => window.__pwned.push(n); window.alert = (m) => window.__pwned.push('alert:' + m);"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(source) -> Iterator[str]:
    """The real app under uvicorn in a thread; yields its base URL."""
    import uvicorn

    from tinv.ui.app import create_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(source), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the UI server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@contextmanager
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            yield b
        finally:
            b.close()


class Page:
    """A browser page that records every request, console error and dialog, for the assertions."""

    def __init__(self, browser, base: str, tmp: Path):
        self.context = browser.new_context(viewport={"width": 1320, "height": 900})
        self.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=base)
        self.context.add_init_script(INIT_SCRIPT)
        self.page = self.context.new_page()
        # generous: the first page of a run imports tensorboard and reads its event files, slow on a busy 2-core CI box
        self.page.set_default_timeout(90_000)
        self.base = base
        self.tmp = tmp
        self.requests: list[str] = []
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))

    def goto(self, path: str):
        resp = self.page.goto(self.base + path)
        self.page.wait_for_load_state("networkidle")
        return resp

    def wait_js(self, expression: str, timeout: float = 10.0):
        """Poll a JS expression until truthy. (Playwright's wait_for_function evaluates strings with
        eval, which the UI's Content Security Policy forbids, as it should.)"""
        deadline = time.monotonic() + timeout
        while True:
            value = self.page.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for: {expression}")
            time.sleep(0.1)

    def pwned(self) -> list:
        return self.page.evaluate("window.__pwned")

    def scroll_through(self) -> None:
        """Scroll to the bottom in steps so lazy images load, then wait for them to decode."""
        self.page.evaluate(
            """async () => {
                for (let y = 0; y < document.body.scrollHeight; y += 600) { window.scrollTo(0, y); await new Promise(r => setTimeout(r, 60)); }
                await Promise.all([...document.images].map(i => i.complete ? null : new Promise(r => { i.onload = i.onerror = r; })));
                window.scrollTo(0, 0);
            }"""
        )

    def screenshot(self, name: str) -> Path:
        folder = Path(os.environ.get("TINV_UI_SCREENSHOTS") or self.tmp)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def close(self) -> None:
        self.context.close()


def assert_local_only(requests: list[str], base: str) -> None:
    """Every request the page made went to the UI server: no CDN, no external URL."""
    outside = [u for u in requests if not (u.startswith(base + "/") or u.startswith(("data:", "blob:")))]
    assert not outside, f"requests outside the UI server: {outside}"


# --------------------------------------------------------------------------- the run the tests look at

REPO = Path(__file__).resolve().parents[2]
IMAGES = REPO / "examples" / "images" / "det-logo"
JOB_NAME, GRID_NAME = "ui-det-logo", "ui-det-logo-grid"
STEPS, CHECKPOINT_EVERY = 40, 10


def job_doc(name: str = JOB_NAME, **storage) -> dict:
    return {
        "apiVersion": "tinv.io/v1alpha1",
        "kind": "TextualInversionJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"source": "builtin:tiny"},
            "concepts": [{"token": HOSTILE_TOKEN, "initializer": HOSTILE_TEXT, "images": str(IMAGES)}],
            "training": {
                "steps": STEPS, "batchSize": 2, "gradientAccumulation": 1, "resolution": 64, "learningRate": 5.0e-3,
                "checkpointEvery": CHECKPOINT_EVERY, "checkpointsKept": 2, "logEvery": 5,
                "validation": {"prompts": [HOSTILE_TEXT, f"a photo of {HOSTILE_TOKEN}"], "steps": 4, "guidanceScale": 3.0},
            },
            **({"storage": storage} if storage else {}),
        },
    }


def grid_doc() -> dict:
    return {
        "apiVersion": "tinv.io/v1alpha1",
        "kind": "GenerationGrid",
        "metadata": {"name": GRID_NAME},
        "spec": {
            "model": {"source": "builtin:tiny"},
            "embeddings": [{"job": JOB_NAME, "checkpoint": "latest"}],
            "prompts": [f"{HOSTILE_TEXT} {HOSTILE_TOKEN}", f"a watercolor of {HOSTILE_TOKEN}"],
            "negativePrompt": HOSTILE_TEXT,
            "grid": {"guidanceScales": [1, 4], "steps": [4], "schedulers": ["ddim"], "seeds": [0, 1], "sizes": [{"width": 64, "height": 64}]},
            "batchSize": 4,
            "precision": "fp32",
            "resources": {"gpusPerWorker": 0},
        },
    }


def tinv(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    r = subprocess.run([sys.executable, "-m", "tinv.api.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"tinv {' '.join(args)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r
