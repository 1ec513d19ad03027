"""Image loading, normalisation, captions and templates (fast)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from tinv.trainer import data
from tinv.trainer.errors import DataError


def _concept(folder, **kw):
    from tinv.api.models import Concept

    return Concept.model_validate({"token": "det-logo", "initializer": "logo", "images": str(folder), **kw})


def test_every_common_mode_becomes_rgb(tmp_path):
    red = Image.new("RGB", (40, 20), (255, 0, 0))
    red.save(tmp_path / "rgb.png")
    rgba = Image.new("RGBA", (20, 20), (0, 0, 255, 0))  # fully transparent -> white
    rgba.save(tmp_path / "rgba.png")
    Image.new("LA", (20, 20), (0, 255)).save(tmp_path / "la.png")
    Image.new("L", (20, 20), 128).save(tmp_path / "grey.png")
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    Image.new("1", (20, 20), 1).save(tmp_path / "bw.png")
    pal = Image.new("P", (20, 20), 0)
    pal.putpalette([0, 255, 0] * 256)
    pal.save(tmp_path / "pal.gif")
    Image.fromarray(np.full((20, 20), 65535, dtype=np.uint16)).save(tmp_path / "deep16.png")
    Image.fromarray(np.linspace(0, 1, 400, dtype=np.float32).reshape(20, 20), "F").save(tmp_path / "float.tif")
    # EXIF orientation 6 (rotate 90 CW): a 40x20 image must come out 20x40
    exif = Image.Exif()
    exif[0x0112] = 6
    red.save(tmp_path / "rotated.jpg", exif=exif)

    out = {p.name: data.load_image(p) for p in sorted(tmp_path.iterdir())}
    assert all(im is not None and im.mode == "RGB" for im in out.values()), out
    px = lambda n: out[n].getpixel((5, 5))  # noqa: E731
    assert px("rgba.png") == (255, 255, 255)
    assert px("la.png") == (0, 0, 0)
    assert px("grey.png") == (128, 128, 128)
    assert px("cmyk.jpg")[0] > 200 and px("cmyk.jpg")[1] < 60
    assert px("bw.png") == (255, 255, 255)
    assert px("pal.gif") == (0, 255, 0)
    assert px("deep16.png") == (255, 255, 255)
    assert out["rotated.jpg"].size == (20, 40)


def test_bad_files_are_skipped_with_a_warning_naming_them(tmp_path, caplog):
    Image.new("RGB", (32, 32), (1, 2, 3)).save(tmp_path / "good.png")
    (tmp_path / "notes.png").write_text("this is not an image")
    (tmp_path / "empty.jpg").write_bytes(b"")
    buf = (tmp_path / "good.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(buf[: len(buf) // 2])
    (tmp_path / "readme.md").write_text("ignored quietly")
    (tmp_path / "model.bin").write_bytes(b"\0" * 10)
    with caplog.at_level(logging.WARNING, logger="tinv.trainer"):
        ds = data.build_dataset([_concept(tmp_path)], 64, False, "bicubic")
    assert ds.names == ["det-logo/good.png"] and ds.pixels[0].shape == (64, 64, 3)
    text = caplog.text
    for name in ("notes.png", "empty.jpg", "truncated.png", "model.bin"):
        assert name in text, text
    assert "readme.md" not in text


def test_zero_usable_images_is_a_clear_error(tmp_path):
    (tmp_path / "a.png").write_text("nope")
    with pytest.raises(DataError, match=r"no usable images in .* \(1 candidate files\)"):
        data.build_dataset([_concept(tmp_path)], 64, False, "bicubic")
    with pytest.raises(DataError, match="does not exist"):
        data.build_dataset([_concept(tmp_path / "missing")], 64, False, "bicubic")


def test_captions_templates_and_crop(tmp_path):
    Image.new("RGB", (100, 50), (0, 0, 0)).save(tmp_path / "on_a_pink_background.png")
    c = _concept(tmp_path, captionFromFilename=True, numBlankPrompts=2, numAPrompts=1)
    ds = data.build_dataset([c], 64, True, "lanczos")
    assert len(ds.templates[0]) == 27 + 3
    assert ds.prompt(0, 0) == "a photo of a det-logo on a pink background"
    assert ds.prompt(0, 27) == "det-logo on a pink background"
    assert ds.prompt(0, 29) == "a det-logo on a pink background"
    assert len(data.templates_for("style", None)) == 19
    assert data.templates_for("object", ["{} in space"]) == ["{} in space"]


def test_images_from_pvc_and_file_uris(tmp_path, monkeypatch):
    d = tmp_path / "claims" / "data-claim" / "sets" / "logo"
    d.mkdir(parents=True)
    Image.new("RGB", (16, 16), (9, 9, 9)).save(d / "a.png")
    monkeypatch.setenv("TINV_PVC_ROOT", str(tmp_path / "claims"))
    assert data.materialise("pvc://data-claim/sets/logo") == d
    assert data.materialise(f"file://{d}") == d
    ds = data.build_dataset([_concept("pvc://data-claim/sets/logo")], 64, False, "nearest")
    assert len(ds) == 1
    # a relative path falls back to the job file's folder
    assert data.materialise("logo", base_dir=d.parent) == d
