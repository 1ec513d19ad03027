"""Tokenizer, placeholder ids and prompt substitution on token boundaries (fast)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tinv.trainer import tiny, tokens
from tinv.trainer.errors import ConfigError


@pytest.fixture(scope="module")
def tok():
    return tiny.build_tokenizer()


def test_tiny_vocabulary_is_identical_in_every_process():
    code = "import json,hashlib;from tinv.trainer import tiny;v,m=tiny.tokenizer_files();print(hashlib.sha256(json.dumps([v,m]).encode()).hexdigest())"
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout for _ in range(2)}
    v, m = tiny.tokenizer_files()
    import hashlib

    assert outs == {hashlib.sha256(json.dumps([v, m]).encode()).hexdigest() + "\n"}


def test_tiny_tokenizer_is_a_real_clip_bpe(tok):
    vocab = tok.get_vocab()
    assert vocab["<|startoftext|>"] == tok.bos_token_id and vocab["<|endoftext|>"] == tok.eos_token_id
    assert tok.tokenize("A Photo of the CAT") == ["a</w>", "photo</w>", "of</w>", "the</w>", "cat</w>"]
    pieces = tok.tokenize("zyxwvu")  # not in the corpus: falls back to learned sub-words / bytes
    assert len(pieces) > 1 and pieces[-1].endswith("</w>")
    ids = tok("a photo")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id


def test_concepts_are_matched_on_token_boundaries(tok):
    v = tokens.ConceptVocab(tok, [("det-logo", "logo", 2), ("det-logo-demo", "brain", 1)])
    base = v.base_size
    logo, demo = [base, base + 1], [base + 2]
    ids = v.ids("a det-logo next to a det-logo-demo, and Det-Logo again")
    assert ids.count(base) == 2 and ids.count(base + 2) == 1
    # "det-logo" never matches inside "det-logo-demo" or glued to other words
    split = [p.token if isinstance(p, tokens.ConceptTokens) else p for p in v.split("mydet-logo det-logo-demo det-logo's x")]
    assert split == ["mydet-logo ", "det-logo-demo", " ", "det-logo", "'s x"]
    assert v.ids("det-logo") == logo and v.ids("det-logo-demo") == demo
    b = v.batch(["a det-logo"])
    assert b.shape == (1, 77) and b[0, 0] == tok.bos_token_id
    assert b[0, 1:5].tolist() == [v.text_ids("a")[0], *logo, tok.eos_token_id]
    assert v.placeholder_prompt("a det-logo") == "a det-logo det-logo_1"


def test_existing_words_and_clashes_are_refused(tok):
    with pytest.raises(ConfigError, match="already a word of the model's vocabulary"):
        tokens.ConceptVocab(tok, [("cat", "cat", None)])
    with pytest.raises(ConfigError, match="already a word"):
        tokens.ConceptVocab(tok, [("Photo", "cat", None)])
    with pytest.raises(ConfigError, match="used twice"):
        tokens.ConceptVocab(tok, [("<x>", "cat", None), ("<X>", "dog", None)])
    with pytest.raises(ConfigError, match="multi-vector name"):
        tokens.ConceptVocab(tok, [("zork", "cat dog", None), ("zork_1", "dog", None)])
    with pytest.raises(ConfigError, match="without spaces"):
        tokens.ConceptVocab(tok, [("two words", "cat", None)])


def test_initializer_gives_one_vector_per_token_or_is_cycled(tok):
    v = tokens.ConceptVocab(tok, [("<a>", "brain logo, sharp lines", None), ("<b>", "red cat", 5), ("<c>", "red cat dog", 2)])
    a, b, c = v.concepts
    assert a.vectors == len(tok.tokenize("brain logo, sharp lines"))
    red, cat, dog = (v.text_ids(w)[0] for w in ("red", "cat", "dog"))
    assert b.init_ids == (red, red, red, cat, cat)
    assert c.init_ids == (red, cat)
    assert v.ids("a <c> photo", initializer=True) == v.text_ids("a") + [red, cat] + v.text_ids("photo")


def test_ti_embedding_only_trains_new_rows(tok):
    base = torch.nn.Embedding(10, 4)
    layer = tokens.TIEmbedding(base, torch.ones(2, 4))
    ids = torch.tensor([[1, 10, 11, 3]])
    out = layer(ids)
    assert torch.equal(out[0, 0], base.weight[1]) and torch.equal(out[0, 1], torch.ones(4))
    out.sum().backward()
    assert base.weight.grad is None and torch.equal(layer.new.grad, torch.ones(2, 4))
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["new"]
