"""SDXL generation on builtin:tiny-xl: grids (sharding, PNG metadata, reproduce, sheets, gallery), the
notebook API, parity with diffusers' StableDiffusionXLPipeline, and family mismatches refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from gridkit import GRID, pngs, vectors
from testkit import merge
from tinv.trainer import cli as trainer_cli
from tinv.trainer import engine as E
from tinv.trainer import generate as G
from tinv.trainer import pngmeta
from tinv.trainer.errors import ConfigError

TOK = "<xl-blob>"


@pytest.fixture(scope="session")
def xl_file(tmp_path_factory) -> Path:
    """An SDXL concept in the layout AUTOMATIC1111/ComfyUI/kohya load: {"clip_l": [2, 32], "clip_g": [2, 48]}."""
    d = tmp_path_factory.mktemp("xl-concept")
    p = d / f"{TOK}.safetensors"
    save_file({"clip_l": vectors(2, 32, seed=1), "clip_g": vectors(2, 48, seed=2)}, str(p))
    return p


def xl_grid(xl_file: Path, tmp_path: Path, **spec):
    from tinv.api.models import GenerationGrid

    d = merge(GRID, {"spec": {"model": {"source": "builtin:tiny-xl"}, "storage": {"uri": str(tmp_path / "runs")},
                              "prompts": [f"a photo of a {TOK}", f"a {TOK} in the style of van gogh"]}})
    d["spec"]["embeddings"] = [{"uri": str(xl_file)}]
    return GenerationGrid.model_validate(merge(d, {"spec": spec}) if spec else d)


def test_sdxl_grid_renders_with_metadata_sheets_gallery_shards_and_reproduces(xl_file, tmp_path, capsys, monkeypatch):
    grid = xl_grid(xl_file, tmp_path, resources={"workers": 2})
    results = []
    for i in range(2):
        monkeypatch.setenv("JOB_COMPLETION_INDEX", str(i))
        results.append(G.run_grid(grid, G.GridOptions(progress_bar=False, tensorboard=False)))
    assert sum(r.rendered for r in results) == 8 and results[-1].complete
    d = tmp_path / "runs" / "ns" / "g-local" / "images"
    files = pngs(d)
    assert len(files) == 8
    for f in files:
        meta = pngmeta.read_png_metadata(f)
        assert meta["model"]["source"] == "builtin:tiny-xl" and (meta["width"], meta["height"]) == (64, 64)
        assert [e["token"] for e in meta["embeddings"]] == [TOK] and meta["embeddings"][0]["vectors"] == 2
    index = json.loads((d / "index.json").read_text())
    assert index["complete"] and [s["file"] for s in index["contact_sheets"]] == ["sheets/p000.png", "sheets/p001.png"]
    assert all(f'src="{f.name}"' in (d / "index.html").read_text() for f in files)
    # guidance changes the image (the concept and negative prompt reach the UNet), and reproduce is exact
    metas = {pngmeta.read_png_metadata(f)["key"]: f for f in files}
    assert len({pngmeta.decode_png(f.read_bytes()).tobytes() for f in metas.values()}) == 8
    out = tmp_path / "again.png"
    assert trainer_cli.main(["reproduce", str(files[3]), "--out", str(out), "--check"]) == 0
    assert "identical pixels" in capsys.readouterr().out
    assert np.array_equal(pngmeta.decode_png(files[3].read_bytes()), pngmeta.decode_png(out.read_bytes()))


def test_engine_renders_what_diffusers_sdxl_pipeline_renders(xl_file):
    """Same model, same concept, same initial noise: tinv's engine and StableDiffusionXLPipeline give the
    same pixels (conditioning, time ids, zeroed empty negative prompt, guidance, DDIM, VAE decode)."""
    from safetensors.torch import load_file

    from tinv.trainer import models
    from tinv.trainer.grid import Request

    eng = E.load_engine("builtin:tiny-xl", [str(xl_file)], device="cpu", precision="fp32")
    q = Request(prompt=f"a photo of a {TOK}", negative_prompt="", seed=3, guidance_scale=5.0, steps=3, scheduler="ddim",
                width=64, height=64)
    mine = eng.render([q])[0].pixels

    bundle = models.load("builtin:tiny-xl")
    sched = E.make_scheduler("ddim", E.scheduler_config(bundle))
    pipe = bundle.pipeline(sched)
    f = load_file(str(xl_file))
    pipe.load_textual_inversion(f["clip_l"], token=TOK, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(f["clip_g"], token=TOK, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(3))
    with torch.no_grad():
        theirs = pipe(q.prompt, num_inference_steps=3, guidance_scale=5.0, latents=noise, output_type="np", height=64, width=64).images[0]
    theirs = (theirs * 255).round().astype(np.uint8)
    assert np.abs(mine.astype(int) - theirs.astype(int)).max() <= 1


def test_notebook_api_renders_sdxl_concepts(xl_file, tmp_path):
    from tinv.trainer.pipeline import ConceptPipeline

    pipe = ConceptPipeline.load("builtin:tiny-xl", [str(xl_file)], device="cpu", precision="fp32")
    assert pipe.tokens == [TOK] and pipe.native_size == 64
    imgs = pipe(f"a {TOK} on a wall", num_images=2, steps=2, scheduler="ddim", guidance_scale=4)
    assert [i.size for i in imgs] == [(64, 64)] * 2
    saved = pipe.save(imgs, tmp_path / "nb")
    meta = pngmeta.read_png_metadata(saved[0])
    assert meta["model"]["source"] == "builtin:tiny-xl" and meta["embeddings"][0]["token"] == TOK
    sheet = pipe.sheet(f"a {TOK}", guidance_scales=[2, 4], seeds=[0], steps=2, scheduler="ddim")
    assert sheet.size[0] > 2 * 128


def test_an_sd_embedding_on_sdxl_and_an_sdxl_embedding_on_sd_are_refused(xl_file, concept_file, tmp_path):
    with pytest.raises(ConfigError, match=r"is an SD 1.x/2.x embedding .* this model is SDXL"):
        E.load_engine("builtin:tiny-xl", [str(concept_file)], device="cpu", precision="fp32")
    with pytest.raises(ConfigError, match=r"is an SDXL embedding \(clip_l \+ clip_g\); this model is SD 1.x/2.x"):
        E.load_engine("builtin:tiny", [str(xl_file)], device="cpu", precision="fp32")
    # an SDXL file of another SDXL's widths
    p = tmp_path / "wide.safetensors"
    save_file({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}, str(p))
    with pytest.raises(ConfigError, match=r"32 \+ 48"):
        E.load_engine("builtin:tiny-xl", [str(p)], device="cpu", precision="fp32")
    # the grid front door exits 2 naming the problem
    grid = xl_grid(xl_file, tmp_path)
    grid.spec.embeddings[0].uri = str(concept_file)
    with pytest.raises(ConfigError, match="SDXL"):
        G.run_grid(grid, G.GridOptions(progress_bar=False, tensorboard=False))


@pytest.fixture(scope="session")
def fp16_safe_vae(tmp_path_factory) -> Path:
    """A VAE folder whose config says it is fp16-safe (force_upcast false), with other weights than tiny-xl's."""
    from tinv.trainer import sdxl

    vae = sdxl.build_tiny_xl(seed=5)["vae"]
    vae.register_to_config(force_upcast=False)
    d = tmp_path_factory.mktemp("vae") / "sdxl-vae-fp16-fix"
    vae.save_pretrained(str(d))
    return d


def test_model_vae_replaces_the_vae_and_decides_the_decode_precision(xl_file, fp16_safe_vae):
    from tinv.trainer.grid import Request

    q = Request(prompt=f"a {TOK}", negative_prompt="", seed=1, guidance_scale=3.0, steps=2, scheduler="ddim", width=64, height=64)
    stock = E.load_engine("builtin:tiny-xl", [str(xl_file)], device="cpu", precision="fp32")
    swapped = E.load_engine("builtin:tiny-xl", [str(xl_file)], device="cpu", precision="fp32", vae=str(fp16_safe_vae))
    a, b = stock.render([q])[0], swapped.render([q])[0]
    assert not np.array_equal(a.pixels, b.pixels)  # the other VAE decoded
    meta = swapped.metadata(b)
    assert meta["model"]["vae"] == str(fp16_safe_vae) and "vae" not in stock.metadata(a)["model"]
    again, _ = E.reproduce(meta)  # the metadata names the VAE: reproduce loads it
    assert np.array_equal(again, b.pixels)
    # fp16: SDXL's stock VAE (force_upcast) decodes in fp32; the fp16-safe one in fp16
    assert E.Engine(stock.bundle, [], device="cpu", precision=torch.float16).vae_dtype == torch.float32
    assert E.Engine(swapped.bundle, [], device="cpu", precision=torch.float16).vae_dtype == torch.float16
    with pytest.raises(Exception, match="model.vae"):
        E.load_engine("builtin:tiny-xl", [], device="cpu", precision="fp32", vae=str(fp16_safe_vae.parent / "missing"))
