"""Staged, seeded training of the shapes model: ``python -m tinv.trainer.world train OUT --seed S``.

Stages, in order (each saves its weights under ``OUT/stages/<name>/`` and a ``done.json``, so a
run cut short keeps what it finished and a rerun resumes at the first unfinished stage):

1. ``clip``: the world's CLIP -- ``CLIPTextModel`` and a small CNN image tower -- trained
   contrastively on (scene, caption) pairs. Its text encoder is then frozen and conditions the UNet,
   so the UNet gets informative text from its first step (the prototype's jointly trained encoder
   left the text ignored for 14 minutes).
2. ``evaluator``: a classifier of what is drawn (shape or mark), colour, background and style,
   trained on fresh scenes, half of them slightly blurred and noisy (as reconstructions are).
3. ``vae``: ``AutoencoderKL`` on the world's images (L1 + MSE + a tiny KL); every
   ``vae_check_every`` steps the evaluator reads 256 fresh scenes through it and the accuracy per
   head is recorded (``vae_target`` can end the stage early once every head reaches it; off by
   default, so that the steps run never depend on the evaluator); then the latent scale is measured.
4. ``unet``: ``UNet2DConditionModel`` on cached latents of a fixed pool of scenes, epsilon
   prediction with min-SNR-5 loss weights, 10 % empty captions (classifier-free guidance), an EMA
   of the weights; the diffusers folder ``OUT/model`` is rewritten at every checkpoint.
5. ``refine``: a second, shorter UNet cycle from the first one's EMA (fresh optimizer, half the
   peak learning rate, new draws). ``--stages refine`` on a finished four-stage run continues it.

Determinism: every random draw comes from generators seeded by ``--seed`` and the stage, and the
run uses one thread. ``--budget-minutes`` caps each stage's wall time at its share of the budget;
the steps each stage actually ran go into ``OUT/manifest.json``, and rerunning with those step
counts (``--steps clip=N,vae=N,...``) and no budget reproduces the run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import ImageFilter

from . import nets, scenes

log = logging.getLogger("tinv.world")

# Appended, never inserted: a stage's seed is its index here, so earlier stages keep their draws.
STAGES = ("clip", "evaluator", "vae", "unet", "refine", "decoder")
# Steps of a full run and each stage's share of a wall budget. Measured on 2 cores (2026-12-02,
# bench/README.md): clip 6 min and evaluator 30 min (one thread) beside the VAE, 31 min (one
# thread); then the UNet, 57 min, and refine, 21 min, on two threads: about 115 minutes in all.
# 1,500 evaluator steps read "what" (shape or mark) only 81 % right on fresh scenes; 3,000 read
# 99.4 %. Refine took held-out prompts from 55 % to 66 % on shape, 54 % to 65 % on all three.
# decoder: 0 (off) by default. On the shipped weights 1,500 steps took reconstructions from 87.6 to
# 96.2 % (shape) but held-out prompts from 64.9 to 60.5 % (all three): opt in with --steps decoder=1500.
FULL_STEPS = {"clip": 300, "evaluator": 3000, "vae": 6000, "unet": 5500, "refine": 2500, "decoder": 0}
BUDGET_SHARE = {"clip": 0.04, "evaluator": 0.08, "vae": 0.23, "unet": 0.37, "refine": 0.16, "decoder": 0.12}
BATCH = {"clip": 128, "vae": 32, "evaluator": 64, "unet": 128, "refine": 128, "decoder": 32}
REDONE_AFTER = {"unet": ("refine",), "vae": ("decoder",)}  # stages to redo whenever the key stage runs again
POOL = 12000  # scenes whose latents the UNet trains on
VAE_LR = 1.5e-3


@dataclass
class Config:
    out: Path
    seed: int = 0
    steps: dict[str, int] = field(default_factory=lambda: dict(FULL_STEPS))
    budget_minutes: float | None = None
    sizes: nets.Sizes = nets.FULL
    pool: int = POOL
    batch: dict[str, int] = field(default_factory=lambda: dict(BATCH))
    checkpoint_every: int = 250
    vae_crop: int = 32  # VAE training crops (px); the full 64 px scene costs 4x as much
    threads: int = 1  # torch threads; results are reproducible for a given count
    device: str = "cpu"  # or "cuda": every random draw still comes from the seeded CPU generators
    vae_check_every: int = 250  # VAE steps between checks of its reconstructions by the evaluator
    # None (the default): the checks are only recorded. A number ends the VAE stage once the evaluator
    # reads every attribute that well -- but then the steps run depend on the evaluator, and
    # `--steps vae=N` with a cosine schedule over N would not redo the same VAE.
    vae_target: float | None = None

    @property
    def dev(self) -> torch.device:
        return torch.device(self.device)

    def stage_dir(self, name: str) -> Path:
        return self.out / "stages" / name


class Budget:
    """Wall-clock cap for one stage (None: no cap)."""

    def __init__(self, minutes: float | None):
        self.deadline = None if minutes is None else time.monotonic() + minutes * 60

    def over(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline


def _gen(cfg: Config, stage: str) -> torch.Generator:
    return torch.Generator().manual_seed(cfg.seed * 1000 + STAGES.index(stage))


def _rng(cfg: Config, stage: str, step: int = 0) -> random.Random:
    return random.Random(f"{cfg.seed}:{stage}:{step}")


def _lr(step: int, total: int, peak: float, warmup: int = 50) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def _update(opt, loss, lr: float, clip=None) -> None:
    """One optimiser step at learning rate `lr`; with `clip`, those parameters' gradient norm is cut to 1."""
    for pg in opt.param_groups:
        pg["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(clip, 1.0)
    opt.step()


def _log(cfg: Config, **row) -> None:
    row["t"] = round(time.time(), 1)
    line = json.dumps(row)
    log.info(line)
    with open(cfg.out / "train-log.jsonl", "a") as f:
        f.write(line + "\n")


def _tokenize(tok, captions: list[str]) -> torch.Tensor:
    # Pad to the model length exactly as StableDiffusionPipeline does, so training sees what inference sees.
    return tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids


def _pool(cfg: Config) -> tuple[list[scenes.Scene], np.ndarray]:
    cache = cfg.out / "pool.npy"
    sc = scenes.scenes(cfg.seed, cfg.pool)
    if cache.exists():
        arr = np.load(cache)
        if len(arr) == len(sc):
            return sc, arr
    t = time.monotonic()
    arr = scenes.render_array(sc)
    # atomically: two processes running different stages side by side may both render it
    tmp = cache.with_name(f"pool.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, arr)
    os.replace(tmp, cache)
    _log(cfg, stage="pool", scenes=len(sc), seconds=round(time.monotonic() - t, 1))
    return sc, arr


def done(cfg: Config, stage: str) -> dict | None:
    p = cfg.stage_dir(stage) / "done.json"
    return json.loads(p.read_text()) if p.exists() else None


def _mark_done(cfg: Config, stage: str, steps: int, seconds: float, **extra) -> dict:
    # The thread count is part of the recipe: a stage reproduces bit for bit only with the same count.
    info = {"stage": stage, "steps": steps, "planned_steps": cfg.steps[stage], "seconds": round(seconds, 1),
            "threads": torch.get_num_threads(), **extra}
    (cfg.stage_dir(stage) / "done.json").write_text(json.dumps(info, indent=2))
    return info


# ---- 1. CLIP --------------------------------------------------------------------------------------


def stage_clip(cfg: Config, pool_scenes, pool_arr, budget: Budget) -> dict:
    tok = nets.tokenizer()
    g = _gen(cfg, "clip")
    torch.manual_seed(g.initial_seed())
    dev = cfg.dev
    text = nets.text_encoder(tok, cfg.sizes).to(dev)
    tower = nets.image_tower(cfg.sizes).to(dev)
    proj = torch.nn.Linear(cfg.sizes.text_width, cfg.sizes.text_width, bias=False).to(dev)
    logit_scale = torch.nn.Parameter(torch.tensor(math.log(10.0), device=dev))
    params = list(text.parameters()) + list(tower.parameters()) + list(proj.parameters()) + [logit_scale]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    total, b = cfg.steps["clip"], cfg.batch["clip"]
    t0, step = time.monotonic(), 0
    text.train()
    for step in range(total):
        if budget.over():
            break
        rng = _rng(cfg, "clip", step)
        idx = torch.randint(0, len(pool_scenes), (b,), generator=g)
        caps = [scenes.caption(pool_scenes[i], rng) for i in idx.tolist()]
        ids = _tokenize(tok, caps).to(dev)
        tf = F.normalize(proj(text(ids).pooler_output), dim=-1)
        imf = F.normalize(tower(nets.to_tensor(pool_arr[idx.numpy()]).to(dev))["proj"], dim=-1)
        logits = logit_scale.exp().clamp(max=100) * imf @ tf.T
        # Identical captions are positives of each other (the world repeats captions often).
        same = torch.tensor([[a == c for c in caps] for a in caps], dtype=torch.float32, device=dev)
        target = same / same.sum(1, keepdim=True)
        loss = 0.5 * (torch.sum(-target * logits.log_softmax(1), 1).mean() + torch.sum(-target * logits.T.log_softmax(1), 1).mean())
        _update(opt, loss, _lr(step, total, 1e-3))
        if step % 10 == 0:
            _log(cfg, stage="clip", step=step, loss=round(loss.item(), 4))
    steps = step + 1 if total else 0
    d = cfg.stage_dir("clip")
    d.mkdir(parents=True, exist_ok=True)
    text.eval().to("cpu")
    tower.to("cpu")
    text.save_pretrained(d / "text_encoder")
    tok.save_pretrained(d / "tokenizer")
    from safetensors.torch import save_file

    save_file({**{f"tower.{k}": v for k, v in tower.state_dict().items()}, "proj.weight": proj.weight.detach().cpu(),
               "logit_scale": logit_scale.detach().cpu().reshape(1)}, str(d / "clip_image.safetensors"))
    return _mark_done(cfg, "clip", steps, time.monotonic() - t0)


# ---- 3. VAE ---------------------------------------------------------------------------------------


def stage_vae(cfg: Config, pool_scenes, pool_arr, budget: Budget) -> dict:
    g = _gen(cfg, "vae")
    torch.manual_seed(g.initial_seed())
    dev = cfg.dev
    vae = nets.vae(cfg.sizes).to(dev)
    ev = load_evaluator(cfg)
    checks: list[dict] = []
    opt = torch.optim.AdamW(vae.parameters(), lr=VAE_LR, weight_decay=0.0)
    total, b, crop = cfg.steps["vae"], cfg.batch["vae"], cfg.vae_crop
    t0, step = time.monotonic(), 0
    vae.train()
    for step in range(total):
        if budget.over():
            break
        idx = torch.randint(0, len(pool_scenes), (b,), generator=g)
        x = nets.to_tensor(pool_arr[idx.numpy()]).to(dev)
        if crop < x.shape[-1]:
            # The VAE is convolutional: random crops teach it the same local code at a fraction of the cost.
            oy, ox = (int(v) * 8 for v in torch.randint(0, (x.shape[-1] - crop) // 8 + 1, (2,), generator=g))
            x = x[:, :, oy : oy + crop, ox : ox + crop]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g).to(dev)
        rec = vae.decode(z).sample
        l1 = (rec - x).abs().mean()
        loss = l1 + (rec - x).pow(2).mean() + 1e-6 * post.kl().mean()
        _update(opt, loss, _lr(step, total, VAE_LR))
        if step % 10 == 0:
            _log(cfg, stage="vae", step=step, loss=round(loss.item(), 4), l1=round(l1.item(), 4))
        if (step + 1) % cfg.vae_check_every == 0:
            from .evaluate import evaluator_accuracy

            vae.eval().to("cpu")
            acc = evaluator_accuracy(ev, vae, n=256, seed=cfg.seed * 1000 + 999)["reconstructed"]
            vae.train().to(dev)
            checks.append({"step": step + 1, "reconstructed": acc})
            _log(cfg, stage="vae", check=step + 1, reconstructed=acc)
            if cfg.vae_target is not None and min(acc.values()) >= cfg.vae_target:
                break
    steps = step + 1 if total else 0
    vae.eval()
    # SD's trick: scale latents to unit variance (SD 1.x's 0.18215), measured on the pool.
    with torch.no_grad():
        zs = torch.cat([vae.encode(nets.to_tensor(pool_arr[i : i + 256]).to(dev)).latent_dist.mean for i in range(0, min(2048, len(pool_arr)), 256)])
    scale = float(1.0 / zs.std())
    vae.register_to_config(scaling_factor=scale)
    vae.to("cpu")
    d = cfg.stage_dir("vae")
    vae.save_pretrained(d / "vae")
    return _mark_done(cfg, "vae", steps, time.monotonic() - t0, scaling_factor=round(scale, 5), checks=checks)


def load_vae(cfg: Config, stage: str = "vae"):
    from diffusers import AutoencoderKL

    from safetensors.torch import load_file

    # Built from config + weights rather than from_pretrained, which records the (run-specific)
    # folder as _name_or_path in the config and would make the shipped files depend on it.
    d = cfg.stage_dir(stage) / "vae"
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(d))
    vae.load_state_dict(load_file(str(d / "diffusion_pytorch_model.safetensors")))
    return vae.eval()


def load_evaluator(cfg: Config) -> nets.ImageNet:
    from safetensors.torch import load_file

    ev = nets.evaluator(cfg.sizes)
    ev.load_state_dict(load_file(str(cfg.stage_dir("evaluator") / "evaluator.safetensors")))
    return ev.eval()


def reconstruct(vae, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)


# ---- 2. evaluator ---------------------------------------------------------------------------------


def stage_evaluator(cfg: Config, budget: Budget) -> dict:
    g = _gen(cfg, "evaluator")
    torch.manual_seed(g.initial_seed())
    dev = cfg.dev
    ev = nets.evaluator(cfg.sizes).to(dev)
    opt = torch.optim.AdamW(ev.parameters(), lr=2e-3, weight_decay=0.01)
    total, b = cfg.steps["evaluator"], cfg.batch["evaluator"]
    t0, step = time.monotonic(), 0
    ev.train()
    for step in range(total):
        if budget.over():
            break
        # Fresh scenes every step (never the UNet's pool); half of them softened as a VAE softens
        # them (blur up to 1 px: the blurry style's is 2 px, so the two stay apart).
        batch = [scenes.sample_scene(_rng(cfg, "evaluator", step * b + i)) for i in range(b)]
        imgs = [scenes.render(s) for s in batch]
        rng = _rng(cfg, "evaluator-aug", step)
        imgs = imgs[: b // 2] + [im.filter(ImageFilter.GaussianBlur(rng.uniform(0.2, 1.0))) for im in imgs[b // 2 :]]
        x = nets.to_tensor(np.stack([np.asarray(im) for im in imgs]))
        x[b // 2 :] += 0.03 * torch.randn(x[b // 2 :].shape, generator=g)
        y = {k: v.to(dev) for k, v in nets.labels(batch).items()}
        out = ev(x.to(dev))
        loss = sum(F.cross_entropy(out[k], y[k], ignore_index=-100) for k in out)
        _update(opt, loss, _lr(step, total, 2e-3))
        if step % 10 == 0:
            _log(cfg, stage="evaluator", step=step, loss=round(loss.item(), 4))
    steps = step + 1 if total else 0
    ev.eval().to("cpu")
    d = cfg.stage_dir("evaluator")
    d.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    save_file(ev.state_dict(), str(d / "evaluator.safetensors"))
    return _mark_done(cfg, "evaluator", steps, time.monotonic() - t0)


# ---- 4. UNet --------------------------------------------------------------------------------------


def _pool_latents(cfg: Config, vae, pool_arr) -> tuple[torch.Tensor, torch.Tensor]:
    cache = cfg.stage_dir("unet") / "latents.pt"
    if cache.exists():
        d = torch.load(cache)
        return d["mean"], d["std"]
    means, stds = [], []
    with torch.no_grad():
        for i in range(0, len(pool_arr), 256):
            post = vae.encode(nets.to_tensor(pool_arr[i : i + 256]).to(cfg.dev)).latent_dist
            means.append(post.mean.cpu())
            stds.append(post.std.cpu())
    mean, std = torch.cat(means), torch.cat(stds)
    torch.save({"mean": mean, "std": std}, cache)
    return mean, std


def save_model(cfg: Config, unet, dest: Path) -> Path:
    """Assemble the diffusers folder from the stages' parts (atomically: a reader never sees half)."""
    import shutil

    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel, CLIPTokenizer

    import copy

    unet = copy.deepcopy(unet).to("cpu")  # the training copy may live on a GPU
    pipe = StableDiffusionPipeline(
        # the decoder stage's VAE once it exists (the same encoder, a decoder trained on whole scenes)
        vae=load_vae(cfg, "decoder" if (cfg.stage_dir("decoder") / "vae").exists() else "vae"),
        text_encoder=CLIPTextModel.from_pretrained(cfg.stage_dir("clip") / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(cfg.stage_dir("clip") / "tokenizer"),
        unet=unet,
        scheduler=nets.scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(str(tmp))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


UNET_LR = 1e-3
REFINE_LR = 5e-4  # half the first peak: the weights start near a minimum (one value tried, not tuned)


def stage_unet(cfg: Config, pool_scenes, pool_arr, budget: Budget) -> dict:
    """The first UNet cycle, from fresh weights; its EMA is kept in ``stages/unet/unet``."""
    steps, seconds, ema = _diffusion_cycle(cfg, "unet", lambda: nets.unet(cfg.sizes), UNET_LR, pool_scenes, pool_arr, budget)
    ema.save_pretrained(str(cfg.stage_dir("unet") / "unet"))
    return _mark_done(cfg, "unet", steps, seconds)


def stage_refine(cfg: Config, pool_scenes, pool_arr, budget: Budget) -> dict:
    """A second cycle (a warm restart, as in SGDR): the first cycle's EMA, a fresh optimizer, a lower
    peak and new draws. The first cycle's loss was still falling when its cosine schedule ended."""
    import shutil

    start = cfg.stage_dir("unet") / "unet"
    if not start.exists():
        # a run made before this stage existed kept the first cycle's EMA only as OUT/model, which
        # is still exactly that until this stage first writes a checkpoint
        if (cfg.stage_dir("refine") / "progress.json").exists():
            raise RuntimeError(f"{start} is missing and OUT/model already holds refine checkpoints: rerun the unet stage")
        shutil.copytree(cfg.out / "model" / "unet", start)
    from ..storage import sha256_file

    steps, seconds, _ = _diffusion_cycle(cfg, "refine", lambda: _load_unet(cfg, start), REFINE_LR, pool_scenes, pool_arr, budget)
    return _mark_done(cfg, "refine", steps, seconds, start_digest=sha256_file(start / "diffusion_pytorch_model.safetensors"))


def _diffusion_cycle(cfg: Config, stage: str, make_unet, peak: float, pool_scenes, pool_arr, budget: Budget):
    """One cosine cycle of epsilon-prediction training on the pool's cached latents (the UNet from
    ``make_unet()``, called once the stage's seed is set, so fresh weights depend on it only); writes the
    EMA to OUT/model at every checkpoint. Returns (steps run, seconds, the EMA on the CPU)."""
    import copy

    from transformers import CLIPTextModel, CLIPTokenizer

    g = _gen(cfg, stage)
    torch.manual_seed(g.initial_seed())
    d = cfg.stage_dir(stage)
    d.mkdir(parents=True, exist_ok=True)
    dev = cfg.dev
    vae = load_vae(cfg).to(dev)
    scale = vae.config.scaling_factor
    tok = CLIPTokenizer.from_pretrained(cfg.stage_dir("clip") / "tokenizer")
    text = CLIPTextModel.from_pretrained(cfg.stage_dir("clip") / "text_encoder").eval().requires_grad_(False).to(dev)
    mean, std = (t.to(dev) for t in _pool_latents(cfg, vae, pool_arr))
    unet = make_unet().to(dev)
    ema = copy.deepcopy(unet).requires_grad_(False)
    sched = nets.scheduler()
    alphas = sched.alphas_cumprod
    snr = (alphas / (1 - alphas)).to(dev)
    opt = torch.optim.AdamW(unet.parameters(), lr=peak, weight_decay=0.01)
    total, b = cfg.steps[stage], cfg.batch[stage]
    t0, step = time.monotonic(), 0
    unet.train()
    for step in range(total):
        if budget.over():
            break
        rng = _rng(cfg, stage, step)
        idx = torch.randint(0, len(pool_scenes), (b,), generator=g)
        caps = ["" if rng.random() < 0.1 else scenes.caption(pool_scenes[i], rng) for i in idx.tolist()]
        with torch.no_grad():
            cond = text(_tokenize(tok, caps).to(dev)).last_hidden_state
        di = idx.to(dev)
        z0 = (mean[di] + std[di] * torch.randn(mean[di].shape, generator=g).to(dev)) * scale
        noise = torch.randn(z0.shape, generator=g).to(dev)
        t = torch.randint(0, sched.config.num_train_timesteps, (b,), generator=g).to(dev)
        zt = sched.add_noise(z0, noise, t)
        pred = unet(zt, t, cond).sample
        w = (snr[t].clamp(max=5.0) / snr[t]).float()  # min-SNR-5 (epsilon target)
        loss = (w * (pred - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        _update(opt, loss, _lr(step, total, peak, warmup=100), clip=unet.parameters())
        decay = min(0.998, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        if step % 10 == 0:
            _log(cfg, stage=stage, step=step, loss=round(loss.item(), 4))
        if (step + 1) % cfg.checkpoint_every == 0:
            save_model(cfg, ema, cfg.out / "model")
            (d / "progress.json").write_text(json.dumps({"steps": step + 1}))
            _log(cfg, stage=stage, checkpoint=step + 1)
    steps = step + 1 if total else 0
    ema = ema.to("cpu")
    save_model(cfg, ema, cfg.out / "model")
    return steps, time.monotonic() - t0, ema


# ---- 6. decoder -----------------------------------------------------------------------------------


DECODER_LR = 1e-3
EDGE_WEIGHT = 1.0  # weight of the L1 on image gradients: thin stripes, dots and star points are edges


def stage_decoder(cfg: Config, pool_scenes, pool_arr, budget: Budget) -> dict:
    """Fine-tune the VAE's decoder on whole 64 px scenes, its encoder frozen.

    The VAE stage trains on 32 px crops (a quarter of the cost); its decoder then blurs thin
    structure: the evaluator read 88 % of shapes, 86 % of colours and 78 % of styles right on its
    reconstructions. The encoder -- hence every latent the UNet learned -- is unchanged here, so
    this stage improves a finished model without retraining its UNet, and needs only the VAE."""
    import shutil

    from .evaluate import evaluator_accuracy

    if not cfg.steps["decoder"]:  # off (the default): the VAE stage's decoder is the model's
        if (cfg.stage_dir("decoder") / "vae").exists():  # turned off after an earlier run trained one
            shutil.rmtree(cfg.stage_dir("decoder") / "vae")
            if (cfg.out / "model" / "unet").exists():
                save_model(cfg, _load_unet(cfg, cfg.out / "model" / "unet"), cfg.out / "model")
        return _mark_done(cfg, "decoder", 0, 0.0, checks=[])
    g = _gen(cfg, "decoder")
    torch.manual_seed(g.initial_seed())
    dev = cfg.dev
    vae = load_vae(cfg).to(dev)
    vae.encoder.requires_grad_(False)
    vae.quant_conv.requires_grad_(False)
    ev = load_evaluator(cfg)
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=DECODER_LR, weight_decay=0.0)
    total, b = cfg.steps["decoder"], cfg.batch["decoder"]
    checks: list[dict] = []
    t0, step = time.monotonic(), 0
    vae.decoder.train()
    for step in range(total):
        if budget.over():
            break
        idx = torch.randint(0, len(pool_scenes), (b,), generator=g)
        x = nets.to_tensor(pool_arr[idx.numpy()]).to(dev)
        with torch.no_grad():
            post = vae.encode(x).latent_dist
        # sampled latents, as the VAE stage decoded: the UNet's samples are not exactly the means either
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g).to(dev)
        d = vae.decode(z).sample - x
        edges = (d[..., 1:, :] - d[..., :-1, :]).abs().mean() + (d[..., :, 1:] - d[..., :, :-1]).abs().mean()
        loss = d.abs().mean() + d.pow(2).mean() + EDGE_WEIGHT * edges
        _update(opt, loss, _lr(step, total, DECODER_LR))
        if step % 10 == 0:
            _log(cfg, stage="decoder", step=step, loss=round(loss.item(), 4), l1=round(d.abs().mean().item(), 4))
        if (step + 1) % cfg.vae_check_every == 0 or step + 1 == total:
            vae.eval().to("cpu")
            acc = evaluator_accuracy(ev, vae, n=256, seed=cfg.seed * 1000 + 999)["reconstructed"]
            vae.to(dev).decoder.train()
            checks.append({"step": step + 1, "reconstructed": acc})
            _log(cfg, stage="decoder", check=step + 1, reconstructed=acc)
    steps = step + 1 if total else 0
    vae.eval().to("cpu")
    dest = cfg.stage_dir("decoder") / "vae"
    tmp = dest.with_name("vae.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    vae.save_pretrained(tmp)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    if (cfg.out / "model" / "unet").exists():  # the UNet is done: put the new decoder in the model now
        save_model(cfg, _load_unet(cfg, cfg.out / "model" / "unet"), cfg.out / "model")
    return _mark_done(cfg, "decoder", steps, time.monotonic() - t0, checks=checks)


def _load_unet(cfg: Config, folder: Path):
    from safetensors.torch import load_file

    unet = nets.unet(cfg.sizes)  # the same class and config, so that a saved copy does not name `folder`
    unet.load_state_dict(load_file(str(folder / "diffusion_pytorch_model.safetensors")))
    return unet


# ---- the whole run --------------------------------------------------------------------------------


def train(cfg: Config, stages: tuple[str, ...] = STAGES) -> dict:
    """Run the stages not yet done; return the per-stage records."""
    # On a shared 2-core machine one thread is fastest (two threads measured up to 12x slower).
    torch.set_num_threads(cfg.threads)
    cfg.out.mkdir(parents=True, exist_ok=True)
    pool_scenes, pool_arr = _pool(cfg)
    records = {}
    deadline = None if cfg.budget_minutes is None else time.monotonic() + cfg.budget_minutes * 60
    for name in (n for n in STAGES if n in stages and not done(cfg, n)):
        for later in REDONE_AFTER.get(name, ()):  # it continues from this stage's output
            for f in ("done.json", "progress.json"):
                (cfg.stage_dir(later) / f).unlink(missing_ok=True)
    todo = [n for n in STAGES if n in stages and not done(cfg, n)]
    for name in STAGES:
        if name not in stages:
            continue
        finished = done(cfg, name)
        if finished:
            records[name] = finished
            continue
        cfg.stage_dir(name).mkdir(parents=True, exist_ok=True)
        # A stage gets its share of what is left, so time a stage leaves unused goes to the next.
        # (a stage set to 0 steps, such as the decoder by default, takes no share)
        share = BUDGET_SHARE[name] / max(1e-9, sum(BUDGET_SHARE[n] for n in todo[todo.index(name):] if cfg.steps[n]))
        budget = Budget(None if deadline is None else (deadline - time.monotonic()) * share / 60)
        _log(cfg, stage=name, start=True, steps=cfg.steps[name])
        if name == "clip":
            records[name] = stage_clip(cfg, pool_scenes, pool_arr, budget)
        elif name == "vae":
            records[name] = stage_vae(cfg, pool_scenes, pool_arr, budget)
        elif name == "evaluator":
            records[name] = stage_evaluator(cfg, budget)
        elif name == "unet":
            records[name] = stage_unet(cfg, pool_scenes, pool_arr, budget)
        elif name == "refine":
            records[name] = stage_refine(cfg, pool_scenes, pool_arr, budget)
        else:
            records[name] = stage_decoder(cfg, pool_scenes, pool_arr, budget)
        _log(cfg, **records[name])
    return records
