"""Real training on the tiny model (CPU): loss, frozen weights, resume, fork, outputs, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tinv.trainer import checkpoint, models, storage
from tinv.trainer.errors import EXIT_PREEMPTED, ConfigError
from tinv.trainer.train import Options, train

pytestmark = pytest.mark.slow


def ckpt_dirs(run: str) -> list[Path]:
    store = storage.Store()
    return [Path(r.uri) for r in checkpoint.list_checkpoints(store, run)[0]]


def test_loss_on_a_fixed_batch_falls_and_only_new_rows_change(make_job):
    bundle = models.load("builtin:tiny")
    frozen = {f"{name}.{k}": v.detach().clone() for name, m in (("unet", bundle.unet), ("vae", bundle.vae), ("te", bundle.text_encoder)) for k, v in m.state_dict().items()}
    job = make_job(training={"steps": 30, "learningRate": 5.0e-2, "checkpointEvery": 100, "flipP": 0.0})
    res = train(job, Options(eval_samples=list(range(16)), validation=False), model=bundle)
    assert res.exit_code == 0 and res.step == 30
    # A random UNet listens to the text only a little: ~1.059 -> ~1.029 is what learning can get.
    assert res.eval_after < res.eval_before * 0.985, (res.eval_before, res.eval_after)
    # Frozen: every UNet, VAE and text-encoder weight (incl. the original vocabulary) is unchanged.
    layer = bundle.text_encoder.get_input_embeddings()
    now = {f"{name}.{k}": v for name, m in (("unet", bundle.unet), ("vae", bundle.vae), ("te", bundle.text_encoder)) for k, v in m.state_dict().items()}
    for k, v in frozen.items():
        k2 = k.replace("token_embedding.weight", "token_embedding.base.weight")
        assert torch.equal(now[k2], v), k
    trainable = [n for n, p in bundle.text_encoder.named_parameters() if p.requires_grad]
    assert len(trainable) == 1 and trainable[0].endswith("embeddings.token_embedding.new"), trainable
    (init,) = [v for k, v in frozen.items() if k.endswith("embeddings.token_embedding.weight")]
    from tinv.trainer.tokens import ConceptVocab

    v = ConceptVocab(bundle.tokenizer, [("det-logo", "brain logo, sharp lines", None)])
    start = init[list(v.concepts[0].init_ids)]
    assert not torch.allclose(res.embeddings["det-logo"], start)
    assert torch.equal(layer.new.detach(), res.embeddings["det-logo"])


def test_interrupted_and_resumed_run_matches_an_uninterrupted_one(make_job, tmp_path):
    kw = dict(training={"steps": 12, "checkpointEvery": 4, "lrScheduler": "cosine", "lrWarmupSteps": 2})
    full = train(make_job(storage=str(tmp_path / "a"), **kw), Options(validation=False))
    assert full.exit_code == 0
    job = make_job(storage=str(tmp_path / "b"), **kw)
    first = train(job, Options(stop_at_step=6, validation=False))
    assert first.exit_code == EXIT_PREEMPTED and first.step == 6
    prog = json.loads((Path(first.run_uri) / "progress.json").read_text())
    assert prog["state"] == "running" and prog["stopped"] == "preempted" and prog["latest_checkpoint"]["step"] == 6
    second = train(job, Options(validation=False))  # picks up its own newest checkpoint
    assert second.exit_code == 0 and second.step == 12
    for tok in full.embeddings:
        assert torch.equal(full.embeddings[tok], second.embeddings[tok]), (full.embeddings[tok] - second.embeddings[tok]).abs().max()
    # retention: checkpointsKept=3 newest complete ones
    steps = [checkpoint.list_checkpoints(storage.Store(), second.run_uri)[0][i].step for i in range(3)]
    assert steps == [6, 8, 12]
    # running it again is a no-op that reports success
    again = train(job, Options(validation=False))
    assert again.exit_code == 0 and again.step == 12 and torch.equal(again.embeddings["det-logo"], full.embeddings["det-logo"])


def test_every_output_loads_in_diffusers_and_plain_torch(make_job, logo_dir, logo_dir2):
    # Tokens that contain each other: the API's CEL rule refuses them for cluster resources,
    # the trainer itself handles them (matching on token boundaries).
    concepts = [
        {"token": "det-logo", "initializer": "brain logo", "images": str(logo_dir)},
        {"token": "det-logo-demo", "initializer": "circle", "vectors": 3, "images": str(logo_dir2), "property": "style"},
    ]
    job = make_job(
        training={"steps": 4, "checkpointEvery": 4, "validation": {"prompts": ["a det-logo and a det-logo-demo"], "steps": 2}},
        concepts=concepts,
    )
    res = train(job, Options())
    assert res.exit_code == 0
    (folder,) = ckpt_dirs(res.run_uri)
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted([
        "det-logo.pt", "det-logo-demo.pt", "det-logo.safetensors", "det-logo-demo.safetensors",
        "learned_embeds.safetensors", "learned_embeddings_dict.pt", "manifest.json", "optimizer.pt",
    ])
    for p in folder.glob("*.pt"):
        torch.load(p, weights_only=True)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["tokens"] == {"det-logo": 2, "det-logo-demo": 3}
    assert manifest["step"] == 4 and set(manifest["files"]) == set(names) - {"manifest.json"}
    assert manifest["files"]["optimizer.pt"] == storage.sha256_file(folder / "optimizer.pt")
    state = torch.load(folder / "optimizer.pt", weights_only=True)
    assert state["format"] == "tinv.trainer-state/v1" and state["embeddings"]["text_encoder"].shape == (5, 32)

    # diffusers: load the per-token files, the A1111 file and the whole dict; vectors land as trained
    pipe = models.load("builtin:tiny").pipeline()
    pipe.load_textual_inversion(str(folder / "det-logo-demo.safetensors"))
    pipe.load_textual_inversion(str(folder / "det-logo.pt"), token="det-logo")
    emb = pipe.text_encoder.get_input_embeddings().weight
    tokid = pipe.tokenizer.convert_tokens_to_ids
    assert torch.equal(emb[tokid("det-logo")], res.embeddings["det-logo"][0])
    assert torch.equal(emb[tokid("det-logo-demo_2")], res.embeddings["det-logo-demo"][2])
    from safetensors.torch import load_file

    pipe2 = models.load("builtin:tiny").pipeline()
    sd = load_file(folder / "learned_embeds.safetensors")
    pipe2.load_textual_inversion(list(sd.values()), token=list(sd.keys()))
    out = pipe2(prompt="a det-logo", num_inference_steps=2, height=64, width=64, output_type="np")
    assert out.images.shape == (1, 64, 64, 3)
    # TensorBoard: scalars and the validation image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(Path(res.run_uri) / "tensorboard"))
    ea.Reload()
    assert "train/loss" in ea.Tags()["scalars"] and "validation/0" in ea.Tags()["images"]


def test_single_concept_checkpoint_folder_loads_in_diffusers(make_job):
    res = train(make_job(training={"steps": 2, "checkpointEvery": 2}), Options(validation=False))
    (folder,) = ckpt_dirs(res.run_uri)
    pipe = models.load("builtin:tiny").pipeline()
    pipe.load_textual_inversion(str(folder))
    n = res.embeddings["det-logo"].shape[0]
    assert all(f"det-logo_{i}" in pipe.tokenizer.get_vocab() for i in range(1, n))


def test_fork_starts_from_embeddings_with_new_hyperparameters(make_job, tmp_path):
    src = train(make_job(storage=str(tmp_path / "src"), training={"steps": 3, "checkpointEvery": 3}), Options(validation=False))
    (folder,) = ckpt_dirs(src.run_uri)
    fork = make_job(
        storage=str(tmp_path / "fork"),
        training={"steps": 1, "learningRate": 1.0e-9, "optimizer": "sgd"},
        resumeFrom={"checkpoint": str(folder), "mode": "fork"},
    )
    res = train(fork, Options(validation=False))
    assert res.step == 1
    assert torch.allclose(res.embeddings["det-logo"], src.embeddings["det-logo"], atol=1e-6)
    # continue by uuid from another job's run folder
    cont = make_job(storage=str(tmp_path / "src"), resumeFrom={"checkpoint": folder.name, "job": "t"}, training={"steps": 5})
    cont = cont.model_copy(update={"metadata": cont.metadata.model_copy(update={"name": "t2"})})
    res2 = train(cont, Options(validation=False))
    assert res2.step == 5
    # the Determined demo layout forks too (vectors must match)
    torch.save({"det-logo": {"initializer_tokens": "x", "learned_embeddings": torch.randn(11, 32)}}, tmp_path / "demo.pt")
    demo = make_job(
        storage=str(tmp_path / "demo"),
        training={"steps": 1},
        concepts=[{"token": "det-logo", "initializer": "logo", "vectors": 11, "images": make_job().spec.concepts[0].images}],
        resumeFrom={"checkpoint": str(tmp_path / "demo.pt"), "mode": "fork"},
    )
    assert train(demo, Options(validation=False)).embeddings["det-logo"].shape == (11, 32)
    bad = make_job(storage=str(tmp_path / "bad"), resumeFrom={"checkpoint": str(tmp_path / "demo.pt"), "mode": "fork"})
    with pytest.raises(ConfigError, match=r"shape \(11, 32\)"):
        train(bad, Options(validation=False))
    with pytest.raises(ConfigError, match="no complete checkpoint with that uuid"):
        train(make_job(storage=str(tmp_path / "x"), resumeFrom={"checkpoint": "0" * 8 + "-0000-0000-0000-" + "0" * 12}), Options())


def test_v_prediction_and_regularisers(make_job):
    assert models.load("builtin:tiny-v").prediction_type == "v_prediction"
    job = make_job(
        training={"steps": 3, "normRegWeight": 0.1, "hiddenRegWeight": 0.1, "optimizer": "adamw", "weightDecay": 0.01, "lrScheduler": "linear"}
    )
    res = train(job, Options(model="builtin:tiny-v", validation=False))
    assert res.exit_code == 0 and res.loss is not None and res.loss == res.loss  # finite, not NaN


def test_model_from_a_diffusers_folder(make_job, tmp_path):
    from tinv.trainer import tiny

    folder = tiny.save(tmp_path / "tiny-model")
    res = train(make_job(model={"source": str(folder)}, training={"steps": 2}), Options(validation=False))
    ref = train(make_job(storage=str(tmp_path / "ref"), training={"steps": 2}), Options(validation=False))
    assert torch.equal(res.embeddings["det-logo"], ref.embeddings["det-logo"])


def test_bad_inputs_fail_before_any_model_work(make_job, tmp_path, monkeypatch):
    from tinv.trainer.errors import DataError, ModelError, UnavailableError

    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.png").write_text("not an image")
    # The model source does not exist either: the images are refused first, before any model work.
    job = make_job(concepts=[{"token": "det-logo", "initializer": "logo", "images": str(tmp_path / "junk")}],
                   model={"source": str(tmp_path / "no-model")})
    with pytest.raises(DataError, match="no usable images"):
        train(job, Options())
    with pytest.raises(ConfigError, match="already a word"):
        train(make_job(concepts=[{"token": "cat", "initializer": "cat", "images": make_job().spec.concepts[0].images}]), Options())
    with pytest.raises(ModelError, match="does not exist"):
        train(make_job(model={"source": str(tmp_path / "nope")}), Options())
    with pytest.raises(UnavailableError, match="HF_HUB_OFFLINE"):
        train(make_job(model={"source": "org/some-model"}), Options())
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: refused at once
    import time

    t0 = time.monotonic()
    with pytest.raises(UnavailableError, match="cannot reach the Hugging Face hub"):
        train(make_job(model={"source": "org/some-model"}), Options())
    assert time.monotonic() - t0 < 20
