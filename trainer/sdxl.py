"""SDXL: its two text encoders, the conditioning it was trained with, its builtin models and its files.

What differs from SD 1.x/2.x, and only that, lives here; the trainer, the objective and the
rendering engine ask the model bundle (:class:`tinv.trainer.models.ModelBundle`, ``family ==
"sdxl"``) and reach this module through it.

- **Text.** Two encoders: CLIP ViT-L/14 (``text_encoder``, 768 wide; file key ``clip_l``) and
  OpenCLIP bigG (``text_encoder_2``, a ``CLIPTextModelWithProjection``, 1280 wide; ``clip_g``).
  Both tokenizers share one vocabulary, so one :class:`~tinv.trainer.tokens.ConceptVocab` lays
  out the placeholder ids for both; only the padding differs (``tokenizer_2`` pads with ``!``),
  which :func:`encode` restores so the hidden states equal diffusers'.
- **Conditioning** (as ``StableDiffusionXLPipeline.encode_prompt`` and SDXL's training):
  ``encoder_hidden_states`` = the penultimate hidden states of both encoders concatenated
  (768 + 1280 = 2048); ``text_embeds`` = the second encoder's pooled projection; ``time_ids`` =
  (original height, width, crop top, crop left, target height, width) -- for training, each
  image's real original size and crop (:func:`geometry`), for generation the image size and no
  crop. Empty negative prompts are zeros (the SDXL pipeline's ``force_zeros_for_empty_prompt``).
- **Learned vectors.** Each concept has ``n`` rows in both encoders; the trainer keeps them as ONE
  fp32 parameter ``[rows, 768 + 1280]`` whose column blocks the two token layers read
  (:func:`tinv.trainer.tokens.install_all`), so the optimizer, the all-reduce and the exact
  resume are the SD code unchanged. :func:`split` / :func:`join` convert to and from files.
- **Files** (:func:`write_files`), per checkpoint: ``<token>.safetensors`` =
  ``{"clip_l": [n, 768], "clip_g": [n, 1280]}`` (what AUTOMATIC1111, ComfyUI and kohya load),
  and for diffusers ``learned_embeds.safetensors`` ``{token: [n, 768]}`` +
  ``learned_embeds_2.safetensors`` ``{token: [n, 1280]}`` (the layout of diffusers' own SDXL
  Textual Inversion script), loaded with two calls::

      pipe = StableDiffusionXLPipeline.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0")
      pipe.load_textual_inversion(f"{ckpt}/learned_embeds.safetensors", token="<tok>",
                                  text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
      pipe.load_textual_inversion(f"{ckpt}/learned_embeds_2.safetensors", token="<tok>",
                                  text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)

  (or, from the one-file layout: ``sd = load_file(f"{ckpt}/<tok>.safetensors")`` and the same two
  calls with ``sd["clip_l"]`` and ``sd["clip_g"]``).
- **Models built in code**: ``builtin:tiny-xl`` (toy sizes, real classes: ``UNet2DConditionModel``
  with ``addition_embed_type="text_time"``, ``CLIPTextModel`` + ``CLIPTextModelWithProjection``;
  tests, CPU, seconds) and ``builtin:sdxl-random`` (SDXL base's architecture with random
  weights, for GPU benchmarks at 1024 px).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import ConfigError, ModelError
from .tiny import TINY_RESOLUTION  # builtin:tiny-xl trains at builtin:tiny's size (8x8 latents)

FAMILY = "sdxl"
NATIVE_RESOLUTION = 1024
COMPONENTS = ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "vae", "unet", "scheduler")
FORMAT_KEYS = ("clip_l", "clip_g")  # file keys of text_encoder / text_encoder_2
DIFFUSERS_FILES = ("learned_embeds.safetensors", "learned_embeds_2.safetensors")


# ---------------------------------------------------------------------------- recognising and loading


def is_sdxl_folder(path: Path) -> bool:
    """A diffusers folder is SDXL when its pipeline class says so or it has a second encoder and tokenizer."""
    path = Path(path)
    index = path / "model_index.json"
    if index.is_file():
        try:
            cls = json.loads(index.read_text()).get("_class_name", "")
        except ValueError:
            cls = ""
        if "XL" in cls:
            return True
    return (path / "text_encoder_2").is_dir() and (path / "tokenizer_2").is_dir()


def load_folder(path: Path, source: str, variant: str | None = None) -> dict:
    """The components of a diffusers SDXL folder (base layout: both encoders and tokenizers)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    path = Path(path)
    missing = [c for c in COMPONENTS if not (path / c).is_dir()]
    if missing:
        hint = (" (an SDXL refiner has only the second encoder: Textual Inversion needs the base model)"
                if "text_encoder" in missing and (path / "text_encoder_2").is_dir() else "")
        raise ModelError(f"{source} is an SDXL folder without {', '.join(m + '/' for m in missing)}{hint}")
    kw = {"variant": variant} if variant else {}
    try:
        c = {
            "tokenizer": CLIPTokenizer.from_pretrained(path / "tokenizer"),
            "tokenizer_2": CLIPTokenizer.from_pretrained(path / "tokenizer_2"),
            "text_encoder": CLIPTextModel.from_pretrained(path / "text_encoder", attn_implementation="sdpa", **kw),
            "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(path / "text_encoder_2", attn_implementation="sdpa", **kw),
            "vae": AutoencoderKL.from_pretrained(path / "vae", **kw),
            "unet": UNet2DConditionModel.from_pretrained(path / "unet", **kw),
            "scheduler": DDPMScheduler.from_pretrained(path / "scheduler"),
        }
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise ModelError(f"cannot load the SDXL model at {source}: {e}") from e
    if c["unet"].config.addition_embed_type != "text_time":
        raise ModelError(f"{source}: its UNet has addition_embed_type {c['unet'].config.addition_embed_type!r}, not SDXL's 'text_time'")
    for name in ("text_encoder", "text_encoder_2", "vae", "unet"):
        c[name].eval()
        c[name].requires_grad_(False)
    return c


# ---------------------------------------------------------------------------- builtin models


def _tokenizers():
    """Two tokenizers over the tiny BPE vocabulary, padded as SDXL's are (EOS; '!')."""
    from transformers import CLIPTokenizer

    from .tiny import tokenizer_files

    vocab, merges = tokenizer_files()
    one = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=77)
    two = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=77, pad_token="!")
    return one, two


def _scheduler():
    from diffusers import DDPMScheduler

    # SDXL base's schedule (its scheduler_config.json, with the DDPM class the trainer uses).
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         prediction_type="epsilon", clip_sample=False, steps_offset=1, timestep_spacing="leading")


def _text_config(tok, **kw):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                          max_position_embeddings=77, attn_implementation="sdpa", **kw)


def build(ref: str) -> dict:
    """Components of ``builtin:tiny-xl[?seed=N]`` or ``builtin:sdxl-random[?seed=N]``."""
    name, _, query = ref.split(":", 1)[1].partition("?")
    seed = 0
    for kv in filter(None, query.split("&")):
        k, _, v = kv.partition("=")
        if k == "seed":
            seed = int(v)
    if name == "sdxl-random":
        return build_sdxl_random(seed)
    if name != "tiny-xl":
        raise ModelError(f"unknown builtin SDXL model {ref!r}: 'builtin:tiny-xl' or 'builtin:sdxl-random'")
    return build_tiny_xl(seed)


def build_tiny_xl(seed: int = 0) -> dict:
    """SDXL's structure at toy sizes: encoders 32 and 48 wide (so a mix-up of the two cannot pass),
    cross-attention 80 = 32 + 48, pooled projection 48, time ids embedded 8 wide (48 + 6 x 8 = 96)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tok1, tok2 = _tokenizers()
    n = len(tok1.get_vocab())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        te1 = CLIPTextModel(_text_config(tok1, vocab_size=n, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                         num_attention_heads=4, projection_dim=32, hidden_act="quick_gelu"))
        te2 = CLIPTextModelWithProjection(_text_config(tok2, vocab_size=n, hidden_size=48, intermediate_size=96,
                                                       num_hidden_layers=3, num_attention_heads=4, projection_dim=48,
                                                       hidden_act="gelu"))
        with torch.no_grad():  # CLIP-like token norms (~0.4), as builtin:tiny does
            for te in (te1, te2):
                w = te.get_input_embeddings().weight
                w.mul_(0.4 / 0.02 / w.shape[1] ** 0.5)
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 16, 16), layers_per_block=1,
                            latent_channels=4, norm_num_groups=4, sample_size=TINY_RESOLUTION, scaling_factor=0.13025,
                            force_upcast=True)
        unet = UNet2DConditionModel(
            sample_size=TINY_RESOLUTION // 8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=80, attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=8,
            transformer_layers_per_block=(1, 2), addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=48 + 6 * 8,
        )
    for m in (te1, te2, vae, unet):
        m.eval()
    return {"tokenizer": tok1, "tokenizer_2": tok2, "text_encoder": te1, "text_encoder_2": te2, "vae": vae, "unet": unet,
            "scheduler": _scheduler()}


def build_sdxl_random(seed: int = 0, device: str | None = None) -> dict:
    """SDXL base 1.0's architecture (2.6B UNet, CLIP ViT-L + OpenCLIP bigG, the 84M VAE) with random
    weights, built on `device` (default CUDA when available); benchmarks only. The tokenizers are the
    tiny BPE ones; both encoders keep CLIP's 49,408-row tables."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tok1, tok2 = _tokenizers()
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []), dev:
        torch.manual_seed(seed)
        te1 = CLIPTextModel(_text_config(tok1, vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                         num_attention_heads=12, projection_dim=768, hidden_act="quick_gelu"))
        te2 = CLIPTextModelWithProjection(_text_config(tok2, vocab_size=49408, hidden_size=1280, intermediate_size=5120,
                                                       num_hidden_layers=32, num_attention_heads=20, projection_dim=1280,
                                                       hidden_act="gelu"))
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                            latent_channels=4, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
        unet = UNet2DConditionModel(
            sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
    for m in (te1, te2, vae, unet):
        m.eval()
    return {"tokenizer": tok1, "tokenizer_2": tok2, "text_encoder": te1, "text_encoder_2": te2, "vae": vae, "unet": unet,
            "scheduler": _scheduler()}


def save(path: str | Path, ref: str = "builtin:tiny-xl") -> Path:
    """Write a builtin SDXL as a diffusers folder (what ``model.source: /that/folder`` loads)."""
    from diffusers import StableDiffusionXLPipeline

    c = build(ref)
    StableDiffusionXLPipeline(**c).save_pretrained(str(path))
    return Path(path)


# ---------------------------------------------------------------------------- conditioning


def _repad(ids: torch.Tensor, eos: int, pad: int) -> torch.Tensor:
    """ConceptVocab pads with its tokenizer's pad id; the second tokenizer pads with its own: every
    position after a row's first EOS becomes `pad`."""
    if pad == eos:
        return ids
    pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    first_eos = torch.where(ids == eos, pos, ids.shape[1]).min(dim=1, keepdim=True).values
    return torch.where(pos > first_eos, torch.full_like(ids, pad), ids)


def encode(bundle, vocab, prompts: list[str], *, initializer: bool = False, zero: list[bool] | None = None):
    """(encoder_hidden_states [B, 77, w1 + w2], pooled text_embeds [B, p2]) of SDXL for these prompts.

    `zero`: rows to replace by zeros (empty negative prompts, as the SDXL pipeline does)."""
    ids = vocab.batch(prompts, initializer)
    hidden, pooled = [], None
    for slot in bundle.text:
        dev = next(slot.encoder.parameters()).device
        tok = slot.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        out = slot.encoder(_repad(ids, vocab.eos, pad).to(dev), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        if out[0].dim() == 2:  # CLIPTextModelWithProjection: its first output is the pooled projection
            pooled = out[0]
    h = torch.cat(hidden, dim=-1)
    if zero is not None and any(zero):
        keep = torch.tensor([not z for z in zero], device=h.device)
        h = h * keep.view(-1, 1, 1).to(h.dtype)
        pooled = pooled * keep.view(-1, 1).to(pooled.dtype)
    return h, pooled


def geometry(size: tuple[int, int], resolution: int, center_crop: bool) -> tuple[int, int, int, int]:
    """(original height, width, crop top, crop left) of an image of PIL `size` (w, h) as
    :func:`tinv.trainer.data.fit` shapes it: the crop in the resized frame, SDXL's convention
    (diffusers' SDXL scripts resize the short side to `resolution`, then crop)."""
    w, h = int(size[0]), int(size[1])
    if not center_crop:
        return h, w, 0, 0  # the whole image, resized to the square
    s = min(w, h)
    scale = resolution / s
    return h, w, round((h - s) // 2 * scale), round((w - s) // 2 * scale)


def time_ids(rows: list[tuple[int, int, int, int]], flips: list[int], resolution: int, device, center_crop: bool) -> torch.Tensor:
    """[B, 6] time ids: original size, crop (mirrored for flipped samples), target size."""
    out = []
    for (h, w, top, left), f in zip(rows, flips):
        if f and center_crop:
            left = round(w * resolution / min(w, h)) - resolution - left
        out.append([h, w, top, left, resolution, resolution])
    return torch.tensor(out, dtype=torch.float32, device=device)


def unet_kwargs(pooled: torch.Tensor, ids: torch.Tensor, dtype) -> dict:
    return {"added_cond_kwargs": {"text_embeds": pooled.to(dtype), "time_ids": ids.to(dtype)}}


class TrainConditioning:
    """The objective's text conditioning for SDXL: hidden states, pooled embeds and each sample's
    time ids from its image's real size and crop (and its flip)."""

    def __init__(self, bundle, vocab, stream, geometry_rows, resolution: int, center_crop: bool, device):
        self.bundle, self.vocab, self.stream = bundle, vocab, stream
        self.geometry, self.resolution, self.center_crop, self.device = geometry_rows, resolution, center_crop, device

    def __call__(self, prompts: list[str], ks: list[int], *, initializer: bool = False, dtype=torch.float32):
        hidden, pooled = encode(self.bundle, self.vocab, prompts, initializer=initializer)
        picks = [self.stream.sample(k) for k in ks]
        ids = time_ids([self.geometry[p[0]] for p in picks], [p[1] for p in picks], self.resolution, self.device, self.center_crop)
        return hidden, unet_kwargs(pooled, ids, dtype)


def render_conditioning(bundle, vocab, negatives: list[str], prompts: list[str], size: tuple[int, int], cfg: bool, dtype):
    """(hidden, UNet kwargs) for a batch of the engine: negatives first when guided; time ids of an
    uncropped image of the render size (the pipeline's defaults)."""
    texts = (negatives + prompts) if cfg else prompts
    zero = [not n for n in negatives] + [False] * len(prompts) if cfg else None
    hidden, pooled = encode(bundle, vocab, texts, zero=zero)
    h, w = size
    ids = torch.tensor([[h, w, 0, 0, h, w]] * len(texts), dtype=torch.float32, device=hidden.device)
    return hidden, unet_kwargs(pooled, ids, dtype)


# ---------------------------------------------------------------------------- vectors and files


def split(rows: torch.Tensor, widths: list[int]) -> dict[str, torch.Tensor]:
    """[n, w1 + w2] (the trainer's layout) -> {"clip_l": [n, w1], "clip_g": [n, w2]}."""
    if rows.shape[1] != sum(widths):
        raise ConfigError(f"SDXL vectors are {rows.shape[1]} wide; this model needs {' + '.join(map(str, widths))}")
    a, b = rows.split(list(widths), dim=1)
    return {"clip_l": a.contiguous(), "clip_g": b.contiguous()}


def join(pair: dict) -> torch.Tensor:
    """{"clip_l": [n, w1], "clip_g": [n, w2]} -> [n, w1 + w2]; both must have the same n."""
    a, b = pair["clip_l"], pair["clip_g"]
    if a.shape[0] != b.shape[0]:
        raise ConfigError(f"an SDXL embedding needs as many clip_l as clip_g vectors; found {a.shape[0]} and {b.shape[0]}")
    return torch.cat([a.float(), b.float()], dim=1)


def write_files(folder: Path, embeddings: dict[str, torch.Tensor], step: int, widths: list[int], model_source: str | None) -> list[str]:
    """Write a checkpoint's SDXL files (see the module doc); `embeddings`: {token: [n, w1 + w2]}."""
    from safetensors.torch import save_file

    from .formats import safe_filename

    folder.mkdir(parents=True, exist_ok=True)
    pairs = {t: split(e.detach().to("cpu", torch.float32), widths) for t, e in embeddings.items()}
    meta = {"format": "pt", "step": str(step), "model_family": FAMILY, **({"sd_checkpoint_name": model_source} if model_source else {})}
    names = []
    for token, pair in pairs.items():
        name = f"{safe_filename(token)}.safetensors"
        save_file(pair, str(folder / name), metadata=meta)
        names.append(name)
    for key, fname in zip(FORMAT_KEYS, DIFFUSERS_FILES):
        save_file({t: p[key].clone() for t, p in pairs.items()}, str(folder / fname), metadata={**meta, "tinv": "learned_embeds"})
        names.append(fname)
    return names


def read_pair(folder: Path) -> dict | None:
    """{token: {"clip_l", "clip_g"}} from a folder holding diffusers' SDXL pair of files, else None."""
    from safetensors.torch import load_file

    from .errors import FormatError

    a, b = (Path(folder) / n for n in DIFFUSERS_FILES)
    if not (a.is_file() and b.is_file()):
        return None
    try:
        one, two = load_file(str(a)), load_file(str(b))
    except Exception as e:
        raise FormatError(f"{folder}: unreadable SDXL embedding files ({e})") from e
    if set(one) != set(two):
        raise FormatError(f"{folder}: {DIFFUSERS_FILES[0]} has tokens {sorted(one)}, {DIFFUSERS_FILES[1]} has {sorted(two)}")
    out = {}
    for t in one:
        l, g = one[t].float(), two[t].float()
        out[t] = {"clip_l": l.unsqueeze(0) if l.dim() == 1 else l, "clip_g": g.unsqueeze(0) if g.dim() == 1 else g}
    return out


def pipeline(bundle, scheduler=None):
    """A diffusers StableDiffusionXLPipeline over the bundle's very modules (no copy)."""
    from diffusers import StableDiffusionXLPipeline

    (one, two) = bundle.text
    return StableDiffusionXLPipeline(vae=bundle.vae, text_encoder=one.encoder, text_encoder_2=two.encoder, tokenizer=one.tokenizer,
                                     tokenizer_2=two.tokenizer, unet=bundle.unet, scheduler=scheduler or bundle.scheduler)
