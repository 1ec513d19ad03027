"""The Textual Inversion training loop: :func:`train`, read top to bottom.

What is learned: for each concept, ``n`` new token vectors (one fp32 parameter for all of them,
inside the text encoder's embedding layer -- see :mod:`.tokens`). Everything else (UNet, VAE, text
encoder, the original vocabulary) is frozen and gets no weight gradients. SDXL (:mod:`.sdxl`): the
vectors of both text encoders, side by side in that one parameter ``[rows, 768 + 1280]``, trained
together; the UNet gets SDXL's conditioning (both encoders' penultimate states, the pooled
projection, each image's size/crop time ids), and the default resolution is the model's native 1024.

One optimisation step, with G = batchSize x gradientAccumulation x world size samples:

1. Rank r of W takes the global samples ``step*G + r*G/W ... + G/W - 1``; each sample's image,
   flip, template, latent draw, noise and timestep are pure functions of ``(seed, k)``
   (:mod:`.objective`), so ranks see different data, the run equals one process with the same
   global batch, and a resume is exact from the step number alone.
2. Latents come from a cache (every image VAE-encoded once); the loss is the per-sample MSE
   against the noise or the velocity, averaged over the global batch. The local samples run in
   micro-batches as large as memory allows; an out-of-memory halves the micro-batch and retries.
3. Gradients (one small tensor) are all-reduced together with the loss and a stop flag; optional
   norm regularisation is added; the optimizer (:mod:`.optim`, decoupled weight decay) steps. The
   learning rate is diffusers' schedule of that name as a pure function of the step, scaled by G
   when ``scaleLr``.

Mixed precision: bf16 autocast with bf16 frozen weights on GPUs that have it, fp16 with a
GradScaler on those that do not, fp32 on CPU (``mixedPrecision`` overrides). Validation images
are rendered by the generation engine (:mod:`.engine`) over the very modules being trained.

Stopping: SIGTERM/SIGINT during start-up ends at once; in the loop, after the step and a
checkpoint (:mod:`.runtime`). Either way the exit code is 75 (130 for Ctrl-C) and the result says
what was saved.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import checkpoint, data, models, objective, runtime, storage, tokens
from .engine import Engine
from .errors import EXIT_OK
from .grid import Request
from .optim import build_optimizer, lr_at
from .reporting import Reporter

log = logging.getLogger("tinv.trainer")

# A scaled learning rate above this is far outside what Textual Inversion recipes use (diffusers'
# 5e-4 x batch 8 = 4e-3; Determined's 5e-3 with batch 4 ... 2e-2): warn with the numbers.
USUAL_MAX_LR = 0.05


@dataclass
class Options:
    """Run options that are not part of the spec (CLI flags / env; the operator sets some)."""

    device: str | None = None  # "cpu", "cuda", "cuda:1"; default: cuda if available
    model: str | None = None  # overrides spec.model.source
    storage: str | None = None  # overrides spec.storage.uri
    steps: int | None = None  # overrides training.steps
    micro_batch: int | None = None  # samples per forward pass; default: all local samples of a step (halved on OOM)
    # one matmul for q/k/v; default $TINV_FUSE_QKV, else on for CUDA
    fuse_qkv: bool | None = field(default_factory=lambda: {"1": True, "0": False}.get(os.environ.get("TINV_FUSE_QKV", "")))
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


def train(job, options: Options | None = None, *, model: models.ModelBundle | None = None) -> Result:
    """Train the concepts of one TextualInversionJob (a tinv.api model). See the module doc.

    `model`: an already loaded bundle to train with (tests, notebooks); default: spec.model.source
    (or Options.model) is loaded."""
    opts = options or Options()
    T = job.spec.training
    with runtime.StopFlag("training", prog="tinv train", termination_path=opts.termination_path) as stop:
        # 1. Open the run: ranks, device, storage, where to start, the images.
        run = Run.open(job, opts)
        start = checkpoint.find_start(run.store, run.uri, storage_root=run.storage_uri, namespace=run.namespace,
                                      resume_from=job.spec.resume_from, auto_resume=opts.auto_resume)
        stop.saved = start.saved()
        resolution = T.resolution or models.DEFAULT_RESOLUTION
        ds = build_dataset(job, opts, run, resolution)
        log.info("%d training images, %d concept(s); run folder %s", len(ds), len(job.spec.concepts), run.uri)
        # 2. The frozen model and the vocabulary of new tokens (checked from the tokenizer alone,
        #    before any weights are read); every prompt must hold every vector of its concept.
        bundle, vocab = load_frozen(job, opts, run, model)
        if T.resolution is None and models.default_resolution(bundle) != resolution:
            resolution = models.default_resolution(bundle)  # SDXL: its native size (the images were checked above)
            log.info("training at %d px, the native size of this %s model (set training.resolution to change it)",
                     resolution, bundle.family.upper())
            ds = build_dataset(job, opts, run, resolution)
        objective.check_prompts(ds, vocab)
        # 3. The new vectors: the initializers', or the start source's (SDXL: both encoders' side by side).
        g = torch.Generator().manual_seed(objective.mix(run.seed, objective.INIT_VECTORS))
        init = torch.cat([tokens.initial_vectors(vocab, s.encoder.get_input_embeddings().weight, g) for s in bundle.text], 1)
        restored = checkpoint.restore(start, vocab, init, family=bundle.family, widths=bundle.widths)
        latents = place_frozen(bundle, ds, run, flips=T.flip_p > 0,
                               fuse_qkv=run.device.type == "cuda" if opts.fuse_qkv is None else opts.fuse_qkv)
        new = tokens.install_all([s.encoder for s in bundle.text], restored.vectors.to(run.device), offset=vocab.base_size)
        # THE trainable tensor (SDXL: shared by both encoders' token layers)
        assert all([p for p in s.encoder.parameters() if p.requires_grad] == [new] for s in bundle.text)

        # 4. Optimizer over the new rows only; lr scaled by the global batch; the objective.
        local = T.batch_size * T.gradient_accumulation
        G = local * run.dist.world
        base_lr = T.learning_rate * (G if T.scale_lr else 1)
        warn_about_settings(T, G, len(ds), base_lr, run.dist.world)
        opt = build_optimizer(T.optimizer, [new], base_lr, T.weight_decay)
        scaler = torch.amp.GradScaler("cuda") if run.dtype == torch.float16 else None
        loss_history: list[float] = []
        if restored.state is not None:
            opt.load_state_dict(restored.state["optimizer"])
            if scaler is not None and restored.state.get("scaler"):
                scaler.load_state_dict(restored.state["scaler"])
            loss_history = list(restored.state.get("loss_history", []))
        stream = objective.Stream(run.seed, ds, T.flip_p)
        loss_of = objective.Objective(
            unet=torch.compile(bundle.unet) if opts.compile else bundle.unet, encoder=bundle.text_encoder, vocab=vocab,
            stream=stream, latents=latents,
            noise=objective.NoiseSchedule(bundle.scheduler.config, T.noise, run.device), seed=run.seed,
            global_batch=G, device=run.device, dtype=run.dtype, hidden_reg_weight=T.hidden_reg_weight,
            condition=condition_of(bundle, vocab, stream, ds, resolution, T.center_crop, run.device),
        )
        # The vocabulary's mean token norm, per encoder (norm regularisation pulls each block towards its own).
        mean_norms = [s.encoder.get_input_embeddings().weight.detach().float().norm(dim=1).mean().item() for s in bundle.text]
        micro = max(1, min(local, opts.micro_batch or local))
        reporter = Reporter(enabled=run.dist.leader, store=run.store, run=run.uri, total_steps=run.total, world_size=run.dist.world,
                            job_meta=run.meta, log_every=T.log_every, metrics_port=opts.metrics_port, progress_bar=opts.progress_bar)
        reporter.global_batch = G
        saver = Saver(job, run, vocab, bundle, reporter, G=G, learning_rate=base_lr, source_uri=start.source_uri,
                      model_source=opts.model or job.spec.model.source)
        validator = Validator(bundle, vocab, run, T, resolution) if (opts.validation and T.validation.prompts and run.dist.leader) else None

        # 5. The loop.
        stop.defer()
        step = restored.step
        exit_code, phase, message = EXIT_OK, "Succeeded", None
        last_saved = step if restored.state is not None else -1
        losses = LossLog(loss_history, T.log_every, G)
        if step >= run.total:
            log.info("nothing to do: the run is at step %d of %d", step, run.total)
        reporter.step(step, losses.smoothed, lr_at(min(step, run.total - 1), base_lr, T.lr_scheduler, T.lr_warmup_steps, run.total), None,
                      step * G / len(ds), force=True, log_line=False)
        eval_before = loss_of.mean_loss(opts.eval_samples, micro) if opts.eval_samples else None
        timer = StepTimer(run.device, skip=3)
        stop_prev: torch.Tensor | None = None  # all-reduced stop flag of the previous step (multi-rank)
        try:
            while step < run.total:
                timer.begin(step - restored.step)
                lr = lr_at(step, base_lr, T.lr_scheduler, T.lr_warmup_steps, run.total)
                for group in opt.param_groups:
                    group["lr"] = lr
                first = step * G + run.dist.rank * local
                loss_sum, micro = loss_of.accumulate(list(range(first, first + local)), micro, scaler=scaler, optimizer=opt)
                # Stop when asked. Ranks must agree: with several, each reads the previous step's
                # all-reduced flag (already computed, so reading it does not stall the GPU) and all
                # stop together one step after the first rank was signalled.
                stopping = stop.set or (opts.stop_at_step is not None and step + 1 >= opts.stop_at_step)
                any_stop = stopping if run.dist.world == 1 else bool(stop_prev is not None and float(stop_prev) > 0)
                # One all-reduce carries the gradient, the loss and the stop flag.
                grad = new.grad if new.grad is not None else torch.zeros_like(new)
                flag = torch.stack([loss_sum.float(), torch.tensor(1.0 if stopping else 0.0, device=run.device)])
                buf = run.dist.all_reduce(torch.cat([grad.flatten().float(), flag]))
                new.grad = buf[: grad.numel()].view_as(grad).to(grad.dtype)
                stop_prev = buf[-1]
                if T.norm_reg_weight > 0:
                    # Pull each new vector's norm towards the vocabulary's mean norm (Determined's reg);
                    # SDXL: each encoder's block of the vector towards that encoder's mean norm.
                    blocks = new.split(bundle.widths, dim=1)
                    reg = T.norm_reg_weight * sum((m - b.norm(dim=1)).pow(2).sum() for m, b in zip(mean_norms, blocks))
                    (scaler.scale(reg) if scaler else reg).backward()
                if scaler:
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                losses.add(step, buf[-2] / G)
                timer.end()
                ckpt_due = step % T.checkpoint_every == 0 or step == run.total or any_stop
                if step % T.log_every == 0 or ckpt_due or losses.unread >= 50:
                    points = losses.read()  # one synchronisation per report
                    norm = float(new.detach()[:, : bundle.widths[0]].norm(dim=1).mean())  # (SDXL: the first encoder's)
                    reporter.step(step, losses.smoothed, lr, losses.samples_per_second, step * G / len(ds), norm, points=points)
                else:
                    reporter.tick(step)
                if ckpt_due:
                    saver.save(step, losses.smoothed, new, opt, scaler, loss_history)
                    last_saved = step
                if validator is not None and (step % validator.every == 0 or step == run.total):
                    validator.run(step, reporter)
                if any_stop and step < run.total:
                    e = runtime.Stopped(stop.signal or signal.SIGTERM, "")
                    exit_code, phase = e.exit_code, e.reason
                    ref = saver.latest
                    message = (f"stopped at step {step} of {run.total}; checkpoint {ref.uuid if ref else '-'} (step {step}) saved, "
                               "a retry continues from it")
                    break
            if step >= run.total and last_saved != step and step > 0:
                saver.save(step, loss_history[-1] if loss_history else None, new, opt, scaler, loss_history)
        except BaseException as e:
            reporter.write_progress("failed", message=f"{type(e).__name__}: {e}", exit_code=getattr(e, "exit_code", 1))
            reporter.close()
            raise
    reporter.write_progress("succeeded" if phase == "Succeeded" else "running", message=message, exit_code=exit_code,
                            stopped=None if phase == "Succeeded" else phase.lower())
    reporter.close()
    result = Result(
        exit_code=exit_code, phase=phase, step=step, total_steps=run.total, loss=losses.smoothed, run_uri=run.uri,
        latest=saver.latest, message=message, embeddings=file_vectors(bundle, vocab.split_rows(new.detach().float().cpu())),
        eval_before=eval_before, eval_after=loss_of.mean_loss(opts.eval_samples, micro) if opts.eval_samples else None,
        throughput=timer.rate(G),
    )
    run.dist.barrier()
    run.dist.close()
    return result


# ---------------------------------------------------------------------------- the run and its parts


@dataclass
class Run:
    """Where and how this process trains: ranks, device, dtype, storage, the run folder."""

    dist: runtime.Dist
    device: torch.device
    dtype: torch.dtype
    store: storage.Store
    storage_uri: str | None
    uri: str  # the run root
    namespace: str
    meta: dict  # the job's name, namespace, uid
    total: int  # optimisation steps
    seed: int

    @classmethod
    def open(cls, job, opts: Options) -> "Run":
        spec, T = job.spec, job.spec.training
        want = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dist = runtime.Dist.init(torch.device(want).type)
        device = runtime.pick_device(opts.device, dist.local_rank)
        runtime.configure_device(device, cpu_threads_one=(opts.model or spec.model.source).startswith("builtin:"))
        md = job.metadata
        storage_uri = opts.storage or spec.storage.uri
        return cls(
            dist=dist, device=device, dtype=runtime.pick_dtype(T.mixed_precision, device),
            store=storage.Store(storage.S3Settings.from_spec(spec.storage)), storage_uri=storage_uri,
            uri=storage.run_root(storage_uri, md.namespace, md.name or "job", md.uid), namespace=md.namespace or "default",
            meta={"name": md.name, "namespace": md.namespace, "uid": md.uid}, total=int(opts.steps or T.steps), seed=int(T.seed),
        )


def build_dataset(job, opts: Options, run: Run, resolution: int) -> data.Dataset:
    T = job.spec.training
    return data.build_dataset(job.spec.concepts, resolution, T.center_crop, T.interpolation, run.store,
                              Path(opts.base_dir) if opts.base_dir else None, T.transparent_background)


def condition_of(bundle: models.ModelBundle, vocab, stream, ds: data.Dataset, resolution: int, center_crop: bool, device):
    """The objective's text conditioning for this model family (None: SD 1.x/2.x's default)."""
    if bundle.family != "sdxl":
        return None
    from . import sdxl

    rows = [sdxl.geometry(size, resolution, center_crop) for size in ds.sizes]
    return sdxl.TrainConditioning(bundle, vocab, stream, rows, resolution, center_crop, device)


def file_vectors(bundle: models.ModelBundle, rows: dict[str, torch.Tensor]) -> dict:
    """{token: rows} as the files hold them: SDXL's as {"clip_l": .., "clip_g": ..}."""
    if bundle.family != "sdxl":
        return rows
    from . import sdxl

    return {t: sdxl.split(r, bundle.widths) for t, r in rows.items()}


def load_frozen(job, opts: Options, run: Run, model: models.ModelBundle | None):
    """(bundle, vocab): the concept vocabulary is built -- and its tokens checked against the model's
    vocabulary -- from the tokenizer alone, before the weights are loaded."""
    spec = job.spec
    concepts = [(c.token, c.initializer, c.vectors) for c in spec.concepts]
    if model is not None:
        bundle = model
        vocab = tokens.ConceptVocab(bundle.tokenizer, concepts, training=True)
    else:
        located = models.locate(opts.model or spec.model.source, spec.model.revision, spec.model.variant, runtime.hf_token(), run.store)
        vocab = tokens.ConceptVocab(located.tokenizer(), concepts, training=True)  # refuses bad tokens before the weights load
        bundle = located.load()
        vocab.tokenizer = bundle.tokenizer  # the same files; keep the bundle's object
    models.swap_vae(bundle, spec.model.vae, runtime.hf_token(), run.store)  # e.g. an fp16-safe SDXL VAE
    for s in bundle.text:  # placeholder ids start past every encoder's table
        vocab.fit_table(s.encoder.get_input_embeddings().num_embeddings)
    return bundle, vocab


def place_frozen(bundle: models.ModelBundle, ds: data.Dataset, run: Run, *, flips: bool, fuse_qkv: bool) -> objective.LatentCache:
    """Freeze the model, cache the images' latents (VAE in fp32), then move everything to the
    compute dtype with the fast kernels of the device."""
    encoders = [s.encoder for s in bundle.text]
    for m in (bundle.unet, bundle.vae, *encoders):
        m.requires_grad_(False)
        m.eval()
    move(bundle.vae, run.device, torch.float32)  # SDXL's VAE overflows in fp16: latents are always encoded in fp32
    latents = objective.LatentCache(bundle.vae, bundle.vae_scale, ds, run.device, flips, run.dist)
    ds.pixels = []  # the cache replaces them; at 512 px they would hold 0.8 MB per image
    upcast = bool(getattr(bundle.vae.config, "force_upcast", False)) and run.dtype == torch.float16
    for m in (bundle.unet, *encoders):
        move(m, run.device, run.dtype)
    move(bundle.vae, run.device, torch.float32 if upcast else run.dtype)  # validation images: SDXL's VAE stays fp32 under fp16
    if run.device.type == "cuda":
        bundle.unet.to(memory_format=torch.channels_last)
    from diffusers.models.attention_processor import AttnProcessor2_0

    bundle.unet.set_attn_processor(AttnProcessor2_0())
    if fuse_qkv:
        # One matmul for q/k/v (self-attention) and k/v (cross-attention): fewer, larger GEMMs.
        try:
            bundle.unet.fuse_qkv_projections()
        except Exception as e:  # noqa: BLE001 - an unusual attention layout: keep the plain one
            log.debug("fused QKV projections unavailable: %s", e)
    return latents


def move(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Move a frozen module; cast only when its dtype differs (diffusers warns on every cast)."""
    module.to(device)
    if next(module.parameters()).dtype != dtype:
        module.to(dtype)


def warn_about_settings(T, G: int, n_images: int, lr: float, world: int) -> None:
    """Settings that run but are rarely what was meant: say so with the numbers and what to change."""
    if T.lr_scheduler == "constant" and T.lr_warmup_steps:
        log.warning("lrScheduler constant ignores lrWarmupSteps %d (as diffusers' does); use constant_with_warmup to warm up",
                    T.lr_warmup_steps)
    if G > n_images:
        log.warning(
            "each step takes %d samples (batchSize %d x gradientAccumulation %d x %d worker%s) from only %d image%s: "
            "every step repeats each image about %d times. Lower batchSize or gradientAccumulation, or add images",
            G, T.batch_size, T.gradient_accumulation, world, "" if world == 1 else "s", n_images, "" if n_images == 1 else "s",
            round(G / n_images),
        )
    if lr > USUAL_MAX_LR:
        how = f"learningRate {T.learning_rate:g} x {G} samples per step (scaleLr)" if T.scale_lr else f"learningRate {T.learning_rate:g}"
        log.warning(
            "the learning rate is %.3g (%s), far above the usual range (at most ~%g): the vectors may blow up. %s",
            lr, how, USUAL_MAX_LR, "Set scaleLr: false or lower learningRate" if T.scale_lr else "Lower learningRate",
        )


class Saver:
    """Writes checkpoints of this run (rank 0 only) and remembers the newest."""

    def __init__(self, job, run: Run, vocab, bundle, reporter: Reporter, *, G: int, learning_rate: float,
                 source_uri: str | None, model_source: str):
        self.job, self.run, self.vocab, self.reporter = job, run, vocab, reporter
        self.G, self.learning_rate, self.source_uri, self.model_source = G, learning_rate, source_uri, model_source
        self.family, self.widths = bundle.family, bundle.widths
        vocab_ids = bundle.tokenizer.get_vocab()
        self.star_id = vocab_ids.get("*</w>", vocab_ids.get("*", 265))  # AUTOMATIC1111's placeholder id
        kept = checkpoint.list_checkpoints(run.store, run.uri)[0] if run.dist.leader else []
        reporter.checkpoints = kept[-job.spec.training.checkpoints_kept :]
        self.latest = reporter.checkpoints[-1] if reporter.checkpoints else None

    def save(self, step: int, loss: float | None, new: torch.Tensor, opt, scaler, loss_history: list[float]) -> None:
        if not self.run.dist.leader:
            return
        run, vocab, T = self.run, self.vocab, self.job.spec.training
        w = new.detach().float().cpu()
        state = checkpoint.training_state(step=step, global_batch=self.G, seed=run.seed, vocab=vocab, weights=w, widths=self.widths,
                                          optimizer=opt, scaler=scaler, loss_history=loss_history)
        manifest = checkpoint.manifest(job=self.job, model_source=self.model_source, loss=loss, vocab=vocab, total_steps=run.total,
                                       global_batch=self.G, learning_rate=self.learning_rate, world_size=run.dist.world,
                                       width=int(w.shape[1]), resumed_from=self.source_uri, family=self.family, widths=self.widths)
        ref = checkpoint.write(run.store, run.uri, step=step, embeddings=vocab.split_rows(w),
                               initializers=manifest["determined"]["initializer_strs"], state=state, manifest=manifest,
                               star_id=self.star_id)
        kept = checkpoint.prune(run.store, run.uri, T.checkpoints_kept)
        self.latest = ref
        self.reporter.checkpoint(ref, kept)


class Validator:
    """Validation images with fixed seeds, rendered by the generation engine over the training modules."""

    def __init__(self, bundle, vocab, run: Run, T, resolution: int):
        self.val, self.resolution = T.validation, resolution
        self.every = T.validation.every or T.checkpoint_every
        self.engine = Engine(bundle, device=run.device, precision=run.dtype, vocab=vocab, optimize=run.device.type == "cuda")

    def run(self, step: int, reporter: Reporter) -> None:
        v, t0 = self.val, time.monotonic()
        requests = [Request(prompt=p, negative_prompt=v.negative_prompt, seed=int(v.seed) + i, guidance_scale=v.guidance_scale,
                            steps=v.steps, scheduler=v.scheduler, width=self.resolution, height=self.resolution)
                    for i, p in enumerate(v.prompts)]
        try:
            images = [r.pixels for r in self.engine.render_many(requests, batch_size=len(requests))]
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - images are a view on training, never a reason to lose it
            log.warning("validation images at step %d failed (%s: %s); training goes on", step, type(e).__name__, e)
            return
        reporter.images("validation", images, step)
        log.info("validation images at step %d (%.1fs)", step, time.monotonic() - t0)


class LossLog:
    """Per-step losses, kept on the device until a report reads them back in one synchronisation;
    the smoothed loss (mean of the last logEvery steps) and the samples/s between reports."""

    def __init__(self, history: list[float], window: int, global_batch: int):
        self.history, self.window, self.G = history, window, global_batch
        self.pending: list[tuple[int, torch.Tensor]] = []
        self.smoothed: float | None = history[-1] if history else None
        self.samples_per_second: float | None = None
        self._t = time.monotonic()

    @property
    def unread(self) -> int:
        return len(self.pending)

    def add(self, step: int, loss: torch.Tensor) -> None:
        self.pending.append((step, loss))

    def read(self) -> list[tuple[int, float]]:
        """(step, loss) of every step since the last read."""
        if not self.pending:
            return []
        values = torch.stack([v for _, v in self.pending]).tolist()
        points = [(s, v) for (s, _), v in zip(self.pending, values)]
        dt = time.monotonic() - self._t
        if dt > 0:
            self.samples_per_second = len(points) * self.G / dt
        self._t = time.monotonic()
        self.pending.clear()
        self.history.extend(values)
        recent = self.history[-self.window :]
        self.smoothed = sum(recent) / len(recent)
        return points


class StepTimer:
    """Pure step time after the first `skip` steps (no checkpoints or validation inside), for benchmarks."""

    def __init__(self, device: torch.device, skip: int):
        self.device, self.skip = device, skip
        self.t, self.steps, self.t0 = 0.0, 0, None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def begin(self, steps_done: int) -> None:
        if steps_done >= self.skip:
            self._sync()
            self.t0 = time.perf_counter()

    def end(self) -> None:
        if self.t0 is not None:
            self._sync()
            self.t += time.perf_counter() - self.t0
            self.steps += 1
            self.t0 = None

    def rate(self, samples_per_step: int) -> float | None:
        return self.steps * samples_per_step / self.t if self.t > 0 else None
