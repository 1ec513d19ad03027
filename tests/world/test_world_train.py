"""The staged training command: a micro run (seconds) writes a diffusers folder that
StableDiffusionPipeline and tinv's loader read, deterministically from its seed, and resumes."""

from __future__ import annotations

import json

import pytest

from tinv.trainer.world import cli, weights

MICRO_STEPS = "clip=3,evaluator=3,vae=3,unet=4,refine=3,decoder=3"


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("world") / "run"
    assert cli.main(["train", str(out), "--micro", "--seed", "3", "--steps", MICRO_STEPS]) == 0
    return out


@pytest.mark.slow
def test_a_micro_run_writes_a_folder_stable_diffusion_loads(micro_run):
    from diffusers import StableDiffusionPipeline

    from tinv.trainer import models

    pipe = StableDiffusionPipeline.from_pretrained(str(micro_run / "model"), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    img = pipe("a red star on a black background", num_inference_steps=2, height=64, width=64, output_type="np").images
    assert img.shape == (1, 64, 64, 3)
    b = models.load(str(micro_run / "model"))
    assert b.vae_scale == 8 and b.prediction_type == "epsilon"
    assert b.vae.config.scaling_factor != 1.0  # measured from the data by the VAE stage
    m = json.loads((micro_run / "manifest.json").read_text())
    assert m["seed"] == 3 and m["stages"]["unet"]["steps"] == 4 and m["stages"]["refine"]["steps"] == 3
    # The VAE stage had its reconstructions read by the evaluator (the gate that ends it).
    assert m["stages"]["vae"]["checks"] and set(m["stages"]["vae"]["checks"][0]["reconstructed"]) >= {"what", "colour", "background"}
    assert "--steps clip=3,evaluator=3,vae=3,unet=4,refine=3,decoder=3" in m["reproduce"]
    # The decoder stage's reconstructions were read too, and its VAE is the model's.
    assert m["stages"]["decoder"]["checks"][-1]["step"] == 3
    assert weights.digests(micro_run / "stages" / "decoder" / "vae") == weights.digests(micro_run / "model" / "vae")
    assert set(m["versions"]) >= {"torch", "diffusers", "transformers"}


@pytest.mark.slow
def test_training_is_deterministic_and_resumes(micro_run, tmp_path):
    again = tmp_path / "again"
    assert cli.main(["train", str(again), "--micro", "--seed", "3", "--steps", MICRO_STEPS]) == 0
    assert weights.digests(again / "model") == weights.digests(micro_run / "model")
    # A finished stage is not run again: only the removed UNet stage is.
    (again / "stages" / "unet" / "done.json").unlink()
    before = (again / "stages" / "vae" / "done.json").read_text()
    assert cli.main(["train", str(again), "--micro", "--seed", "3", "--steps", MICRO_STEPS]) == 0
    assert (again / "stages" / "vae" / "done.json").read_text() == before
    assert weights.digests(again / "model") == weights.digests(micro_run / "model")


@pytest.mark.slow
def test_stages_run_apart_give_the_same_model_and_say_how_to_redo_them(micro_run, tmp_path):
    apart = tmp_path / "apart"
    base = ["train", str(apart), "--micro", "--seed", "3", "--steps", MICRO_STEPS]
    # clip and evaluator alone (as two processes side by side would): no model yet, no manifest.
    assert cli.main(base + ["--stages", "clip,evaluator"]) == 0
    assert not (apart / "model").exists() and not (apart / "manifest.json").exists()
    assert cli.main(base + ["--threads", "2"]) == 0
    m = json.loads((apart / "manifest.json").read_text())
    assert {k: r["threads"] for k, r in m["stages"].items()} == {"clip": 1, "evaluator": 1, "vae": 2, "unet": 2, "refine": 2, "decoder": 2}
    assert m["reproduce"].count("python -m tinv.trainer.world train OUT") == 2
    assert "--threads 1 --stages clip,evaluator" in m["reproduce"] and "--threads 2 --stages vae,unet,refine,decoder" in m["reproduce"]
    with pytest.raises(SystemExit):
        cli.main(["train", str(apart), "--stages", "clip,unte"])


@pytest.mark.slow
def test_refine_continues_a_four_stage_run_to_the_same_model(micro_run, tmp_path):
    later = tmp_path / "later"
    base = ["train", str(later), "--micro", "--seed", "3", "--steps", MICRO_STEPS]
    assert cli.main(base + ["--stages", "clip,evaluator,vae,unet,decoder"]) == 0
    assert not (later / "manifest.json").exists()
    # a run made before the refine stage existed kept the first cycle only as OUT/model
    import shutil

    shutil.rmtree(later / "stages" / "unet" / "unet")
    assert cli.main(base + ["--stages", "refine"]) == 0
    assert weights.digests(later / "model") == weights.digests(micro_run / "model")
    m = json.loads((later / "manifest.json").read_text())
    assert m["stages"]["refine"]["start_digest"] == json.loads((micro_run / "manifest.json").read_text())["stages"]["refine"]["start_digest"]


@pytest.mark.slow
def test_the_decoder_stage_keeps_the_encoder_and_continues_unpacked_weights(micro_run, tmp_path):
    from safetensors.torch import load_file

    model_vae = load_file(str(micro_run / "model" / "vae" / "diffusion_pytorch_model.safetensors"))
    first_vae = load_file(str(micro_run / "stages" / "vae" / "vae" / "diffusion_pytorch_model.safetensors"))
    # the encoder (the UNet's latents) is the VAE stage's exactly; the decoder was trained on
    assert all(model_vae[k].equal(first_vae[k]) for k in first_vae if k.startswith(("encoder.", "quant_conv.")))
    assert not all(model_vae[k].equal(first_vae[k]) for k in first_vae if k.startswith("decoder."))

    # Weights installed before the decoder stage existed: unpack them and run only that stage.
    older = tmp_path / "older"
    assert cli.main(["train", str(older), "--micro", "--seed", "3", "--steps", MICRO_STEPS, "--stages", "clip,evaluator,vae,unet,refine"]) == 0
    shipped = weights.install(_as_finished(older), tmp_path / "weights")
    later = tmp_path / "later"
    assert weights.unpack(shipped, later) == {"restored": ["clip", "evaluator", "refine", "vae"], "not_restored": ["unet"]}
    assert cli.main(["train", str(later), "--micro", "--seed", "3", "--steps", MICRO_STEPS, "--stages", "decoder"]) == 0
    assert weights.digests(later / "model") == weights.digests(micro_run / "model")
    m = json.loads((later / "manifest.json").read_text())
    assert m["history"] == [json.loads((shipped / "manifest.json").read_text())["command"], f"python -m tinv.trainer.world unpack {later}"]
    assert set(m["stages"]) == set(json.loads((micro_run / "manifest.json").read_text())["stages"])
    # refine must not silently restart from OUT/model (it holds refine's output, not the first cycle's)
    (later / "stages" / "refine" / "done.json").unlink()
    with pytest.raises(RuntimeError, match="rerun the unet stage"):
        cli.main(["train", str(later), "--micro", "--seed", "3", "--steps", MICRO_STEPS, "--stages", "refine"])
    with pytest.raises(FileExistsError, match="empty folder"):
        weights.unpack(shipped, later)
    # turned off again (0 steps, the default): the model gets the VAE stage's decoder back
    (later / "stages" / "decoder" / "done.json").unlink()
    assert cli.main(["train", str(later), "--micro", "--seed", "3", "--steps", MICRO_STEPS.replace("decoder=3", "decoder=0"), "--stages", "decoder"]) == 0
    assert not (later / "stages" / "decoder" / "vae").exists()
    assert weights.digests(later / "model" / "vae") == weights.digests(later / "stages" / "vae" / "vae")


def _as_finished(run):
    """A five-stage run's folder as `install` takes it (the manifest a five-stage version wrote)."""
    from tinv.trainer.world import train

    stages = {n: train.done(train.Config(out=run), n) for n in train.STAGES if n != "decoder"}
    (run / "evaluator.safetensors").write_bytes((run / "stages" / "evaluator" / "evaluator.safetensors").read_bytes())
    (run / "manifest.json").write_text(json.dumps({"command": "python -m tinv.trainer.world train OLD --seed 3", "seed": 3, "stages": stages}))
    return run


@pytest.mark.slow
def test_install_writes_a_manifest_the_check_accepts(micro_run, tmp_path):
    dest = weights.install(micro_run, tmp_path / "weights")
    assert weights.available(dest) and weights.mismatches(dest) == []
    f = dest / "model" / "unet" / "config.json"
    f.write_text(f.read_text() + " ")
    assert weights.mismatches(dest) == ["model/unet/config.json: digest differs"]


@pytest.mark.slow
def test_the_evaluation_and_the_quality_measurement_run_on_a_trained_folder(micro_run):
    from tinv.trainer.world import evaluate, quality, scenes

    rows = evaluate.report(micro_run, n=2, steps=2, per_pair=1, seen=1)
    acc = rows[0]["evaluator"]
    assert set(acc) == {"fresh", "reconstructed"} and all(0 <= v <= 1 for v in acc["fresh"].values())
    summaries = [r for r in rows if "summary" in r]
    assert [r["set"] for r in summaries] == ["held-out", "seen"] and summaries[0]["prompts"] == 5
    ev = evaluate.load_evaluator(micro_run)
    m = quality.measure(scenes.concept("det-logo"), str(micro_run / "model"), ev, quality.Recipe(steps=2, images=2), n=2, contexts=False)
    assert set(m["fidelity"]) == {"learned", "initializer", "real", "real_vs_other_concepts", "fraction"}
    assert list(m["per_prompt"]) == ["a det-logo"]


def test_fraction_of_the_way_from_baseline_to_ceiling():
    from tinv.trainer.world.quality import fraction

    assert fraction(0.5, 0.2, 0.8) == 0.5
    assert fraction(0.5, 0.8, 0.8) is None  # no gap: the concept does not count


def test_a_context_is_what_the_prompt_asks_besides_the_concept():
    from tinv.trainer.world.quality import _context_target

    assert _context_target("a purple-star on an orange background", "purple-star") == {"background": "orange"}
    assert _context_target("a large purple-star", "purple-star") == {}  # 'star' is the concept, not a context
    assert _context_target("a striped circle", "striped") == {"what": "circle"}
