"""``builtin:tiny``: a tiny random-weight Stable Diffusion built in code, deterministic from a seed.

It uses the real classes -- diffusers ``UNet2DConditionModel``, ``AutoencoderKL``,
``DDPMScheduler`` and transformers ``CLIPTextModel`` / ``CLIPTokenizer`` -- at toy sizes, so the
trainer, the formats and diffusers' ``load_textual_inversion`` are exercised exactly as with
SD 1.5, on a CPU, in seconds, with no download.

The tokenizer is a real CLIP-format byte-level BPE (lower-case, ``</w>`` word ends, CLIP's
pre-tokeniser) whose merges are *learned here* from a corpus built in code (the prompt
templates plus an English word list). The learner is a plain greedy BPE with a total order on
ties, so the vocabulary is identical on every machine and every run (the Rust trainer in
``tokenizers`` breaks ties by hash order, which differs between processes).

Variants: ``builtin:tiny`` (SD 1.x-like: epsilon prediction) and ``builtin:tiny-v`` (SD 2.x-like:
v-prediction, linear attention projections). ``?seed=N`` picks another set of random weights.
"""

from __future__ import annotations

import collections
import functools
import re
from pathlib import Path

TINY_RESOLUTION = 64  # what examples and tests train at: the VAE downsamples 8x -> 8x8 latents

_WORDS = """
a an the of in on at to with and or for from by my one two three this that is are be as it its
photo photograph picture image painting drawing sketch illustration render rendering rendition
style portrait close up close-up cropped clean dirty dark bright cool good nice small large weird
big little old new beautiful pretty ugly sharp soft blurry detailed simple modern vintage abstract
red orange yellow green blue purple pink white black grey gray brown gold silver teal colorful
background wall sky floor table room space sun moon star stars nebula galaxy ocean waves sea water
pool river lake mountain mountains forest tree trees leaf leaves flower flowers rose roses petals
plant grass field garden city street building house window door bricks brick stone marble wood
glass metal paper canvas book books light lights shadow shadows night day morning evening sunset
cat dog bird fish horse cow sheep lion tiger bear fox rabbit mouse toy teddy doll robot car bike
bicycle train boat plane person man woman child face hand hands eye eyes hair head people
logo brain circle circles line lines dot dots node nodes network graph shape shapes geometric
pattern texture gradient splash paint oil watercolor neon pastel ink pencil charcoal digital
art artwork artist poster icon symbol sign mark emblem badge sticker print design letter word
front behind above below under over top bottom left right middle center near far around
covered full many several lots lined fluid wavy curves curve solid fading bed cluster stack
open dried glowing floating shining seen surrounded made looking standing sitting lying flying
very extremely slightly highly quite really more most less least thin thick long short wide tall
game boy phone fruit lemons lemon apple apples sunglasses products shutters umbrellas orchids
cinder blocks stucco lollipops eclipse library astronaut earth northern branch ring buttons
van gogh monet picasso style of in the style of
""".split()


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable-unicode table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _corpus_words() -> collections.Counter:
    from .data import OBJECT_TEMPLATES, STYLE_TEMPLATES

    text = " ".join(OBJECT_TEMPLATES + STYLE_TEMPLATES).replace("{}", " ") + " " + " ".join(_WORDS)
    counts: collections.Counter = collections.Counter()
    for w in re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", text.lower()):
        counts[w] += 1
    for w in set(_WORDS):  # every listed word ends up a single token
        counts[w] += 2
    return counts


def learn_bpe(counts: collections.Counter, max_merges: int = 4000) -> list[tuple[str, str]]:
    """Greedy BPE on word counts; ties broken by the pair itself (a total order), so the
    result never depends on hash order. Incremental pair counts + a lazy heap: ~50 ms."""
    import heapq

    b2u = _bytes_to_unicode()
    words: list[list[str]] = []
    freq: list[int] = []
    for w, c in sorted(counts.items()):
        syms = [b2u[b] for b in w.encode("utf-8")]
        syms[-1] = syms[-1] + "</w>"
        words.append(syms)
        freq.append(c)
    pair_count: collections.Counter = collections.Counter()
    where: dict[tuple[str, str], set[int]] = collections.defaultdict(set)
    for i, syms in enumerate(words):
        for a, b in zip(syms, syms[1:]):
            pair_count[(a, b)] += freq[i]
            where[(a, b)].add(i)
    heap = [(-c, p) for p, c in pair_count.items()]
    heapq.heapify(heap)
    merges: list[tuple[str, str]] = []
    while heap and len(merges) < max_merges:
        negc, pair = heapq.heappop(heap)
        if pair_count.get(pair, 0) != -negc or negc == 0:
            continue  # stale entry
        merges.append(pair)
        joined = pair[0] + pair[1]
        touched: set[tuple[str, str]] = set()
        for i in sorted(where.pop(pair, ())):
            syms, c = words[i], freq[i]
            for a, b in zip(syms, syms[1:]):
                pair_count[(a, b)] -= c
                touched.add((a, b))
            out, j = [], 0
            while j < len(syms):
                if j + 1 < len(syms) and syms[j] == pair[0] and syms[j + 1] == pair[1]:
                    out.append(joined)
                    j += 2
                else:
                    out.append(syms[j])
                    j += 1
            words[i] = out
            for a, b in zip(out, out[1:]):
                pair_count[(a, b)] += c
                where[(a, b)].add(i)
                touched.add((a, b))
        pair_count.pop(pair, None)
        for p in touched:
            c = pair_count.get(p, 0)
            if c > 0 and p != pair:
                heapq.heappush(heap, (-c, p))
            elif c <= 0:
                pair_count.pop(p, None)
    return merges


@functools.lru_cache(maxsize=1)
def tokenizer_files() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) in CLIP's layout: 256 bytes, 256 bytes+</w>, merges, then the specials."""
    b2u = _bytes_to_unicode()
    base = list(b2u.values())
    vocab_list = base + [b + "</w>" for b in base]
    merges = learn_bpe(_corpus_words())
    seen = set(vocab_list)
    for a, b in merges:
        if a + b not in seen:
            vocab_list.append(a + b)
            seen.add(a + b)
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(vocab_list)}, [(a, b) for a, b in merges]


def build_tokenizer():
    from transformers import CLIPTokenizer

    vocab, merges = tokenizer_files()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=77)


def parse_ref(ref: str) -> tuple[str, int]:
    """'builtin:tiny[-v][?seed=N]' (or 'builtin:sd15-random', for benchmarks) -> (variant, seed)."""
    body = ref.split(":", 1)[1]
    name, _, query = body.partition("?")
    seed = 0
    for kv in filter(None, query.split("&")):
        k, _, v = kv.partition("=")
        if k == "seed":
            seed = int(v)
    if name not in ("tiny", "tiny-v", "sd15-random"):
        from .errors import ModelError

        raise ModelError(f"unknown builtin model {ref!r}: the builtin models are 'builtin:tiny' and 'builtin:tiny-v'")
    return name, seed


def build(ref: str = "builtin:tiny") -> dict:
    """The components of a tiny SD as a dict (tokenizer, text_encoder, vae, unet, scheduler)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    variant, seed = parse_ref(ref)
    if variant == "sd15-random":
        return build_sd15_random(seed)
    v = variant == "tiny-v"
    tokenizer = build_tokenizer()
    width = 32
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer.get_vocab()),
                hidden_size=width,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                projection_dim=width,
                hidden_act="quick_gelu" if not v else "gelu",
                attn_implementation="sdpa",
            )
        )
        # CLIP's real token embeddings have norm ~0.4; a std-0.02 init gives ~0.11. Scale so that
        # norm regularisation and initialisation behave as on the real model.
        with torch.no_grad():
            text_encoder.get_input_embeddings().weight.mul_(0.4 / 0.02 / width**0.5)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 16, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=4,
            sample_size=TINY_RESOLUTION,
            scaling_factor=0.18215,
        )
        unet = UNet2DConditionModel(
            sample_size=TINY_RESOLUTION // 8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=width,
            attention_head_dim=(2, 4) if v else 8,
            use_linear_projection=v,
            norm_num_groups=8,
        )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction" if v else "epsilon",
        clip_sample=False,
        steps_offset=1,
    )
    for m in (text_encoder, vae, unet):
        m.eval()
    return {"tokenizer": tokenizer, "text_encoder": text_encoder, "vae": vae, "unet": unet, "scheduler": scheduler}


def build_sd15_random(seed: int = 0, device: str | None = None) -> dict:
    """Stable Diffusion 1.5's architecture (860M UNet, ViT-L/14 text encoder, 84M VAE) with random
    weights, for benchmarks only (``builtin:sd15-random``; not an API model source). The tokenizer
    is the tiny BPE one; the text encoder keeps CLIP's 49,408-row table. Built directly on
    `device` (default: CUDA when available) because initialising 1.1B parameters on a CPU is slow."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = build_tokenizer()
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []), dev:
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                attn_implementation="sdpa",
            )
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
            scaling_factor=0.18215,
        )
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", clip_sample=False, steps_offset=1,
    )
    for m in (text_encoder, vae, unet):
        m.eval()
    return {"tokenizer": tokenizer, "text_encoder": text_encoder, "vae": vae, "unet": unet, "scheduler": scheduler}


def save(path: str | Path, ref: str = "builtin:tiny") -> Path:
    """Write the tiny model as a diffusers folder (what `model.source: /that/folder` loads)."""
    from diffusers import StableDiffusionPipeline

    c = build(ref)
    pipe = StableDiffusionPipeline(**c, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(path))
    return Path(path)
