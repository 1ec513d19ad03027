"""Correctness of what the trainer learns and writes (issue 13, bugs 1-9, 11-13): each test here
failed before its fix. Real training on the tiny model; real diffusers where files are loaded."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tinv.trainer import checkpoint, data, models, storage, tiny, tokens
from tinv.trainer.errors import ConfigError, ModelError
from tinv.trainer.optim import build_optimizer, lr_at
from tinv.trainer.train import Options, train

pytestmark = pytest.mark.slow


def folder_of(res) -> Path:
    (ref,) = checkpoint.list_checkpoints(storage.Store(), res.run_uri)[0][-1:]
    return Path(ref.uri)


# ---------------------------------------------------------------------------- bug 1


@pytest.mark.parametrize("template", ["a {}-style photo", "two {}s", "{}_v2"])
def test_a_template_that_glues_the_token_into_a_word_is_refused(make_job, template):
    job = make_job(concepts=[{"token": "det-logo", "initializer": "logo", "images": make_job().spec.concepts[0].images,
                              "templates": ["a photo of {}", template]}])
    with pytest.raises(ConfigError, match=r"never be trained") as e:
        train(job, Options(validation=False))
    assert template in str(e.value)


def test_every_prompt_the_trainer_builds_holds_every_vector(make_job):
    bundle = models.load("builtin:tiny")
    job = make_job(training={"steps": 1}, concepts=[{"token": "det-logo", "initializer": "logo", "vectors": 3,
                                                     "images": make_job().spec.concepts[0].images,
                                                     "templates": ["a {} photo", "({})", "the {}'s colours"]}])
    res = train(job, Options(validation=False), model=bundle)
    assert res.exit_code == 0
    from tinv.trainer.objective import Stream

    vocab = tokens.ConceptVocab(bundle.tokenizer, [("det-logo", "logo", 3)])
    ds = data.build_dataset(job.spec.concepts, 64, False, "bicubic")
    stream = Stream(0, ds, 0.5)
    base = vocab.base_size
    for k in range(40):
        row = vocab.batch([stream.sample(k)[2]])[0].tolist()
        assert {base, base + 1, base + 2} <= set(row)


def test_a_prompt_too_long_for_its_vectors_is_refused(make_job):
    long = "a " + " ".join(["very"] * 70) + " {}"
    job = make_job(concepts=[{"token": "det-logo", "initializer": "logo", "vectors": 10,
                              "images": make_job().spec.concepts[0].images, "templates": [long]}])
    with pytest.raises(ConfigError, match="tokens long"):
        train(job, Options(validation=False))


# ---------------------------------------------------------------------------- bug 2


def test_files_load_identically_in_diffusers_and_capitals_are_refused(make_job):
    images = make_job().spec.concepts[0].images
    with pytest.raises(ConfigError, match="lower case"):
        train(make_job(concepts=[{"token": "<MyCat>", "initializer": "cat", "vectors": 3, "images": images}]), Options())
    res = train(make_job(training={"steps": 2}, concepts=[{"token": "<mycat>", "initializer": "cat", "vectors": 3, "images": images}]),
                Options(validation=False))
    pipe = models.load("builtin:tiny").pipeline()
    pipe.load_textual_inversion(str(folder_of(res)))
    prompt = pipe.maybe_convert_prompt("a photo of <mycat>", pipe.tokenizer)
    ids = pipe.tokenizer(prompt, add_special_tokens=False).input_ids
    table = pipe.text_encoder.get_input_embeddings().weight
    learned = res.embeddings["<mycat>"]
    # every learned vector reaches the prompt, in order -- what tinv itself feeds the encoder
    got = torch.stack([table[i] for i in ids[-3:]])
    assert torch.equal(got, learned), prompt


# ---------------------------------------------------------------------------- bug 4


def test_checkpoint_folders_load_in_diffusers_a1111_and_comfyui_by_file_name(make_job, logo_dir2):
    images = make_job().spec.concepts[0].images
    one = train(make_job(training={"steps": 2}), Options(validation=False))
    folder = folder_of(one)
    pipe = models.load("builtin:tiny").pipeline()
    pipe.load_textual_inversion(str(folder))  # one concept: the folder, in one call
    assert "det-logo" in pipe.tokenizer.get_vocab()
    # the per-token files: one key each (ComfyUI takes the only tensor; A1111 the file name as the trigger)
    from safetensors.torch import load_file

    sd = load_file(folder / "det-logo.safetensors")
    assert list(sd) == ["det-logo"] and torch.equal(sd["det-logo"], one.embeddings["det-logo"])
    a1111 = torch.load(folder / "det-logo.pt", weights_only=True)
    assert list(a1111["string_to_param"]) == ["*"] and torch.equal(a1111["string_to_param"]["*"], one.embeddings["det-logo"])

    two = train(make_job(storage=str(Path(images).parent / "two-runs"), training={"steps": 2}, concepts=[
        {"token": "det-logo", "initializer": "logo", "images": images},
        {"token": "<shape>", "initializer": "circle", "vectors": 2, "images": str(logo_dir2)},
    ]), Options(validation=False))
    folder = folder_of(two)
    pipe = models.load("builtin:tiny").pipeline()
    with pytest.raises(ValueError, match="Loaded state dictionary is incorrect"):
        pipe.load_textual_inversion(str(folder))  # several concepts in one file: diffusers refuses
    # the documented one-liner (formats.py, README): every token of learned_embeds.safetensors
    sd = load_file(f"{folder}/learned_embeds.safetensors"); pipe.load_textual_inversion(list(sd.values()), token=list(sd))  # noqa: E702
    vocab = pipe.tokenizer.get_vocab()
    table = pipe.text_encoder.get_input_embeddings().weight
    assert torch.equal(table[vocab["<shape>_1"]], two.embeddings["<shape>"][1])
    assert torch.equal(table[vocab["det-logo"]], two.embeddings["det-logo"][0])
    import tinv.trainer.formats as formats

    assert "pipe.load_textual_inversion(list(sd.values()), token=list(sd))" in formats.__doc__


# ---------------------------------------------------------------------------- bug 5


def test_the_determined_dict_satisfies_its_pipelines_vector_count(make_job, logo_dir2):
    """The Determined example's pipeline (detsd/pipeline.py, load_from_checkpoint_dir) adds one
    dummy token per tokenizer token of `initializer_strs` and asserts that count equals the rows of
    `learned_embeddings`: the file must satisfy that for any vector count."""
    images = make_job().spec.concepts[0].images
    res = train(make_job(training={"steps": 1}, concepts=[
        {"token": "det-logo", "initializer": "brain logo, sharp lines", "vectors": 3, "images": images},  # 5 tokens -> 3 vectors
        {"token": "<round>", "initializer": "circle", "vectors": 7, "images": str(logo_dir2)},  # 1 token -> 7 vectors
        {"token": "<plain>", "initializer": "red cat", "images": images},  # as many vectors as tokens
    ]), Options(validation=False))
    tok = tiny.build_tokenizer()
    d = torch.load(folder_of(res) / "learned_embeddings_dict.pt", weights_only=True)
    for concept, entry in d.items():
        ids = tok(entry["initializer_strs"], return_tensors="pt", add_special_tokens=False).input_ids[0]
        assert len(ids) == len(entry["learned_embeddings"]), (concept, entry["initializer_strs"])
    assert d["<plain>"]["initializer_strs"] == "red cat"
    manifest = storage.Store().read_json(str(folder_of(res) / "manifest.json"))
    assert manifest["determined"]["initializer_strs"]["<round>"] == d["<round>"]["initializer_strs"]
    assert manifest["concepts"][0]["initializer"] == "brain logo, sharp lines"  # the phrase itself stays recorded


# ---------------------------------------------------------------------------- bug 6


@pytest.mark.parametrize("name", ["constant", "constant_with_warmup", "linear", "cosine"])
@pytest.mark.parametrize("warmup", [0, 3])
def test_schedules_match_diffusers_by_name(name, warmup):
    from diffusers.optimization import get_scheduler

    total, base = 20, 0.1
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=base)
    ref = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total)
    for step in range(total):
        want = opt.param_groups[0]["lr"]
        assert math.isclose(lr_at(step, base, name, warmup, total), want, rel_tol=1e-9, abs_tol=1e-12), (step, want)
        opt.step()
        ref.step()


def test_weight_decay_is_decoupled_for_every_optimizer():
    g = torch.tensor([[0.5, -2.0, 1e-3]])
    for name in ("adam", "adamw", "sgd"):
        p = torch.nn.Parameter(torch.tensor([[1.0, 2.0, -3.0]]))
        ref = torch.nn.Parameter(p.detach().clone())
        opt = build_optimizer(name, [p], lr=0.1, weight_decay=0.5)
        plain = (torch.optim.SGD if name == "sgd" else torch.optim.Adam)([ref], lr=0.1)
        p.grad, ref.grad = g.clone(), g.clone()
        with torch.no_grad():
            ref.mul_(1 - 0.1 * 0.5)  # decoupled: shrink first, then the plain update
        opt.step()
        plain.step()
        assert torch.allclose(p, ref, atol=1e-7), (name, p, ref)


def test_constant_ignores_warmup_and_says_so(make_job, caplog):
    job = make_job(training={"steps": 2, "lrScheduler": "constant", "lrWarmupSteps": 5})
    with caplog.at_level(logging.WARNING, "tinv.trainer"):
        train(job, Options(validation=False))
    assert "constant_with_warmup" in caplog.text


# ---------------------------------------------------------------------------- bug 7


def _rgba(path: Path) -> None:
    a = np.zeros((8, 8, 4), np.uint8)
    a[:4, :, :] = (10, 200, 30, 255)  # opaque green top half; bottom half fully transparent
    a[4:, :, :3] = (90, 90, 90)  # colour under the transparent pixels: what dropping alpha would show
    Image.fromarray(a, "RGBA").save(path)


@pytest.mark.parametrize("background, colour", [("white", (255, 255, 255)), ("black", (0, 0, 0))])
def test_transparent_pixels_are_composited_on_the_chosen_background(tmp_path, background, colour):
    _rgba(tmp_path / "a.png")
    img = np.asarray(data.load_image(tmp_path / "a.png", background))
    assert tuple(img[0, 0]) == (10, 200, 30) and tuple(img[7, 7]) == colour
    job_default = data.build_dataset([_concept(tmp_path)], 8, False, "nearest")
    assert tuple(job_default.pixels[0][7, 7]) == (255, 255, 255)  # the default stays white
    ds = data.build_dataset([_concept(tmp_path)], 8, False, "nearest", background=background)
    assert tuple(ds.pixels[0][7, 7]) == colour


def _concept(folder: Path):
    from tinv.api.models import Concept

    return Concept(token="det-logo", initializer="logo", images=str(folder))


# ---------------------------------------------------------------------------- bug 8


def test_resume_from_job_takes_that_jobs_newest_checkpoint_never_a_prefix_match(make_job, tmp_path):
    runs = str(tmp_path / "shared")
    foo = make_job(storage=runs, training={"steps": 2, "checkpointEvery": 2})
    foo = foo.model_copy(update={"metadata": foo.metadata.model_copy(update={"name": "foo"})})
    a = train(foo, Options(validation=False))
    foobar = make_job(storage=runs, training={"steps": 6, "checkpointEvery": 6, "learningRate": 0.5})
    foobar = foobar.model_copy(update={"metadata": foobar.metadata.model_copy(update={"name": "foo-bar"})})
    b = train(foobar, Options(validation=False))  # further along: a prefix match would prefer it
    child = make_job(storage=runs, training={"steps": 1, "learningRate": 1e-9, "optimizer": "sgd"},
                     resumeFrom={"job": "foo", "mode": "fork"})
    res = train(child, Options(validation=False))
    assert torch.allclose(res.embeddings["det-logo"], a.embeddings["det-logo"], atol=1e-6)
    assert not torch.allclose(res.embeddings["det-logo"], b.embeddings["det-logo"], atol=1e-3)


# ---------------------------------------------------------------------------- bug 9


def test_a_derived_vector_count_past_a_prompts_room_is_refused_and_counts_are_logged(make_job, caplog):
    images = make_job().spec.concepts[0].images
    words = " ".join(["logo"] * 80)
    with pytest.raises(ConfigError, match=r"80 vectors.*75"):
        train(make_job(concepts=[{"token": "det-logo", "initializer": words, "images": images}]), Options())
    with caplog.at_level(logging.INFO, "tinv.trainer"):
        train(make_job(training={"steps": 1}, concepts=[{"token": "det-logo", "initializer": words, "vectors": 4, "images": images}]),
              Options(validation=False))
    assert "concept 'det-logo': 4 vectors (set by vectors)" in caplog.text


# ---------------------------------------------------------------------------- bug 11


def test_vocabulary_checks_run_from_the_tokenizer_before_the_weights_load(make_job, tmp_path):
    folder = tiny.save(tmp_path / "model")
    for f in (folder / "unet").glob("*.safetensors"):
        f.write_bytes(b"not weights")  # loading the UNet would fail: the check must come first
    images = make_job().spec.concepts[0].images
    with pytest.raises(ConfigError, match="already a word"):
        train(make_job(model={"source": str(folder)}, concepts=[{"token": "cat", "initializer": "cat", "images": images}]), Options())
    with pytest.raises(ModelError):  # and the weights really are broken
        train(make_job(model={"source": str(folder)}), Options())


# ---------------------------------------------------------------------------- bug 12


def test_fork_says_what_was_taken_from_where_and_a_foreign_uuid_gets_a_hint(make_job, tmp_path, caplog):
    src = train(make_job(storage=str(tmp_path / "r"), training={"steps": 2, "checkpointEvery": 2}), Options(validation=False))
    folder = folder_of(src)
    images = make_job().spec.concepts[0].images
    fork = make_job(storage=str(tmp_path / "f"), training={"steps": 1}, resumeFrom={"checkpoint": str(folder), "mode": "fork"},
                    concepts=[{"token": "<new>", "initializer": "brain logo, sharp lines", "images": images}])
    with caplog.at_level(logging.INFO, "tinv.trainer"):
        train(fork, Options(validation=False))
    assert "'<new>' starts from the vectors of 'det-logo'" in caplog.text and str(folder) in caplog.text
    other = make_job(storage=str(tmp_path / "r"), training={"steps": 1}, resumeFrom={"checkpoint": folder.name})
    other = other.model_copy(update={"metadata": other.metadata.model_copy(update={"name": "other"})})
    with pytest.raises(ConfigError, match=r"belongs to job 't'.*resumeFrom\.job: t"):
        train(other, Options(validation=False))


# ---------------------------------------------------------------------------- bug 13


def test_a_batch_larger_than_the_images_and_a_huge_scaled_lr_are_warned_about(make_job, caplog):
    job = make_job(training={"steps": 1, "batchSize": 16, "gradientAccumulation": 1, "learningRate": 5e-3})
    with caplog.at_level(logging.WARNING, "tinv.trainer"):
        train(job, Options(validation=False, micro_batch=4))
    text = caplog.text
    assert "16 samples" in text and "only 6 images" in text and "Lower batchSize" in text
    assert "learning rate is 0.08" in text and "scaleLr: false" in text
