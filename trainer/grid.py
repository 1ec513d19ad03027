"""A grid as a list of images, pure and torch-free: expansion in a stable order, sharding, batching.

- :class:`Request` is one image to render; :class:`GridImage` is one image of a grid, with its place.
- :func:`expand`: every image of a GenerationGridSpec in the stable order prompt, size, scheduler,
  steps, guidance scale, seed, image in cell.
- :func:`shard`: shard i of n takes images greedily by cost (steps x pixels x UNet passes) in that
  order, each to the least-loaded shard (ties: the lowest shard) -- round-robin when costs are
  equal; every image lands in exactly one shard for any n.
- :func:`plan_batches`: group by (size, steps, scheduler), then chunk by the batch size.

Imports neither torch nor diffusers (the operator and the UI can use it).
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
import os
import re
from dataclasses import dataclass
from typing import Iterable, Sequence, get_args

from tinv.api import storage as api_storage
from tinv.api.models import SchedulerName

from .errors import ConfigError

log = logging.getLogger("tinv.trainer")

SCHEDULER_NAMES: tuple[str, ...] = get_args(SchedulerName)


def check_scheduler(name: str) -> str:
    if name not in SCHEDULER_NAMES:
        raise ConfigError(f"unknown scheduler {name!r}: choose one of {', '.join(SCHEDULER_NAMES)}")
    return name


@dataclass(frozen=True)
class Request:
    """One image to render."""

    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    guidance_scale: float = 7.5
    steps: int = 25
    scheduler: str = "dpm-solver++"
    width: int = 512
    height: int = 512

    @property
    def batch_key(self) -> tuple:
        """Images with equal keys can share a batch (same latent shape, timesteps and sampler)."""
        return (self.width, self.height, self.steps, self.scheduler)


@dataclass(frozen=True)
class GridImage(Request):
    """One image of a grid, with its place in the grid."""

    index: int = 0  # position in the stable order
    prompt_index: int = 0
    seed_base: int = 0  # the cell's seed; seed = seed_base + k
    k: int = 0  # image within the cell

    @property
    def cost(self) -> float:
        passes = 2 if self.scheduler == "heun" else 1
        cfg = 2 if self.guidance_scale > 1 else 1
        return float(self.steps * passes * cfg * self.width * self.height) / (512 * 512)

    @property
    def filename(self) -> str:
        sched = self.scheduler.replace("+", "p")
        g = f"{self.guidance_scale:g}"
        if float(g) != self.guidance_scale:  # more digits than %g shows: keep them all, names stay unique
            g = repr(float(self.guidance_scale))
        return f"p{self.prompt_index:03d}_{self.width}x{self.height}_{sched}_st{self.steps}_g{g}_s{self.seed_base}_{self.k}.png"

    def request(self) -> Request:
        return Request(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Request)})


def axis_values(spec) -> dict[str, list]:
    """The grid's axes by name (the gallery labels its sheets with them)."""
    g = spec.grid
    return {
        "prompts": list(spec.prompts),
        "sizes": [(s.width, s.height) for s in g.sizes],
        "schedulers": list(g.schedulers),
        "steps": list(g.steps),
        "guidance_scales": [float(x) for x in g.guidance_scales],
        "seeds": list(g.seeds),
    }


def expand(spec) -> list[GridImage]:
    """Every image of a GenerationGridSpec, in the stable order; ConfigError for an empty grid."""
    axes = axis_values(spec)
    fields = {
        "prompts": "spec.prompts",
        "sizes": "spec.grid.sizes",
        "schedulers": "spec.grid.schedulers",
        "steps": "spec.grid.steps",
        "guidance_scales": "spec.grid.guidanceScales",
        "seeds": "spec.grid.seeds",
    }
    empty = [fields[k] for k, v in axes.items() if not v]
    if empty:
        raise ConfigError(f"the grid is empty: {', '.join(empty)} {'has' if len(empty) == 1 else 'have'} no values; every axis needs at least one")
    blank = [i for i, p in enumerate(axes["prompts"]) if not str(p).strip()]
    if blank:
        raise ConfigError(f"spec.prompts[{blank[0]}] is blank; every prompt needs some text")
    for name in axes["schedulers"]:
        check_scheduler(name)
    per_cell = int(spec.images_per_cell)
    if per_cell < 1:
        raise ConfigError("the grid is empty: spec.imagesPerCell must be at least 1")
    neg = spec.negative_prompt or ""
    out: list[GridImage] = []
    for pi, prompt in enumerate(axes["prompts"]):
        for w, h in axes["sizes"]:
            for sched in axes["schedulers"]:
                for steps in axes["steps"]:
                    for g in axes["guidance_scales"]:
                        for seed in axes["seeds"]:
                            for k in range(per_cell):
                                out.append(
                                    GridImage(
                                        prompt=prompt, negative_prompt=neg, seed=int(seed) + k, guidance_scale=g,
                                        steps=int(steps), scheduler=sched, width=int(w), height=int(h),
                                        index=len(out), prompt_index=pi, seed_base=int(seed), k=k,
                                    )
                                )
    seeds = sorted(set(axes["seeds"]))
    if per_cell > 1 and any(b - a < per_cell for a, b in zip(seeds, seeds[1:])):
        log.warning(
            "seeds %s with imagesPerCell %d overlap (image k of a cell uses seed + k): some images will be rendered twice",
            seeds, per_cell,
        )
    return out


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' -> (i, n) with 0 <= i < n."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
    if not m:
        raise ConfigError(f"--shard {text!r}: expected i/n, e.g. 0/4 (shard i of n, counting from 0)")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 0 <= i < n:
        raise ConfigError(f"--shard {text!r}: need 0 <= i < n (got i={i}, n={n})")
    return i, n


def assign(images: Sequence[GridImage], count: int) -> list[int]:
    """Shard of each image: greedy by cost in the stable order (ties -> lowest shard); deterministic."""
    if count < 1:
        raise ConfigError("the number of shards must be at least 1")
    heap = [(0.0, s) for s in range(count)]  # (load, shard): the least loaded, then the lowest index
    out = []
    for img in images:
        load, j = heapq.heappop(heap)
        out.append(j)
        heapq.heappush(heap, (load + img.cost, j))
    return out


def split(images: Sequence[GridImage], count: int) -> list[list[GridImage]]:
    """All `count` shards at once (shard(images, i, count) for every i)."""
    out: list[list[GridImage]] = [[] for _ in range(count)]
    for img, o in zip(images, assign(images, count)):
        out[o].append(img)
    return out


def shard(images: Sequence[GridImage], index: int, count: int) -> list[GridImage]:
    """The images of shard `index` of `count`, in the stable order."""
    if not 0 <= index < count:
        raise ConfigError(f"shard {index} of {count} does not exist (shards count from 0)")
    owners = assign(images, count)
    return [img for img, o in zip(images, owners) if o == index]


def plan_batches(images: Iterable[Request], batch_size: int) -> list[list[Request]]:
    """Group by batch key (first-appearance order, stable within a group), then chunk."""
    groups: dict[tuple, list] = {}
    for img in images:
        groups.setdefault(img.batch_key, []).append(img)
    out = []
    size = max(1, int(batch_size))
    for group in groups.values():
        out += [group[i : i + size] for i in range(0, len(group), size)]
    return out


def shard_from_env(spec, explicit: tuple[int, int] | None = None) -> tuple[int, int]:
    """--shard wins; else JOB_COMPLETION_INDEX (Indexed Job) of TINV_SHARDS or spec.resources.workers."""
    if explicit is not None:
        return explicit
    idx = os.environ.get("JOB_COMPLETION_INDEX")
    if idx is None or idx == "":
        return (0, 1)
    n = int(os.environ.get("TINV_SHARDS") or spec.resources.workers or 1)
    return parse_shard(f"{idx}/{n}")


def grid_root(grid, storage_override: str | None = None) -> str:
    md = grid.metadata
    return api_storage.run_root(storage_override or grid.spec.storage.uri, md.namespace, md.name or "grid", md.uid)


