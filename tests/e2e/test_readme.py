"""The README's first two commands are `make demo` and `make test`, and `make demo` works as written."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# measured on the shipped builtin:shapes (see the closing lines of bench/README.md's shapes section)
BACKGROUND_MIN = 0.5
MARKS_MIN = 0.75


def _first_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    return [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]


def test_readme_starts_with_the_two_commands_and_ci_runs_the_second():
    assert _first_commands() == ["make demo", "make test"]
    ci = (REPO / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.M), ".ci/run must run the README's test command"


@pytest.mark.slow
@pytest.mark.e2e
def test_make_demo_as_written(tmp_path):
    """The first command, in the checkout (CI's is a clean clone): trains, checkpoints, renders the grid."""
    r = subprocess.run(["make", "demo"], cwd=REPO, capture_output=True, text=True, timeout=900)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-5000:]
    assert "valid TextualInversionJob 'tiny-det-logo'" in out
    uuids = re.findall(r"^([0-9a-f-]{36})\s+(\d+)\s", out, re.M)
    assert uuids and uuids[-1][1] == "200", out[-3000:]  # the final checkpoint is listed with its uuid
    gallery = REPO / "tinv-runs" / "default" / "tiny-det-logo-grid-local" / "images" / "index.html"
    assert gallery.exists() and "demo done" in out
    assert len(list(gallery.parent.glob("p*.png"))) == 36
    _the_gallery_shows_marks_on_the_asked_backgrounds(gallery.parent)


def _the_gallery_shows_marks_on_the_asked_backgrounds(images: Path) -> None:
    """The demo is a proof, not noise: the world's evaluator reads its images. The first two prompts
    ask for the det-logo on a pink and on a black background (see examples/tiny-grid.yaml)."""
    from PIL import Image

    from tinv.trainer.world import evaluate, scenes, weights

    ev = evaluate.load_evaluator(weights.WEIGHTS)
    for index, background in ((0, "pink"), (1, "black")):
        files = sorted(images.glob(f"p{index:03d}_*.png"))
        pred = evaluate.predict(ev, [Image.open(f) for f in files])
        on_bg = sum(b == background for b in pred["background"]) / len(files)
        marks = sum(w in scenes.MARKS for w in pred["what"]) / len(files)
        assert len(files) == 12 and on_bg >= BACKGROUND_MIN and marks >= MARKS_MIN, (background, pred)
