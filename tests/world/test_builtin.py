"""builtin:shapes: accepted by the CRD rule and `tinv validate`, loaded by the trainer's model loader."""

from __future__ import annotations

import pytest

from tinv.api.validation import validate_document
from tinv.trainer import models
from tinv.trainer.errors import ModelError
from tinv.trainer.world import weights


def _job(source: str) -> dict:
    return {
        "apiVersion": "tinv.io/v1alpha1",
        "kind": "TextualInversionJob",
        "metadata": {"name": "j"},
        "spec": {"model": {"source": source}, "concepts": [{"token": "det-logo", "initializer": "logo", "images": "/x"}]},
    }


@pytest.mark.parametrize("source,ok", [("builtin:shapes", True), ("builtin:tiny", True), ("builtin:shapes?seed=1", False),
                                       ("builtin:shape", False), ("builtin:shapes-v", False)])
def test_the_crd_rule_accepts_builtin_shapes(source, ok):
    _, problems = validate_document(_job(source))
    assert (not problems) == ok, problems
    if not ok:
        assert any("builtin:shapes" in p.message for p in problems)


def test_missing_weights_fail_with_an_actionable_message(tmp_path):
    with pytest.raises(ModelError, match="python -m tinv.trainer.world train"):
        weights.model_folder(tmp_path)


@pytest.mark.skipif(not weights.available(), reason="the package ships no trained shapes weights in this checkout")
def test_builtin_shapes_loads_the_shipped_folder():
    b = models.load("builtin:shapes")
    assert b.path == str(weights.model_dir()) and b.prediction_type == "epsilon"
