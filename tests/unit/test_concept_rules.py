"""Concept, template and training rules that tinv validate and the apiserver check without a model
(issue 13, bugs 1, 2, 6, 7, 11): each refused value is named by its field."""

from __future__ import annotations

import copy

import pytest

from tinv.api import validate_document
from tinv.api.models import ExitCode, Training

JOB = {
    "apiVersion": "tinv.io/v1alpha1",
    "kind": "TextualInversionJob",
    "metadata": {"name": "det-logo"},
    "spec": {
        "model": {"source": "builtin:tiny"},
        "concepts": [{"token": "det-logo", "initializer": "brain logo", "images": "s3://bucket/det-logo/"}],
    },
}


def problems(concepts=None, training=None) -> list[tuple[str, str]]:
    doc = copy.deepcopy(JOB)
    if concepts is not None:
        doc["spec"]["concepts"] = [{"initializer": "logo", "images": "s3://b/x/", **c} for c in concepts]
    if training is not None:
        doc["spec"]["training"] = training
    _, found = validate_document(doc)
    return [(p.path, p.message) for p in found]


@pytest.mark.parametrize("template", ["a {}-style photo", "two {}s", "{}_v2", "x{}", "a 3{} photo"])
def test_template_whose_slot_touches_a_word_is_refused(template):
    found = problems([{"token": "det-logo", "templates": ["a photo of {}", template]}])
    assert any(path == "spec.concepts[0].templates" and "touches" in msg for path, msg in found), found


@pytest.mark.parametrize("template", ["a {} photo", "{}", "a photo of {}, sharp", "({})", "the {}'s colours"])
def test_templates_with_a_free_slot_pass(template):
    assert problems([{"token": "det-logo", "templates": [template]}]) == []


@pytest.mark.parametrize(
    "token, fragment",
    [
        ("***", "letter"),
        ("<|endoftext|>", "special token"),
        ("a/b", "'/'"),
        ("a\\b", "'/'"),
        ("<MyCat>", "lower case"),
        ("x{}y", "'{}'"),
    ],
)
def test_tokens_refused_without_a_model(token, fragment):
    found = problems([{"token": token}])
    assert any(path == "spec.concepts[0].token" and fragment in msg for path, msg in found), found


def test_tokens_equal_up_to_case_are_refused():
    found = problems([{"token": "<cat-toy>"}, {"token": "<Cat-Toy>"}])
    assert ("spec.concepts[1].token", ) == tuple(p for p, m in found if "lower case" in m), found


def test_contained_token_message_names_the_tokens():
    found = problems([{"token": "<toy>"}, {"token": "<cat>"}, {"token": "my-<cat>-2"}])
    (msg,) = [m for p, m in found if p == "spec.concepts"]
    assert "'<cat>'" in msg and "'my-<cat>-2'" in msg and "<toy>" not in msg, msg


def test_schedules_are_diffusers_names_and_decay_is_decoupled():
    assert problems(training={"lrScheduler": "constant_with_warmup", "lrWarmupSteps": 5}) == []
    assert "decoupled" in Training.model_fields["weight_decay"].description.lower()


def test_transparent_background_is_an_option():
    assert problems(training={"transparentBackground": "black"}) == []
    found = problems(training={"transparentBackground": "pink"})
    assert found and found[0][0] == "spec.training.transparentBackground", found
    assert Training().transparent_background == "white"


def test_exit_codes_are_part_of_the_contract():
    assert (ExitCode.OK, ExitCode.INVALID, ExitCode.PREEMPTED, ExitCode.INTERRUPTED) == (0, 2, 75, 130)
    assert ExitCode.PREEMPTED in ExitCode.RETRYABLE and ExitCode.INVALID not in ExitCode.RETRYABLE
