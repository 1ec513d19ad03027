"""Embedding files: write the three formats, read them and the other common layouts (fast)."""

from __future__ import annotations

import pytest
import torch

from tinv.trainer import formats
from tinv.trainer.errors import FormatError


def test_written_files_load_in_plain_torch_and_read_back(tmp_path):
    emb = {"det-logo": torch.randn(3, 32), "<b>": torch.randn(1, 32)}
    names = formats.write_all(tmp_path, emb, {"det-logo": "brain logo", "<b>": "cat"}, step=7, model_source="builtin:tiny", star_id=9)
    assert sorted(names) == sorted(
        ["learned_embeds.safetensors", "det-logo.safetensors", "<b>.safetensors", "det-logo.pt", "<b>.pt", "learned_embeddings_dict.pt"]
    )
    a1111 = torch.load(tmp_path / "det-logo.pt", weights_only=True)
    assert a1111["name"] == "det-logo" and a1111["step"] == 7 and a1111["string_to_token"] == {"*": 9}
    assert torch.equal(a1111["string_to_param"]["*"], emb["det-logo"])
    det = torch.load(tmp_path / "learned_embeddings_dict.pt", weights_only=True)
    assert det["<b>"]["initializer_strs"] == "cat" and torch.equal(det["<b>"]["learned_embeddings"], emb["<b>"])
    assert det["det-logo"]["learned_embeddings"].shape == (3, 32)  # each concept its own rows
    from safetensors.torch import load_file

    assert set(load_file(tmp_path / "learned_embeds.safetensors")) == {"det-logo", "<b>"}
    for name in names:
        got = formats.read_file(tmp_path / name)
        for tok, e in got.items():
            assert torch.equal(e, emb[tok]), name
    assert set(formats.read_embeddings(str(tmp_path))) == {"det-logo", "<b>"}
    assert set(formats.read_embeddings(f"file://{tmp_path}/learned_embeddings_dict.pt")) == {"det-logo", "<b>"}


def test_reads_determined_demo_and_other_layouts(tmp_path):
    demo = {"det-logo": {"initializer_tokens": "brain logo, sharp lines", "learned_embeddings": torch.randn(11, 768)}}
    torch.save(demo, tmp_path / "learned_embeddings_dict.pt")
    assert formats.read_file(tmp_path / "learned_embeddings_dict.pt")["det-logo"].shape == (11, 768)
    torch.save(torch.randn(768), tmp_path / "bare.pt")
    assert formats.read_file(tmp_path / "bare.pt")["bare"].shape == (1, 768)
    torch.save({"emb_params": torch.randn(2, 768)}, tmp_path / "kohya.pt")
    assert formats.read_file(tmp_path / "kohya.pt")["kohya"].shape == (2, 768)
    from safetensors.torch import save_file

    save_file({"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)}, str(tmp_path / "xl.safetensors"))
    xl = formats.read_file(tmp_path / "xl.safetensors")["xl"]
    assert xl["clip_g"].shape == (2, 1280)
    torch.save({"<cat-toy>": torch.randn(768)}, tmp_path / "learned_embeds.bin")
    assert formats.read_file(tmp_path / "learned_embeds.bin")["<cat-toy>"].shape == (1, 768)


def test_unknown_or_unsafe_files_are_refused(tmp_path):
    torch.save({"foo": "bar"}, tmp_path / "odd.pt")
    with pytest.raises(FormatError, match="unknown embedding layout"):
        formats.read_file(tmp_path / "odd.pt")
    import argparse

    torch.save({"x": argparse.Namespace(a=1)}, tmp_path / "evil.pt")
    with pytest.raises(FormatError, match="weights_only"):
        formats.read_file(tmp_path / "evil.pt")
    with pytest.raises(FormatError, match="no such file"):
        formats.read_file(tmp_path / "missing.pt")
