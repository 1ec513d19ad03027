"""The shapes world: small procedurally drawn scenes with template captions and held-out concepts.

A scene is a coloured shape (or a mark, i.e. a logo) on a gradient background, in one of a few
styles. Everything is drawn with PIL from a ``random.Random`` seeded per scene, so scene ``i`` of
seed ``s`` is the same picture on every machine.

What the captions *never* say (the held-out concepts, see :data:`CONCEPTS`):

- (a) attribute combinations never captioned together: a purple star and a green triangle are
  drawn, but their captions drop the colour ("a star") or the shape ("a purple shape");
- (b) things drawn under a generic caption only: every mark -- the det-logo (drawn by
  :func:`tinv.trainer.samples.draw_logo`, exactly as examples/images/det-logo), a sun, a chevron
  and a grid -- is captioned "a logo" or "a symbol"; the striped style is captioned as plain.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .. import samples

SIZE = 64
_SS = 2  # supersampling factor for smooth edges

SHAPES = ("circle", "square", "triangle", "star", "cross")
COLOURS = {
    "red": (220, 40, 40),
    "yellow": (245, 215, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 230),
    "purple": (150, 50, 190),
    "white": (245, 245, 245),
}
# A subset of the det-logo samples' backgrounds (index into samples.BACKGROUNDS), with caption words.
BACKGROUNDS = {"pink": 0, "dark blue": 1, "orange": 2, "white": 3, "green": 4, "black": 11}
STYLES = ("plain", "outlined", "dotted", "blurry", "striped")
STYLE_WORDS = {"plain": "", "outlined": "outlined", "dotted": "dotted", "blurry": "blurry", "striped": ""}
MARKS = ("det-logo", "sun", "chevron", "grid")
SIZES = ("small", "large")

# (a): shape/colour pairs that no caption names together (their scenes are drawn, captioned partially).
HELD_OUT_PAIRS = (("star", "purple"), ("triangle", "green"), ("circle", "yellow"), ("square", "white"), ("cross", "blue"))


def _min_contrast(colour: tuple[int, int, int], bg: str) -> float:
    _, top, bottom = samples.BACKGROUNDS[BACKGROUNDS[bg]]
    return min(math.dist(colour, top), math.dist(colour, bottom))


# Colour/background pairs that are drawn: an object must stand out from its background.
VALID_PAIRS = tuple((c, b) for c in COLOURS for b in BACKGROUNDS if _min_contrast(COLOURS[c], b) > 110)


@dataclass(frozen=True)
class Scene:
    kind: str  # "object" | "mark"
    shape: str | None  # a SHAPES entry (object) or a MARKS entry (mark)
    colour: str | None  # object colour name; None for marks (they use the det-logo palette)
    background: str
    style: str
    size: str
    seed: int  # the drawing's own randomness (position, rotation, jitter)

    @property
    def what(self) -> str:
        """The evaluator's 'what' class: a shape or a mark."""
        return self.shape


WHATS = SHAPES + MARKS


def sample_scene(rng: random.Random, mark_fraction: float = 0.25, striped_fraction: float = 0.12) -> Scene:
    """One random scene. Marks appear at `mark_fraction`; the striped style at `striped_fraction`."""
    seed = rng.randrange(2**31)
    size = rng.choice(SIZES)
    if rng.random() < mark_fraction:
        return Scene("mark", rng.choice(MARKS), None, rng.choice(tuple(BACKGROUNDS)), "plain", size, seed)
    colour, bg = rng.choice(VALID_PAIRS)
    style = "striped" if rng.random() < striped_fraction else rng.choice(STYLES[:4])
    return Scene("object", rng.choice(SHAPES), colour, bg, style, size, seed)


def scenes(seed: int, count: int, **kw) -> list[Scene]:
    rng = random.Random(seed)
    return [sample_scene(rng, **kw) for _ in range(count)]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(scene: Scene, rng: random.Random) -> str:
    """A template caption that never names a held-out concept."""
    bg = f" on {_article(scene.background)} {scene.background} background" if rng.random() < 0.85 else ""
    if scene.kind == "mark":
        noun = rng.choice(("logo", "symbol"))
        words = [noun]
    else:
        colour, shape = scene.colour, scene.shape
        if rng.random() < 0.08:
            colour = None
        if (scene.shape, scene.colour) in HELD_OUT_PAIRS:
            if rng.random() < 0.5:
                colour = None
            else:
                shape = "shape"
        words = [w for w in (scene.size if rng.random() < 0.5 else None, STYLE_WORDS[scene.style] or None, colour, shape) if w]
    obj = f"{_article(words[0])} {' '.join(words)}"
    template = rng.choice(("{}", "{}", "a picture of {}", "a drawing of {}"))
    return template.format(obj + bg)


def _gradient(bg: str) -> np.ndarray:
    _, top, bottom = samples.BACKGROUNDS[BACKGROUNDS[bg]]
    t = np.linspace(0.0, 1.0, SIZE * _SS, dtype=np.float32)[:, None, None]
    col = np.asarray(top, np.float32) * (1 - t) + np.asarray(bottom, np.float32) * t
    return np.broadcast_to(col, (SIZE * _SS, SIZE * _SS, 3)).copy()


def _polygon(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    def ring(n: int, radii: list[float], offset: float) -> list[tuple[float, float]]:
        pts = []
        for i in range(n * len(radii)):
            a = rot + offset + 2 * math.pi * i / (n * len(radii))
            rr = r * radii[i % len(radii)]
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return pts

    if shape == "square":
        return ring(4, [0.9], math.pi / 4)
    if shape == "triangle":
        return ring(3, [1.0], -math.pi / 2)
    if shape == "star":
        return ring(5, [1.0, 0.42], -math.pi / 2)
    if shape == "cross":
        w = 0.34
        base = [(w, 1), (w, w), (1, w), (1, -w), (w, -w), (w, -1), (-w, -1), (-w, -w), (-1, -w), (-1, w), (-w, w), (-w, 1)]
        c, s = math.cos(rot), math.sin(rot)
        return [(cx + r * 0.9 * (x * c - y * s), cy + r * 0.9 * (x * s + y * c)) for x, y in base]
    raise ValueError(shape)


def _shape_mask(scene: Scene, rng: random.Random) -> Image.Image:
    big = SIZE * _SS
    r = big * (0.2 if scene.size == "small" else 0.33) * rng.uniform(0.9, 1.1)
    margin = r + big * 0.04
    cx, cy = rng.uniform(margin, big - margin), rng.uniform(margin, big - margin)
    rot = rng.uniform(-0.25, 0.25)
    mask = Image.new("L", (big, big), 0)
    d = ImageDraw.Draw(mask)
    if scene.shape == "circle":
        box = [cx - r, cy - r, cx + r, cy + r]
        if scene.style == "outlined":
            d.ellipse(box, outline=255, width=int(big * 0.05))
        else:
            d.ellipse(box, fill=255)
    else:
        pts = _polygon(scene.shape, cx, cy, r, rot)
        if scene.style == "outlined":
            d.line(pts + pts[:1], fill=255, width=int(big * 0.05), joint="curve")
        else:
            d.polygon(pts, fill=255)
    if scene.style == "striped":
        yy, xx = np.mgrid[0:big, 0:big]
        period = big / 8
        stripes = ((xx + yy) % period) < period / 2
        mask = Image.fromarray(np.where(stripes, np.asarray(mask), 0).astype(np.uint8))
    elif scene.style == "dotted":
        yy, xx = np.mgrid[0:big, 0:big]
        period = big / 10
        dots = ((xx % period - period / 2) ** 2 + (yy % period - period / 2) ** 2) < (period * 0.32) ** 2
        mask = Image.fromarray(np.where(dots, np.asarray(mask), 0).astype(np.uint8))
    elif scene.style == "blurry":
        mask = mask.filter(ImageFilter.GaussianBlur(big * 0.035))
    return mask


def _mark_mask(scene: Scene, rng: random.Random) -> Image.Image:
    """The sun, chevron and grid marks (the det-logo is drawn by samples.draw_logo)."""
    big = SIZE * _SS
    scale = rng.uniform(0.28, 0.42) * big
    cx = big / 2 + rng.uniform(-0.12, 0.12) * big
    cy = big / 2 + rng.uniform(-0.12, 0.12) * big
    rot = rng.uniform(0, 2 * math.pi)
    mask = Image.new("L", (big, big), 0)
    d = ImageDraw.Draw(mask)
    w = max(2, int(big * 0.04))
    if scene.shape == "sun":
        rad = scale * 0.45
        d.ellipse([cx - rad, cy - rad, cx + rad, cy + rad], fill=255)
        for i in range(8):
            a = rot + 2 * math.pi * i / 8
            d.line([(cx + scale * 0.62 * math.cos(a), cy + scale * 0.62 * math.sin(a)),
                    (cx + scale * math.cos(a), cy + scale * math.sin(a))], fill=255, width=w)
    elif scene.shape == "chevron":
        c, s = math.cos(rot), math.sin(rot)
        for off in (-0.45, 0.25):
            pts = [(off - 0.35, -0.7), (off + 0.35, 0.0), (off - 0.35, 0.7)]
            d.line([(cx + scale * (x * c - y * s), cy + scale * (x * s + y * c)) for x, y in pts], fill=255, width=w * 2, joint="curve")
    elif scene.shape == "grid":
        c, s = math.cos(rot / 4), math.sin(rot / 4)
        for i in (-1, 0, 1):
            for j in (-1, 0, 1):
                x, y = i * scale * 0.62, j * scale * 0.62
                px, py = cx + x * c - y * s, cy + x * s + y * c
                h = scale * 0.2
                d.rectangle([px - h, py - h, px + h, py + h], fill=255)
    else:
        raise ValueError(scene.shape)
    return mask


def render(scene: Scene) -> Image.Image:
    """The scene as a SIZE x SIZE RGB image."""
    rng = random.Random(scene.seed)
    if scene.kind == "mark" and scene.shape == "det-logo":
        img, _ = samples.draw_logo(size=SIZE, seed=scene.seed, background=BACKGROUNDS[scene.background])
        return img
    canvas = _gradient(scene.background)
    if scene.kind == "mark":
        mask = _mark_mask(scene, rng)
        _, top, _ = samples.BACKGROUNDS[BACKGROUNDS[scene.background]]
        lum = sum(top) / 3
        palette = [c for c in samples.LOGO_COLOURS if abs(sum(c) / 3 - lum) > 60] or samples.LOGO_COLOURS[:2]
        colour = palette[rng.randrange(len(palette))]
    else:
        mask = _shape_mask(scene, rng)
        colour = COLOURS[scene.colour]
    a = np.asarray(mask, np.float32)[..., None] / 255.0
    out = canvas * (1 - a) + np.asarray(colour, np.float32) * a
    img = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    return img.resize((SIZE, SIZE), Image.LANCZOS)


def render_array(batch: list[Scene]) -> np.ndarray:
    """Scenes as a uint8 array (N, SIZE, SIZE, 3)."""
    return np.stack([np.asarray(render(s)) for s in batch])


# ---- held-out concepts ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Concept:
    """A concept the captions never name, with how tinv learns it and how it is drawn fresh."""

    name: str  # the placeholder token used for Textual Inversion
    kind: str  # "combination" (a) | "mark" (b) | "style" (b)
    property: str  # tinv's template set: "object" | "style"
    initializer: str  # the initializer phrase (words the model knows)
    contexts: tuple[str, ...]  # prompts with "{}" for the placeholder, rendering it in new contexts

    def scene(self, rng: random.Random) -> Scene:
        """A fresh scene showing the concept (the images for training and for scoring)."""
        seed = rng.randrange(2**31)
        size = rng.choice(SIZES)
        if self.kind == "mark":
            return Scene("mark", _MARK_OF[self.name], None, rng.choice(tuple(BACKGROUNDS)), "plain", size, seed)
        if self.kind == "style":
            colour, bg = rng.choice(VALID_PAIRS)
            return Scene("object", rng.choice(SHAPES), colour, bg, "striped", size, seed)
        shape, colour = _COMBOS[self.name]
        bg = rng.choice([b for c, b in VALID_PAIRS if c == colour])
        return Scene("object", shape, colour, bg, "plain", size, seed)

    def images(self, seed: int, count: int) -> list[Image.Image]:
        rng = random.Random(f"{self.name}:{seed}")
        return [render(self.scene(rng)) for _ in range(count)]


_MARK_OF = {"det-logo": "det-logo", "sun-mark": "sun"}
_COMBOS = {"purple-star": ("star", "purple"), "green-triangle": ("triangle", "green")}

CONCEPTS = (
    Concept("det-logo", "mark", "object", "logo", ("a {} on a pink background", "a {} on a black background", "a picture of a {}")),
    Concept("sun-mark", "mark", "object", "symbol", ("a {} on a white background", "a {} on a dark blue background", "a drawing of a {}")),
    Concept("striped", "style", "style", "pattern", ("a {} circle", "a {} star on a black background", "a {} square")),
    Concept("purple-star", "combination", "object", "shape", ("a {} on a white background", "a large {}", "a {} on an orange background")),
    Concept("green-triangle", "combination", "object", "shape", ("a {} on a black background", "a small {}", "a {} on a pink background")),
)
CONCEPT_NAMES = tuple(c.name for c in CONCEPTS)


def concept(name: str) -> Concept:
    for c in CONCEPTS:
        if c.name == name:
            return c
    raise KeyError(f"unknown concept {name!r}; known: {', '.join(CONCEPT_NAMES)}")
