#!/usr/bin/env python
"""Training throughput: tinv's recipe against the diffusers example script's ("naive").

    python bench/train.py --device cpu  --model tiny --recipe both
    python bench/train.py --device cuda --model sd15 --recipe both --batch 8 --accum 4
    python bench/train.py --device cuda --model sdxl --recipe both --batch 4 --accum 1 --steps 8

Prints one JSON line per result: {"name", "value", "unit", "config", "git_revision", "device"}:
``train_samples_per_second``, ``train_peak_memory_mib`` and ``train_mfu`` per recipe, and with
``--recipe both`` a ``speedup`` row (tinv / naive samples per second). MFU = samples/s x the model
FLOPs of one Textual Inversion sample (text encoders forward and backward, UNet forward and backward
to its inputs, counted with torch's FlopCounterMode on the model itself) / the bf16 (GPU) or fp32
(CPU) matmul rate measured in the same run (``train_matmul_peak_tflops``; the same useful FLOPs for
both recipes, so the naive recipe's per-step VAE encodes count as waste). Counted this way (meta
device, batch 1): SD 1.5 at 512 px 1.70 TFLOP/sample (REFERENCE.md's 803 + 866 + 26 GFLOP), SDXL at
1024 px 14.5 TFLOP/sample.

- tinv: the real trainer (`tinv.trainer.train.train`) on a generated job: latents cached once
  (both flips), bf16 autocast + bf16 frozen weights on GPUs (fp32 on CPU), SDPA attention, only
  the new rows in the optimizer, a step's local samples in one forward pass.
- naive: the diffusers ``textual_inversion.py`` recipe re-implemented faithfully: fp32, the VAE
  encodes every sample every step, AdamW over the *whole* resized vocabulary with the old
  rows restored after each step, batch 1 x gradient accumulation 4.

Models: ``tiny`` (builtin:tiny at 64 px), ``sd15`` (Stable Diffusion 1.5's architecture with
random weights, builtin:sd15-random, 512 px), ``sdxl`` (SDXL base's architecture with random weights,
builtin:sdxl-random, 1024 px: both text encoders learn; the naive recipe is diffusers'
``textual_inversion_sdxl.py``) or ``tiny-xl`` (builtin:tiny-xl at 64 px, for CPU). Timing excludes the first 3 steps (warm-up,
cuDNN autotuning) and everything outside the steps (loading, caching, checkpoints). Each recipe
runs in its own process so peak memory is its own.
"""

from __future__ import annotations

import argparse
import contextlib
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


MODELS = {"tiny": ("builtin:tiny", 64), "sd15": ("builtin:sd15-random", 512), "tiny-xl": ("builtin:tiny-xl", 64),
          "sdxl": ("builtin:sdxl-random", 1024)}


def model_ref(model: str) -> tuple[str, int]:
    ref, res = MODELS[model]
    return ref, RESOLUTION or res


def build_components(model: str, device: str) -> dict:
    """The model's components, built on the device (the random-weight architectures are slow to build on a CPU)."""
    from tinv.trainer import sdxl, tiny

    ref = MODELS[model][0]
    if model == "sd15":
        return tiny.build_sd15_random(0, device)
    if model == "sdxl":
        return sdxl.build_sdxl_random(0, device)
    return sdxl.build(ref) if model == "tiny-xl" else tiny.build(ref)


def flops_per_sample(bundle, res: int, device, dtype) -> float:
    """Model FLOPs of one TI sample, as the trainer computes it (FlopCounterMode, batch 1): the text
    encoders forward and backward to the new rows, the UNet forward and backward to its inputs."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from tinv.trainer import tokens

    vocab = tokens.ConceptVocab(bundle.tokenizer, [("det-logo", "brain logo, sharp lines", None)])
    for s in bundle.text:
        vocab.fit_table(s.encoder.get_input_embeddings().num_embeddings)
    for m in (bundle.unet, *(s.encoder for s in bundle.text)):
        m.requires_grad_(False)  # frozen, as in training: no weight gradients
    init = torch.zeros(vocab.num_new, sum(bundle.widths), device=device)  # values do not change the count
    new = tokens.install_all([s.encoder for s in bundle.text], init, offset=vocab.base_size)
    x = torch.randn(1, bundle.unet.config.in_channels, res // bundle.vae_scale, res // bundle.vae_scale, device=device, dtype=dtype)
    t = torch.tensor([500], device=device)
    ctx = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    with FlopCounterMode(display=False) as fc, ctx:
        hidden, pooled = bundle.encode(vocab, ["a photo of a det-logo"])
        kw = {}
        if pooled is not None:
            ids = torch.tensor([[res, res, 0, 0, res, res]], device=device, dtype=dtype)
            kw = {"added_cond_kwargs": {"text_embeds": pooled.to(dtype), "time_ids": ids}}
        bundle.unet(x, t, hidden.to(dtype), **kw).sample.float().pow(2).mean().backward()
    new.grad = None
    return float(fc.get_total_flops())


def matmul_peak(device, dtype) -> float:
    """FLOP/s of a large square matmul on this device and dtype (the MFU denominator, measured here)."""
    import torch

    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    reps = 20 if device.type == "cuda" else 5
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0)


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
        from tinv.trainer import models, runtime

        bundle = models.from_components(ref, build_components(args.model, args.device))
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        r = train(job, Options(device=args.device, model=ref, validation=False, progress_bar=False, auto_resume=False, compile=args.compile,
                               micro_batch=args.micro_batch), model=bundle)
        peak = peak_mib(args.device)
        device = torch.device(args.device)
        dtype = runtime.pick_dtype(args.precision, device)
        flops = flops_per_sample(bundle, res, device, dtype)  # the trained modules, as the trainer placed them
        matmul = matmul_peak(device, torch.bfloat16 if dtype != torch.float32 else torch.float32)
    return {"samples_per_second": r.throughput, "peak_mib": peak, "final_loss": r.loss, "flops_per_sample": flops,
            "matmul_flops": matmul}


def run_naive(args) -> dict:
    """diffusers examples/textual_inversion/textual_inversion.py (SDXL: textual_inversion_sdxl.py), default
    flags, in one loop: fp32, the VAE encodes every sample every step, AdamW over the *whole* resized
    vocabulary of every text encoder with the old rows restored after each step, batch 1; SDXL's
    conditioning (both encoders' penultimate states, the pooled projection, time ids of the image size)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from tinv.trainer import data, models
    from tinv.trainer.samples import draw_logo

    ref, res = model_ref(args.model)
    device = torch.device(args.device)
    bundle = models.from_components(ref, build_components(args.model, args.device))
    vae, unet, sched = bundle.vae, bundle.unet, bundle.scheduler
    for m in (vae, unet, *(s.encoder for s in bundle.text)):
        m.to(device)
        m.requires_grad_(False)
    # resize_token_embeddings(+1) and train the whole table, as the scripts do
    tables, keeps, origs, ids = [], [], [], []
    for s in bundle.text:
        te, tok = s.encoder, s.tokenizer
        emb = te.get_input_embeddings()
        n_old = emb.num_embeddings
        new_emb = torch.nn.Embedding(n_old + 1, emb.embedding_dim, device=device)
        with torch.no_grad():
            new_emb.weight[:n_old] = emb.weight
            new_emb.weight[n_old] = emb.weight[tok.convert_tokens_to_ids("logo</w>")]
        te.set_input_embeddings(new_emb)
        new_emb.weight.requires_grad_(True)
        te.train()
        keep = torch.ones(n_old + 1, dtype=torch.bool, device=device)
        keep[n_old] = False
        tables.append(new_emb.weight)
        keeps.append(keep)
        origs.append(new_emb.weight.detach().clone())
        t_ids = tok(["a photo of a logo"], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        t_ids[t_ids == tok.convert_tokens_to_ids("logo</w>")] = n_old
        ids.append(t_ids.to(device))
    lr = 5e-4 * args.accum * 1  # scale_lr
    opt = torch.optim.AdamW(tables, lr=lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    unet.train()
    imgs = [data.to_tensor([np.asarray(draw_logo(res, seed=i)[0])]) for i in range(8)]
    time_ids = torch.tensor([[res, res, 0, 0, res, res]], device=device, dtype=torch.float32)

    def condition():
        if bundle.family != "sdxl":
            return bundle.text_encoder(ids[0])[0], {}
        h1 = bundle.text[0].encoder(ids[0], output_hidden_states=True).hidden_states[-2]
        out2 = bundle.text[1].encoder(ids[1], output_hidden_states=True)
        hidden = torch.cat([h1, out2.hidden_states[-2]], dim=-1)
        return hidden, {"added_cond_kwargs": {"text_embeds": out2[0], "time_ids": time_ids}}

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
            hidden, extra = condition()
            pred = unet(noisy, t, hidden, **extra).sample
            loss = F.mse_loss(pred.float(), noise.float()) / args.accum
            loss.backward()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            for w, keep, orig in zip(tables, keeps, origs):
                w[keep] = orig[keep]
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
    p.add_argument("--model", default="tiny", choices=list(MODELS))
    p.add_argument("--recipe", default="both", choices=["tinv", "naive", "both"])
    p.add_argument("--steps", type=int, default=None, help="optimisation steps (first 3 untimed); default 23 on GPU, 13 on CPU")
    p.add_argument("--batch", type=int, default=1, help="tinv: batch size per step (the naive recipe always uses 1)")
    p.add_argument("--accum", type=int, default=4, help="gradient accumulation (both recipes)")
    p.add_argument("--micro-batch", type=int, default=None, help="tinv: samples per forward pass (default: all of a step)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "no"])
    p.add_argument("--compile", action="store_true", help="tinv: torch.compile the UNet")
    p.add_argument("--resolution", type=int, default=None, help="image size (default: 64 for tiny and tiny-xl, 512 for sd15, 1024 for sdxl)")
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
        flops = results.get("tinv", {}).get("flops_per_sample")
        if flops and results["tinv"].get("matmul_flops"):
            peak = results["tinv"]["matmul_flops"]
            out.emit("train_mfu", results[recipe]["samples_per_second"] * flops / peak, "fraction",
                     {**cfg, "flops_per_sample": round(flops), "matmul_peak_tflops": round(peak / 1e12, 2)}, digits=4)
    if results.get("tinv", {}).get("matmul_flops"):
        out.emit("train_matmul_peak_tflops", results["tinv"]["matmul_flops"] / 1e12, "TFLOP/s", config(args, "tinv"), digits=2)
    if len(results) == 2:
        sp = results["tinv"]["samples_per_second"] / results["naive"]["samples_per_second"]
        out.emit("speedup", sp, "x", {"model": args.model, "tinv_batch": args.batch, "accumulation": args.accum,
                                      "versus": "naive (diffusers " + ("textual_inversion_sdxl.py" if "xl" in args.model else "textual_inversion.py") + " recipe)"}, digits=2)
    out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
