"""The rendering engine: a base model plus learned concepts on one device, rendering batches.

ONE denoising loop for everything tinv renders -- grids (:mod:`.generate`), the notebook API
(:mod:`.pipeline`), ``tinv reproduce`` and the trainer's validation images:

- prompts are tokenised by :class:`tinv.trainer.tokens.ConceptVocab` (concept tokens found on
  token boundaries, each spliced in as its learned vectors through a
  :class:`tinv.trainer.tokens.TIEmbedding` with the same offset the trainer uses -- so a concept
  renders exactly as it was learned, also on models whose embedding table is padded);
- classifier-free guidance runs negative and positive prompts in ONE UNet forward pass of 2B
  samples; each image may have its own guidance scale (g <= 1 means no guidance for that image,
  as in diffusers);
- every image has its own CPU ``torch.Generator`` seeded with the image's seed, for its initial
  noise and any noise a scheduler draws, so an image's pixels do not depend on the rest of its
  batch beyond the kernels the batch shape selects; the batch shape is recorded in each PNG and
  :func:`reproduce` renders the image in a batch of the same shape;
- the VAE decodes the whole batch at once (or ``vae_batch`` at a time); attention is PyTorch SDPA;
  bf16/fp16 on GPUs (latents and scheduler math stay fp32; a VAE that asks for it -- SDXL's,
  ``force_upcast`` -- decodes in fp32 rather than fp16); optional ``torch.compile``, channels-last
  and fused QKV projections on CUDA;
- SDXL (:mod:`.sdxl`): concepts hold vectors for both text encoders, each installed in its
  encoder; the UNet gets SDXL's conditioning (both encoders' penultimate states, the pooled
  projection, time ids of the image size) and empty negative prompts are zeros, as in diffusers'
  StableDiffusionXLPipeline.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from tinv.api import storage as api_storage

from . import concepts as concepts_mod
from . import models, pngmeta
from .errors import ConfigError
from .grid import Request, check_scheduler, plan_batches
from .runtime import device_name, dtype_name, hf_token, pick_device, pick_dtype, version
from .tokens import ConceptTokens, ConceptVocab, TIEmbedding, install_all

log = logging.getLogger("tinv.trainer")


# ---------------------------------------------------------------------------- schedulers


# tinv's scheduler names (tinv.api.models.SchedulerName) -> diffusers classes and their options.
SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm-solver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpm-solver++-karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
}


def make_scheduler(name: str, config):
    """A fresh inference scheduler by tinv name, from a model's config (one per batch: multistep
    solvers keep state).

    diffusers' LMS computes its coefficients with scipy; without scipy installed, tinv uses the
    same class with exact Gauss-Legendre quadrature (the integrand is a polynomial of degree < 4).
    """
    import diffusers

    check_scheduler(name)
    if name == "lms" and not _has_scipy():
        return _lms_class().from_config(dict(config))
    cls_name, extra = SCHEDULERS[name]
    return getattr(diffusers, cls_name).from_config(dict(config), **extra)


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
        vocab: ConceptVocab | None = None,
    ):
        """`vocab`: render with the vocabulary and token layer already installed in the bundle's text
        encoder -- the trainer's, whose vectors are being learned (its modules stay where training
        placed them, trainable vectors included); `concepts` are then ignored."""
        self.bundle = bundle
        self.device = device if isinstance(device, torch.device) else pick_device(device)
        self.dtype = precision if isinstance(precision, torch.dtype) else pick_dtype(precision, self.device)
        self.compiled = bool(compile)
        self.optimized = (self.device.type == "cuda") if optimize is None else bool(optimize)
        self.vae_batch = int(vae_batch) if vae_batch else None
        self.model_info = model_info or {"source": bundle.source}
        self.sched_config = scheduler_config(bundle)
        self.vae_scale = bundle.vae_scale
        # fp16 overflows in SDXL's VAE (its config says force_upcast): it decodes in fp32 then; bf16 is safe.
        upcast = bool(getattr(bundle.vae.config, "force_upcast", False)) and self.dtype == torch.float16
        self.vae_dtype = torch.float32 if upcast else self.dtype
        self.native_size = int(bundle.unet.config.sample_size) * self.vae_scale
        self.text_encoder = bundle.text_encoder
        self.tokenizer = bundle.tokenizer
        self.encoders = [s.encoder for s in bundle.text]  # SDXL: both, in the order of their vectors' columns
        if vocab is not None:  # the trainer's own vocabulary and layer, already in place
            self.concepts = []
            self.vocab = vocab
            self._embeddings = [e.get_input_embeddings() for e in self.encoders]
        else:
            self.concepts = list(concepts or [])
            concepts_mod.check_against(self.concepts, self.text_encoder, bundle.family, bundle.widths)
            bases = [e.get_input_embeddings() for e in self.encoders]
            bases = [b.base if isinstance(b, TIEmbedding) else b for b in bases]
            # Tokens: refuses words of the vocabulary and clashing tokens with clear messages.
            # Placeholder ids start past the embedding table, which may have more rows than the
            # tokenizer has words (a padded table): the trainer's rule, so ids never hit padding rows.
            self.vocab = ConceptVocab(self.tokenizer, [(c.token, "", int(c.vectors.shape[0])) for c in self.concepts],
                                      table_size=max(b.num_embeddings for b in bases))
            self._place_modules()
            # This engine's token tables: each encoder's own embedding plus the concepts' rows. Engines
            # sharing one bundle (ConceptPipeline.with_concepts) each re-attach theirs before encoding.
            if self.concepts:
                install_all(self.encoders, torch.cat([c.vectors for c in self.concepts], 0), offset=self.vocab.base_size)
            else:
                for e, b in zip(self.encoders, bases):
                    e.set_input_embeddings(b)
            self._embeddings = [e.get_input_embeddings() for e in self.encoders]
        self._unet_call = self.bundle.unet
        if self.compiled:
            self._unet_call = torch.compile(self.bundle.unet, fullgraph=False, dynamic=False)
            self._vae_decode = torch.compile(self.bundle.vae.decode, fullgraph=False, dynamic=False)
        else:
            self._vae_decode = self.bundle.vae.decode

    # ------------------------------------------------------------------ set-up
    def _place_modules(self) -> None:
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet, vae = self.bundle.unet, self.bundle.vae
        for m in (unet, vae, *self.encoders):
            m.eval()
            m.requires_grad_(False)
            dtype = self.vae_dtype if m is vae else self.dtype
            p = next(m.parameters())
            if p.device != self.device or p.dtype != dtype:
                with _quiet_diffusers():
                    m.to(self.device, dtype)
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
            "format": pngmeta.IMAGE_FORMAT,
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
            "precision": dtype_name(self.dtype),
            "device": device_name(self.device),
            "batch": {"size": r.batch_size, "index": r.batch_index, "cfg": r.cfg, "vae_batch": self.vae_batch,
                      "compiled": self.compiled, "optimized": self.optimized},
            "tinv_version": version(),
        }
        doc["key"] = pngmeta.params_key(doc)
        if extra:
            doc.update(extra)
        return doc

    # ------------------------------------------------------------------ rendering
    def _noise_shape(self, q: Request) -> tuple[int, int, int, int]:
        if q.width % self.vae_scale or q.height % self.vae_scale:
            raise ConfigError(f"size {q.width}x{q.height}: width and height must be multiples of {self.vae_scale}")
        return (1, int(self.bundle.unet.config.in_channels), q.height // self.vae_scale, q.width // self.vae_scale)

    def _attach(self) -> None:
        for enc, layer in zip(self.encoders, self._embeddings):
            if enc.get_input_embeddings() is not layer:
                enc.set_input_embeddings(layer)

    @torch.inference_mode()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """The UNet's encoder_hidden_states for these prompts (SDXL: both encoders', concatenated)."""
        self._attach()
        return self.bundle.encode(self.vocab, prompts)[0]

    @torch.inference_mode()
    def condition(self, negatives: list[str], prompts: list[str], cfg: bool, size: tuple[int, int]) -> tuple[torch.Tensor, dict]:
        """(encoder_hidden_states, extra UNet kwargs) of a batch: negatives then prompts when guided."""
        self._attach()
        if self.bundle.family == "sdxl":
            from . import sdxl

            return sdxl.render_conditioning(self.bundle, self.vocab, negatives, prompts, size, cfg, self.dtype)
        return self.encode((negatives + prompts) if cfg else prompts), {}

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
        emb, extra = self.condition([q.negative_prompt or "" for q in requests], prompts, use_cfg, (q0.height, q0.width))
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
            out = self._unet_call(x, t, encoder_hidden_states=emb, return_dict=False, **extra)[0].float()
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
            zi = z[i : i + chunk].to(next(vae.parameters()).dtype).contiguous(memory_format=mf)
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
    vae: str | None = None,
) -> Engine:
    """Load the base model (any spec.model.source form; `vae`: spec.model.vae) and the concepts; build an engine."""
    store = store or api_storage.Store()
    loaded = concepts_mod.load_all(refs, store=store, storage_uri=storage_uri, namespace=namespace)
    bundle = models.load(model, revision=revision, variant=variant, token=hf_token(), store=store, vae=vae)
    source = model
    if "://" not in model and not model.startswith("builtin:") and Path(model).exists():
        source = str(Path(model).resolve())
    info = {"source": source, "revision": revision, "variant": variant, **({"vae": vae} if vae else {})}
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
            optimize=b.get("optimized"), vae_batch=b.get("vae_batch"), vae=m.get("vae"),
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


