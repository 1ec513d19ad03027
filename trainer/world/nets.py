"""The shapes model's components, built from the real diffusers/transformers classes, and the
world's two small image networks (the CLIP image tower and the evaluator).

Sizes are a preset (``Sizes``) so the unit tests build a micro model with the same code.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from . import scenes


@dataclass(frozen=True)
class Sizes:
    text_width: int = 64
    text_layers: int = 3
    vae_channels: tuple[int, ...] = (16, 32, 64, 64)
    unet_channels: tuple[int, ...] = (48, 96)
    unet_layers: int = 1
    tower_width: int = 32  # CLIP image tower / evaluator base width

    def as_dict(self) -> dict:
        return asdict(self)


FULL = Sizes()
MICRO = Sizes(text_width=16, text_layers=1, vae_channels=(4, 8, 8, 8), unet_channels=(16, 32), tower_width=4)


def tokenizer():
    """tinv's deterministic CLIP-format BPE tokenizer (the same one builtin:tiny uses)."""
    from ..tiny import build_tokenizer

    return build_tokenizer()


def text_encoder(tok, sz: Sizes):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tok.get_vocab()),
            hidden_size=sz.text_width,
            intermediate_size=sz.text_width * 2,
            num_hidden_layers=sz.text_layers,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            projection_dim=sz.text_width,
            hidden_act="quick_gelu",
            attn_implementation="sdpa",
        )
    )


def vae(sz: Sizes):
    from diffusers import AutoencoderKL

    n = len(sz.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=sz.vae_channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        mid_block_add_attention=False,  # flat 64 px scenes need no global attention in the VAE
        sample_size=scenes.SIZE,
        scaling_factor=1.0,  # set from the data after the VAE stage (as SD's 0.18215 was)
    )


def unet(sz: Sizes):
    from diffusers import UNet2DConditionModel

    n = len(sz.unet_channels)
    return UNet2DConditionModel(
        sample_size=scenes.SIZE // 2 ** (len(sz.vae_channels) - 1),
        in_channels=4,
        out_channels=4,
        block_out_channels=sz.unet_channels,
        layers_per_block=sz.unet_layers,
        down_block_types=("CrossAttnDownBlock2D",) * n,
        up_block_types=("CrossAttnUpBlock2D",) * n,
        cross_attention_dim=sz.text_width,
        attention_head_dim=8,
        norm_num_groups=8 if sz.unet_channels[0] >= 16 else 4,
    )


def scheduler():
    """SD 1.x's training scheduler (epsilon prediction, scaled-linear betas)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,
    )


class ImageNet(nn.Module):
    """A small CNN over 64 px images in [-1, 1] -> a feature vector; heads on top.

    Used twice: as the world CLIP's image tower (one projection head) and as the evaluator
    (one classification head per attribute, see :data:`HEADS`)."""

    def __init__(self, width: int, heads: dict[str, int]):
        super().__init__()
        w = width

        def block(i: int, o: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.GroupNorm(4, o), nn.SiLU(),
                                 nn.Conv2d(o, o, 3, padding=1), nn.GroupNorm(4, o), nn.SiLU(), nn.MaxPool2d(2))

        # A strided stem: 64 px -> 32 px at once (the world has no detail finer than 2 px).
        stem = nn.Sequential(nn.Conv2d(3, w, 4, stride=2, padding=1), nn.GroupNorm(4, w), nn.SiLU())
        self.body = nn.Sequential(stem, block(w, 2 * w), block(2 * w, 4 * w), block(4 * w, 4 * w),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w * 1, 8 * w), nn.SiLU())
        self.heads = nn.ModuleDict({k: nn.Linear(8 * w, n) for k, n in heads.items()})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.body(x)
        return {k: h(f) for k, h in self.heads.items()}


# The evaluator's heads: what is drawn (a shape or a mark), its colour, the background, the style.
HEADS = {"what": len(scenes.WHATS), "colour": len(scenes.COLOURS), "background": len(scenes.BACKGROUNDS), "style": len(scenes.STYLES)}


def evaluator(sz: Sizes) -> ImageNet:
    return ImageNet(sz.tower_width, HEADS)


def image_tower(sz: Sizes) -> ImageNet:
    return ImageNet(sz.tower_width, {"proj": sz.text_width})


def labels(batch: list[scenes.Scene]) -> dict[str, torch.Tensor]:
    """Ground-truth classes per head; -100 (ignored) where a head does not apply (a mark's colour)."""
    colours, bgs = list(scenes.COLOURS), list(scenes.BACKGROUNDS)
    return {
        "what": torch.tensor([scenes.WHATS.index(s.shape) for s in batch]),
        "colour": torch.tensor([colours.index(s.colour) if s.colour else -100 for s in batch]),
        "background": torch.tensor([bgs.index(s.background) for s in batch]),
        "style": torch.tensor([scenes.STYLES.index(s.style) if s.kind == "object" else -100 for s in batch]),
    }


def to_tensor(arr) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    t = torch.as_tensor(arr)
    return t.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
