"""The optimizer of the new vectors and the learning-rate schedule.

Schedules are diffusers' ``get_scheduler`` schedules by name, as a pure function of the step (the
lr of optimisation step s, counting from 0, is what diffusers' LambdaLR gives before its s-th
``scheduler.step()``):

- ``constant``: the base rate; it ignores warm-up, as diffusers' does;
- ``constant_with_warmup``: s/W during the first W steps, then the base rate;
- ``linear``: s/W, then down to 0 at the last step: (T - s) / (T - W);
- ``cosine``: s/W, then half a cosine wave: 0.5 (1 + cos(pi (s - W) / (T - W))).

Weight decay is decoupled for every optimizer (Loshchilov & Hutter, AdamW's): each step first
scales the vectors by ``1 - lr x weightDecay``. So ``adam`` with a weight decay is AdamW, not Adam
with an L2 term (which Adam's per-coordinate scaling would weaken where gradients are large);
``sgd`` without momentum is the same update either way.
"""

from __future__ import annotations

import math

import torch

from .errors import ConfigError

SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine")


def lr_at(step: int, base: float, schedule: str, warmup: int, total: int) -> float:
    """Learning rate of optimisation step `step` (0-based), as diffusers' schedule of that name."""
    if schedule == "constant":
        return base
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown lrScheduler {schedule!r}; use one of {', '.join(SCHEDULES)}")
    if step < warmup:
        return base * step / max(1, warmup)
    if schedule == "constant_with_warmup":
        return base
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return base * max(0.0, (total - step) / max(1, total - warmup))
    return base * max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def build_optimizer(name: str, params: list[torch.Tensor], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """adam | adamw | sgd over `params`, with decoupled weight decay (see the module doc)."""
    if name in ("adam", "adamw"):
        # AdamW with weight_decay 0 is Adam exactly; with a decay it is Adam + decoupled decay.
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        # Plain SGD: torch's coupled decay, p -= lr (g + wd p), IS p *= 1 - lr wd, then p -= lr g.
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    raise ConfigError(f"unknown optimizer {name!r}; use adam, adamw or sgd")
