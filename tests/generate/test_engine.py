"""The engine on the tiny model: determinism, batching, schedulers, parity with diffusers, bad input."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from gridkit import TOKEN, vectors  # noqa: F401  (tests/generate/gridkit.py)
from tinv.trainer import engine as E, grid as grids, runtime
from tinv.trainer.errors import ConfigError

P = f"a photo of a {TOKEN}"


def req(**kw) -> grids.Request:
    base = dict(prompt=P, negative_prompt="blurry", seed=3, guidance_scale=5.0, steps=3, scheduler="ddim", width=64, height=64)
    base.update(kw)
    return grids.Request(**base)


def test_same_seed_same_pixels_and_different_seed_different_pixels(engine):
    a = engine.render([req()])[0].pixels
    b = engine.render([req()])[0].pixels
    c = engine.render([req(seed=4)])[0].pixels
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_a_fresh_engine_gives_the_same_pixels(engine, concept_file):
    other = E.load_engine("builtin:tiny", [str(concept_file)], device="cpu", precision="fp32")
    assert np.array_equal(engine.render([req()])[0].pixels, other.render([req()])[0].pixels)


def test_batch_pixels_equal_single_renders(engine):
    """Per-image generators: an image's pixels do not depend on the other images of its batch.

    Exactly equal when rendered in a batch of the same shape (what `tinv reproduce` does); alone,
    at most a rounding step apart (a different batch size may pick different CPU kernels)."""
    reqs = [req(seed=s, guidance_scale=g, prompt=p) for s, g, p in
            [(0, 1.0, P), (1, 5.0, "a red dog"), (2, 7.5, f"{TOKEN} {TOKEN}"), (3, 5.0, P)]]
    batch = engine.render(reqs)
    assert [r.batch_index for r in batch] == [0, 1, 2, 3] and all(r.batch_size == 4 and r.cfg for r in batch)
    for i, r in enumerate(batch):
        same_shape = engine.render([reqs[i]] * 4, cfg=True)[i].pixels
        assert np.array_equal(same_shape, r.pixels), f"image {i}: same batch shape -> identical pixels"
        alone = engine.render([reqs[i]], cfg=True)[0].pixels
        assert np.abs(alone.astype(int) - r.pixels.astype(int)).max() <= 2, f"image {i}: alone differs by rounding only"


def test_guidance_one_means_no_guidance_per_image(engine):
    """g <= 1 is the conditional prediction alone, as in diffusers, even inside a guided batch.
    (Batches of different sizes agree to a rounding step: they may pick different CPU kernels; on
    an AMD EPYC a batch of 1 and one of 2 differ by one level in 1 of 12,288 values.)"""
    alone = engine.render([req(guidance_scale=1.0)], cfg=True)[0].pixels
    mixed = engine.render([req(guidance_scale=1.0), req(guidance_scale=8.0, seed=9)])[0].pixels
    pair = engine.render([req(guidance_scale=1.0)] * 2, cfg=True)
    assert np.array_equal(pair[0].pixels, pair[1].pixels), "one request twice in a batch: the same pixels twice"
    assert np.abs(alone.astype(int) - pair[0].pixels.astype(int)).max() <= 2
    assert np.abs(alone.astype(int) - mixed.astype(int)).max() <= 2
    unguided = engine.render([req(guidance_scale=1.0)])[0]
    assert not unguided.cfg, "a batch where no image is guided skips the negative-prompt pass"


@pytest.mark.parametrize("name", grids.SCHEDULER_NAMES)
def test_every_scheduler_renders_deterministically(engine, name):
    a = engine.render([req(scheduler=name, seed=1), req(scheduler=name, seed=2)])
    b = engine.render([req(scheduler=name, seed=1), req(scheduler=name, seed=2)])
    for x, y in zip(a, b):
        assert x.pixels.shape == (64, 64, 3)
        assert np.array_equal(x.pixels, y.pixels), f"{name}: same seeds, same pixels (ancestral noise included)"
    assert not np.array_equal(a[0].pixels, a[1].pixels)


def test_schedulers_are_the_named_diffusers_classes(engine):
    import diffusers
    from diffusers.schedulers.scheduling_lms_discrete import LMSDiscreteScheduler  # the real class, with or without scipy

    expect = {
        "ddim": diffusers.DDIMScheduler, "pndm": diffusers.PNDMScheduler, "euler": diffusers.EulerDiscreteScheduler,
        "dpm-solver++": diffusers.DPMSolverMultistepScheduler, "unipc": diffusers.UniPCMultistepScheduler,
        "euler-ancestral": diffusers.EulerAncestralDiscreteScheduler, "heun": diffusers.HeunDiscreteScheduler,
        "lms": LMSDiscreteScheduler, "ddpm": diffusers.DDPMScheduler,
    }
    for name, cls in expect.items():
        s = E.make_scheduler(name, engine.sched_config)
        assert isinstance(s, cls) if name == "lms" else type(s) is cls
        assert s.config.beta_schedule == "scaled_linear" and s.config.beta_end == 0.012, "the model's noise schedule"
    dpm = E.make_scheduler("dpm-solver++-karras", engine.sched_config)
    assert dpm.config.algorithm_type == "dpmsolver++" and dpm.config.use_karras_sigmas


@pytest.mark.parametrize("scheduler", ["ddim", "dpm-solver++"])
def test_matches_a_plain_diffusers_pipeline(scheduler):
    """Without concepts, the engine is a StableDiffusionPipeline call with the same seed (fp32, CPU)."""
    eng = E.load_engine("builtin:tiny", [], device="cpu", precision="fp32")
    q = req(prompt="a red brick wall", scheduler=scheduler, steps=4, guidance_scale=6.0)
    ours = eng.render([q])[0].pixels
    pipe = eng.bundle.pipeline(E.make_scheduler(scheduler, eng.sched_config))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(q.prompt, negative_prompt=q.negative_prompt, num_inference_steps=q.steps, guidance_scale=q.guidance_scale,
               generator=torch.Generator("cpu").manual_seed(q.seed), height=64, width=64, output_type="np").images[0]
    theirs = (out * 255).round().astype(np.uint8)
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1


def test_concept_vectors_reach_the_text_encoder(engine):
    with_concept = engine.encode([P])
    other = E.load_engine("builtin:tiny", [], device="cpu", precision="fp32")
    assert engine.mentions(P) == [TOKEN]
    assert engine.vocab.ids(P)[-2:] == [engine.vocab.base_size, engine.vocab.base_size + 1], "2 vectors -> 2 placeholder ids"
    assert not torch.allclose(with_concept, other.encode([P]))


def test_bf16_on_cpu_renders():
    eng = E.load_engine("builtin:tiny", [], device="cpu", precision="bf16")
    r = eng.render([req(prompt="a cat")])[0]
    assert r.pixels.shape == (64, 64, 3)
    assert eng.metadata(r)["precision"] == "bf16"


def test_fp16_on_cpu_is_refused():
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        runtime.pick_dtype("fp16", torch.device("cpu"))


# ---------------------------------------------------------------------------- bad input


def _save(tmp_path, name, obj):
    from safetensors.torch import save_file

    p = tmp_path / name
    if name.endswith(".safetensors"):
        save_file(obj, str(p))
    else:
        torch.save(obj, p)
    return p


def test_wrong_width_is_a_clear_error(tmp_path):
    p = _save(tmp_path, "sd15.safetensors", {"<wide>": torch.randn(3, 768)})
    with pytest.raises(ConfigError, match=r"is 768 wide, but this model's text encoder is 32 wide: it was trained for SD 1.x"):
        E.load_engine("builtin:tiny", [str(p)], device="cpu", precision="fp32")


def test_token_already_in_the_vocabulary_is_a_clear_error(tmp_path):
    p = _save(tmp_path, "cat.pt", {"string_to_token": {"*": 265}, "string_to_param": {"*": torch.randn(1, 32)},
                                    "name": "cat", "step": 1, "sd_checkpoint": None, "sd_checkpoint_name": None})
    with pytest.raises(ConfigError, match=r"concept token 'cat' is already a word of the model's vocabulary"):
        E.load_engine("builtin:tiny", [str(p)], device="cpu", precision="fp32")


def test_the_same_token_twice_is_a_clear_error(tmp_path, concept_file):
    with pytest.raises(ConfigError, match=r"concept token '<blob>' is loaded twice"):
        E.load_engine("builtin:tiny", [str(concept_file), str(concept_file)], device="cpu", precision="fp32")
    # ... and renaming one of them is the fix
    eng = E.load_engine("builtin:tiny", [str(concept_file), f"{concept_file}#<blob2>"], device="cpu", precision="fp32")
    assert eng.tokens == [TOKEN, "<blob2>"]


def test_sdxl_and_unknown_files_are_clear_errors(tmp_path):
    from tinv.trainer.errors import FormatError

    p = _save(tmp_path, "xl.safetensors", {"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)})
    with pytest.raises(ConfigError, match="SDXL embedding"):
        E.load_engine("builtin:tiny", [str(p)], device="cpu", precision="fp32")
    p = _save(tmp_path, "junk.pt", {"weights": [1, 2, 3]})
    with pytest.raises((FormatError, ConfigError), match="junk.pt"):
        E.load_engine("builtin:tiny", [str(p)], device="cpu", precision="fp32")
    with pytest.raises((FormatError, ConfigError), match="no such file"):
        E.load_engine("builtin:tiny", [str(tmp_path / "missing.pt")], device="cpu", precision="fp32")


def test_unknown_scheduler_is_a_clear_error(engine):
    with pytest.raises(ConfigError, match=r"unknown scheduler 'euler-a': choose one of"):
        engine.render([req(scheduler="euler-a")])


def test_prompt_without_any_concept_warns_but_renders(engine):
    with pytest.warns(UserWarning, match=r"mentions none of the loaded concepts \(<blob>\)"):
        out = engine.check_prompts(["a photo of a cat", P])
    assert len(out) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert engine.check_prompts([P]) == []
    # 'blob' alone or glued to other characters is not the token
    assert engine.mentions("a blob") == [] and engine.mentions(f"x{TOKEN}y") == []
    assert engine.render([req(prompt="a photo of a cat")])[0].pixels.shape == (64, 64, 3)


def test_lms_coefficients_match_numerical_integration(engine):
    """The scipy-free LMS uses exact quadrature; compare with a fine trapezoid integral."""
    s = E._lms_class().from_config(engine.sched_config)
    s.set_timesteps(10)
    sig = [float(x) for x in s.sigmas]
    for order, t, cur in [(1, 0, 0), (2, 3, 1), (4, 6, 0), (4, 6, 3)]:
        taus = np.linspace(sig[t], sig[t + 1], 20001)
        vals = np.ones_like(taus)
        for k in range(order):
            if k != cur:
                vals *= (taus - sig[t - k]) / (sig[t - cur] - sig[t - k])
        ref = float(np.sum((vals[1:] + vals[:-1]) / 2 * np.diff(taus)))
        assert s.get_lms_coefficient(order, t, cur) == pytest.approx(ref, rel=1e-6, abs=1e-9)


def test_gpu_optimisations_run_on_cpu_too():
    """channels-last + fused QKV (on by default on CUDA) change kernels, not the picture."""
    reqs = [req(seed=s) for s in (1, 2)]
    plain = E.load_engine("builtin:tiny", [], device="cpu", precision="fp32").render(reqs)
    fast = E.load_engine("builtin:tiny", [], device="cpu", precision="fp32", optimize=True)
    assert type(next(iter(fast.bundle.unet.attn_processors.values()))).__name__ == "FusedAttnProcessor2_0"
    for a, b in zip(plain, fast.render(reqs)):
        assert np.abs(a.pixels.astype(int) - b.pixels.astype(int)).max() <= 2
