#!/usr/bin/env python
"""Training throughput: tinv's recipe against the diffusers example script's ("naive").

    python bench/train.py --device cpu  --model tiny --recipe both
    python bench/train.py --device cuda --model sd15 --recipe both --batch 8 --accum 4

Prints one JSON line per result: {"name", "value", "unit", "config", "git_revision", "device"}:
``train_samples_per_second`` and ``train_peak_memory_mib`` per recipe, and with ``--recipe both``
a ``speedup`` row (tinv / naive samples per second).

- tinv: the real trainer (`tinv.trainer.train.train`) on a generated job: latents cached once
  (both flips), bf16 autocast + bf16 frozen weights on GPUs (fp32 on CPU), SDPA attention, only
  the new rows in the optimizer, a step's local samples in one forward pass.
- naive: the diffusers ``textual_inversion.py`` recipe re-implemented faithfully: fp32, the VAE
  encodes every sample every step, AdamW over the *whole* resized vocabulary with the old
  rows restored after each step, batch 1 x gradient accumulation 4.

Models: ``tiny`` (builtin:tiny at 64 px) or ``sd15`` (Stable Diffusion 1.5's architecture with
random weights, builtin:sd15-random, 512 px). Timing excludes the first 3 steps (warm-up,
cuDNN autotuning) and everything outside the steps (loading, caching, checkpoints). Each recipe
runs in its own process so peak memory is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import Results

REPO = Path(__file__).resolve().parent.parent


def peak_mib(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


RESOLUTION: int | None = None  # --resolution override


def model_ref(model: str) -> tuple[str, int]:
    ref, res = ("builtin:tiny", 64) if model == "tiny" else ("builtin:sd15-random", 512)
    return ref, RESOLUTION or res


def run_tinv(args) -> dict:
    import torch

    from tinv.api.models import TextualInversionJob
    from tinv.trainer.samples import write_samples
    from tinv.trainer.train import Options, train

    ref, res = model_ref(args.model)
    with tempfile.TemporaryDirectory(prefix="tinv-bench-") as tmp:
        write_samples(Path(tmp) / "images", count=8, size=res)
        job = TextualInversionJob.model_validate(
            {
                "apiVersion": "tinv.io/v1alpha1",
                "kind": "TextualInversionJob",
                "metadata": {"name": "bench"},
                "spec": {
                    "model": {"source": "builtin:tiny"},
                    "concepts": [{"token": "det-logo", "initializer": "brain logo, sharp lines", "images": str(Path(tmp) / "images")}],
                    "training": {
                        "steps": args.steps,
                        "batchSize": args.batch,
                        "gradientAccumulation": args.accum,
                        "resolution": res,
                        "checkpointEvery": 10**6,
                        "logEvery": 10**6,
                        "mixedPrecision": args.precision,
                    },
                    "storage": {"uri": str(Path(tmp) / "runs")},
                },
            }
        )
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        r = train(job, Options(device=args.device, model=ref, validation=False, progress_bar=False, auto_resume=False, compile=args.compile, micro_batch=args.micro_batch))
    return {"samples_per_second": r.throughput, "peak_mib": peak_mib(args.device), "final_loss": r.loss}


def run_naive(args) -> dict:
    """diffusers examples/textual_inversion/textual_inversion.py, default flags, in one loop."""
    import torch
    import torch.nn.functional as F

    from tinv.trainer import data, models, tiny
    from tinv.trainer.samples import draw_logo

    ref, res = model_ref(args.model)
    device = torch.device(args.device)
    c = tiny.build_sd15_random(0, args.device) if args.model == "sd15" else tiny.build(ref)
    bundle = models.from_components(ref, c)
    tok, te, vae, unet, sched = bundle.tokenizer, bundle.text_encoder, bundle.vae, bundle.unet, bundle.scheduler
    for m in (te, vae, unet):
        m.to(device)
    vae.requires_grad_(False)
    unet.requires_grad_(False)
    te.text_model.encoder.requires_grad_(False) if hasattr(te, "text_model") else None
    te.requires_grad_(False)
    # resize_token_embeddings(+1) and train the whole table, as the script does
    emb = te.get_input_embeddings()
    n_old = emb.num_embeddings
    new_emb = torch.nn.Embedding(n_old + 1, emb.embedding_dim, device=device)
    with torch.no_grad():
        new_emb.weight[:n_old] = emb.weight
        new_emb.weight[n_old] = emb.weight[tok.convert_tokens_to_ids("logo</w>")]
    te.set_input_embeddings(new_emb)
    new_emb.weight.requires_grad_(True)
    orig = new_emb.weight.detach().clone()
    keep = torch.ones(n_old + 1, dtype=torch.bool, device=device)
    keep[n_old] = False
    lr = 5e-4 * args.accum * 1  # scale_lr
    opt = torch.optim.AdamW([new_emb.weight], lr=lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    unet.train()
    te.train()
    imgs = [data.to_tensor([__import__("numpy").asarray(draw_logo(res, seed=i)[0])]) for i in range(8)]
    ids = tok(["a photo of a logo"], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    ids[ids == tok.convert_tokens_to_ids("logo</w>")] = n_old
    ids = ids.to(device)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    total_t, timed = 0.0, 0
    for step in range(args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for micro in range(args.accum):
            x = imgs[(step * args.accum + micro) % len(imgs)].to(device)
            latents = vae.encode(x).latent_dist.sample().detach() * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            t = torch.randint(0, sched.config.num_train_timesteps, (1,), device=device)
            noisy = sched.add_noise(latents, noise, t)
            hidden = te(ids)[0]
            pred = unet(noisy, t, hidden).sample
            loss = F.mse_loss(pred.float(), noise.float()) / args.accum
            loss.backward()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            new_emb.weight[keep] = orig[keep]
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= 3:
            total_t += time.perf_counter() - t0
            timed += 1
    return {"samples_per_second": timed * args.accum / total_t, "peak_mib": peak_mib(args.device), "final_loss": float(loss) * args.accum}


def config(args, recipe: str) -> dict:
    return {
        "recipe": recipe,
        "model": args.model,
        "resolution": model_ref(args.model)[1],
        "steps": args.steps,
        "timed_steps": args.steps - 3,
        "batch": 1 if recipe == "naive" else args.batch,
        "accumulation": args.accum,
        "precision": "fp32" if recipe == "naive" else args.precision,
        "compile": bool(args.compile) if recipe == "tinv" else False,
        "threads": args.threads,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--model", default="tiny", choices=["tiny", "sd15"])
    p.add_argument("--recipe", default="both", choices=["tinv", "naive", "both"])
    p.add_argument("--steps", type=int, default=None, help="optimisation steps (first 3 untimed); default 23 on GPU, 13 on CPU")
    p.add_argument("--batch", type=int, default=1, help="tinv: batch size per step (the naive recipe always uses 1)")
    p.add_argument("--accum", type=int, default=4, help="gradient accumulation (both recipes)")
    p.add_argument("--micro-batch", type=int, default=None, help="tinv: samples per forward pass (default: all of a step)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "no"])
    p.add_argument("--compile", action="store_true", help="tinv: torch.compile the UNet")
    p.add_argument("--resolution", type=int, default=None, help="image size (default: 64 for tiny, 512 for sd15)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for both recipes (default: 1 on CPU -- fair and fastest for the tiny model on a shared machine)")
    p.add_argument("--record", action="store_true", help="append the JSON lines to bench/results/train.jsonl")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.steps is None:
        args.steps = 23 if args.device.startswith("cuda") else 33
    global RESOLUTION
    RESOLUTION = args.resolution
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    if args.threads is None and not args.device.startswith("cuda"):
        args.threads = 1
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        import torch

        torch.set_num_threads(args.threads)
    if args._child:
        out = run_tinv(args) if args._child == "tinv" else run_naive(args)
        print("RESULT " + json.dumps(out), flush=True)
        return 0
    results = {}
    out = Results("train", record=args.record, device=args.device)
    for recipe in (["tinv", "naive"] if args.recipe == "both" else [args.recipe]):
        cmd = [sys.executable, __file__, *[a for a in sys.argv[1:] if a != "--record"], "--_child", recipe]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            sys.stderr.write(proc.stderr[-4000:])
            return proc.returncode or 1
        results[recipe] = json.loads(line[-1][len("RESULT ") :])
        cfg = config(args, recipe)
        out.emit("train_samples_per_second", results[recipe]["samples_per_second"], "samples/s", cfg, digits=3)
        out.emit("train_peak_memory_mib", results[recipe]["peak_mib"], "MiB", cfg, digits=1)
    if len(results) == 2:
        sp = results["tinv"]["samples_per_second"] / results["naive"]["samples_per_second"]
        out.emit("speedup", sp, "x", {"model": args.model, "tinv_batch": args.batch, "accumulation": args.accum,
                                      "versus": "naive (diffusers textual_inversion.py recipe)"}, digits=2)
    out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
