#!/usr/bin/env python
"""Generation throughput: tinv's engine against a plain diffusers StableDiffusionPipeline.

    python bench/generate.py --device cuda --model sd15                 # 512 px, 25 steps, DPM-Solver++, bf16,
                                                                        # batch 1/8/32, compile off and on
    python bench/generate.py --device cpu --model tiny                  # the tiny model at 64 px (its native size)
    python bench/generate.py --device cuda --model sd15 --grid --record # + an end-to-end grid; append to bench/results/

Prints one JSON line per result: {"name", "value", "unit", "config", "git_revision", "device", ...}:

- ``generate_images_per_second`` and ``generate_batch_latency_seconds`` for every (implementation,
  batch size, compile) -- implementation ``tinv`` is :class:`tinv.trainer.engine.Engine` (what
  ``tinv generate`` runs: guidance batched into one UNet pass, per-image generators, fp32
  latents with bf16/fp16 weights, SDPA, batched VAE decode; on CUDA channels-last and fused QKV,
  optionally ``torch.compile``); ``diffusers`` is ``StableDiffusionPipeline.__call__`` on the very
  same modules, dtype, scheduler and steps, nothing else changed, run first (before tinv's
  optimisations touch the modules);
- ``generate_speedup_vs_diffusers``: tinv images/s over diffusers images/s, at the same batch size and
  against diffusers at batch 1 (how one renders a grid with the plain pipeline: a call per image);
- with ``--grid``: ``grid_images_per_second``, ``tinv generate`` end to end on a synthetic grid
  (PNG encoding with metadata, writes, progress, gallery) at the largest batch size.

Timing: each configuration renders ``--warmup`` batches untimed (compilation, cuDNN heuristics), then
at least ``--images`` images (and at least two batches); CUDA is synchronised by the copy of the
pixels to the host. Models: ``sd15`` = Stable Diffusion 1.5's architecture with random weights built
in code (builtin:sd15-random; the same FLOPs as the real weights, no download) or any model source
(a diffusers folder, a Hugging Face id in the cache); ``tiny`` = builtin:tiny; ``sdxl`` = SDXL base's
architecture with random weights (builtin:sdxl-random, 1024 px; the baseline is StableDiffusionXLPipeline)
and ``tiny-xl`` = builtin:tiny-xl.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
from common import RESULTS_DIR, Results  # noqa: E402


def model_source(model: str) -> str:
    return {"tiny": "builtin:tiny", "sd15": "builtin:sd15-random", "tiny-xl": "builtin:tiny-xl", "sdxl": "builtin:sdxl-random"}.get(model, model)


def prompts(n: int) -> list[str]:
    subjects = ["lighthouse", "red fox", "teapot", "mountain lake", "robot", "city street", "sunflower", "sailing boat"]
    styles = ["watercolor painting", "photo", "oil painting", "pencil sketch"]
    return [f"a {styles[i % len(styles)]} of a {subjects[i % len(subjects)]}, detailed, {i}" for i in range(n)]


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def peak_mib(device: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None


def timed(fn, batches: int, warmup: int, device: str) -> tuple[float, list[float]]:
    """(total seconds, per-batch seconds) of `batches` timed calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    sync(device)
    lat = []
    t0 = time.perf_counter()
    for _ in range(batches):
        t = time.perf_counter()
        fn()
        sync(device)
        lat.append(time.perf_counter() - t)
    return time.perf_counter() - t0, lat


def bench_diffusers(bundle, args, bs: int, dtype) -> dict:
    """A plain StableDiffusionPipeline call per batch: same modules, dtype, scheduler, steps, size."""
    import torch

    from tinv.trainer import engine as E

    pipe = bundle.pipeline(E.make_scheduler(args.scheduler, E.scheduler_config(bundle)))
    pipe.set_progress_bar_config(disable=True)
    ps = prompts(bs)
    counter = [0]

    def call():
        counter[0] += 1
        gens = [torch.Generator("cpu").manual_seed(1000 * counter[0] + i) for i in range(bs)]
        out = pipe(prompt=ps, negative_prompt=[""] * bs, num_inference_steps=args.steps, guidance_scale=args.guidance,
                   height=args.size, width=args.size, generator=gens, output_type="np")
        return out.images

    batches = max(2, math.ceil(args.images / bs))
    reset_peak(args.device)
    total, lat = timed(call, batches, args.warmup, args.device)
    return {"images_per_second": batches * bs / total, "batch_latency": sum(lat) / len(lat), "batches": batches,
            "peak_mib": peak_mib(args.device)}


def bench_tinv(engine, args, bs: int) -> dict:
    from tinv.trainer import grid as grids

    ps = prompts(bs)
    counter = [0]

    def call():
        counter[0] += 1
        reqs = [grids.Request(prompt=p, negative_prompt="", seed=1000 * counter[0] + i, guidance_scale=args.guidance,
                          steps=args.steps, scheduler=args.scheduler, width=args.size, height=args.size) for i, p in enumerate(ps)]
        return engine.render(reqs)

    batches = max(2, math.ceil(args.images / bs))
    warmup = args.warmup + (1 if engine.compiled else 0)
    reset_peak(args.device)
    total, lat = timed(call, batches, warmup, args.device)
    return {"images_per_second": batches * bs / total, "batch_latency": sum(lat) / len(lat), "batches": batches,
            "peak_mib": peak_mib(args.device)}


def bench_grid(args, bs: int, compile_: bool) -> dict:
    """`tinv generate` end to end on a synthetic grid (PNG + metadata + writes + progress + gallery)."""
    from tinv.api.models import GenerationGrid
    from tinv.trainer import generate as G

    n_prompts = max(1, math.ceil(max(args.images, 2 * bs) / 4))
    with tempfile.TemporaryDirectory(prefix="tinv-bench-grid-") as tmp:
        grid = GenerationGrid.model_validate({
            "apiVersion": "tinv.io/v1alpha1", "kind": "GenerationGrid", "metadata": {"name": "bench"},
            "spec": {"model": {"source": model_source(args.model)}, "prompts": prompts(n_prompts),
                     "grid": {"guidanceScales": [args.guidance], "steps": [args.steps], "schedulers": [args.scheduler],
                              "seeds": [0, 1, 2, 3], "sizes": [{"width": args.size, "height": args.size}]},
                     "batchSize": bs, "precision": args.precision, "storage": {"uri": tmp}},
        })
        opts = G.GridOptions(device=args.device, compile=compile_, progress_bar=False, tensorboard=True)
        # warm up (and compile) on a throwaway copy, then time a fresh run of the grid
        G.run_grid(grid, G.GridOptions(device=args.device, compile=compile_, progress_bar=False, tensorboard=False,
                                       gallery=False, storage=os.path.join(tmp, "warm")))
        t0 = time.perf_counter()
        res = G.run_grid(grid, opts)
        total = time.perf_counter() - t0
    return {"images_per_second": res.rendered / total, "images": res.rendered, "seconds": total}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--model", default="sd15", help="tiny, sd15 (SD 1.5 architecture, random weights), tiny-xl, sdxl (SDXL base "
                   "architecture, random weights; the baseline is StableDiffusionXLPipeline) or a model source")
    p.add_argument("--size", type=int, default=None, help="image size in px (default: 512; 64 for tiny and tiny-xl; 1024 for sdxl)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--scheduler", default="dpm-solver++")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--precision", default=None, choices=["bf16", "fp16", "fp32"], help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--compile", default=None, choices=["off", "on", "both"], help="torch.compile (default: both on CUDA, off on CPU)")
    p.add_argument("--images", type=int, default=None, help="images timed per configuration (default: 64 on CUDA, 16 on CPU)")
    p.add_argument("--warmup", type=int, default=1, help="untimed batches per configuration (compile adds one)")
    p.add_argument("--no-baseline", action="store_true", help="skip the plain diffusers pipeline")
    p.add_argument("--grid", action="store_true", help="also time `tinv generate` end to end at the largest batch size")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--record", action="store_true", help=f"append the JSON lines to {(RESULTS_DIR / 'generate.jsonl').relative_to(REPO)}")
    args = p.parse_args()

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = args.device.startswith("cuda")
    args.size = args.size or {"tiny": 64, "tiny-xl": 64, "sdxl": 1024}.get(args.model, 512)
    args.precision = args.precision or ("bf16" if cuda else "fp32")
    args.compile = args.compile or ("both" if cuda else "off")
    args.images = args.images or (64 if cuda else 16)
    sizes = [int(x) for x in args.batch_sizes.split(",") if x.strip()]
    compiles = {"off": [False], "on": [True], "both": [False, True]}[args.compile]

    from tinv.trainer import engine as E, runtime
    from tinv.trainer import models

    dtype = runtime.pick_dtype(args.precision, torch.device(args.device))
    base_cfg = {"model": args.model, "size": args.size, "steps": args.steps, "scheduler": args.scheduler,
                "guidance": args.guidance, "precision": args.precision, "argv": " ".join(sys.argv[1:])}
    results = Results("generate", record=args.record, device=args.device)

    def emit(name: str, value: float, unit: str, **cfg) -> None:
        results.emit(name, value, unit, {**base_cfg, **cfg}, torch=torch.__version__)

    bundle = models.load(model_source(args.model))
    for m in (bundle.unet, bundle.vae, *(s.encoder for s in bundle.text)):  # SDXL: both text encoders
        m.to(args.device, dtype)
    baseline: dict[int, dict] = {}
    pipe_name = "StableDiffusionXLPipeline" if bundle.family == "sdxl" else "StableDiffusionPipeline"
    if not args.no_baseline:
        for bs in sizes:
            r = bench_diffusers(bundle, args, bs, dtype)
            baseline[bs] = r
            emit("generate_images_per_second", r["images_per_second"], "images/s", impl="diffusers", batch_size=bs, compile=False,
                 images=r["batches"] * bs, peak_mib=r["peak_mib"])
            emit("generate_batch_latency_seconds", r["batch_latency"], "s", impl="diffusers", batch_size=bs, compile=False)
    for comp in compiles:
        engine = E.Engine(bundle, [], device=args.device, precision=args.precision, compile=comp,
                          model_info={"source": model_source(args.model)})
        for bs in sizes:
            r = bench_tinv(engine, args, bs)
            emit("generate_images_per_second", r["images_per_second"], "images/s", impl="tinv", batch_size=bs, compile=comp,
                 images=r["batches"] * bs, peak_mib=r["peak_mib"])
            emit("generate_batch_latency_seconds", r["batch_latency"], "s", impl="tinv", batch_size=bs, compile=comp)
            if bs in baseline:
                emit("generate_speedup_vs_diffusers", r["images_per_second"] / baseline[bs]["images_per_second"], "x",
                     impl="tinv", batch_size=bs, compile=comp, versus=f"diffusers {pipe_name}, batch {bs}")
            if 1 in baseline and bs != 1:
                emit("generate_speedup_vs_diffusers", r["images_per_second"] / baseline[1]["images_per_second"], "x",
                     impl="tinv", batch_size=bs, compile=comp, versus=f"diffusers {pipe_name}, batch 1")
    if args.grid:
        bs = max(sizes)
        comp = compiles[-1]
        r = bench_grid(args, bs, comp)
        emit("grid_images_per_second", r["images_per_second"], "images/s", impl="tinv generate (end to end)", batch_size=bs,
             compile=comp, images=r["images"])
    results.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
