"""Grid expansion, sharding and batching: pure functions, no model."""

from __future__ import annotations

import itertools
import random

import pytest

from tinv.api.models import GenerationGridSpec
from tinv.trainer import grid as grids
from tinv.trainer.errors import ConfigError


def spec(**kw) -> GenerationGridSpec:
    base = {"model": {"source": "builtin:tiny"}, "prompts": ["a", "b"]}
    base.update(kw)
    return GenerationGridSpec.model_validate(base)


def test_expansion_is_the_full_product_in_the_documented_order():
    s = spec(
        prompts=["p0", "p1"],
        grid={"guidanceScales": [2, 4], "steps": [10, 20], "schedulers": ["ddim", "unipc"], "seeds": [7, 9],
              "sizes": [{"width": 64, "height": 64}, {"width": 128, "height": 64}]},
        imagesPerCell=3,
        negativePrompt="ugly",
    )
    images = grids.expand(s)
    assert len(images) == 2 * 2 * 2 * 2 * 2 * 2 * 3
    assert [img.index for img in images] == list(range(len(images)))
    expected = [
        (p, (w, h), sch, st, g, seed, k)
        for p, (w, h), sch, st, g, seed, k in itertools.product(
            [0, 1], [(64, 64), (128, 64)], ["ddim", "unipc"], [10, 20], [2.0, 4.0], [7, 9], range(3)
        )
    ]
    got = [(i.prompt_index, (i.width, i.height), i.scheduler, i.steps, i.guidance_scale, i.seed_base, i.k) for i in images]
    assert got == expected
    assert all(i.seed == i.seed_base + i.k and i.negative_prompt == "ugly" for i in images)
    assert len({i.filename for i in images}) == len(images), "file names are unique"
    assert grids.expand(s) == images, "expansion is stable"


def test_default_grid_matches_the_determined_example_size():
    # generate_grid.yaml: 4 prompts x 3 guidance x 2 seeds, 10 images per cell x 2 workers -> 480 images
    s = spec(prompts=["a", "b", "c", "d"], grid={"guidanceScales": [2, 4, 6], "seeds": [2, 3]}, imagesPerCell=20)
    assert len(grids.expand(s)) == 480


def _random_spec(rng: random.Random) -> GenerationGridSpec:
    return spec(
        prompts=[f"p{i}" for i in range(rng.randint(1, 4))],
        grid={
            "guidanceScales": rng.sample([1, 2.5, 4, 7.5, 9], rng.randint(1, 3)),
            "steps": rng.sample([5, 10, 25, 50], rng.randint(1, 2)),
            "schedulers": rng.sample(list(grids.SCHEDULER_NAMES), rng.randint(1, 2)),
            "seeds": rng.sample(range(100), rng.randint(1, 3)),
            "sizes": rng.sample([{"width": 64, "height": 64}, {"width": 512, "height": 512}, {"width": 768, "height": 512}], rng.randint(1, 2)),
        },
        imagesPerCell=rng.randint(1, 3),
    )


@pytest.mark.parametrize("seed", range(12))
def test_sharding_covers_every_image_exactly_once_for_any_n(seed):
    rng = random.Random(seed)
    images = grids.expand(_random_spec(rng))
    for n in list(range(1, 9)) + [len(images), len(images) + 3]:
        shards = grids.split(images, n)
        if n <= 8:
            assert [grids.shard(images, i, n) for i in range(n)] == shards
        flat = [img.index for s in shards for img in s]
        assert sorted(flat) == list(range(len(images))), f"n={n}: every image exactly once"
        for s in shards:
            assert [img.index for img in s] == sorted(img.index for img in s), "a shard keeps the stable order"
        loads = [sum(img.cost for img in s) for s in shards]
        assert max(loads) - min(loads) <= max(img.cost for img in images) + 1e-9, f"n={n}: balanced by cost"
        assert grids.split(images, n) == shards, "deterministic"


def test_equal_costs_shard_round_robin_with_counts_within_one():
    images = grids.expand(spec(prompts=[f"p{i}" for i in range(7)], grid={"seeds": [1, 2, 3]}))
    for n in range(1, 10):
        counts = [len(grids.shard(images, i, n)) for i in range(n)]
        assert max(counts) - min(counts) <= 1
        assert [img.index for img in grids.shard(images, 0, n)] == list(range(0, len(images), n))


def test_batches_share_size_steps_and_scheduler_and_cover_the_shard():
    images = grids.expand(_random_spec(random.Random(3)))
    for bs in (1, 2, 5, 64):
        batches = grids.plan_batches(images, bs)
        assert sorted(i.index for b in batches for i in b) == [i.index for i in images]
        for b in batches:
            assert 1 <= len(b) <= bs
            assert len({i.batch_key for i in b}) == 1
        # at most one partial batch per group
        partial = [b for b in batches if len(b) < bs]
        assert len(partial) <= len({i.batch_key for i in images})


def test_parse_shard_and_job_completion_index(monkeypatch):
    assert grids.parse_shard("0/1") == (0, 1)
    assert grids.parse_shard(" 3 / 8 ") == (3, 8)
    for bad in ("1/1", "-1/2", "2", "a/b", "0/0"):
        with pytest.raises(ConfigError, match="--shard"):
            grids.parse_shard(bad)
    s = spec(resources={"workers": 3})
    assert grids.shard_from_env(s) == (0, 1)
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "2")
    assert grids.shard_from_env(s) == (2, 3), "the operator's Indexed Job: index of spec.resources.workers"
    assert grids.shard_from_env(s, (0, 5)) == (0, 5), "--shard wins"
    monkeypatch.setenv("TINV_SHARDS", "4")
    assert grids.shard_from_env(s) == (2, 4)
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "4")
    with pytest.raises(ConfigError):
        grids.shard_from_env(s)


def test_empty_grid_and_unknown_scheduler_are_clear_errors():
    with pytest.raises(ConfigError, match=r"the grid is empty: spec.prompts"):
        grids.expand(spec(prompts=[]))
    with pytest.raises(ConfigError, match=r"the grid is empty: spec.grid.guidanceScales, spec.grid.seeds have no values"):
        grids.expand(spec(grid={"guidanceScales": [], "seeds": []}))
    with pytest.raises(ConfigError, match="blank"):
        grids.expand(spec(prompts=["ok", "   "]))
    with pytest.raises(ConfigError, match=r"unknown scheduler 'k-lms': choose one of ddim, ddpm, pndm"):
        grids.check_scheduler("k-lms")


def test_every_api_scheduler_name_is_known():
    import typing

    from tinv.api.models import SchedulerName

    assert set(typing.get_args(SchedulerName)) == set(grids.SCHEDULER_NAMES)


def test_file_names_stay_unique_for_close_guidance_scales():
    images = grids.expand(spec(grid={"guidanceScales": [7.5, 7.5000001, 7.50000011]}))
    assert len({i.filename for i in images}) == len(images) == 6


def test_grid_expansion_and_sharding_import_no_torch():
    """The grid is pure: the operator and the UI can expand and shard it without torch."""
    import subprocess
    import sys

    code = ("import sys, tinv.trainer.grid as g, tinv.trainer.pngmeta; "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", out
