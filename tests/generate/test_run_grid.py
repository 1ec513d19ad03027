"""`tinv generate` / `tinv reproduce` end to end on the tiny model: outputs, metadata, resume, shards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gridkit import TOKEN, pngs
from tinv.trainer import generate as G, grid as grids, pngmeta, runtime
from tinv.trainer import cli as trainer_cli


def run(*argv: str) -> int:
    return trainer_cli.main(list(argv))


def images_dir(tmp_path: Path, name: str = "g", ns: str = "ns") -> Path:
    return tmp_path / "runs" / ns / f"{name}-local" / "images"


def test_generate_writes_images_metadata_index_gallery_progress_and_tensorboard(grid_yaml, tmp_path, capsys):
    path = grid_yaml()
    assert run("generate", str(path), "--no-progress") == 0
    out = capsys.readouterr().out
    d = images_dir(tmp_path)
    files = pngs(d)
    assert len(files) == 8  # 2 prompts x 2 guidance x 2 seeds
    assert f"gallery: {d / 'index.html'} (complete)" in out

    # metadata round-trips: every parameter, the model and the concept's provenance
    from tinv.api.validation import load_resource

    expected = {img.filename: img for img in grids.expand(load_resource(path).spec)}
    for f in files:
        meta = pngmeta.read_png_metadata(f)
        img = expected[f.name]
        assert (meta["prompt"], meta["negative_prompt"], meta["seed"], meta["guidance_scale"], meta["steps"], meta["scheduler"],
                meta["width"], meta["height"]) == (img.prompt, "blurry", img.seed, img.guidance_scale, 2, "ddim", 64, 64)
        assert meta["model"]["source"] == "builtin:tiny" and meta["precision"] == "fp32" and meta["device"] == "cpu"
        assert [e["token"] for e in meta["embeddings"]] == [TOKEN] and len(meta["embeddings"][0]["sha256"]) == 64
        assert meta["grid"]["index"] == img.index and meta["grid"]["name"] == "g" and meta["grid"]["namespace"] == "ns"
        assert meta["key"] == pngmeta.params_key(meta)
        from PIL import Image

        with Image.open(f) as im:
            assert im.size == (64, 64) and "Sampler: DDIM, CFG scale" in im.text["parameters"]

    index = json.loads((d / "index.json").read_text())
    assert index["format"] == "tinv.grid-index/v1" and index["complete"] and index["images_total"] == 8
    assert sorted(r["file"] for r in index["images"]) == sorted(f.name for f in files)
    assert [s["file"] for s in index["contact_sheets"]] == ["sheets/p000.png", "sheets/p001.png"]
    from PIL import Image

    with Image.open(d / "sheets" / "p000.png") as sheet:  # 2 guidance columns + labels, 2 seed rows + title/header
        assert sheet.size[0] > 2 * 128 and sheet.size[1] > 2 * 128
    page = (d / "index.html").read_text()
    for f in files:
        assert f'src="{f.name}"' in page

    progress = json.loads((d.parent / "progress.json").read_text())
    assert progress["state"] == "succeeded" and progress["images_done"] == progress["images_total"] == 8
    assert set(progress) >= {"state", "images_done", "images_total", "images_per_second", "eta_seconds", "updated_at"}

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = d.parent / "tensorboard" / "generate-000-of-001"
    acc = EventAccumulator(str(tb), size_guidance={"images": 0})
    acc.Reload()
    assert sum(len(acc.Images(t)) for t in acc.Tags()["images"]) == 8


def test_reproduce_gives_identical_pixels(grid_yaml, tmp_path, capsys):
    assert run("generate", str(grid_yaml()), "--no-progress", "--no-tensorboard", "--no-gallery") == 0
    original = pngs(images_dir(tmp_path))[5]
    out = tmp_path / "again.png"
    assert run("reproduce", str(original), "--out", str(out), "--check") == 0
    assert "identical pixels" in capsys.readouterr().out
    assert np.array_equal(pngmeta.decode_png(original.read_bytes()), pngmeta.decode_png(out.read_bytes()))
    a, b = pngmeta.read_png_metadata(original), pngmeta.read_png_metadata(out)
    assert a["key"] == b["key"] and a["grid"] == b["grid"]


def test_resume_after_preemption_skips_finished_images(make_grid, tmp_path):
    grid = make_grid()
    with pytest.raises(runtime.Stopped):
        G.run_grid(grid, G.GridOptions(stop_after_batches=1, progress_bar=False, tensorboard=False))
    d = images_dir(tmp_path)
    first = {p.name: p.read_bytes() for p in pngs(d)}
    assert len(first) == 3, "one batch of 3 written before the stop"
    progress = json.loads((d.parent / "progress.json").read_text())
    assert progress["state"] == "running" and progress["images_done"] == 3 and progress["stopped"] == "preempted"

    # a half-written image (a crash outside the atomic write) is rendered again
    victim = sorted(first)[0]
    (d / victim).write_bytes(first[victim][: len(first[victim]) // 2])
    res = G.run_grid(grid, G.GridOptions(progress_bar=False, tensorboard=False))
    assert (res.rendered, res.skipped, res.complete) == (6, 2, True)
    for name, data in first.items():
        if name != victim:
            assert (d / name).read_bytes() == data, "finished images are not rewritten"
    assert (d / victim).read_bytes() == first[victim], "the re-rendered image is identical"

    again = G.run_grid(grid, G.GridOptions(progress_bar=False, tensorboard=False))
    assert (again.rendered, again.skipped) == (0, 8)
    # a changed parameter changes the key: those images are rendered again
    changed = make_grid(spec={"negativePrompt": "ugly"})
    res = G.run_grid(changed, G.GridOptions(progress_bar=False, tensorboard=False, gallery=False))
    assert (res.rendered, res.skipped) == (8, 0)


def test_shards_together_render_the_grid_once_and_the_last_one_completes_the_gallery(make_grid, tmp_path, monkeypatch):
    grid = make_grid(spec={"resources": {"workers": 3}})
    results = []
    for i in range(3):
        monkeypatch.setenv("JOB_COMPLETION_INDEX", str(i))  # as the operator's Indexed Job runs it
        results.append(G.run_grid(grid, G.GridOptions(progress_bar=False, tensorboard=False)))
        progress = json.loads((images_dir(tmp_path).parent / "progress.json").read_text())
        assert progress["shards"]["reported"] == i + 1
        assert progress["state"] == ("succeeded" if i == 2 else "running")
    assert [r.shard for r in results] == [(0, 3), (1, 3), (2, 3)]
    assert sum(r.rendered for r in results) == 8 and [r.shard_total for r in results] == [3, 3, 2]
    assert [r.complete for r in results] == [False, False, True]
    index = json.loads((images_dir(tmp_path) / "index.json").read_text())
    assert index["complete"] and index["images_present"] == 8
    metas = [pngmeta.read_png_metadata(p) for p in pngs(images_dir(tmp_path))]
    assert sorted(m["grid"]["index"] for m in metas) == list(range(8))


def test_dry_run_lists_the_shard(grid_yaml, capsys):
    from tinv.api.validation import load_resource

    path = grid_yaml()
    assert run("generate", str(path), "--dry-run", "--shard", "1/3") == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    want = grids.shard(grids.expand(load_resource(path).spec), 1, 3)
    assert [r["index"] for r in lines] == [img.index for img in want] and len(lines) in (2, 3)
    assert [r["file"] for r in lines] == [img.filename for img in want]


@pytest.mark.parametrize(
    "spec,message",
    [
        ({"grid": {"schedulers": ["warp-drive"]}}, "spec.grid.schedulers[0]: must be one of"),
        ({"prompts": []}, "spec.prompts: a grid needs at least one prompt"),
        ({"grid": {"seeds": []}}, "every grid axis needs at least one value"),
    ],
)
def test_bad_grids_exit_2_with_the_field_named(grid_yaml, tmp_path, capsys, spec, message):
    import yaml

    path = grid_yaml()
    doc = yaml.safe_load(path.read_text())
    from testkit import merge

    doc = merge(doc, {"spec": spec})
    path.write_text(yaml.safe_dump(doc))
    assert run("generate", str(path)) == 2
    assert message in capsys.readouterr().err


def test_wrong_width_embedding_exits_2(grid_yaml, tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    wide = tmp_path / "wide.safetensors"
    save_file({"<w>": torch.randn(2, 768)}, str(wide))
    path = grid_yaml(spec={"embeddings": [{"uri": str(wide)}], "prompts": ["a <w>"]})
    assert run("generate", str(path), "--no-progress") == 2
    assert "768 wide, but this model's text encoder is 32 wide" in capsys.readouterr().err


def test_reproduce_rejects_foreign_pngs(tmp_path, capsys):
    from PIL import Image

    p = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(p)
    assert run("reproduce", str(p)) == 2
    assert "no tinv metadata" in capsys.readouterr().err
    assert run("reproduce", str(tmp_path / "missing.png")) == 2


def test_termination_message_summarises_the_shard(grid_yaml, tmp_path):
    term = tmp_path / "term.json"
    assert run("generate", str(grid_yaml()), "--no-progress", "--no-tensorboard", "--termination-message-path", str(term)) == 0
    doc = json.loads(term.read_text())
    assert doc["exit_code"] == 0 and doc["images_total"] == 8 and doc["rendered"] == 8 and doc["complete"]
    assert len(term.read_bytes()) < 4096


def test_out_of_memory_halves_the_batch_and_records_the_real_batch(make_grid, tmp_path, engine, monkeypatch):
    import torch

    real = engine.render

    def small_gpu(requests, **kw):
        if len(requests) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(requests, **kw)

    monkeypatch.setattr(engine, "render", small_gpu)
    res = G.run_grid(make_grid(), G.GridOptions(progress_bar=False, tensorboard=False, gallery=False), engine=engine)
    assert res.rendered == 8
    for p in pngs(images_dir(tmp_path)):
        assert pngmeta.read_png_metadata(p)["batch"]["size"] == 1
    monkeypatch.setattr(engine, "render", real)
    assert run("reproduce", str(pngs(images_dir(tmp_path))[0]), "--out", str(tmp_path / "r.png"), "--check") == 0
