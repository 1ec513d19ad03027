"""The shapes world: deterministic drawing, captions that never name a held-out concept."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest

from tinv.trainer import samples
from tinv.trainer.world import scenes


def test_the_world_is_deterministic_from_its_seed():
    a, b = scenes.scenes(7, 40), scenes.scenes(7, 40)
    assert a == b
    assert np.array_equal(scenes.render_array(a), scenes.render_array(b))
    assert scenes.scenes(8, 40) != a
    rng1, rng2 = random.Random(3), random.Random(3)
    assert [scenes.caption(s, rng1) for s in a] == [scenes.caption(s, rng2) for s in a]


def test_every_kind_of_scene_is_drawn_at_64_px():
    batch = scenes.scenes(0, 2000)
    assert {s.shape for s in batch} == set(scenes.WHATS)
    assert {s.style for s in batch if s.kind == "object"} == set(scenes.STYLES)
    assert {s.background for s in batch} == set(scenes.BACKGROUNDS)
    assert {(s.shape, s.colour) for s in batch} >= set(scenes.HELD_OUT_PAIRS)  # drawn, never captioned in full
    arr = scenes.render_array(batch[:20])
    assert arr.shape == (20, 64, 64, 3) and arr.dtype == np.uint8
    # A drawn object changes pixels: the picture is not just its background.
    assert all(arr[i].std() > 5 for i in range(20))


def test_the_det_logo_is_the_samples_drawing():
    s = scenes.Scene("mark", "det-logo", None, "pink", "plain", "small", 123)
    img, _ = samples.draw_logo(size=64, seed=123, background=scenes.BACKGROUNDS["pink"])
    assert np.array_equal(np.asarray(scenes.render(s)), np.asarray(img))


HELD_OUT_WORDS = ("det", "sun", "stripe", "striped", "chevron", "grid", "mark")


@pytest.mark.parametrize("seed", [0, 1])
def test_captions_never_name_a_held_out_concept(seed):
    rng = random.Random(seed)
    batch = scenes.scenes(seed, 5000)
    caps = [scenes.caption(s, rng) for s in batch]
    for s, c in zip(batch, caps):
        words = set(re.findall(r"[a-z-]+", c))
        assert not words & set(HELD_OUT_WORDS), c
        assert not words & set(scenes.CONCEPT_NAMES), c
        obj = c.split(" on ")[0]  # the object's phrase (a background's colour word may be anything)
        for shape, colour in scenes.HELD_OUT_PAIRS:
            assert not {shape, colour} <= set(obj.split()), c
        if s.kind == "mark":
            assert words & {"logo", "symbol"} and not words & set(scenes.SHAPES), c
    # The same scenes are still described: colours and shapes appear where they are drawn.
    assert sum("purple star" in c for c in caps) == 0
    assert sum(" star" in c for s, c in zip(batch, caps) if s.shape == "star" and s.colour == "purple") > 0


def test_concept_images_are_fresh_and_show_the_concept():
    for c in scenes.CONCEPTS:
        imgs = c.images(seed=0, count=4)
        assert len(imgs) == 4 and imgs[0].size == (64, 64)
        rng = random.Random(f"{c.name}:0")
        s = c.scene(rng)
        if c.kind == "mark":
            assert s.kind == "mark"
        elif c.kind == "style":
            assert s.style == "striped"
        else:
            assert (s.shape, s.colour) in scenes.HELD_OUT_PAIRS
    # Fresh: not among the training pool's scenes.
    pool = set(scenes.scenes(0, 5000))
    assert not any(c.scene(random.Random(f"{c.name}:0")) in pool for c in scenes.CONCEPTS)
