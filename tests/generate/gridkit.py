"""Constants and helpers of the generation tests (a module of its own: `conftest` is ambiguous
when the whole suite runs, since every layer has one)."""

from __future__ import annotations

from pathlib import Path

import torch

TOKEN = "<blob>"
WIDTH = 32  # the tiny model's text width


def vectors(n: int = 2, width: int = WIDTH, seed: int = 0) -> "torch.Tensor":
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, width, generator=g) * 0.4 / width**0.5 * 4


GRID = {
    "apiVersion": "tinv.io/v1alpha1",
    "kind": "GenerationGrid",
    "metadata": {"name": "g", "namespace": "ns"},
    "spec": {
        "model": {"source": "builtin:tiny"},
        "embeddings": [{"uri": "CONCEPT"}],
        "prompts": [f"a photo of a {TOKEN}", f"a {TOKEN} in the style of van gogh"],
        "negativePrompt": "blurry",
        "grid": {
            "guidanceScales": [1, 5],
            "steps": [2],
            "schedulers": ["ddim"],
            "seeds": [0, 1],
            "sizes": [{"width": 64, "height": 64}],
        },
        "imagesPerCell": 1,
        "batchSize": 3,
        "precision": "fp32",
        "resources": {"workers": 1, "gpusPerWorker": 0},
    },
}


def pngs(folder: Path) -> list[Path]:
    return sorted(Path(folder).glob("*.png"))
