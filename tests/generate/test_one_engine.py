"""One rendering engine for training and generation (issue 13, bug 3 and the redesign): the engine
places concept vectors exactly as the trainer does, also on padded embedding tables, and the
trainer's validation images are the engine's images."""

from __future__ import annotations

import torch

from tinv.trainer import concepts as C
from tinv.trainer import engine as E
from tinv.trainer import models
from tinv.trainer.grid import Request


def padded_bundle(extra: int = 16):
    """The tiny model with 16 more embedding rows than the tokenizer has words (as many released
    models have: tables padded to a multiple of 8 or 64)."""
    bundle = models.load("builtin:tiny")
    te = bundle.text_encoder
    n = len(bundle.tokenizer)
    te.resize_token_embeddings(n + extra)
    with torch.no_grad():
        te.get_input_embeddings().weight[n:] = 100.0  # padding rows: anything but a learned vector
    return bundle


def test_placeholder_ids_select_the_learned_vectors_on_a_padded_table():
    bundle = padded_bundle()
    vec = torch.randn(2, bundle.text_encoder.get_input_embeddings().embedding_dim)
    engine = E.Engine(bundle, [C.Concept(token="<blob>", vectors=vec, uri="mem")], device="cpu", precision="fp32")
    ids = engine.vocab.batch(["a photo of <blob>"])
    rows = engine.text_encoder.get_input_embeddings()(ids)[0]
    placeholders = (ids[0] >= engine.vocab.base_size).nonzero().flatten().tolist()
    assert len(placeholders) == 2
    assert torch.equal(rows[placeholders], vec)
    # ... and the frozen words keep their own rows
    first = int(ids[0, 1])
    assert torch.equal(rows[1], bundle.text_encoder.get_input_embeddings().base.weight[first])


def test_the_trainers_engine_renders_what_a_generation_engine_renders():
    """Validation images come from engine.Engine over the trainer's own modules (its vocabulary and
    installed token layer): the same vectors give the same pixels as a generation engine."""
    from tinv.trainer import tokens
    from tinv.trainer.train import Validator

    vec = torch.randn(3, 32) * 0.3
    q = Request(prompt="a <blob>", seed=3, steps=2, scheduler="ddim", width=64, height=64, guidance_scale=7.5)
    plain = E.Engine(models.load("builtin:tiny"), [C.Concept(token="<blob>", vectors=vec, uri="mem")], device="cpu",
                     precision="fp32").render([q])[0].pixels
    trained = models.load("builtin:tiny")
    vocab = tokens.ConceptVocab(trained.tokenizer, [("<blob>", "", 3)], training=True)
    tokens.install(trained.text_encoder, vec, offset=vocab.base_size)
    via_training = E.Engine(trained, device=torch.device("cpu"), precision=torch.float32, vocab=vocab, optimize=False)
    assert (via_training.render([q])[0].pixels == plain).all()
    assert "engine" in Validator.__doc__
