"""Measuring the shapes model with the world's evaluator.

- :func:`evaluator_accuracy`: the evaluator on freshly drawn scenes and on their VAE reconstructions;
- :func:`prompt_following`: how often generated images get each attribute (what, colour,
  background) of a caption right, on held-out caption combinations and on seen ones;
- :func:`features` / :func:`fidelity`: the evaluator's penultimate features, the image-feature
  cosine used as concept fidelity (the CLIP-I / DINO analog).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import nets, scenes

ATTRS = ("what", "colour", "background")
GUIDANCE = 5.0


def load_evaluator(root: Path) -> nets.ImageNet:
    """The evaluator of a run or weights folder (sizes from its manifest)."""
    from safetensors.torch import load_file

    manifest = json.loads((root / "manifest.json").read_text())
    width = manifest["sizes"]["tower_width"]
    ev = nets.ImageNet(width, nets.HEADS)
    ev.load_state_dict(load_file(str(root / "evaluator.safetensors")))
    return ev.eval()


def as_tensor(images) -> torch.Tensor:
    """PIL images, a uint8 (N,H,W,3) array or a float (N,H,W,3) array in [0,1] -> (N,3,H,W) in [-1,1]."""
    if isinstance(images, torch.Tensor):
        return images
    if isinstance(images, np.ndarray) and images.dtype != np.uint8:
        images = (images * 255).round().clip(0, 255).astype(np.uint8)
    elif not isinstance(images, np.ndarray):
        images = np.stack([np.asarray(im.convert("RGB").resize((scenes.SIZE, scenes.SIZE))) for im in images])
    return nets.to_tensor(images)


@torch.no_grad()
def predict(ev: nets.ImageNet, images) -> dict[str, list[str]]:
    x = as_tensor(images)
    names = {"what": scenes.WHATS, "colour": tuple(scenes.COLOURS), "background": tuple(scenes.BACKGROUNDS), "style": scenes.STYLES}
    out: dict[str, list[str]] = {k: [] for k in names}
    for i in range(0, len(x), 256):
        logits = ev(x[i : i + 256])
        for k in names:
            out[k] += [names[k][j] for j in logits[k].argmax(-1).tolist()]
    return out


@torch.no_grad()
def features(ev: nets.ImageNet, images) -> torch.Tensor:
    """L2-normalised penultimate features, one row per image."""
    x = as_tensor(images)
    return F.normalize(torch.cat([ev.features(x[i : i + 256]) for i in range(0, len(x), 256)]), dim=-1)


def fidelity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine between every row of a and every row of b (excluding identical pairs when a is b)."""
    sim = a @ b.T
    if a is b:
        n = len(a)
        return float((sim.sum() - sim.diagonal().sum()) / max(1, n * n - n))
    return float(sim.mean())


def _truth(batch: list[scenes.Scene]) -> dict[str, list[str | None]]:
    return {"what": [s.shape for s in batch], "colour": [s.colour for s in batch],
            "background": [s.background for s in batch], "style": [s.style if s.kind == "object" else None for s in batch]}


def _accuracy(pred: dict, truth: dict) -> dict[str, float]:
    acc = {}
    for k in truth:
        pairs = [(p, t) for p, t in zip(pred[k], truth[k]) if t is not None]
        acc[k] = round(sum(p == t for p, t in pairs) / max(1, len(pairs)), 4)
    return acc


def evaluator_accuracy(ev: nets.ImageNet, vae=None, n: int = 1000, seed: int = 12345) -> dict[str, dict[str, float]]:
    """Per-head accuracy on n fresh scenes (a seed no training stage uses), and on their reconstructions."""
    batch = scenes.scenes(seed, n)
    x = nets.to_tensor(scenes.render_array(batch))
    out = {"fresh": _accuracy(predict(ev, x), _truth(batch))}
    if vae is not None:
        from .train import reconstruct

        rec = torch.cat([reconstruct(vae, x[i : i + 128]) for i in range(0, len(x), 128)])
        out["reconstructed"] = _accuracy(predict(ev, rec), _truth(batch))
    return out


@dataclass(frozen=True)
class Target:
    prompt: str
    what: str | None = None
    colour: str | None = None
    background: str | None = None
    style: str | None = None

    def check(self, pred: dict[str, list[str]]) -> dict[str, float]:
        n = len(pred["what"])
        ok = {k: [pred[k][i] == getattr(self, k) for i in range(n)] for k in ("what", "colour", "background", "style") if getattr(self, k)}
        rates = {k: round(sum(v) / n, 4) for k, v in ok.items()}
        rates["all"] = round(sum(all(v[i] for v in ok.values()) for i in range(n)) / n, 4)
        return rates


def held_out_targets(per_pair: int = 2, seed: int = 0) -> list[Target]:
    """Captions naming a held-out shape/colour pair in full, on backgrounds the pair is drawn on."""
    rng = random.Random(seed)
    out = []
    for shape, colour in scenes.HELD_OUT_PAIRS:
        bgs = sorted(b for c, b in scenes.VALID_PAIRS if c == colour)
        for bg in rng.sample(bgs, min(per_pair, len(bgs))):
            out.append(Target(f"a {colour} {shape} on {scenes._article(bg)} {bg} background", shape, colour, bg))
    return out


def seen_targets(count: int = 6, seed: int = 1) -> list[Target]:
    rng = random.Random(seed)
    held = set(scenes.HELD_OUT_PAIRS)
    pool = [(s, c, b) for s in scenes.SHAPES for c, b in scenes.VALID_PAIRS if (s, c) not in held]
    return [Target(f"a {c} {s} on {scenes._article(b)} {b} background", s, c, b) for s, c, b in rng.sample(pool, count)]


def generate(pipe, prompt: str, n: int, seed: int = 0, steps: int = 20, guidance: float = GUIDANCE, batch: int = 96) -> np.ndarray:
    """n images (float (N,H,W,3) in [0,1]) with distinct seeds seed..seed+n-1."""
    outs = []
    for i in range(0, n, batch):
        k = min(batch, n - i)
        gens = [torch.Generator().manual_seed(seed + i + j) for j in range(k)]
        r = pipe(prompt, num_images_per_prompt=k, generator=gens, num_inference_steps=steps, guidance_scale=guidance,
                 height=scenes.SIZE, width=scenes.SIZE, output_type="np")
        outs.append(r.images)
    return np.concatenate(outs)


def load_pipeline(model: Path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(model), safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def prompt_following(pipe, ev, targets: list[Target], n: int = 96, seed: int = 0, steps: int = 20) -> list[dict]:
    rows = []
    for t in targets:
        pred = predict(ev, generate(pipe, t.prompt, n, seed, steps))
        rows.append({"prompt": t.prompt, "n": n, **t.check(pred)})
    return rows


def summarise(rows: list[dict]) -> dict[str, float]:
    keys = [k for k in ("what", "colour", "background", "all") if all(k in r for r in rows)]
    return {k: round(sum(r[k] for r in rows) / len(rows), 4) for k in keys}


def report(root: Path, n: int = 96, seed: int = 0, steps: int = 20) -> list[dict]:
    """JSON rows: evaluator accuracy, then prompt following on held-out and on seen combinations."""
    torch.set_num_threads(1)
    ev = load_evaluator(root)
    pipe = load_pipeline(root / "model")
    rows: list[dict] = [{"evaluator": evaluator_accuracy(ev, pipe.vae)}]
    for name, targets in (("held-out", held_out_targets()), ("seen", seen_targets())):
        pf = prompt_following(pipe, ev, targets, n, seed, steps)
        rows += [{"set": name, **r} for r in pf]
        rows.append({"set": name, "summary": summarise(pf), "prompts": len(pf), "images_per_prompt": n, "steps": steps, "guidance": GUIDANCE})
    return rows
