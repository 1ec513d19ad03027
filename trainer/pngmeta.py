"""PNG metadata, in one place: what tinv writes into each image and reads back to reproduce it.

Each PNG carries two text chunks: ``tinv`` (JSON: prompt, negative prompt, seed, guidance, steps,
scheduler, size, model, concepts with their checkpoint and content hash, precision, device, the
batch shape, the tinv version, and ``key`` -- a hash of everything that decides the pixels) and
``parameters`` (AUTOMATIC1111's text, which many image tools show).
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np

from .errors import ConfigError

IMAGE_FORMAT = "tinv.image/v1"
PNG_KEY = "tinv"


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


