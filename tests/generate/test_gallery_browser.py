"""The gallery page opens straight from the folder in a real browser (headless Chromium) and lists every image.

Needs Debian's chromium (`apt-get install -y chromium`); skipped with that hint when it is absent.
The screenshot is kept at $TINV_GALLERY_SCREENSHOT (if set) for people to look at.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tinv.trainer import generate as G, grid as grids

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (apt-get install -y chromium)")


def chromium(args: list[str], tmp_path: Path, timeout: int = 90) -> subprocess.CompletedProcess:
    profile = tmp_path / f"chromium-profile-{len(list(tmp_path.glob('chromium-profile-*')))}"
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
        f"--user-data-dir={profile}", *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def gallery(tmp_path_factory, concept_file):
    from tinv.api.models import GenerationGrid

    from gridkit import GRID
    from testkit import merge

    tmp = tmp_path_factory.mktemp("gallery")
    doc = merge(GRID, {"spec": {"storage": {"uri": str(tmp / "runs")}, "grid": {"schedulers": ["ddim", "euler"]}}})
    doc["spec"]["embeddings"][0]["uri"] = str(concept_file)
    grid = GenerationGrid.model_validate(doc)
    res = G.run_grid(grid, G.GridOptions(progress_bar=False, tensorboard=False))
    assert res.complete
    return Path(res.gallery_uri), [img.filename for img in grids.expand(grid.spec)]


def test_every_image_is_listed_and_loads_in_chromium(gallery, tmp_path):
    page, files = gallery
    r = chromium(["--virtual-time-budget=15000", "--dump-dom", page.as_uri()], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    dom = r.stdout
    srcs = re.findall(r'<figure[^>]*data-file="([^"]+)"[^>]*><a href="[^"]+"><img src="([^"]+)"', dom)
    assert sorted(s for _, s in srcs) == sorted(files), "the page lists every image of the grid, once"
    assert all(f == s for f, s in srcs)
    listed = re.search(r'data-images-listed="(\d+)"', dom)
    loaded = re.search(r'data-images-loaded="(\d+)"', dom)
    assert listed and int(listed.group(1)) == len(files), "the page's script ran and counted every image"
    assert loaded and int(loaded.group(1)) == len(files), "every image decoded in the browser (relative links work from file://)"
    assert f"{len(files)} of {len(files)} images shown" in dom
    assert dom.count('class="sheet"') == 2, "one contact sheet per prompt"


def test_screenshot(gallery, tmp_path):
    page, files = gallery
    shot = Path(os.environ.get("TINV_GALLERY_SCREENSHOT") or tmp_path / "gallery.png")
    shot.parent.mkdir(parents=True, exist_ok=True)
    r = chromium(["--window-size=1280,1600", "--virtual-time-budget=15000", f"--screenshot={shot}", page.as_uri()], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    from PIL import Image

    with Image.open(shot) as im:
        assert im.size == (1280, 1600)
        colours = im.convert("RGB").resize((64, 100)).getcolors(maxcolors=100000)
        assert colours is not None and len(colours) > 200, "not a blank page: the images and sheets are drawn"
