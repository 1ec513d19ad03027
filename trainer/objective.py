"""What one training sample is and what it costs: the sample stream, the latent cache and the loss.

- :class:`Stream`: sample k of the run (a global index) picks its image, flip and template from
  ``(seed, k)`` alone; epoch e visits the images in a permutation drawn from ``(seed, e)``, like a
  shuffled DataLoader. Nothing but the step number is needed to continue the stream exactly.
- :class:`LatentCache`: every image (and its mirror image) VAE-encoded ONCE; each sample draws
  ``mean + std * eps`` from the cached distribution -- what encoding every step does, without the
  VAE encoder per sample. Each rank encodes a strided shard; the shards are all-gathered.
- :class:`Objective`: per-sample MSE of the UNet's prediction against the noise (epsilon models)
  or the velocity (v-prediction), summed and divided by the global batch, plus the optional
  hidden-state regulariser. Noise, timestep and latent draw of sample k come from ``(seed, k)``.
"""

from __future__ import annotations

import logging
import random
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from . import data
from .errors import ConfigError

log = logging.getLogger("tinv.trainer")


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


# Purposes of the independent draws of one run (the third argument of mix).
IMAGE_ORDER, SAMPLE_CHOICE, INIT_VECTORS, NOISE = 1, 2, 3, 4


class Stream:
    """Which image/flip/template sample k uses: a pure function of (seed, k)."""

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
            g = torch.Generator().manual_seed(mix(self.seed, epoch, IMAGE_ORDER))
            perm = torch.randperm(self.n, generator=g).tolist()
            self._perm = {epoch: perm}
        return perm[pos]

    def sample(self, k: int) -> tuple[int, int, str]:
        """(image, flip 0/1, prompt)."""
        img = self.image(k)
        r = random.Random(mix(self.seed, k, SAMPLE_CHOICE))
        flip = 1 if r.random() < self.flip_p else 0
        template = r.randrange(len(self.ds.templates[self.ds.concept[img]]))
        return img, flip, self.ds.prompt(img, template)


def check_prompts(ds: data.Dataset, vocab) -> None:
    """Every prompt the stream can build must hold every vector of its concept (after the cut to the
    encoder's length): a template gluing the token into a word, or a prompt too long for the
    vectors, would otherwise train nothing and still report success."""
    seen: set[str] = set()
    for img in range(len(ds)):
        c = ds.concept[img]
        for t, template in enumerate(ds.templates[c]):
            prompt = ds.prompt(img, t)
            if prompt in seen:
                continue
            seen.add(prompt)
            token = ds.tokens[c]
            mentioned = [p.token for p in vocab.split(prompt) if not isinstance(p, str)]
            if token in mentioned and token not in vocab.missing_vectors(prompt):
                continue
            where = f"template {template!r}" + (f" with the caption of {ds.names[img]}" if ds.caption[img] else "")
            if token not in mentioned:
                why = "does not contain the token as a word of its own (is '{}' glued to a letter, digit, '_' or '-'?)"
            else:
                why = f"is {len(vocab.ids(prompt))} tokens long: the text encoder reads {vocab.room}, so some of its vectors are cut off"
            raise ConfigError(
                f"concept {token!r}: the prompt {prompt!r} ({where}) {why}; its vectors would never be trained. "
                "Fix the template (put a space next to '{}'), shorten it or the caption, or use fewer vectors"
            )


class LatentCache:
    """(mean, std) of the VAE's latent distribution per image and flip, [N, F, C, h, w] fp32 on device."""

    def __init__(self, vae, vae_scale: int, ds: data.Dataset, device, flips: bool, dist, chunk: int = 8):
        n = len(ds)
        mine = list(range(dist.rank, n, dist.world))
        per = (n + dist.world - 1) // dist.world
        nf = 2 if flips else 1
        h = ds.pixels[0].shape[0] // vae_scale
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
                d = vae.encode(x).latent_dist
                b = len(idx)
                mean[s : s + b] = d.mean.float().view(nf, b, c, h, h).transpose(0, 1)
                std[s : s + b] = d.std.float().view(nf, b, c, h, h).transpose(0, 1)
        if dist.world > 1:
            gm, gs = dist.all_gather(mean), dist.all_gather(std)
            mean = torch.zeros(n, nf, c, h, h, device=device)
            std = torch.zeros(n, nf, c, h, h, device=device)
            for r in range(dist.world):
                idx = list(range(r, n, dist.world))
                mean[idx] = gm[r][: len(idx)]
                std[idx] = gs[r][: len(idx)]
        self.mean, self.std = mean[:n], std[:n]
        self.flips = flips
        self.scale = float(vae.config.scaling_factor)


class NoiseSchedule:
    """The model's training noise schedule with the spec's overrides (training.noise)."""

    def __init__(self, scheduler_config, overrides, device):
        from diffusers import DDPMScheduler

        cfg = dict(scheduler_config)
        for k in ("beta_start", "beta_end", "beta_schedule", "prediction_type"):
            v = getattr(overrides, k)
            if v is not None:
                cfg[k] = v
        sched = DDPMScheduler.from_config(cfg)
        self.prediction = sched.config.prediction_type
        if self.prediction not in ("epsilon", "v_prediction"):
            raise ConfigError(f"prediction type {self.prediction!r} is not supported (epsilon or v_prediction)")
        self.alphas = sched.alphas_cumprod.to(device=device, dtype=torch.float32)
        self.timesteps = int(sched.config.num_train_timesteps)


class Objective:
    """The training loss of a list of global sample indices."""

    def __init__(self, *, unet, encoder, vocab, stream: Stream, latents: LatentCache, noise: NoiseSchedule,
                 seed: int, global_batch: int, device, dtype, hidden_reg_weight: float = 0.0, condition=None):
        """`condition`: the model family's text conditioning, ``(prompts, ks, initializer=, dtype=) ->
        (encoder_hidden_states, extra UNet kwargs)`` (SDXL: :class:`tinv.trainer.sdxl.TrainConditioning`);
        default: SD 1.x/2.x's, the last hidden states of the one encoder."""
        self.unet, self.encoder, self.vocab = unet, encoder, vocab
        self.condition = condition or self._sd_condition
        self.stream, self.latents, self.noise = stream, latents, noise
        self.seed, self.G, self.device, self.dtype = seed, global_batch, device, dtype
        self.hidden_reg_weight = hidden_reg_weight
        self.autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()

    def draw(self, ks: list[int]):
        """Noisy latents, timesteps, targets and prompts of these samples."""
        picks = [self.stream.sample(k) for k in ks]
        dev = self.device
        imgs = torch.tensor([p[0] for p in picks], device=dev)
        fl = torch.tensor([p[1] for p in picks], device=dev) if self.latents.flips else torch.zeros(len(ks), dtype=torch.long, device=dev)
        mu, sd = self.latents.mean[imgs, fl], self.latents.std[imgs, fl]
        eps, noise, ts = [], [], []
        for k in ks:
            g = torch.Generator(device=dev).manual_seed(mix(self.seed, k, NOISE))
            ts.append(torch.randint(0, self.noise.timesteps, (1,), generator=g, device=dev))
            eps.append(torch.randn(mu.shape[1:], generator=g, device=dev))
            noise.append(torch.randn(mu.shape[1:], generator=g, device=dev))
        t = torch.cat(ts)
        latents = (mu + sd * torch.stack(eps)) * self.latents.scale
        noise = torch.stack(noise)
        a = self.noise.alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        target = noise if self.noise.prediction == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * latents
        return noisy, t, target, [p[2] for p in picks]

    def _sd_condition(self, prompts: list[str], ks: list[int], *, initializer: bool = False, dtype=None):
        return self.encoder(self.vocab.batch(prompts, initializer=initializer).to(self.device))[0], {}

    def __call__(self, ks: list[int], *, backward: bool = True, scaler=None) -> torch.Tensor:
        """Backpropagates (sum of these samples' losses) / G; returns that sum, on the device (reading
        it here would stall the GPU queue)."""
        noisy, t, target, prompts = self.draw(ks)
        with self.autocast:
            hidden, extra = self.condition(prompts, ks, dtype=self.dtype)
            x = noisy.to(self.dtype)
            if self.device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            pred = self.unet(x, t, hidden.to(self.dtype), **extra).sample
        per = F.mse_loss(pred.float(), target, reduction="none").mean(dim=(1, 2, 3))
        loss = per.sum() / self.G
        if self.hidden_reg_weight > 0:
            with torch.no_grad(), self.autocast:
                ref = self.condition(prompts, ks, initializer=True, dtype=self.dtype)[0]
            reg = F.mse_loss(hidden.float(), ref.float(), reduction="none").mean(dim=(1, 2)).sum() / self.G
            loss = loss + self.hidden_reg_weight * reg
        if backward:
            (scaler.scale(loss) if scaler else loss).backward()
        return per.detach().sum()

    def accumulate(self, ks: list[int], micro: int, *, scaler, optimizer) -> tuple[torch.Tensor, int]:
        """Forward and backward over these samples in micro-batches of `micro`: (loss sum, the
        micro-batch that fitted). An out-of-memory halves the micro-batch and redoes the step."""
        while True:
            try:
                total = torch.zeros((), device=self.device)
                for i in range(0, len(ks), micro):
                    total = total + self(ks[i : i + micro], scaler=scaler)
                return total, micro
            except torch.OutOfMemoryError:
                if micro == 1:
                    raise
                optimizer.zero_grad(set_to_none=True)
                micro = max(1, micro // 2)
                torch.cuda.empty_cache()
                log.warning("out of GPU memory: micro-batch now %d samples", micro)

    def mean_loss(self, ks: list[int], micro: int) -> float:
        """Mean loss of fixed samples, without gradients (before/after figures for tests and benchmarks)."""
        with torch.no_grad():
            return sum(float(self(ks[i : i + micro], backward=False)) for i in range(0, len(ks), micro)) / len(ks)
