"""SDXL training on builtin:tiny-xl (real diffusers/transformers classes, CPU): both encoders learn,
the conditioning is SDXL's, resume is exact, and the files load in diffusers' StableDiffusionXLPipeline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tinv.trainer import checkpoint, models, sdxl, storage
from tinv.trainer.errors import EXIT_PREEMPTED, ConfigError, ModelError
from tinv.trainer.tokens import ConceptVocab
from tinv.trainer.train import Options, train

pytestmark = pytest.mark.slow

XL = {"model": {"source": "builtin:tiny-xl"}}


def ckpt_dirs(run: str) -> list[Path]:
    return [Path(r.uri) for r in checkpoint.list_checkpoints(storage.Store(), run)[0]]


def frozen_state(bundle) -> dict[str, torch.Tensor]:
    mods = {"unet": bundle.unet, "vae": bundle.vae, "te1": bundle.text[0].encoder, "te2": bundle.text[1].encoder}
    return {f"{n}.{k}": v.detach().clone() for n, m in mods.items() for k, v in m.state_dict().items()}


def test_tiny_xl_is_sdxl_from_code_and_from_a_folder(tmp_path):
    b = models.load("builtin:tiny-xl")
    assert b.family == "sdxl" and b.widths == [32, 48] and [s.format_key for s in b.text] == ["clip_l", "clip_g"]
    assert b.unet.config.addition_embed_type == "text_time" and b.unet.config.cross_attention_dim == sum(b.widths)
    assert type(b.text[1].encoder).__name__ == "CLIPTextModelWithProjection"
    assert models.default_resolution(b) == 64 and models.default_resolution(models.load("builtin:tiny")) == 512
    folder = sdxl.save(tmp_path / "xl")
    loaded = models.load(str(folder))
    assert loaded.family == "sdxl" and loaded.widths == [32, 48]
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    # a refiner-like folder (second encoder only) is refused with what to use instead
    import shutil

    shutil.rmtree(folder / "text_encoder")
    with pytest.raises(ModelError, match="refiner"):
        models.load(str(folder))


def test_time_ids_come_from_each_images_real_size_and_crop():
    # a 200x100 (w x h) image centre-cropped to a 100 px square, resized to 64: crop left 50 px -> 32 px
    assert sdxl.geometry((200, 100), 64, center_crop=True) == (100, 200, 0, 32)
    assert sdxl.geometry((200, 100), 64, center_crop=False) == (100, 200, 0, 0)
    ids = sdxl.time_ids([(100, 200, 0, 32), (100, 200, 0, 32)], [0, 1], 64, "cpu", center_crop=True)
    # flipped: the crop's left edge mirrored in the resized frame (128 - 64 - 32)
    assert ids.tolist() == [[100, 200, 0, 32, 64, 64], [100, 200, 0, 32, 64, 64]]
    ids = sdxl.time_ids([(60, 200, 0, 10)], [1], 64, "cpu", center_crop=True)
    assert ids.tolist() == [[60, 200, 0, round(200 * 64 / 60) - 64 - 10, 64, 64]]


def test_loss_falls_and_only_the_new_rows_of_both_encoders_change(make_job):
    bundle = models.load("builtin:tiny-xl")
    before = frozen_state(bundle)
    job = make_job(training={"steps": 30, "learningRate": 2.0e-2, "checkpointEvery": 100, "flipP": 0.0}, **XL)
    res = train(job, Options(eval_samples=list(range(16)), validation=False), model=bundle)
    assert res.exit_code == 0 and res.step == 30
    # A random tiny UNet listens to the text a little: ~1.079 -> ~1.067 is what learning gets here.
    assert res.eval_after < res.eval_before * 0.995, (res.eval_before, res.eval_after)
    after = frozen_state(bundle)
    for k, v in before.items():
        assert torch.equal(after[k.replace("token_embedding.weight", "token_embedding.base.weight")], v), k
    # ONE trainable tensor, shared by both encoders' token layers; each reads its own columns
    l1, l2 = (s.encoder.get_input_embeddings() for s in bundle.text)
    assert l1.new is l2.new and l1.columns == (0, 32) and l2.columns == (32, 80)
    for s in bundle.text:
        names = [n for n, p in s.encoder.named_parameters() if p.requires_grad]
        assert len(names) == 1 and names[0].endswith("embeddings.token_embedding.new"), names
    v = ConceptVocab(bundle.tokenizer, [("det-logo", "brain logo, sharp lines", None)])
    ids = list(v.concepts[0].init_ids)
    e = res.embeddings["det-logo"]
    assert e["clip_l"].shape == (len(ids), 32) and e["clip_g"].shape == (len(ids), 48)
    for key, te in (("clip_l", "te1"), ("clip_g", "te2")):
        (init,) = [v[ids] for k, v in before.items() if k.startswith(te + ".") and k.endswith("embeddings.token_embedding.weight")]
        assert not torch.allclose(e[key], init), key  # both encoders' vectors learned
    assert torch.equal(l1.new.detach(), torch.cat([e["clip_l"], e["clip_g"]], 1))


def test_interrupted_and_resumed_sdxl_run_is_bit_exact(make_job, tmp_path):
    kw = dict(training={"steps": 8, "checkpointEvery": 4, "lrScheduler": "cosine", "normRegWeight": 0.01, "hiddenRegWeight": 0.1}, **XL)
    full = train(make_job(storage=str(tmp_path / "a"), **kw), Options(validation=False))
    job = make_job(storage=str(tmp_path / "b"), **kw)
    first = train(job, Options(stop_at_step=3, validation=False))
    assert first.exit_code == EXIT_PREEMPTED and first.step == 3
    second = train(job, Options(validation=False))
    assert second.exit_code == 0 and second.step == 8
    for key in ("clip_l", "clip_g"):
        assert torch.equal(full.embeddings["det-logo"][key], second.embeddings["det-logo"][key]), key
    state = torch.load(ckpt_dirs(second.run_uri)[-1] / "optimizer.pt", weights_only=True)
    assert {k: tuple(v.shape) for k, v in state["embeddings"].items()} == {"text_encoder": (5, 32), "text_encoder_2": (5, 48)}


def test_files_have_the_clip_l_clip_g_layout_and_load_in_diffusers_sdxl_pipeline(make_job, logo_dir2):
    concepts = [
        {"token": "det-logo", "initializer": "brain logo, sharp lines", "images": str(make_job().spec.concepts[0].images)},
        # not "det-logo-demo": diffusers' prompt expansion is a plain str.replace, which garbles tokens that
        # contain one another (tinv's own substitution works on token boundaries; tests/trainer/test_tokens.py)
        {"token": "xl-mark", "initializer": "logo", "vectors": 3, "images": str(logo_dir2)},
    ]
    res = train(make_job(concepts=concepts, training={"steps": 4, "checkpointEvery": 4}, **XL), Options(validation=False))
    (ck,) = ckpt_dirs(res.run_uri)
    manifest = json.loads((ck / "manifest.json").read_text())
    assert manifest["family"] == "sdxl" and manifest["embedding_widths"] == {"clip_l": 32, "clip_g": 48}
    assert manifest["tokens"] == {"det-logo": 5, "xl-mark": 3}
    # AUTOMATIC1111 / ComfyUI / kohya: one file per concept named after the token, {"clip_l", "clip_g"}
    for tok, n in manifest["tokens"].items():
        f = load_file(str(ck / f"{tok}.safetensors"))
        assert set(f) == {"clip_l", "clip_g"} and f["clip_l"].shape == (n, 32) and f["clip_g"].shape == (n, 48)
        assert torch.equal(f["clip_l"], res.embeddings[tok]["clip_l"]) and torch.equal(f["clip_g"], res.embeddings[tok]["clip_g"])
    # diffusers: the documented two calls, per file layout, on the real StableDiffusionXLPipeline
    for layout in ("pair", "one-file"):
        bundle = models.load("builtin:tiny-xl")
        pipe = bundle.pipeline()
        assert type(pipe).__name__ == "StableDiffusionXLPipeline"
        for tok in manifest["tokens"]:
            if layout == "pair":
                one, two = str(ck / "learned_embeds.safetensors"), str(ck / "learned_embeds_2.safetensors")
                one, two = load_file(one)[tok], load_file(two)[tok]
            else:
                f = load_file(str(ck / f"{tok}.safetensors"))
                one, two = f["clip_l"], f["clip_g"]
            pipe.load_textual_inversion(one, token=tok, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
            pipe.load_textual_inversion(two, token=tok, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
        for tok, n in manifest["tokens"].items():
            names = [tok] + [f"{tok}_{i}" for i in range(1, n)]
            for te, tz, key in ((pipe.text_encoder, pipe.tokenizer, "clip_l"), (pipe.text_encoder_2, pipe.tokenizer_2, "clip_g")):
                rows = te.get_input_embeddings().weight[tz.convert_tokens_to_ids(names)]
                assert torch.equal(rows, res.embeddings[tok][key]), (layout, tok, key)
        # ... and diffusers' SDXL conditioning of a prompt with both concepts equals tinv's
        prompt = "a xl-mark next to a det-logo on a wall"
        with torch.no_grad():
            d_hidden, _, d_pooled, _ = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
            mine = models.load("builtin:tiny-xl")
            from tinv.trainer.engine import Engine
            from tinv.trainer.concepts import load_all
            from tinv.api import storage as api_storage

            eng = Engine(mine, load_all([str(ck)], store=api_storage.Store()), device="cpu", precision="fp32")
            t_hidden, t_pooled = mine.encode(eng.vocab, [prompt])
        assert d_hidden.shape == (1, 77, 80) and d_pooled.shape == (1, 48)
        torch.testing.assert_close(t_hidden, d_hidden, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(t_pooled, d_pooled, rtol=1e-5, atol=1e-5)


def test_sd_and_sdxl_embeddings_are_refused_in_each_others_resume_and_fork(make_job, tmp_path):
    sd = train(make_job(storage=str(tmp_path / "sd"), training={"steps": 2, "checkpointEvery": 2}), Options(validation=False))
    xl = train(make_job(storage=str(tmp_path / "xl"), training={"steps": 2, "checkpointEvery": 2}, **XL), Options(validation=False))
    (sd_ck,), (xl_ck,) = ckpt_dirs(sd.run_uri), ckpt_dirs(xl.run_uri)
    for mode in ("continue", "fork"):
        with pytest.raises(ConfigError, match="holds SD 1.x/2.x embeddings, but this job's model is SDXL"):
            train(make_job(storage=str(tmp_path / "c"), resumeFrom={"checkpoint": str(sd_ck), "mode": mode}, **XL), Options(validation=False))
        with pytest.raises(ConfigError, match="holds SDXL embeddings, but this job's model is SD 1.x/2.x"):
            train(make_job(storage=str(tmp_path / "d"), resumeFrom={"checkpoint": str(xl_ck), "mode": mode}), Options(validation=False))
    # a single file without a manifest: refused by its layout
    with pytest.raises(ConfigError, match="SDXL"):
        train(make_job(storage=str(tmp_path / "e"), resumeFrom={"checkpoint": str(xl_ck / "det-logo.safetensors"), "mode": "fork"}),
              Options(validation=False))
    with pytest.raises(ConfigError, match="SDXL"):
        train(make_job(storage=str(tmp_path / "f"), resumeFrom={"checkpoint": str(sd_ck / "det-logo.pt"), "mode": "fork"}, **XL),
              Options(validation=False))
    # the same family forks fine, from the folder and from the one-file layout
    for src in (str(xl_ck), str(xl_ck / "det-logo.safetensors")):
        r = train(make_job(storage=str(tmp_path / "g" / Path(src).name), resumeFrom={"checkpoint": src, "mode": "fork"},
                           training={"steps": 1, "checkpointEvery": 1}, **XL), Options(validation=False))
        assert r.exit_code == 0


def test_resolution_defaults_to_the_native_size_of_sdxl(make_job):
    job = make_job(**XL)
    job.spec.training.resolution = None  # as a spec that sets none arrives
    from tinv.api.models import TextualInversionJob

    doc = job.model_dump(mode="json", by_alias=True, exclude_none=True)
    assert "resolution" not in doc["spec"]["training"]
    assert TextualInversionJob.model_validate(doc).spec.training.resolution is None
    job.spec.training.steps = 1
    job.spec.training.checkpoint_every = 1
    res = train(job, Options(validation=False))
    (ck,) = ckpt_dirs(res.run_uri)
    m = json.loads((ck / "manifest.json").read_text())
    assert res.exit_code == 0 and m["family"] == "sdxl"


def test_validation_images_render_sdxl_during_training(make_job):
    job = make_job(training={"steps": 2, "checkpointEvery": 2, "validation": {"prompts": ["a det-logo"], "steps": 2, "every": 2}}, **XL)
    res = train(job, Options())
    assert res.exit_code == 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (Path(res.run_uri) / "tensorboard").glob("events.*")
    ea = EventAccumulator(str(events))
    ea.Reload()
    assert ea.Tags()["images"] == ["validation/0"]
    (img,) = ea.Images("validation/0")
    assert (img.step, img.width, img.height) == (2, 64, 64)


def test_model_vae_is_used_for_the_latents_and_recorded(make_job, tmp_path):
    from tinv.trainer import sdxl

    vae = sdxl.build_tiny_xl(seed=5)["vae"]
    vae.register_to_config(force_upcast=False)
    vae.save_pretrained(str(tmp_path / "vae"))
    bundle = models.load("builtin:tiny-xl")
    job = make_job(model={"source": "builtin:tiny-xl", "vae": str(tmp_path / "vae")}, training={"steps": 1, "checkpointEvery": 1})
    res = train(job, Options(validation=False), model=bundle)
    assert res.exit_code == 0 and bundle.vae.config.force_upcast is False
    (ck,) = ckpt_dirs(res.run_uri)
    assert json.loads((ck / "manifest.json").read_text())["model"]["vae"] == str(tmp_path / "vae")


def test_sdxl_two_gloo_processes_match_one_process_through_the_cli(job_yaml, tmp_path):
    """`tinv train` on builtin:tiny-xl: one process 2 x 2 per step == two torchrun ranks 1 x 2 each."""
    import os
    import socket
    import subprocess
    import sys

    from tinv.trainer.formats import read_embeddings

    kw = dict(model={"source": "builtin:tiny-xl"})
    one = job_yaml("one.yaml", storage=str(tmp_path / "one"), training={"steps": 4, "batchSize": 2, "gradientAccumulation": 2, "checkpointEvery": 4}, **kw)
    two = job_yaml("two.yaml", storage=str(tmp_path / "two"), training={"steps": 4, "batchSize": 1, "gradientAccumulation": 2, "checkpointEvery": 4}, **kw)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r1 = subprocess.run([sys.executable, "-m", "tinv.trainer", "train", str(one), "--no-progress", "--device", "cpu"],
                        capture_output=True, text=True, timeout=300, env=env)
    assert r1.returncode == 0, r1.stderr[-3000:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r2 = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                         "--master-port", str(port), "-m", "tinv.trainer", "train", str(two), "--no-progress", "--device", "cpu"],
                        capture_output=True, text=True, timeout=300, env=env)
    assert r2.returncode == 0, r2.stderr[-3000:]

    def final(root):
        (ck,) = [p.parent for p in Path(root).glob("*/*/checkpoints/*/manifest.json")]
        return read_embeddings(str(ck))["det-logo"], json.loads((ck / "manifest.json").read_text())

    (a, ma), (b, mb) = final(tmp_path / "one"), final(tmp_path / "two")
    assert ma["family"] == mb["family"] == "sdxl" and mb["world_size"] == 2
    for key in ("clip_l", "clip_g"):
        assert torch.allclose(a[key], b[key], atol=1e-5), (key, (a[key] - b[key]).abs().max())


def test_an_sdxl_hugging_face_id_is_recognised_from_the_cached_snapshot(tmp_path, monkeypatch):
    """`model.source: org/name` of an SDXL repository: the hub snapshot (here pre-filled in the cache, offline)
    is recognised as SDXL from its components and loads both encoders."""
    rev = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "models--tinv-test--tiny-xl"
    sdxl.save(repo / "snapshots" / rev)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # no ./tinv-test/tiny-xl folder shadows the id
    b = models.load("tinv-test/tiny-xl")
    assert b.family == "sdxl" and b.widths == [32, 48] and b.path.endswith(rev)
