"""Sample training images the project draws itself: a "det-logo"-style mark.

The Determined example learns its logo from photos; we cannot ship photos, so we draw a
logo of the same kind -- filled circles connected by sharp straight lines -- on varied
backgrounds, at varied positions, scales and rotations. Each image's file name is a caption
("on_a_pink_background.png"), so `captionFromFilename` has something to read.

Everything is deterministic from a seed: `python -m tinv.trainer samples OUT_DIR` draws the
same files every time (examples/images/det-logo was made that way).
"""

from __future__ import annotations

import math
import random
from pathlib import Path

from PIL import Image, ImageDraw

# (caption words, background top colour, background bottom colour)
BACKGROUNDS = [
    ("on_a_pink_background", (240, 170, 200), (250, 215, 230)),
    ("on_a_dark_blue_background", (20, 30, 80), (40, 60, 130)),
    ("on_a_solid_orange_background", (245, 140, 40), (245, 140, 40)),
    ("on_a_white_background", (250, 250, 250), (235, 235, 235)),
    ("on_a_green_background", (60, 140, 70), (120, 190, 110)),
    ("on_a_purple_gradient", (90, 40, 130), (200, 120, 220)),
    ("on_a_yellow_wall", (240, 220, 60), (220, 190, 40)),
    ("on_a_grey_sky", (150, 155, 160), (210, 212, 215)),
    ("in_outer_space", (5, 5, 20), (20, 10, 40)),
    ("on_red_bricks", (160, 50, 40), (120, 35, 30)),
    ("on_a_teal_background", (30, 130, 140), (80, 190, 190)),
    ("on_a_black_background", (10, 10, 10), (30, 30, 30)),
]

LOGO_COLOURS = [(255, 102, 0), (0, 90, 200), (240, 240, 240), (30, 30, 30)]


def _gradient(size: int, top: tuple[int, int, int], bottom: tuple[int, int, int]) -> Image.Image:
    img = Image.new("RGB", (size, size))
    draw = ImageDraw.Draw(img)
    for y in range(size):
        t = y / max(1, size - 1)
        draw.line([(0, y), (size, y)], fill=tuple(int(a + (b - a) * t) for a, b in zip(top, bottom)))
    return img


def draw_logo(size: int = 128, seed: int = 0, background: int | None = None) -> tuple[Image.Image, str]:
    """One det-logo image and its caption stem. Circles on a ring plus a hub, joined by lines."""
    rng = random.Random(seed)
    caption, top, bottom = BACKGROUNDS[background if background is not None else rng.randrange(len(BACKGROUNDS))]
    # Supersample 4x, then downscale: sharp lines without aliasing.
    big = size * 4
    img = _gradient(big, top, bottom)
    draw = ImageDraw.Draw(img)
    lum = sum(top) / 3
    colours = [c for c in LOGO_COLOURS if abs(sum(c) / 3 - lum) > 60] or LOGO_COLOURS[:2]
    colour = colours[rng.randrange(len(colours))]
    scale = rng.uniform(0.28, 0.42) * big
    cx = big / 2 + rng.uniform(-0.12, 0.12) * big
    cy = big / 2 + rng.uniform(-0.12, 0.12) * big
    rot = rng.uniform(0, 2 * math.pi)
    n = 6
    nodes = [(cx, cy)]
    for i in range(n):
        a = rot + 2 * math.pi * i / n
        r = scale * (1.0 if i % 2 == 0 else 0.62)
        nodes.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    width = max(2, int(big * 0.022))
    edges = [(0, i) for i in range(1, n + 1)] + [(i, i % n + 1) for i in range(1, n + 1)]
    for a, b in edges:
        draw.line([nodes[a], nodes[b]], fill=colour, width=width)
    for i, (x, y) in enumerate(nodes):
        rad = big * (0.075 if i == 0 else 0.05)
        draw.ellipse([x - rad, y - rad, x + rad, y + rad], fill=colour)
    return img.resize((size, size), Image.LANCZOS), caption


def write_samples(out_dir: str | Path, count: int = 8, size: int = 128, seed: int = 0) -> list[Path]:
    """Draw `count` det-logo images into out_dir as PNGs named after their captions."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        img, caption = draw_logo(size=size, seed=seed * 1000 + i, background=i % len(BACKGROUNDS))
        path = out / f"{caption}.png"
        img.save(path, optimize=True)
        paths.append(path)
    return paths
