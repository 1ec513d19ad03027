"""The Textual Inversion training loop: one function, :func:`train`, read top to bottom.

What is learned: for each concept, ``n`` new token vectors (one fp32 parameter for all of
them, inside the text encoder's embedding layer -- see :mod:`.tokens`). Everything else (UNet,
VAE, text encoder, the original vocabulary) is frozen and gets no weight gradients.

One optimisation step, with G = batchSize x gradientAccumulation x world size samples:

1. Sample k of the run (a global index) picks its image, flip, template, latent draw,
   noise and timestep from ``(seed, k)`` alone. Rank r of W takes the samples
   ``step*G + r*G/W ... + G/W - 1``, so ranks see different data and draw different noise, and
   the run equals one process with the same global batch (only float summation order differs).
   It also makes resume exact: nothing but the step number is needed to continue the stream.
2. Latents come from a cache: every image (and its mirror image) is VAE-encoded ONCE; each
   step samples ``mean + std * eps`` from the cached distribution (what encoding every step
   does, without the 1.1 TFLOP VAE encoder per sample at 512 px).
3. Per-sample loss: MSE of the UNet's prediction against the noise (epsilon models) or the
   velocity (v-prediction models), averaged over the global batch. The local samples are
   processed in micro-batches as large as memory allows (gradient accumulation is then just a
   statement about the global batch, not a speed penalty); an out-of-memory halves the
   micro-batch and retries the step.
4. Gradients (one small tensor) are all-reduced together with the loss and a stop flag, then
   optional norm regularisation (towards the vocabulary's mean norm) is added and the optimizer
   steps. The learning rate is a pure function of the step (constant/linear/cosine + warm-up),
   scaled by G when ``scaleLr``.

Mixed precision: bf16 autocast with bf16 frozen weights on GPUs that have it, fp16 with a
GradScaler on those that do not, fp32 on CPU (``mixedPrecision`` overrides). Attention is
PyTorch SDPA (diffusers' AttnProcessor2_0, transformers' "sdpa").
"""

from __future__ import annotations

import logging
import math
import os
import random
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from . import checkpoint, data, models, storage, tokens
from .errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_PREEMPTED, ConfigError
from .reporting import Reporter

log = logging.getLogger("tinv.trainer")

__version__ = "0.1.0"


# ---------------------------------------------------------------------------- small helpers


def mix(*xs: int) -> int:
    """A 63-bit hash of integers (splitmix64 steps): independent seeds per (seed, sample, purpose)."""
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = (h ^ (x & 0xFFFFFFFFFFFFFFFF)) & 0xFFFFFFFFFFFFFFFF
        h = (h + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def lr_at(step: int, base: float, schedule: str, warmup: int, total: int) -> float:
    """Learning rate for optimisation step `step` (0-based), as diffusers' schedules define it."""
    if warmup and step < warmup:
        return base * (step + 1) / (warmup + 1)
    if schedule == "constant":
        return base
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return base * max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    raise ConfigError(f"unknown lrScheduler {schedule!r}")


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owned: bool = False  # we initialised the process group, so we tear it down

    @classmethod
    def init(cls, device_kind: str) -> "Dist":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        owned = False
        if not dist.is_initialized():
            backend = "nccl" if device_kind == "cuda" else "gloo"
            if device_kind == "cuda":
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend=backend)
            owned = True
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), owned)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(t)
        return t

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        if self.world == 1:
            return [t]
        import torch.distributed as dist

        out = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(out, t.contiguous())
        return out

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


@dataclass
class Options:
    """Run options that are not part of the spec (CLI flags / env; the operator sets some)."""

    device: str | None = None  # "cpu", "cuda", "cuda:1"; default: cuda if available
    model: str | None = None  # overrides spec.model.source
    storage: str | None = None  # overrides spec.storage.uri
    steps: int | None = None  # overrides training.steps
    micro_batch: int | None = None  # samples per forward pass; default: all local samples of a step
    metrics_port: int | None = None
    termination_path: str | None = None
    auto_resume: bool = True  # continue from this run's own newest checkpoint (operator retries)
    progress_bar: bool | None = None
    validation: bool = True
    stop_at_step: int | None = None  # behave as if SIGTERM arrived after this step (tests)
    compile: bool = False  # torch.compile the UNet (GPU)
    base_dir: str | None = None  # relative image paths are also looked up here (the job file's folder)
    eval_samples: list[int] | None = None  # report the mean loss of these fixed samples before and after


@dataclass
class Result:
    exit_code: int
    phase: str
    step: int
    total_steps: int
    loss: float | None
    run_uri: str
    latest: checkpoint.CheckpointRef | None = None
    message: str | None = None
    embeddings: dict = field(default_factory=dict)
    eval_before: float | None = None  # mean loss of Options.eval_samples at the start / end
    eval_after: float | None = None
    throughput: float | None = None  # samples/s over the steps after the first 3 (no checkpoints or validation inside)

    def summary(self) -> dict:
        """The termination-message JSON (see :mod:`.reporting`)."""
        return {
            "state": "succeeded" if self.phase == "Succeeded" else "running",
            "exit_code": self.exit_code,
            "reason": {"Succeeded": "Completed"}.get(self.phase, self.phase),
            "message": self.message,
            "step": self.step,
            "total_steps": self.total_steps,
            "loss": self.loss,
            "latest_checkpoint": (
                {"uuid": self.latest.uuid, "step": self.latest.step, "uri": self.latest.uri} if self.latest else None
            ),
            "output_uri": self.run_uri,
        }


class StopFlag:
    """SIGTERM/SIGINT set a flag; the loop checkpoints at the next step boundary and exits."""

    def __init__(self):
        self.signal: int | None = None
        self._old = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. embedded use)
                pass

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signal = signum
        log.warning("received %s: finishing this step, writing a checkpoint, then exiting", signal.Signals(signum).name)

    def restore(self) -> None:
        for sig, old in self._old.items():
            try:
                signal.signal(sig, old)
            except (ValueError, TypeError):
                pass


# ---------------------------------------------------------------------------- the sample stream


class Stream:
    """Which image/flip/template sample k uses: a pure function of (seed, k).

    Epoch e visits the images in a permutation drawn from (seed, e), like a shuffled
    DataLoader, so every image is seen once per epoch whatever the batch layout.
    """

    def __init__(self, seed: int, ds: data.Dataset, flip_p: float):
        self.seed = seed
        self.n = len(ds)
        self.ds = ds
        self.flip_p = flip_p
        self._perm: dict[int, list[int]] = {}

    def image(self, k: int) -> int:
        epoch, pos = divmod(k, self.n)
        perm = self._perm.get(epoch)
        if perm is None:
            g = torch.Generator().manual_seed(mix(self.seed, epoch, 1))
            perm = torch.randperm(self.n, generator=g).tolist()
            self._perm = {epoch: perm}
        return perm[pos]

    def sample(self, k: int) -> tuple[int, int, str]:
        """(image, flip 0/1, prompt)."""
        img = self.image(k)
        r = random.Random(mix(self.seed, k, 2))
        flip = 1 if r.random() < self.flip_p else 0
        c = self.ds.concept[img]
        template = r.randrange(len(self.ds.templates[c]))
        return img, flip, self.ds.prompt(img, template)


# ---------------------------------------------------------------------------- training


def pick_device(requested: str | None, local_rank: int) -> torch.device:
    if requested:
        d = torch.device(requested)
        if d.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda was asked for, but no CUDA GPU is visible")
        if d.type == "cuda" and d.index is None:
            d = torch.device("cuda", local_rank)
        return d
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def pick_precision(mode: str, device: torch.device) -> torch.dtype:
    mode = {"fp32": "no"}.get(mode, mode)
    if device.type != "cuda":
        if mode == "fp16":
            raise ConfigError("mixedPrecision fp16 needs a CUDA GPU; use bf16 or no on CPU")
        return torch.bfloat16 if mode == "bf16" else torch.float32
    if mode == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}[mode]


def encode_latents(bundle, ds: data.Dataset, device, flips: bool, dist: Dist, chunk: int = 8):
    """(mean, std), each [N, F, C, h, w] fp32 on device, F = 2 with mirror images else 1.

    Each rank encodes a strided shard of the images, then the shards are all-gathered."""
    vae = bundle.vae
    n = len(ds)
    mine = list(range(dist.rank, n, dist.world))
    per = (n + dist.world - 1) // dist.world
    nf = 2 if flips else 1
    h = ds.pixels[0].shape[0] // bundle.vae_scale
    c = vae.config.latent_channels
    mean = torch.zeros(per, nf, c, h, h, device=device)
    std = torch.zeros(per, nf, c, h, h, device=device)
    vdtype = next(vae.parameters()).dtype
    with torch.no_grad():
        for s in range(0, len(mine), chunk):
            idx = mine[s : s + chunk]
            x = data.to_tensor([ds.pixels[i] for i in idx]).to(device, vdtype)
            if flips:
                x = torch.cat([x, x.flip(-1)])
            dist_ = vae.encode(x).latent_dist
            m, sd = dist_.mean.float(), dist_.std.float()
            b = len(idx)
            mean[s : s + b] = m.view(nf, b, c, h, h).transpose(0, 1)
            std[s : s + b] = sd.view(nf, b, c, h, h).transpose(0, 1)
    if dist.world == 1:
        return mean[:n], std[:n]
    gm, gs = dist.all_gather(mean), dist.all_gather(std)
    out_m = torch.zeros(n, nf, c, h, h, device=device)
    out_s = torch.zeros(n, nf, c, h, h, device=device)
    for r in range(dist.world):
        idx = list(range(r, n, dist.world))
        out_m[idx] = gm[r][: len(idx)]
        out_s[idx] = gs[r][: len(idx)]
    return out_m, out_s


def move(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Move a frozen module; cast only when its dtype differs (diffusers warns on every cast)."""
    module.to(device)
    if next(module.parameters()).dtype != dtype:
        module.to(dtype)


def job_meta(job) -> dict:
    md = job.metadata
    return {"name": md.name, "namespace": md.namespace, "uid": md.uid}


def train(job, opts: Options | None = None) -> Result:
    """Train the concepts of one TextualInversionJob (a tinv.api model). See the module doc."""
    opts = opts or Options()
    spec = job.spec
    T = spec.training
    total = int(opts.steps or T.steps)
    seed = int(T.seed)

    want = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dist = Dist.init(torch.device(want).type)
    device = pick_device(opts.device, dist.local_rank)
    rank0 = dist.rank == 0
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ and (opts.model or spec.model.source).startswith("builtin:"):
        # The tiny model's ops are too small to gain from threads, and on a shared CPU OpenMP's
        # spin-waiting makes 2 threads up to 20x slower than 1 (measured with a build running).
        torch.set_num_threads(1)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True

    storage_uri = opts.storage or spec.storage.uri
    meta = job_meta(job)
    run = storage.run_root(storage_uri, meta["namespace"], meta["name"] or "job", meta["uid"])
    store = storage.Store(storage.S3Settings.from_spec(spec.storage))
    for c in spec.concepts:
        if "/" in c.token or "\\" in c.token:
            raise ConfigError(f"concept token {c.token!r} must not contain '/' or '\\' (it names files)")

    # 1. Data first: a missing or unusable folder fails here, before any model or GPU work.
    ds = data.build_dataset(
        spec.concepts, T.resolution, T.center_crop, T.interpolation, store, Path(opts.base_dir) if opts.base_dir else None
    )
    log.info("%d training images, %d concept(s); run folder %s", len(ds), len(spec.concepts), run)

    # 2. Where to start: this run's own newest checkpoint (a retried pod), else resumeFrom.
    source_uri, mode = None, "continue"
    if opts.auto_resume:
        own, _ = checkpoint.list_checkpoints(store, run)
        if own:
            source_uri = own[-1].uri
            log.info("continuing this run from its newest checkpoint %s (step %d)", own[-1].uuid, own[-1].step)
    if source_uri is None and spec.resume_from is not None:
        source_uri = checkpoint.resolve(store, run, storage_uri, meta["namespace"] or "default", spec.resume_from)
        mode = spec.resume_from.mode
        log.info("%s from %s", "continuing" if mode == "continue" else "forking", source_uri)
    loaded = checkpoint.load(store, source_uri) if source_uri else None

    # 3. Model, frozen, in the compute dtype.
    dtype = pick_precision(T.mixed_precision, device)
    token = os.environ.get("HF_TOKEN")
    bundle = models.load(opts.model or spec.model.source, spec.model.revision, spec.model.variant, token, store)
    slot = bundle.text[0]
    vocab = tokens.ConceptVocab(
        slot.tokenizer,
        [(c.token, c.initializer, c.vectors) for c in spec.concepts],
        table_size=slot.encoder.get_input_embeddings().num_embeddings,
    )
    init = tokens.initial_vectors(vocab, slot.encoder.get_input_embeddings().weight, torch.Generator().manual_seed(mix(seed, 3)))
    mean_norm = slot.encoder.get_input_embeddings().weight.detach().float().norm(dim=1).mean().item()
    for m in (bundle.unet, bundle.vae, slot.encoder):
        m.requires_grad_(False)
        m.eval()
    move(bundle.vae, device, torch.float32)  # encode once in fp32; cast for decoding later
    flips = T.flip_p > 0
    lat_mean, lat_std = encode_latents(bundle, ds, device, flips, dist)
    ds.pixels = []  # the cache replaces them; at 512 px they would hold 0.8 MB per image
    move(bundle.vae, device, dtype)
    move(bundle.unet, device, dtype)
    move(slot.encoder, device, dtype)
    if device.type == "cuda":
        bundle.unet.to(memory_format=torch.channels_last)
    try:
        from diffusers.models.attention_processor import AttnProcessor2_0

        bundle.unet.set_attn_processor(AttnProcessor2_0())
    except Exception:  # pragma: no cover - diffusers moved it
        pass
    if os.environ.get("TINV_FUSE_QKV", "1" if device.type == "cuda" else "0") == "1":
        # One matmul for q/k/v (self-attention) and k/v (cross-attention): fewer, larger GEMMs.
        try:
            bundle.unet.fuse_qkv_projections()
        except Exception as e:  # noqa: BLE001 - an unusual attention layout: keep the plain one
            log.debug("fused QKV projections unavailable: %s", e)
    unet_fwd = torch.compile(bundle.unet) if opts.compile else bundle.unet

    # 4. The new vectors, possibly from a checkpoint.
    rows = {c.token: (vocab.offsets[c.token], c.vectors) for c in vocab.concepts}
    start_step = 0
    state = loaded.state if (loaded and mode == "continue") else None
    if loaded is not None:
        if state is not None:
            if list(state["tokens"]) != [c.token for c in vocab.concepts] or list(state["vectors"]) != [
                c.vectors for c in vocab.concepts
            ]:
                raise ConfigError(
                    f"cannot continue {source_uri}: it has concepts {state['tokens']} with vectors {state['vectors']}, "
                    f"this job {[c.token for c in vocab.concepts]} with {[c.vectors for c in vocab.concepts]} "
                    "(use resumeFrom.mode: fork to start new concepts from its embeddings)"
                )
            init = state["embeddings"]["text_encoder"].float().clone()
            start_step = int(state["step"])
        else:
            found = 0
            for tok, (off, n) in rows.items():
                e = loaded.embeddings.get(tok)
                if e is None and len(loaded.embeddings) == 1 and len(rows) == 1:
                    e = next(iter(loaded.embeddings.values()))  # single-concept file under another name
                if e is None:
                    log.warning("%s has no embedding for %r: it starts from its initializer", source_uri, tok)
                    continue
                if isinstance(e, dict):
                    raise ConfigError(f"{source_uri} holds SDXL embeddings (clip_l/clip_g); this model is SD 1.x/2.x")
                if e.shape != (n, init.shape[1]):
                    raise ConfigError(
                        f"embedding for {tok!r} in {source_uri} has shape {tuple(e.shape)}, this job needs ({n}, {init.shape[1]}): "
                        "set the concept's vectors to match, or use a model of the same width"
                    )
                init[off : off + n] = e
                found += 1
            if found == 0:
                raise ConfigError(
                    f"{source_uri} has no embedding for any concept of this job (it has {sorted(loaded.embeddings)})"
                )
            if mode == "continue":
                log.warning("%s is not a tinv checkpoint with optimizer state: starting at step 0 from its embeddings", source_uri)
    layer = tokens.install(slot.encoder, init.to(device), offset=vocab.base_size)
    new = layer.new  # THE trainable tensor
    assert [p for p in slot.encoder.parameters() if p.requires_grad] == [new]

    # 5. Optimizer over the new rows only; lr scaled by the global batch.
    local = T.batch_size * T.gradient_accumulation
    G = local * dist.world
    base_lr = T.learning_rate * (G if T.scale_lr else 1)
    if T.optimizer == "adam":
        opt = torch.optim.Adam([new], lr=base_lr, weight_decay=T.weight_decay)
    elif T.optimizer == "adamw":
        opt = torch.optim.AdamW([new], lr=base_lr, weight_decay=T.weight_decay)
    else:
        opt = torch.optim.SGD([new], lr=base_lr, weight_decay=T.weight_decay)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    loss_history: list[float] = []
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        loss_history = list(state.get("loss_history", []))

    # 6. Noise schedule: the model's, with the spec's overrides.
    sched_cfg = dict(bundle.scheduler.config)
    nz = T.noise
    for k, v in (("beta_start", nz.beta_start), ("beta_end", nz.beta_end), ("beta_schedule", nz.beta_schedule), ("prediction_type", nz.prediction_type)):
        if v is not None:
            sched_cfg[k] = v
    from diffusers import DDPMScheduler

    noise_sched = DDPMScheduler.from_config(sched_cfg)
    prediction = noise_sched.config.prediction_type
    if prediction not in ("epsilon", "v_prediction"):
        raise ConfigError(f"prediction type {prediction!r} is not supported (epsilon or v_prediction)")
    alphas = noise_sched.alphas_cumprod.to(device=device, dtype=torch.float32)
    n_train_t = noise_sched.config.num_train_timesteps
    scale = bundle.vae.config.scaling_factor

    stream = Stream(seed, ds, T.flip_p)
    micro = max(1, min(local, opts.micro_batch or int(os.environ.get("TINV_MICRO_BATCH", "0")) or local))
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    reg_hidden = T.hidden_reg_weight > 0

    def encode(ids: torch.Tensor) -> torch.Tensor:
        return slot.encoder(ids.to(device))[0]

    def forward_backward(ks: list[int], backward: bool = True) -> float:
        """Loss (sum over these samples / G) -> backward; returns the sum of per-sample losses."""
        picks = [stream.sample(k) for k in ks]
        imgs = torch.tensor([p[0] for p in picks], device=device)
        fl = torch.tensor([p[1] for p in picks], device=device) if flips else torch.zeros(len(ks), dtype=torch.long, device=device)
        mu, sd = lat_mean[imgs, fl], lat_std[imgs, fl]
        eps_l, noise, ts = [], [], []
        for k in ks:
            g = torch.Generator(device=device).manual_seed(mix(seed, k, 4))
            ts.append(torch.randint(0, n_train_t, (1,), generator=g, device=device))
            eps_l.append(torch.randn(mu.shape[1:], generator=g, device=device))
            noise.append(torch.randn(mu.shape[1:], generator=g, device=device))
        t = torch.cat(ts)
        latents = (mu + sd * torch.stack(eps_l)) * scale
        noise = torch.stack(noise)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        target = noise if prediction == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * latents
        prompts = [p[2] for p in picks]
        ids = vocab.batch(prompts)
        with autocast:
            hidden = encode(ids)
            x = noisy.to(dtype)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            pred = unet_fwd(x, t, hidden.to(dtype)).sample
        per = F.mse_loss(pred.float(), target, reduction="none").mean(dim=(1, 2, 3))
        loss = per.sum() / G
        if reg_hidden:
            with torch.no_grad(), autocast:
                ref = encode(vocab.batch(prompts, initializer=True))
            loss = loss + T.hidden_reg_weight * F.mse_loss(hidden.float(), ref.float(), reduction="none").mean(dim=(1, 2)).sum() / G
        if backward:
            (scaler.scale(loss) if scaler else loss).backward()
        return per.detach().sum()  # a device tensor: reading it here would stall the GPU queue

    def fixed_loss() -> float | None:
        if not opts.eval_samples:
            return None
        with torch.no_grad():
            total_loss = sum(
                float(forward_backward(list(opts.eval_samples[i : i + micro]), backward=False))
                for i in range(0, len(opts.eval_samples), micro)
            )
            return total_loss / len(opts.eval_samples)

    reporter = Reporter(
        enabled=rank0,
        store=store,
        run=run,
        total_steps=total,
        world_size=dist.world,
        job_meta=meta,
        log_every=T.log_every,
        metrics_port=opts.metrics_port,
        progress_bar=opts.progress_bar,
    )
    reporter.global_batch = G
    kept, _ = checkpoint.list_checkpoints(store, run) if rank0 else ([], [])
    reporter.checkpoints = kept[-T.checkpoints_kept :]
    latest = reporter.checkpoints[-1] if reporter.checkpoints else None

    hyper = T.model_dump(mode="json", by_alias=True)
    initializers = {c.token: c.initializer for c in vocab.concepts}
    star_id = slot.tokenizer.get_vocab().get("*</w>", slot.tokenizer.get_vocab().get("*", 265))

    def save(step: int, loss: float | None) -> checkpoint.CheckpointRef | None:
        nonlocal latest
        if not rank0:
            return None
        w = new.detach().float().cpu()
        emb = {tok: w[off : off + n].clone() for tok, (off, n) in rows.items()}
        st = {
            "format": checkpoint.STATE_FORMAT,
            "step": step,
            "samples_seen": step * G,
            "seed": seed,
            "global_batch": G,
            "tokens": [c.token for c in vocab.concepts],
            "vectors": [c.vectors for c in vocab.concepts],
            "embeddings": {"text_encoder": w.clone()},
            "optimizer": opt.state_dict(),
            "scaler": scaler.state_dict() if scaler else None,
            "loss_history": loss_history[-1000:],
        }
        manifest = {
            "loss": loss,
            "job": meta,
            "tokens": {c.token: c.vectors for c in vocab.concepts},
            "hyperparameters": hyper,
            "total_steps": total,
            "model": {"source": opts.model or spec.model.source, "revision": spec.model.revision, "variant": spec.model.variant},
            "concepts": [
                {"token": c.token, "vectors": c.vectors, "initializer": c.initializer, "property": sc.property}
                for c, sc in zip(vocab.concepts, spec.concepts)
            ],
            "effective_batch_size": G,
            "learning_rate": base_lr,
            "world_size": dist.world,
            "embedding_width": int(w.shape[1]),
            "resumed_from": source_uri,
            "trainer": {"version": __version__},
        }
        ref = checkpoint.write(store, run, step=step, embeddings=emb, initializers=initializers, state=st, manifest=manifest, star_id=star_id)
        kept = checkpoint.prune(store, run, T.checkpoints_kept)
        latest = ref
        reporter.checkpoint(ref, kept)
        return ref

    val = T.validation
    val_every = val.every or T.checkpoint_every

    def validate(step: int) -> None:
        if not (rank0 and opts.validation and val.prompts):
            return
        t0 = time.monotonic()
        try:
            arrays = generate(bundle, vocab, val.prompts, val.negative_prompt, val.scheduler, val.steps, val.guidance_scale, val.seed, T.resolution, device, dtype)
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # images are a view on training, never a reason to lose it
            log.warning("validation images at step %d failed (%s: %s); training goes on", step, type(e).__name__, e)
            return
        reporter.images("validation", arrays, step)
        log.info("validation images at step %d (%.1fs)", step, time.monotonic() - t0)

    stop = StopFlag()
    stop.install()
    step = start_step
    exit_code, phase, message = EXIT_OK, "Succeeded", None
    last_saved = start_step if loaded is not None and state is not None else -1
    pending: list[tuple[int, torch.Tensor]] = []  # (step, loss on device) not yet read back
    t_last, steps_since = time.monotonic(), 0
    sps = None
    smoothed = loss_history[-1] if loss_history else None
    if step >= total:
        log.info("nothing to do: the run is at step %d of %d", step, total)
    reporter.step(step, smoothed, lr_at(min(step, total - 1), base_lr, T.lr_scheduler, T.lr_warmup_steps, total), None, step * G / len(ds), force=True, log_line=False)
    eval_before = fixed_loss()
    timed = {"t": 0.0, "steps": 0, "t0": None}  # pure step time (no checkpoints/validation), for benchmarks
    stop_prev: torch.Tensor | None = None  # all-reduced stop flag of the previous step (multi-rank)
    zero = torch.zeros((), device=device)
    try:
        while step < total:
            if step - start_step >= 3:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                timed["t0"] = time.perf_counter()
            lr = lr_at(step, base_lr, T.lr_scheduler, T.lr_warmup_steps, total)
            for gr in opt.param_groups:
                gr["lr"] = lr
            first = step * G + dist.rank * local
            ks = list(range(first, first + local))
            while True:
                try:
                    loss_sum = zero
                    for i in range(0, local, micro):
                        loss_sum = loss_sum + forward_backward(ks[i : i + micro])
                    break
                except torch.OutOfMemoryError:
                    if micro == 1:
                        raise
                    opt.zero_grad(set_to_none=True)
                    micro = max(1, micro // 2)
                    torch.cuda.empty_cache()
                    log.warning("out of GPU memory: micro-batch now %d samples", micro)
            # Stop when asked. Ranks must agree: with several, each reads the previous step's
            # all-reduced flag (already computed, so reading it does not stall the GPU) and all
            # stop together one step after the first rank was signalled.
            stopping = stop.signal is not None or (opts.stop_at_step is not None and step + 1 >= opts.stop_at_step)
            any_stop = stopping if dist.world == 1 else bool(stop_prev is not None and float(stop_prev) > 0)
            # One all-reduce carries the gradient, the loss and the stop flag.
            grad = new.grad if new.grad is not None else torch.zeros_like(new)
            flag = torch.stack([loss_sum.float(), torch.tensor(1.0 if stopping else 0.0, device=device)])
            buf = dist.all_reduce(torch.cat([grad.flatten().float(), flag]))
            new.grad = buf[: grad.numel()].view_as(grad).to(grad.dtype)
            stop_prev = buf[-1]
            if T.norm_reg_weight > 0:
                # Pull each new vector's norm towards the vocabulary's mean norm (Determined's reg).
                reg = T.norm_reg_weight * (mean_norm - new.norm(dim=1)).pow(2).sum()
                (scaler.scale(reg) if scaler else reg).backward()
            if scaler:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            pending.append((step, buf[-2] / G))
            if timed["t0"] is not None:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                timed["t"] += time.perf_counter() - timed["t0"]
                timed["steps"] += 1
                timed["t0"] = None
            steps_since += 1
            ckpt_due = step % T.checkpoint_every == 0 or step == total or any_stop
            if step % T.log_every == 0 or ckpt_due or steps_since >= 50:
                # Read back the losses since the last report: one synchronisation per report.
                values = torch.stack([v for _, v in pending]).tolist()
                points = [(s_, v) for (s_, _), v in zip(pending, values)]
                pending.clear()
                loss_history.extend(values)
                recent = loss_history[-T.log_every :]
                smoothed = sum(recent) / len(recent)
                dt = time.monotonic() - t_last
                sps = steps_since * G / dt if dt > 0 else sps
                t_last, steps_since = time.monotonic(), 0
                norm = float(new.detach().norm(dim=1).mean())
                reporter.step(step, smoothed, lr, sps, step * G / len(ds), norm, points=points)
            else:
                reporter.tick(step)
            if ckpt_due:
                save(step, smoothed)
                last_saved = step
            if step % val_every == 0 or step == total:
                validate(step)
            if any_stop and step < total:
                interrupted = stop.signal == signal.SIGINT
                exit_code = EXIT_INTERRUPTED if interrupted else EXIT_PREEMPTED
                phase = "Interrupted" if interrupted else "Preempted"
                message = f"stopped at step {step} of {total} after a checkpoint; a retry continues from it"
                break
        if step >= total and last_saved != step and rank0 and step > 0:
            save(step, loss_history[-1] if loss_history else None)
    except BaseException as e:
        reporter.write_progress("failed", message=f"{type(e).__name__}: {e}", exit_code=getattr(e, "exit_code", 1))
        reporter.close()
        stop.restore()
        raise
    stop.restore()
    final_loss = smoothed
    reporter.write_progress(
        "succeeded" if phase == "Succeeded" else "running",
        message=message,
        exit_code=exit_code,
        stopped=None if phase == "Succeeded" else phase.lower(),
    )
    reporter.close()
    w = new.detach().float().cpu()
    result = Result(
        exit_code=exit_code,
        phase=phase,
        step=step,
        total_steps=total,
        loss=final_loss,
        run_uri=run,
        latest=latest,
        message=message,
        embeddings={tok: w[off : off + n].clone() for tok, (off, n) in rows.items()},
        eval_before=eval_before,
        eval_after=fixed_loss(),
        throughput=timed["steps"] * G / timed["t"] if timed["t"] > 0 else None,
    )
    dist.barrier()
    if dist.owned:
        dist.close()
    return result


# ---------------------------------------------------------------------------- validation images


def generate(bundle, vocab, prompts, negative, scheduler_name, steps, guidance, seed, resolution, device, dtype):
    """HWC uint8 arrays, one per prompt, with a fixed seed per prompt (comparable across steps)."""
    import numpy as np

    pipe = bundle.pipeline(models_scheduler(scheduler_name, bundle.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    slot = bundle.text[0]
    out = []
    with torch.no_grad():
        for i, p in enumerate(prompts):
            ids = vocab.batch([p]).to(device)
            neg = vocab.batch([negative or ""]).to(device)
            pe = slot.encoder(ids)[0].to(dtype)
            ne = slot.encoder(neg)[0].to(dtype)
            g = torch.Generator(device=device).manual_seed(int(seed) + i)
            img = pipe(
                prompt_embeds=pe,
                negative_prompt_embeds=ne,
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=g,
                height=resolution,
                width=resolution,
                output_type="np",
            ).images[0]
            out.append((np.clip(img, 0, 1) * 255).round().astype("uint8"))
    return out


def models_scheduler(name: str, config):
    return models.make_scheduler(name, config)
