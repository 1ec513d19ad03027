"""Loading concepts: every format tinv writes (and the Determined demo file), by path, URI, job or uuid."""

from __future__ import annotations

import json
import uuid as uuidlib
from pathlib import Path

import numpy as np
import pytest
import torch

from gridkit import vectors
from tinv.trainer import concepts as C
from tinv.trainer import formats
from tinv.trainer import generate as G, engine as E, grid as grids
from tinv.trainer.errors import ConfigError

TOK = "det-logo"


def write_checkpoint(run: Path, step: int, vecs: torch.Tensor, created: str, *, manifest: bool = True, job: str = "tiny-det-logo") -> str:
    """A checkpoint folder in the storage layout (formats.write_all + manifest.json written last)."""
    cid = str(uuidlib.uuid4())
    folder = run / "checkpoints" / cid
    formats.write_all(folder, {TOK: vecs}, {TOK: "brain logo"}, step, "builtin:tiny")
    if manifest:
        (folder / "manifest.json").write_text(json.dumps({
            "format": "tinv.checkpoint/v1", "uuid": cid, "step": step, "createdAt": created, "uri": str(folder),
            "job": {"name": job, "namespace": "default", "uid": None},
        }))
    return cid


@pytest.fixture(scope="module")
def tiny_engine():
    return E.load_engine("builtin:tiny", [], device="cpu", precision="fp32")


def render_with(base: E.Engine, refs, **kw) -> np.ndarray:
    from tinv.api.storage import Store

    concepts = C.load_all(refs, store=Store(), **kw)
    eng = E.Engine(base.bundle, concepts, device="cpu", precision="fp32")
    q = grids.Request(prompt=f"a watercolor painting of a {concepts[0].token}", seed=5, guidance_scale=5, steps=2, scheduler="ddim",
                  width=64, height=64)
    return eng.render([q])[0].pixels, concepts


def test_every_format_gives_the_same_vectors_and_pixels(tmp_path, tiny_engine):
    v = vectors(3, seed=1)
    folder = tmp_path / "ckpt"
    formats.write_all(folder, {TOK: v}, {TOK: "brain logo"}, 40, "builtin:tiny")
    # the Determined demo layout: a folder holding only learned_embeddings_dict_demo.pt (older files say initializer_tokens)
    demo = tmp_path / "demo"
    demo.mkdir()
    torch.save({TOK: {"initializer_tokens": "brain logo", "learned_embeddings": v.clone()}}, demo / "learned_embeddings_dict_demo.pt")
    # diffusers' own textual_inversion.py output: learned_embeds.bin with {token: [n, d]}
    bin_dir = tmp_path / "diffusers-bin"
    bin_dir.mkdir()
    torch.save({TOK: v.clone()}, bin_dir / "learned_embeds.bin")
    refs = [
        str(folder),                                    # a checkpoint folder
        str(folder / "learned_embeds.safetensors"),     # diffusers safetensors
        str(folder / f"{TOK}.pt"),                      # AUTOMATIC1111: the trigger is the file name
        str(folder / "learned_embeddings_dict.pt"),     # the Determined example's layout
        f"file://{folder / 'learned_embeds.safetensors'}",
        str(demo),                                      # the Determined demo file's layout
        str(demo / "learned_embeddings_dict_demo.pt"),
        str(bin_dir),
    ]
    first, _ = render_with(tiny_engine, [refs[0]])
    for ref in refs:
        pixels, concepts = render_with(tiny_engine, [ref])
        assert [c.token for c in concepts] == [TOK], ref
        assert torch.equal(concepts[0].vectors, v), ref
        assert np.array_equal(pixels, first), f"{ref}: same vectors, same image"


def test_a1111_trigger_is_the_file_name_and_hash_renames(tmp_path, tiny_engine):
    v = vectors(2, seed=2)
    p = tmp_path / "my-style.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": v}, "name": "ignored-name", "step": 3,
                "sd_checkpoint": None, "sd_checkpoint_name": None}, p)
    _, concepts = render_with(tiny_engine, [str(p)])
    assert concepts[0].token == "my-style"
    _, concepts = render_with(tiny_engine, [f"{p}#<other>"])
    assert concepts[0].token == "<other>"


def test_multi_concept_checkpoint_loads_every_token(tmp_path):
    from tinv.api.storage import Store

    folder = tmp_path / "multi"
    formats.write_all(folder, {"<a>": vectors(1), "<b>": vectors(2, seed=3)}, {}, 1)
    got = C.load_all([str(folder)], store=Store())
    assert [c.token for c in got] == ["<a>", "<b>"]
    one = C.load_all([C.ConceptRef(uri=str(folder), token="<b>")], store=Store())
    assert [c.token for c in one] == ["<b>"] and one[0].vectors.shape == (2, 32)
    with pytest.raises(ConfigError, match=r"holds 2 concepts \(<a>, <b>\); token '<c>' is none of them"):
        C.load_all([C.ConceptRef(uri=str(folder), token="<c>")], store=Store())


def test_job_reference_resolves_latest_complete_checkpoint_and_uuid(tmp_path, tiny_engine):
    from tinv.api.storage import Store

    storage = tmp_path / "runs"
    run = storage / "default" / "tiny-det-logo-local"
    old = write_checkpoint(run, 50, vectors(2, seed=10), "2026-01-01T00:00:00.000000Z")
    new = write_checkpoint(run, 100, vectors(2, seed=11), "2026-01-01T00:01:00.000000Z")
    write_checkpoint(run, 150, vectors(2, seed=12), "2026-01-01T00:02:00.000000Z", manifest=False)  # being written
    # a job whose name starts with the same words must not be mistaken for it
    write_checkpoint(storage / "default" / "tiny-det-logo-v2-local", 999, vectors(2, seed=13), "2026-02-01T00:00:00.000000Z")
    kw = dict(storage_uri=str(storage), namespace=None)
    store = Store()
    (latest,) = C.load_all(["job:tiny-det-logo"], store=store, **kw)
    assert latest.checkpoint == new and latest.job == "tiny-det-logo" and latest.uri.endswith(new)
    (by_uuid,) = C.load_all([f"job:tiny-det-logo@{old}"], store=store, **kw)
    assert by_uuid.checkpoint == old
    (bare,) = C.load_all([old], store=store, **kw)
    assert bare.checkpoint == old and bare.job == "tiny-det-logo"
    spec_ref = {"job": "tiny-det-logo", "checkpoint": "latest"}
    assert C.load_all([spec_ref], store=store, **kw)[0].checkpoint == new
    # a file inside a checkpoint folder still knows its checkpoint and job (from the manifest)
    (f,) = C.load_all([str(run / "checkpoints" / old / f"{TOK}.pt")], store=store)
    assert (f.checkpoint, f.job) == (old, "tiny-det-logo")
    with pytest.raises(ConfigError, match=r"no complete checkpoint 00000000-0000-0000-0000-000000000000"):
        C.load_all(["job:tiny-det-logo@00000000-0000-0000-0000-000000000000"], store=store, **kw)
    with pytest.raises(ConfigError, match=r"job 'nope': no complete checkpoint under .*Train it first"):
        C.load_all(["job:nope"], store=store, **kw)


def test_grid_uses_the_operators_resolved_embeddings(tmp_path, make_grid, concept_file):
    """In a cluster, status.resolvedEmbeddings (written by the operator) carries the concrete URI."""
    grid = make_grid(
        spec={"embeddings": [{"job": "det-logo", "checkpoint": "latest"}]},
        doc={"status": {"resolvedEmbeddings": [{"job": "det-logo", "checkpoint": "11111111-2222-3333-4444-555555555555",
                                                "uri": str(concept_file)}]}},
    )
    (ref,) = G.refs_of(grid)
    assert ref.uri == str(concept_file) and ref.checkpoint == "11111111-2222-3333-4444-555555555555"
    from tinv.api.storage import Store

    (c,) = C.load_all([ref], store=Store())
    assert c.checkpoint == "11111111-2222-3333-4444-555555555555" and c.job == "det-logo"
