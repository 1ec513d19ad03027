"""Does tinv learn? Textual Inversion of one held-out concept on builtin:shapes, through tinv's
real trainer and generator, must beat the initializer phrase on concept fidelity -- and the same
run must *fail* when the placeholder never reaches the text encoder (a broken prompt template)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tinv.trainer import objective
from tinv.trainer.world import evaluate, quality, scenes, weights

# TINV_SHAPES_RUN points at a training run (a folder with model/, evaluator.safetensors and
# manifest.json) to test that instead of the shipped weights.
ROOT = Path(os.environ.get("TINV_SHAPES_RUN") or weights.WEIGHTS)
MODEL = str(ROOT / "model") if os.environ.get("TINV_SHAPES_RUN") else "builtin:shapes"
CONCEPT = scenes.concept("green-triangle")
RECIPE = quality.Recipe(steps=200, learning_rate=5e-3, images=8)
N = 24
MARGIN = 0.1

pytestmark = pytest.mark.skipif(not (ROOT / "manifest.json").exists(),
                                reason="no trained builtin:shapes weights in this checkout yet")


def _fidelity(monkeypatch=None, broken: bool = False) -> dict:
    ev = evaluate.load_evaluator(ROOT)
    if broken:
        # A test double of a broken trainer: the prompts it trains on lose the placeholder (the
        # prompt check before training still sees correct templates), so the text encoder never
        # sees the new token and its vector gets no gradient.
        real_sample = objective.Stream.sample

        def sample(self, k):
            img, flip, prompt = real_sample(self, k)
            return img, flip, prompt.replace(self.ds.tokens[self.ds.concept[img]], "thing")

        monkeypatch.setattr(objective.Stream, "sample", sample)
    return quality.measure(CONCEPT, MODEL, ev, RECIPE, n=N, contexts=False)["fidelity"]


@pytest.fixture(scope="module")
def learned():
    return _fidelity()


@pytest.mark.slow
def test_the_learned_embedding_beats_the_initializer(learned):
    assert learned["real"] - learned["initializer"] > MARGIN, learned  # words alone do not reach the concept
    assert learned["learned"] - learned["initializer"] > MARGIN, learned


@pytest.mark.slow
def test_a_placeholder_that_never_reaches_the_text_encoder_fails(monkeypatch, learned):
    broken = _fidelity(monkeypatch, broken=True)
    assert broken["learned"] - broken["initializer"] < MARGIN / 2, broken
    assert learned["learned"] - broken["learned"] > MARGIN / 2, (learned, broken)
