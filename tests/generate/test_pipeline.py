"""The notebook API (tinv.trainer.pipeline.ConceptPipeline) on the tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gridkit import TOKEN
from tinv.trainer import pngmeta
from tinv.trainer import cli as trainer_cli
from tinv.trainer.errors import ConfigError
from tinv.trainer.pipeline import ConceptPipeline


@pytest.fixture(scope="module")
def pipe(concept_file):
    return ConceptPipeline.load("builtin:tiny", [str(concept_file)], device="cpu", precision="fp32")


def test_call_sheet_save_and_reproduce(pipe, tmp_path):
    assert pipe.tokens == [TOKEN] and pipe.native_size == 64
    assert pipe.concepts[0]["uri"].endswith("learned_embeds.safetensors")
    images = pipe([f"a photo of a {TOKEN}", f"a {TOKEN} at night"], num_images=2, seed=7, steps=3, scheduler="unipc")
    assert len(images) == 4 and all(im.size == (64, 64) for im in images)
    metas = [json.loads(im.info["tinv"]) for im in images]
    assert [m["seed"] for m in metas] == [7, 8, 7, 8] and metas[0]["scheduler"] == "unipc"
    again = pipe([f"a photo of a {TOKEN}", f"a {TOKEN} at night"], num_images=2, seed=7, steps=3, scheduler="unipc")
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, again))

    sheet = pipe.sheet(f"a photo of a {TOKEN}", guidance_scales=[1, 5], seeds=[0, 1, 2], steps=2)
    assert sheet.size[0] > 2 * 128 and sheet.size[1] > 3 * 128

    paths = pipe.save(images, tmp_path / "out")
    assert len(paths) == 4 and pngmeta.read_png_metadata(paths[1])["seed"] == 8
    assert trainer_cli.main(["reproduce", str(paths[3]), "--out", str(tmp_path / "r.png"), "--check"]) == 0


def test_with_concepts_shares_the_model_and_keeps_each_pipeline_right(pipe, concept_file):
    other = pipe.with_concepts(f"{concept_file}#<blob-b>")
    assert other.engine.bundle is pipe.engine.bundle and other.tokens == ["<blob-b>"]
    a = pipe(f"a photo of a {TOKEN}", seed=3, steps=2)[0]
    b = other("a photo of a <blob-b>", seed=3, steps=2)[0]
    assert np.array_equal(np.asarray(a), np.asarray(b)), "same vectors under another token: same image"
    # the first pipeline still sees its own token table
    assert np.array_equal(np.asarray(pipe(f"a photo of a {TOKEN}", seed=3, steps=2)[0]), np.asarray(a))


def test_bad_input_messages(pipe, tmp_path, concept_file):
    with pytest.raises(ConfigError, match="unknown scheduler 'plms'"):
        pipe("a photo", scheduler="plms")
    with pytest.raises(ConfigError, match="loaded twice"):
        pipe.with_concepts(str(concept_file), str(concept_file))
    with pytest.warns(UserWarning, match="mentions none of the loaded concepts"):
        pipe("a photo of a cat", steps=2)
