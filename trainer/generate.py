"""Generation: one engine for the notebook API and for ``tinv generate`` grids.

The engine (:class:`Engine`) renders batches of images with learned concepts:

- prompts are tokenised by :class:`tinv.trainer.tokens.ConceptVocab` (concept tokens found on token
  boundaries, each spliced in as its learned vectors through a :class:`tinv.trainer.tokens.TIEmbedding`
  -- the same code path training uses, so a concept renders exactly as it was learned);
- classifier-free guidance runs negative and positive prompts in ONE UNet forward pass of 2B
  samples; each image may have its own guidance scale (g <= 1 means no guidance for that image,
  as in diffusers);
- every image has its own ``torch.Generator`` (CPU, seeded with the image's seed) for its initial
  noise and for any noise a scheduler draws while stepping, so an image's pixels do not depend on
  the other images of its batch beyond the kernels the batch shape selects. The batch shape is
  recorded in each PNG, and :func:`reproduce` renders the image in a batch of the same shape:
  same seed -> same pixels on the same device;
- the VAE decodes the whole batch at once (or in chunks of ``vae_batch``); attention is
  PyTorch SDPA; bf16/fp16 on GPUs (latents and scheduler math stay fp32); optional
  ``torch.compile``, channels-last and fused QKV projections on CUDA.

The grid (:func:`expand`, :func:`shard`, :func:`plan_batches`, :func:`run_grid`):

- the stable order is prompt, size, scheduler, steps, guidance scale, seed, image in cell;
- shard i of n takes images greedily by cost (steps x pixels x UNet passes) in that order, each to
  the least-loaded shard (ties: the lowest shard) -- round-robin when costs are equal; every image
  lands in exactly one shard for any n;
- a shard groups its images by (size, steps, scheduler) and renders them ``batchSize`` at a time;
  PNG encoding and upload run on background threads while the next batch renders;
- output: ``<run root>/images/<name>.png`` with JSON metadata (tEXt ``tinv``) and an AUTOMATIC1111
  style ``parameters`` text; ``progress.json`` at the run root (aggregated over the shards' files in
  ``shards/``); TensorBoard image summaries in ``tensorboard/``; when every image exists, the gallery
  (:mod:`tinv.trainer.gallery`): ``images/index.json``, contact sheets, ``images/index.html``;
- re-running skips every image whose PNG exists, decodes and carries the same parameters key.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import hashlib
import inspect
import io
import json
import logging
import os
import re
import signal
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from tinv.api import storage as api_storage

from . import concepts as concepts_mod
from . import models
from .errors import EXIT_PREEMPTED, ConfigError, TinvError

log = logging.getLogger("tinv.trainer")

IMAGE_FORMAT = "tinv.image/v1"
PNG_KEY = "tinv"
SCHEDULER_NAMES = tuple(models.SCHEDULERS)
SHARDS_DIR = "shards"


class Preempted(TinvError):
    """SIGTERM/SIGINT arrived: the images of the current batch were written, then the shard stopped."""

    exit_code = EXIT_PREEMPTED
    reason = "Preempted"


def tinv_version() -> str:
    try:
        from importlib.metadata import version

        return version("tinv")
    except Exception:  # noqa: BLE001
        from . import __version__

        return __version__


# ---------------------------------------------------------------------------- requests


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


def _axis_values(spec) -> dict[str, list]:
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
    axes = _axis_values(spec)
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
    import heapq

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


# ---------------------------------------------------------------------------- devices


def pick_device(requested: str | None = None) -> torch.device:
    if requested:
        d = torch.device(requested)
        if d.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {requested!r} was asked for, but no CUDA GPU is visible")
        return d
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def pick_dtype(precision: str, device: torch.device) -> torch.dtype:
    precision = precision or "auto"
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if precision == "fp16" and device.type == "cpu":
        raise ConfigError("precision fp16 needs a GPU; use fp32 (or bf16) on a CPU")
    try:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    except KeyError:
        raise ConfigError(f"unknown precision {precision!r}: use auto, bf16, fp16 or fp32") from None


DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


def check_scheduler(name: str) -> str:
    if name not in models.SCHEDULERS:
        raise ConfigError(f"unknown scheduler {name!r}: choose one of {', '.join(SCHEDULER_NAMES)}")
    return name


def make_scheduler(name: str, config):
    """A fresh inference scheduler by tinv name (one per batch: multistep solvers keep state).

    diffusers' LMS computes its coefficients with scipy; without scipy installed, tinv uses the
    same class with exact Gauss-Legendre quadrature (the integrand is a polynomial of degree < 4).
    """
    check_scheduler(name)
    if name == "lms" and not _has_scipy():
        return _lms_class().from_config(dict(config))
    return models.make_scheduler(name, config)


def _has_scipy() -> bool:
    import importlib.util

    return importlib.util.find_spec("scipy") is not None


_LMS = None


def _lms_class():
    global _LMS
    if _LMS is None:
        from diffusers.schedulers.scheduling_lms_discrete import LMSDiscreteScheduler

        nodes, weights = np.polynomial.legendre.leggauss(8)  # exact for polynomials up to degree 15

        class LMSDiscreteScheduler_(LMSDiscreteScheduler):  # noqa: N801 - diffusers' name, plus '_'
            def get_lms_coefficient(self, order: int, t: int, current_order: int) -> float:
                sig = [float(x) for x in self.sigmas]
                a, b = sig[t], sig[t + 1]
                taus = (b - a) / 2 * nodes + (a + b) / 2
                vals = np.ones_like(taus)
                for k in range(order):
                    if k != current_order:
                        vals *= (taus - sig[t - k]) / (sig[t - current_order] - sig[t - k])
                return float((b - a) / 2 * np.sum(weights * vals))

        _LMS = LMSDiscreteScheduler_
    return _LMS


def scheduler_config(bundle) -> dict:
    """The model's own scheduler config (the raw file for a folder, so keys such as
    set_alpha_to_one survive), else its training scheduler's config."""
    if getattr(bundle, "path", None):
        p = Path(bundle.path) / "scheduler" / "scheduler_config.json"
        if p.is_file():
            try:
                return json.loads(p.read_text())
            except ValueError:
                pass
    return dict(bundle.scheduler.config)


# ---------------------------------------------------------------------------- the engine


@dataclass
class Rendered:
    """The pixels of one image and how its batch was shaped (for exact reproduction)."""

    request: Request
    pixels: np.ndarray  # HxWx3 uint8
    batch_size: int
    batch_index: int
    cfg: bool
    seconds: float = 0.0


class Engine:
    """A base model plus learned concepts on one device, rendering batches of images."""

    def __init__(
        self,
        bundle,
        concepts: list[concepts_mod.Concept] | None = None,
        *,
        device: str | torch.device | None = None,
        precision: str = "auto",
        compile: bool = False,
        optimize: bool | None = None,
        vae_batch: int | None = None,
        model_info: dict | None = None,
    ):
        from .tokens import ConceptVocab, TIEmbedding, install

        self.bundle = bundle
        self.device = device if isinstance(device, torch.device) else pick_device(device)
        self.dtype = pick_dtype(precision, self.device)
        self.compiled = bool(compile)
        self.optimized = (self.device.type == "cuda") if optimize is None else bool(optimize)
        self.vae_batch = int(vae_batch) if vae_batch else None
        self.model_info = model_info or {"source": bundle.source}
        self.sched_config = scheduler_config(bundle)
        self.vae_scale = bundle.vae_scale
        self.native_size = int(bundle.unet.config.sample_size) * self.vae_scale
        self.concepts = list(concepts or [])
        self.text_encoder = bundle.text_encoder
        self.tokenizer = bundle.tokenizer
        concepts_mod.check_against(self.concepts, self.text_encoder)
        # Tokens: refuses words of the vocabulary and clashing tokens with clear messages.
        self.vocab = ConceptVocab(self.tokenizer, [(c.token, "", int(c.vectors.shape[0])) for c in self.concepts])
        self._place_modules()
        # This engine's token table: the encoder's own embedding plus the concepts' rows. Engines
        # sharing one bundle (ConceptPipeline.with_concepts) each re-attach theirs before encoding.
        current = self.text_encoder.get_input_embeddings()
        base = current.base if isinstance(current, TIEmbedding) else current
        if self.concepts:
            self._embedding = install(self.text_encoder, torch.cat([c.vectors for c in self.concepts], 0))
        else:
            self._embedding = base
            self.text_encoder.set_input_embeddings(base)
        self._unet_call = self.bundle.unet
        if self.compiled:
            self._unet_call = torch.compile(self.bundle.unet, fullgraph=False, dynamic=False)
            self._vae_decode = torch.compile(self.bundle.vae.decode, fullgraph=False, dynamic=False)
        else:
            self._vae_decode = self.bundle.vae.decode

    # ------------------------------------------------------------------ set-up
    def _place_modules(self) -> None:
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet, vae, te = self.bundle.unet, self.bundle.vae, self.text_encoder
        for m in (unet, vae, te):
            m.eval()
            m.requires_grad_(False)
            p = next(m.parameters())
            if p.device != self.device or p.dtype != self.dtype:
                with _quiet_diffusers():
                    m.to(self.device, self.dtype)
        # SDPA attention everywhere (diffusers' default on torch 2; made explicit).
        unet.set_attn_processor(AttnProcessor2_0())
        vae.set_attn_processor(AttnProcessor2_0())
        if self.optimized:
            unet.to(memory_format=torch.channels_last)
            vae.to(memory_format=torch.channels_last)
            try:
                unet.fuse_qkv_projections()
                vae.fuse_qkv_projections()
            except Exception as e:  # noqa: BLE001 - older diffusers or unusual attention
                log.debug("fused QKV projections unavailable: %s", e)

    @property
    def tokens(self) -> list[str]:
        return [c.token for c in self.concepts]

    def mentions(self, prompt: str) -> list[str]:
        """Concept tokens a prompt mentions (on token boundaries, as the tokenizer sees them)."""
        from .tokens import ConceptTokens

        return [p.token for p in self.vocab.split(prompt) if isinstance(p, ConceptTokens)]

    def check_prompts(self, prompts: Iterable[str], *, python_warnings: bool = True) -> list[str]:
        """Warnings (not errors): prompts that mention none of the loaded concepts; long prompts.

        Issued as Python warnings (notebooks show them) or, with python_warnings=False, as log lines."""
        out = []
        prompts = list(dict.fromkeys(prompts))
        for p in prompts:
            if self.concepts and not self.mentions(p):
                out.append(
                    f"prompt {p!r} mentions none of the loaded concepts ({', '.join(self.tokens)}): "
                    "it renders with the base model only"
                )
            n = len(self.vocab.ids(p)) + 2
            if n > self.vocab.max_length:
                out.append(f"prompt {p[:60]!r}... is {n} tokens long; the text encoder reads the first {self.vocab.max_length}")
        for w in out:
            if python_warnings:
                warnings.warn(w, UserWarning, stacklevel=3)
            else:
                log.warning("%s", w)
        return out

    def metadata(self, r: Rendered, extra: dict | None = None) -> dict:
        """The JSON stored in the PNG: everything needed to render the image again."""
        q = r.request
        doc = {
            "format": IMAGE_FORMAT,
            "prompt": q.prompt,
            "negative_prompt": q.negative_prompt,
            "seed": int(q.seed),
            "guidance_scale": float(q.guidance_scale),
            "steps": int(q.steps),
            "scheduler": q.scheduler,
            "width": int(q.width),
            "height": int(q.height),
            "model": self.model_info,
            "embeddings": [c.to_json() for c in self.concepts],
            "precision": DTYPE_NAMES[self.dtype],
            "device": device_name(self.device),
            "batch": {"size": r.batch_size, "index": r.batch_index, "cfg": r.cfg, "vae_batch": self.vae_batch,
                      "compiled": self.compiled, "optimized": self.optimized},
            "tinv_version": tinv_version(),
        }
        doc["key"] = params_key(doc)
        if extra:
            doc.update(extra)
        return doc

    # ------------------------------------------------------------------ rendering
    def _noise_shape(self, q: Request) -> tuple[int, int, int, int]:
        if q.width % self.vae_scale or q.height % self.vae_scale:
            raise ConfigError(f"size {q.width}x{q.height}: width and height must be multiples of {self.vae_scale}")
        return (1, int(self.bundle.unet.config.in_channels), q.height // self.vae_scale, q.width // self.vae_scale)

    @torch.inference_mode()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        if self.text_encoder.get_input_embeddings() is not self._embedding:
            self.text_encoder.set_input_embeddings(self._embedding)
        ids = self.vocab.batch(prompts).to(self.device)
        return self.text_encoder(ids)[0]

    @torch.inference_mode()
    def render(self, requests: Sequence[Request], *, cfg: bool | None = None) -> list[Rendered]:
        """Render one batch (all requests share size, steps and scheduler)."""
        if not requests:
            return []
        keys = {q.batch_key for q in requests}
        if len(keys) != 1:
            raise ValueError(f"one batch needs one size, step count and scheduler; got {sorted(keys)}")
        q0 = requests[0]
        check_scheduler(q0.scheduler)
        t0 = time.perf_counter()
        B = len(requests)
        dev = self.device
        use_cfg = any(q.guidance_scale > 1 for q in requests) if cfg is None else bool(cfg)
        # Text: negative and positive prompts in one encoder pass.
        prompts = [q.prompt for q in requests]
        if use_cfg:
            emb = self.encode([q.negative_prompt or "" for q in requests] + prompts)
        else:
            emb = self.encode(prompts)
        # Noise: one CPU generator per image (batch-independent, device-independent draws).
        gens = [torch.Generator("cpu").manual_seed(int(q.seed)) for q in requests]
        shape = self._noise_shape(q0)
        latents = torch.cat([torch.randn(shape, generator=g, dtype=torch.float32) for g in gens]).to(dev)
        sched = make_scheduler(q0.scheduler, self.sched_config)
        sched.set_timesteps(int(q0.steps), device=dev)
        latents = latents * sched.init_noise_sigma
        step_kwargs = {}
        params = inspect.signature(sched.step).parameters
        if "generator" in params:
            step_kwargs["generator"] = gens
        gscale = torch.tensor([float(q.guidance_scale) for q in requests], dtype=torch.float32, device=dev).view(B, 1, 1, 1)
        guided = gscale > 1
        mf = torch.channels_last if self.optimized else torch.contiguous_format
        for t in sched.timesteps:
            x = torch.cat([latents, latents]) if use_cfg else latents
            x = sched.scale_model_input(x, t).to(self.dtype).contiguous(memory_format=mf)
            out = self._unet_call(x, t, encoder_hidden_states=emb, return_dict=False)[0].float()
            if use_cfg:
                uncond, cond = out.chunk(2)
                out = torch.where(guided, uncond + gscale * (cond - uncond), cond)
            latents = sched.step(out, t, latents, return_dict=False, **step_kwargs)[0]
        pixels = self.decode(latents)
        dt = time.perf_counter() - t0
        return [Rendered(q, pixels[i], B, i, use_cfg, dt / B) for i, q in enumerate(requests)]

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Latents -> [B, H, W, 3] uint8 (the VAE decodes the whole batch, or vae_batch at a time)."""
        vae = self.bundle.vae
        sf = float(vae.config.scaling_factor)
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        z = latents / sf + shift
        chunk = self.vae_batch or z.shape[0]
        mf = torch.channels_last if self.optimized else torch.contiguous_format
        outs = []
        for i in range(0, z.shape[0], chunk):
            zi = z[i : i + chunk].to(self.dtype).contiguous(memory_format=mf)
            img = self._vae_decode(zi, return_dict=False)[0]
            img = (img.float() / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8)
            outs.append(img.permute(0, 2, 3, 1).contiguous().cpu())
        return torch.cat(outs).numpy()

    def render_many(self, requests: Sequence[Request], batch_size: int = 8) -> list[Rendered]:
        """Any requests, batched by shape; results in the order of the requests."""
        results: list[Rendered | None] = [None] * len(requests)
        wrapped = [_Tagged(q, i) for i, q in enumerate(requests)]
        for batch in plan_batches(wrapped, batch_size):
            for tag, r in zip(batch, self.render([t.q for t in batch])):
                results[tag.i] = r
        return results  # type: ignore[return-value]


class _quiet_diffusers:
    """diffusers warns on every dtype cast of a model built in code; nothing to act on here."""

    def __enter__(self):
        from diffusers.utils import logging as dlog

        self.level = dlog.get_verbosity()
        dlog.set_verbosity_error()

    def __exit__(self, *exc):
        from diffusers.utils import logging as dlog

        dlog.set_verbosity(self.level)


@dataclass(frozen=True)
class _Tagged:
    q: Request
    i: int

    @property
    def batch_key(self):
        return self.q.batch_key


# ---------------------------------------------------------------------------- PNG metadata


def params_key(meta: dict) -> str:
    """Hash of everything that decides the pixels (not of where the image is written)."""
    keep = {
        "prompt": meta["prompt"],
        "negative_prompt": meta["negative_prompt"],
        "seed": meta["seed"],
        "guidance_scale": meta["guidance_scale"],
        "steps": meta["steps"],
        "scheduler": meta["scheduler"],
        "width": meta["width"],
        "height": meta["height"],
        "model": {k: meta["model"].get(k) for k in ("source", "revision", "variant")},
        "embeddings": [(e["token"], e["sha256"]) for e in meta["embeddings"]],
        "precision": meta["precision"],
    }
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


_SAMPLER_LABELS = {
    "ddim": "DDIM", "ddpm": "DDPM", "pndm": "PLMS", "lms": "LMS", "euler": "Euler", "euler-ancestral": "Euler a",
    "heun": "Heun", "dpm-solver++": "DPM++ 2M", "dpm-solver++-karras": "DPM++ 2M Karras", "unipc": "UniPC",
}


def a1111_parameters(meta: dict) -> str:
    """The AUTOMATIC1111 'parameters' text many image tools show."""
    lines = [meta["prompt"]]
    if meta.get("negative_prompt"):
        lines.append(f"Negative prompt: {meta['negative_prompt']}")
    tokens = ", ".join(e["token"] for e in meta.get("embeddings", []))
    extra = f", TI: {tokens}" if tokens else ""
    lines.append(
        f"Steps: {meta['steps']}, Sampler: {_SAMPLER_LABELS.get(meta['scheduler'], meta['scheduler'])}, "
        f"CFG scale: {meta['guidance_scale']:g}, Seed: {meta['seed']}, Size: {meta['width']}x{meta['height']}, "
        f"Model: {meta['model'].get('source')}{extra}, Version: tinv {meta.get('tinv_version', '')}"
    )
    return "\n".join(lines)


def encode_png(pixels: np.ndarray, meta: dict, compress_level: int = 4) -> bytes:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(PNG_KEY, json.dumps(meta, sort_keys=True))
    info.add_text("parameters", a1111_parameters(meta))
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="PNG", pnginfo=info, compress_level=compress_level)
    return buf.getvalue()


def read_png_metadata(data: bytes | str | Path) -> dict:
    """The tinv JSON of a PNG (bytes or a local path); ConfigError if it has none."""
    from PIL import Image

    if not isinstance(data, (bytes, bytearray)):
        data = Path(data).read_bytes()
    try:
        img = Image.open(io.BytesIO(data))
        text = getattr(img, "text", None) or img.info
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"not a readable PNG image: {e}") from e
    raw = text.get(PNG_KEY)
    if not raw:
        raise ConfigError("this PNG has no tinv metadata (a 'tinv' text chunk): it was not written by tinv generate")
    return json.loads(raw)


def decode_png(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def png_complete(data: bytes, key: str | None = None) -> bool:
    """True when the bytes are a whole, decodable PNG (and carry the parameters key, if given)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            text = dict(getattr(img, "text", {}) or {})
            img.load()  # decodes every row; a truncated file raises
        if key is None:
            return True
        return json.loads(text.get(PNG_KEY, "{}")).get("key") == key
    except Exception:  # noqa: BLE001
        return False


def put(store: api_storage.Store, uri: str, data: bytes, content_type: str | None = None) -> None:
    """Write an object; on S3 with a Content-Type, so browsers show PNGs and HTML from the bucket."""
    store.write_bytes(uri, data, content_type=content_type)


# ---------------------------------------------------------------------------- building engines


def load_engine(
    model: str,
    refs: Iterable[Any] = (),
    *,
    revision: str | None = None,
    variant: str | None = None,
    device: str | None = None,
    precision: str = "auto",
    storage_uri: str | None = None,
    namespace: str | None = None,
    store: api_storage.Store | None = None,
    compile: bool = False,
    optimize: bool | None = None,
    vae_batch: int | None = None,
) -> Engine:
    """Load the base model (any spec.model.source form) and the concepts; build an engine."""
    store = store or api_storage.Store()
    loaded = concepts_mod.load_all(refs, store=store, storage_uri=storage_uri, namespace=namespace)
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    bundle = models.load(model, revision=revision, variant=variant, token=token, store=store)
    source = model
    if "://" not in model and not model.startswith("builtin:") and Path(model).exists():
        source = str(Path(model).resolve())
    info = {"source": source, "revision": revision, "variant": variant}
    return Engine(bundle, loaded, device=device, precision=precision, compile=compile, optimize=optimize,
                  vae_batch=vae_batch, model_info=info)


# ---------------------------------------------------------------------------- reproduce


def reproduce(meta: dict, *, engine: Engine | None = None, device: str | None = None, single: bool = False,
              store: api_storage.Store | None = None) -> tuple[np.ndarray, dict]:
    """Render an image again from its metadata: (pixels, metadata of the new render).

    The image is rendered in a batch of the recorded shape (copies of itself), so the same kernels
    run and the pixels match on the same device; ``single=True`` renders it alone instead.
    """
    for k in ("prompt", "seed", "guidance_scale", "steps", "scheduler", "width", "height", "model"):
        if k not in meta:
            raise ConfigError(f"the image metadata lacks {k!r}; it cannot be reproduced")
    b = meta.get("batch") or {}
    if engine is None:
        refs = [concepts_mod.ConceptRef(uri=e["uri"], token=e["token"], checkpoint=e.get("checkpoint") or "latest")
                for e in meta.get("embeddings", [])]
        m = meta["model"]
        engine = load_engine(
            m["source"], _group_refs(refs), revision=m.get("revision"), variant=m.get("variant"), device=device,
            precision=meta.get("precision", "auto"), store=store, compile=bool(b.get("compiled")) and not single,
            optimize=b.get("optimized"), vae_batch=b.get("vae_batch"),
        )
    want = {e["token"]: e.get("sha256") for e in meta.get("embeddings", [])}
    have = {c.token: c.sha256 for c in engine.concepts}
    for tok, sha in want.items():
        if tok not in have:
            raise ConfigError(f"the image used concept {tok!r}, which the engine has not loaded")
        if sha and have[tok] != sha:
            raise ConfigError(
                f"concept {tok!r} at {next(c.uri for c in engine.concepts if c.token == tok)} is not the one the image was made "
                "with (its vectors changed: a newer checkpoint?); the image cannot be reproduced exactly"
            )
    q = Request(prompt=meta["prompt"], negative_prompt=meta.get("negative_prompt", ""), seed=int(meta["seed"]),
                guidance_scale=float(meta["guidance_scale"]), steps=int(meta["steps"]), scheduler=meta["scheduler"],
                width=int(meta["width"]), height=int(meta["height"]))
    if single or not b:
        r = engine.render([q])[0]
    else:
        size, index = int(b.get("size", 1)), int(b.get("index", 0))
        r = engine.render([q] * size, cfg=b.get("cfg"))[index]
        r = dataclasses.replace(r, batch_size=size, batch_index=index)
    new = engine.metadata(r, {k: meta[k] for k in ("grid",) if k in meta})
    return r.pixels, new


def _group_refs(refs: list) -> list:
    """Several tokens read from the same multi-concept file: load that file once."""
    by_uri: dict[str, list] = {}
    for r in refs:
        by_uri.setdefault(r.uri, []).append(r)
    out = []
    for uri, rs in by_uri.items():
        out += [concepts_mod.ConceptRef(uri=uri)] if len(rs) > 1 else rs
    return out


# ---------------------------------------------------------------------------- grids


@dataclass
class GridOptions:
    """Run options that are not part of the spec (CLI flags / env)."""

    shard: tuple[int, int] | None = None  # (i, n); default: JOB_COMPLETION_INDEX / workers, else 0/1
    device: str | None = None
    precision: str | None = None  # overrides spec.precision
    batch_size: int | None = None  # overrides spec.batchSize
    model: str | None = None  # overrides spec.model.source
    storage: str | None = None  # overrides spec.storage.uri
    compile: bool = False
    vae_batch: int | None = None
    tensorboard: bool = True
    gallery: bool = True
    force: bool = False  # re-render images that already exist
    writers: int = 4  # PNG encode/upload threads
    progress_bar: bool | None = None
    stop_after_batches: int | None = None  # behave as if SIGTERM arrived after this many batches (tests)
    progress_interval: float = float(os.environ.get("TINV_PROGRESS_MIN_INTERVAL", "2"))


@dataclass
class GridResult:
    root: str
    images_uri: str
    shard: tuple[int, int]
    images_total: int  # the whole grid
    shard_total: int  # this shard's images
    rendered: int
    skipped: int
    seconds: float
    images_per_second: float | None
    gallery_uri: str | None = None
    index_uri: str | None = None
    complete: bool = False  # every image of the grid exists
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "state": "succeeded",
            "images_total": self.images_total,
            "shard": f"{self.shard[0]}/{self.shard[1]}",
            "shard_images": self.shard_total,
            "rendered": self.rendered,
            "skipped": self.skipped,
            "images_per_second": self.images_per_second,
            "output_uri": self.images_uri,
            "gallery_uri": self.gallery_uri,
            "index_uri": self.index_uri,
            "complete": self.complete,
        }


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


def _refs_of(grid) -> list:
    """spec.embeddings, with the operator's resolved URIs (status.resolvedEmbeddings) when present."""
    spec_refs = list(grid.spec.embeddings)
    resolved = list(getattr(grid.status, "resolved_embeddings", None) or []) if grid.status else []
    if not resolved:
        return spec_refs
    out = []
    if len(resolved) == len(spec_refs):
        pairs = list(zip(spec_refs, resolved))
    else:
        pairs = []
        pool = list(resolved)
        for e in spec_refs:
            match = next((r for r in pool if (e.job and r.job == e.job) or (e.uri and r.uri == e.uri)), None)
            if match is not None:
                pool.remove(match)
            pairs.append((e, match))
    for e, r in pairs:
        if r is None:
            out.append(e)
        else:
            out.append(concepts_mod.ConceptRef(job=r.job or e.job, checkpoint=r.checkpoint or e.checkpoint, uri=r.uri, token=e.token))
    return out


class _Stop:
    def __init__(self):
        self.signal: int | None = None
        self._old: dict = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:
                pass

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum
        log.warning("signal %d: finishing the current batch, then stopping (re-run to resume)", signum)

    def restore(self) -> None:
        for sig, old in self._old.items():
            try:
                signal.signal(sig, old)
            except ValueError:
                pass
        self._old = {}


class _Progress:
    """This shard's progress file, and progress.json aggregated over every shard's file."""

    def __init__(self, store, root: str, shard: tuple[int, int], grid_total: int, shard_total: int, interval: float, bar: bool | None):
        self.store = store
        self.root = root
        self.i, self.n = shard
        self.grid_total = grid_total
        self.shard_total = shard_total
        self.interval = interval
        self.started = _now()
        self.t0 = time.monotonic()
        self.last = 0.0
        self.done = 0
        self.rendered = 0
        self.render_t0: float | None = None
        self.bar = None
        use_bar = (os.isatty(2) if bar is None else bar)
        if use_bar:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=shard_total, desc=f"tinv generate {self.i}/{self.n}", unit="img", dynamic_ncols=True)
            except Exception:  # noqa: BLE001
                self.bar = None

    @property
    def shard_uri(self) -> str:
        return api_storage.join(self.root, SHARDS_DIR, f"shard-{self.i:03d}-of-{self.n:03d}.json")

    def rate(self) -> float | None:
        if not self.rendered or self.render_t0 is None:
            return None
        dt = time.monotonic() - self.render_t0
        return self.rendered / dt if dt > 0 else None

    def add(self, done: int = 0, rendered: int = 0) -> None:
        """Count images written (`done`, from the writer threads) or rendered; callers hold the lock."""
        if rendered and self.render_t0 is None:
            self.render_t0 = time.monotonic()
        if done:
            self.done += done
        if rendered:
            self.rendered += rendered
        if self.bar is not None:
            self.bar.n = self.done
            r = self.rate()
            if r:
                self.bar.set_postfix({"img/s": f"{r:.2f}"}, refresh=False)
            self.bar.refresh()

    def start_rendering(self) -> None:
        self.render_t0 = time.monotonic()

    def shard_doc(self, state: str, message: str | None = None, stopped: str | None = None) -> dict:
        rate = self.rate()
        left = self.shard_total - self.done
        return {
            "format": "tinv.grid-shard/v1",
            "state": state,
            "stopped": stopped,
            "shard": {"index": self.i, "count": self.n},
            "images_done": self.done,
            "images_total": self.shard_total,
            "images_rendered": self.rendered,
            "images_per_second": rate,
            "eta_seconds": int(left / rate) if rate and state == "running" else (0 if state == "succeeded" else None),
            "started_at": self.started,
            "updated_at": _now(),
            "message": message,
        }

    def write(self, state: str, message: str | None = None, force: bool = False, stopped: str | None = None) -> None:
        now = time.monotonic()
        if not force and now - self.last < self.interval:
            return
        self.last = now
        try:
            doc = self.shard_doc(state, message, stopped)
            put(self.store, self.shard_uri, json.dumps(doc, indent=2).encode(), "application/json")
            put(self.store, api_storage.join(self.root, api_storage.PROGRESS_FILE),
                json.dumps(self.aggregate(doc), indent=2).encode(), "application/json")
        except Exception as e:  # noqa: BLE001 - progress is best effort
            log.warning("cannot write progress: %s", e)

    def aggregate(self, mine: dict) -> dict:
        docs = {}
        suffix = f"-of-{self.n:03d}.json"
        try:
            for uri in self.store.list(api_storage.join(self.root, SHARDS_DIR)):
                if uri.endswith(suffix):
                    try:
                        d = self.store.read_json(uri)
                        docs[int(d["shard"]["index"])] = d
                    except Exception:  # noqa: BLE001 - a shard writing its file right now
                        continue
        except Exception:  # noqa: BLE001
            pass
        docs[self.i] = mine
        done = sum(d.get("images_done", 0) for d in docs.values())
        states = [d.get("state") for d in docs.values()]
        if any(s == "failed" for s in states):
            state = "failed"
        elif len(docs) == self.n and all(s == "succeeded" for s in states):
            state = "succeeded"
        else:
            state = "running"
        live = [d for d in docs.values() if d.get("state") == "running"] or (list(docs.values()) if state == "succeeded" else [])
        rate = sum(d.get("images_per_second") or 0.0 for d in live) or None
        etas = [d.get("eta_seconds") for d in docs.values() if d.get("eta_seconds") is not None]
        pct = int(100 * done / self.grid_total) if self.grid_total else 100
        return {
            "format": "tinv.progress/v1",
            "kind": "GenerationGrid",
            "state": state,
            "phase": {"running": "Running", "succeeded": "Succeeded", "failed": "Failed"}[state],
            "images_done": done,
            "images_total": self.grid_total,
            "images_per_second": rate,
            "eta_seconds": max(etas) if etas and state == "running" else (0 if state == "succeeded" else None),
            "summary": f"{done}/{self.grid_total} ({pct}%)",
            "stopped": mine.get("stopped") if state == "running" else None,
            "message": mine.get("message"),
            "shards": {"count": self.n, "reported": len(docs),
                       "states": {str(k): v.get("state") for k, v in sorted(docs.items())}},
            "started_at": min((d.get("started_at") or self.started) for d in docs.values()),
            "updated_at": _now(),
        }

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class _TensorBoard:
    """Image summaries of a shard under <root>/tensorboard/generate-<i>-of-<n>/ (staged for S3)."""

    def __init__(self, store, root: str, shard: tuple[int, int]):
        self.store = store
        self.remote = api_storage.join(root, api_storage.TENSORBOARD_DIR, f"generate-{shard[0]:03d}-of-{shard[1]:03d}")
        self.writer = None
        self.staged: Path | None = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception as e:  # noqa: BLE001
            log.warning("TensorBoard summaries disabled: %s", e)
            return
        if api_storage.is_s3(self.remote):
            self.staged = Path(tempfile.mkdtemp(prefix="tinv-tb-"))
            logdir = self.staged
        else:
            logdir = api_storage.local_path(self.remote)
            logdir.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(log_dir=str(logdir), flush_secs=30)

    def image(self, img: GridImage, pixels: np.ndarray) -> None:
        if self.writer is None:
            return
        tag = f"p{img.prompt_index:03d} {img.prompt[:80]}/{img.scheduler} {img.steps} steps {img.width}x{img.height} guidance {img.guidance_scale:g}"
        if max(pixels.shape[:2]) > 512:  # keep event files small: at most 512 px
            from PIL import Image

            im = Image.fromarray(pixels)
            im.thumbnail((512, 512))
            pixels = np.asarray(im)
        self.writer.add_image(tag, pixels, global_step=img.seed, dataformats="HWC")

    def scalar(self, name: str, value: float, step: int) -> None:
        if self.writer is not None and value is not None:
            self.writer.add_scalar(name, value, step)

    def sync(self) -> None:
        if self.writer is None:
            return
        self.writer.flush()
        if self.staged is not None:
            for f in self.staged.rglob("*"):
                if f.is_file():
                    try:
                        self.store.upload_file(api_storage.join(self.remote, f.relative_to(self.staged).as_posix()), f)
                    except Exception as e:  # noqa: BLE001
                        log.warning("cannot upload TensorBoard file %s: %s", f, e)

    def close(self) -> None:
        if self.writer is not None:
            self.sync()
            self.writer.close()
            self.writer = None
        if self.staged is not None:
            import shutil

            shutil.rmtree(self.staged, ignore_errors=True)


def _now() -> str:
    import datetime as _dt

    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def existing_images(store: api_storage.Store, images_uri: str, wanted: dict[str, str], workers: int = 8) -> set[str]:
    """File names (of `wanted`: name -> params key) that exist, decode and carry that key."""
    present = {u.rsplit("/", 1)[-1] for u in store.list(images_uri) if u.endswith(".png")}
    todo = [n for n in wanted if n in present]

    def ok(name: str) -> bool:
        try:
            return png_complete(store.read_bytes(api_storage.join(images_uri, name)), wanted[name])
        except Exception:  # noqa: BLE001
            return False

    with cf.ThreadPoolExecutor(max_workers=max(1, workers)) as ex:
        flags = list(ex.map(ok, todo))
    return {n for n, f in zip(todo, flags) if f}


def run_grid(grid, opts: GridOptions | None = None, *, engine: Engine | None = None) -> GridResult:
    """Render one shard of a GenerationGrid into its storage (see the module doc)."""
    from . import gallery

    opts = opts or GridOptions()
    spec = grid.spec
    images = expand(spec)
    i, n = shard_from_env(spec, opts.shard)
    mine = shard(images, i, n)
    root = grid_root(grid, opts.storage)
    images_uri = api_storage.join(root, api_storage.IMAGES_DIR)
    store = api_storage.Store(api_storage.S3Settings.from_spec(spec.storage))
    storage_uri = opts.storage or spec.storage.uri
    batch_size = int(opts.batch_size or spec.batch_size)
    log.info("grid %s: %d images; shard %d/%d renders %d of them into %s", grid.metadata.name, len(images), i, n, len(mine), images_uri)

    if engine is None:
        engine = load_engine(
            opts.model or spec.model.source, _refs_of(grid), revision=spec.model.revision, variant=spec.model.variant,
            device=opts.device, precision=opts.precision or spec.precision, storage_uri=storage_uri,
            namespace=grid.metadata.namespace, store=store, compile=opts.compile, vae_batch=opts.vae_batch,
        )
    warn = engine.check_prompts(spec.prompts, python_warnings=False)
    grid_info = {"name": grid.metadata.name, "namespace": grid.metadata.namespace or "default", "uid": grid.metadata.uid}

    # Which images are already there (resume after pre-emption), by file name and parameters key.
    def meta_for(img: GridImage, r: Rendered) -> dict:
        return engine.metadata(r, {"grid": {**grid_info, "index": img.index, "prompt_index": img.prompt_index,
                                            "seed_base": img.seed_base, "image_in_cell": img.k, "file": img.filename,
                                            "shard": [i, n]}})

    def expected_key(img: GridImage) -> str:
        return engine.metadata(Rendered(img.request(), np.zeros((1, 1, 3), np.uint8), 1, 0, True))["key"]

    keys = {img.filename: expected_key(img) for img in mine}
    done = set() if opts.force else existing_images(store, images_uri, keys)
    todo = [img for img in mine if img.filename not in done]
    if done:
        log.info("shard %d/%d: %d of its %d images already exist and are complete; rendering %d", i, n, len(done), len(mine), len(todo))

    progress = _Progress(store, root, (i, n), len(images), len(mine), opts.progress_interval, opts.progress_bar)
    progress.add(done=len(done))
    progress.write("running", force=True)
    tb = _TensorBoard(store, root, (i, n)) if opts.tensorboard else None
    stop = _Stop()
    stop.install()
    pool = cf.ThreadPoolExecutor(max_workers=max(1, opts.writers), thread_name_prefix="tinv-png")
    pending: list[cf.Future] = []
    t_start = time.monotonic()
    rendered = 0
    lock = threading.Lock()

    def write_one(img: GridImage, r: Rendered) -> None:
        meta = meta_for(img, r)
        put(store, api_storage.join(images_uri, img.filename), encode_png(r.pixels, meta), "image/png")
        with lock:
            progress.add(done=1)

    try:
        batches = plan_batches(todo, batch_size)
        progress.start_rendering()
        for b_i, batch in enumerate(batches):
            results = render_adaptive(engine, [img.request() for img in batch])
            rendered += len(batch)
            with lock:
                progress.add(rendered=len(batch))
            for img, r in zip(batch, results):
                pending.append(pool.submit(write_one, img, r))
                if tb is not None:
                    tb.image(img, r.pixels)
            pending = _reap(pending)
            if tb is not None:
                tb.scalar("generate/images_per_second", progress.rate(), progress.done)
            progress.write("running")
            stopped = stop.signal is not None or (opts.stop_after_batches is not None and b_i + 1 >= opts.stop_after_batches)
            if stopped and b_i + 1 < len(batches):
                _reap(pending, wait=True)
                why = "interrupted" if stop.signal == signal.SIGINT else "preempted"
                progress.write("running", f"{why}: the images written so far are kept; re-run to resume", force=True, stopped=why)
                raise Preempted(f"stopped after {progress.done} of {len(mine)} images of shard {i}/{n} (re-run to resume)")
        _reap(pending, wait=True)
    except BaseException as e:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True)
        if not isinstance(e, Preempted):
            progress.write("failed", f"{type(e).__name__}: {e}", force=True)
        progress.close()
        if tb is not None:
            tb.close()
        stop.restore()
        raise
    pool.shutdown(wait=True)
    seconds = time.monotonic() - t_start
    rate = rendered / seconds if rendered and seconds > 0 else None
    progress.write("succeeded", force=True)
    progress.close()
    if tb is not None:
        tb.close()
    stop.restore()
    result = GridResult(root=root, images_uri=images_uri, shard=(i, n), images_total=len(images), shard_total=len(mine),
                        rendered=rendered, skipped=len(done), seconds=seconds, images_per_second=rate, warnings=warn)
    if opts.gallery:
        built = gallery.build(store, grid, images, images_uri)
        result.gallery_uri, result.index_uri, result.complete = built.gallery_uri, built.index_uri, built.complete
    log.info("shard %d/%d: rendered %d, skipped %d, %.1f s%s", i, n, rendered, len(done), seconds,
             f", {rate:.2f} images/s" if rate else "")
    return result


def render_adaptive(engine: Engine, requests: Sequence[Request]) -> list[Rendered]:
    """engine.render, halving the batch on CUDA out-of-memory (each image's metadata records the
    batch it was really rendered in, so reproduction stays exact)."""
    try:
        return engine.render(requests)
    except torch.cuda.OutOfMemoryError:
        if len(requests) == 1:
            raise
        torch.cuda.empty_cache()
        half = (len(requests) + 1) // 2
        log.warning("CUDA out of memory with a batch of %d images; rendering %d at a time (lower spec.batchSize to skip this)",
                    len(requests), half)
        return render_adaptive(engine, requests[:half]) + render_adaptive(engine, requests[half:])


def _reap(futures: list[cf.Future], wait: bool = False) -> list[cf.Future]:
    """Raise the first write error; keep the unfinished futures (all of them finished if wait)."""
    if wait:
        cf.wait(futures)
    left = []
    for f in futures:
        if f.done():
            f.result()
        else:
            left.append(f)
    return left
