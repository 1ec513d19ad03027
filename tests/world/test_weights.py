"""The shipped builtin:shapes weights: every file matches the manifest, the whole is small, and the
manifest says how they were made."""

from __future__ import annotations

import json

import pytest

from tinv.trainer.world import weights

MAX_BYTES = 25 * 2**20

pytestmark = pytest.mark.skipif(not weights.available(), reason="no trained builtin:shapes weights in this checkout yet")


def test_the_committed_files_match_the_manifest():
    assert weights.available(), f"no weights in {weights.WEIGHTS}: run `python -m tinv.trainer.world train OUT` and `... install OUT`"
    assert weights.mismatches() == []


def test_the_weights_are_small_and_say_how_they_were_made():
    files = [p for p in weights.WEIGHTS.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= MAX_BYTES
    m = json.loads((weights.WEIGHTS / weights.MANIFEST).read_text())
    assert m["command"].startswith("python -m tinv.trainer.world train ")
    assert m["reproduce"].startswith("python -m tinv.trainer.world train OUT --seed ")
    assert {"torch", "diffusers", "transformers"} <= set(m["versions"])
    assert all(r["steps"] > 0 for r in m["stages"].values())


def test_every_weights_file_has_a_manifest_beside_it_naming_its_digest():
    want = json.loads((weights.WEIGHTS / weights.MANIFEST).read_text())["files"]
    for f in weights.WEIGHTS.rglob("*.safetensors"):
        beside = json.loads((f.parent / weights.MANIFEST).read_text())
        assert beside["files"][f.name] == want[f.relative_to(weights.WEIGHTS).as_posix()]
        assert beside["command"].startswith("python -m tinv.trainer.world train ") and "seed" in beside
