"""bench/quality.py's Markdown summary: one line per concept and recipe, with the raw figures."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import quality  # noqa: E402


def test_one_line_per_concept_and_recipe_with_raw_figures():
    cfg = {"concept": "det-logo", "recipe": "defaults"}
    rows = [
        {"name": "concept_fidelity_fraction", "config": cfg, "counts": True,
         "raw": {"learned": 0.8, "initializer": 0.4, "real": 0.9, "real_vs_other_concepts": 0.3, "fraction": 0.8}},
        {"name": "attribute_accuracy", "config": cfg, "raw": {"learned": 0.7, "initializer": 0.0, "real": 0.95}},
        {"name": "prompt_fidelity_ratio", "config": cfg, "raw": {"learned": 0.9, "plain_words": 1.0, "ratio": 0.9}},
        {"name": "concept_fidelity_fraction", "config": {"concept": "striped", "recipe": "defaults"}, "counts": False,
         "raw": {"learned": 0.5, "initializer": 0.6, "real": 0.61, "real_vs_other_concepts": 0.5, "fraction": None}},
    ]
    lines = quality.table(rows).splitlines()
    assert len(lines) == 4
    assert lines[2] == "| det-logo | defaults | 0.80 / 0.40 / 0.90 (0.30) | 0.80 | yes | 0.70 / 0.00 / 0.95 | 0.90 / 1.00 (0.90) |"
    assert lines[3].startswith("| striped | defaults | 0.50 / 0.60 / 0.61 (0.50) | — | no | — / — / — |")
