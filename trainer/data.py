"""Training data: find images, normalise them, build each sample's prompt, cache latents.

Images come from a local folder, ``file://``, ``pvc://claim/path`` or an ``s3://`` prefix (downloaded
once into the cache). Every common mode is normalised to 8-bit RGB: EXIF rotation applied,
transparency composited on white, CMYK/palette/greyscale converted, 16-bit and float images
rescaled. Transparency is composited on ``training.transparentBackground``: white (the default)
or black (what diffusers' textual_inversion.py gives fully transparent pixels: it drops the alpha
channel, and PNG encoders store such pixels as black). A file that is not an image, is empty or is corrupt is skipped with a warning naming
it; zero usable images is a :class:`DataError` raised before any model is loaded.

Prompts: a concept's templates (its own, or the 27 "object" / 19 "style" ones), plus
``numBlankPrompts`` copies of "{}" and ``numAPrompts`` of "a {}" (Determined), the concept token in
the slot, and with ``captionFromFilename`` the file name's words appended.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

from . import storage
from .errors import DataError

log = logging.getLogger("tinv.trainer")

OBJECT_TEMPLATES = [
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
]

STYLE_TEMPLATES = [
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a cropped painting in the style of {}",
    "the painting in the style of {}",
    "a clean painting in the style of {}",
    "a dirty painting in the style of {}",
    "a dark painting in the style of {}",
    "a picture in the style of {}",
    "a cool painting in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a cropped painting in the style of {}",
    "a good painting in the style of {}",
    "a close-up painting in the style of {}",
    "a rendition in the style of {}",
    "a nice painting in the style of {}",
    "a small painting in the style of {}",
    "a weird painting in the style of {}",
    "a large painting in the style of {}",
]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".jfif", ".ppm", ".pgm"}

RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
}


@dataclass
class ConceptData:
    token: str
    prompts: list[str]  # one list per image is not needed: captions are appended per image
    templates: list[str]
    image_paths: list[Path] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)


@dataclass
class Dataset:
    """All usable images of all concepts, as one list (a sample draws an index into it)."""

    pixels: list[np.ndarray]  # HxWx3 uint8 each, already resized/cropped to resolution
    concept: list[int]  # concept index per image
    caption: list[str]  # caption suffix per image ("" when unused)
    names: list[str]  # file names, for logs and manifests
    templates: list[list[str]]  # per concept
    tokens: list[str]  # per concept
    sizes: list[tuple[int, int]] = field(default_factory=list)  # (width, height) of each original image: SDXL's time ids

    def __len__(self) -> int:
        return len(self.names)  # pixels are dropped once the latents are cached

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for n, p in zip(self.names, self.pixels):
            h.update(n.encode())
            h.update(p.tobytes())
        return h.hexdigest()[:16]

    def prompt(self, image: int, template: int) -> str:
        c = self.concept[image]
        t = self.templates[c][template % len(self.templates[c])]
        text = t.replace("{}", self.tokens[c])
        cap = self.caption[image]
        return f"{text} {cap}" if cap else text


def templates_for(prop: str, custom: list[str] | None, num_blank: int = 0, num_a: int = 0) -> list[str]:
    base = list(custom) if custom else list(OBJECT_TEMPLATES if prop == "object" else STYLE_TEMPLATES)
    return base + ["{}"] * num_blank + ["a {}"] * num_a


def caption_from_name(name: str, split_char: str) -> str:
    stem = Path(name).stem
    return " ".join(w for w in stem.split(split_char) if w)


BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0)}


def normalise(img: Image.Image, background: str = "white") -> Image.Image:
    """Any PIL image -> 8-bit RGB, upright, transparency composited on `background` (white or black)."""
    img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if mode.startswith("I;16"):
            arr = arr / 65535.0
        else:
            lo, hi = float(arr.min()), float(arr.max())
            if mode == "I" and lo >= 0 and hi <= 65535 and hi > 255:
                arr = arr / 65535.0
            elif hi > lo:
                arr = (arr - lo) / (hi - lo)
            else:
                arr = np.zeros_like(arr)
        img = Image.fromarray(np.clip(arr * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
        mode = "L"
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode in ("LA", "PA", "La", "RGBa"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        bg = Image.new("RGB", img.size, BACKGROUNDS[background])
        bg.paste(img, mask=img.getchannel("A"))
        return bg
    if img.mode != "RGB":  # L, 1, CMYK, YCbCr, LAB, HSV
        img = img.convert("RGB")
    return img


def fit(img: Image.Image, resolution: int, center_crop: bool, interpolation: str) -> np.ndarray:
    """Square-crop (if asked) and resize to resolution x resolution; returns HxWx3 uint8."""
    if center_crop:
        w, h = img.size
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        img = img.crop((left, top, left + s, top + s))
    if img.size != (resolution, resolution):
        img = img.resize((resolution, resolution), RESAMPLE[interpolation])
    return np.asarray(img, dtype=np.uint8).copy()


def load_image(path: Path, background: str = "white") -> Image.Image | None:
    """Open and fully decode an image; None (with a warning naming the file) when unusable."""
    try:
        if path.stat().st_size == 0:
            log.warning("skipping %s: the file is empty", path)
            return None
        prev = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                out = normalise(im, background)
        ImageFile.LOAD_TRUNCATED_IMAGES = prev
        if out.size[0] < 1 or out.size[1] < 1:
            log.warning("skipping %s: the image has no pixels", path)
            return None
        return out
    except Exception as e:  # UnidentifiedImageError, OSError (truncated), DecompressionBomb...
        log.warning("skipping %s: not a usable image (%s: %s)", path, type(e).__name__, e)
        return None


def materialise(uri: str, store: storage.Store | None = None, base_dir: Path | None = None) -> Path:
    """A local folder holding the images at uri (object-storage prefixes are downloaded once).

    A relative plain path is taken from the working directory, else from base_dir (the job
    file's folder)."""
    p = storage.local_path(uri)
    if p is not None:
        if not p.exists() and base_dir is not None and "://" not in uri and not p.is_absolute() and (base_dir / p).exists():
            p = base_dir / p
        if not p.exists():
            raise DataError(f"image folder {uri} does not exist")
        return p
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    dest = storage.cache_dir() / "images" / digest
    store = store or storage.Store()
    try:
        uris = list(store.list(uri))
    except Exception as e:
        from .errors import UnavailableError

        raise UnavailableError(f"cannot list training images at {uri}: {e}") from e
    if not uris:
        raise DataError(f"no objects under {uri}: check the prefix and the credentials")
    store.download_prefix(uri, dest)
    return dest


def list_images(folder: Path) -> list[Path]:
    if folder.is_file():
        return [folder]
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    out = []
    for p in files:
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            # Not an image by name; say so, as a typo'd folder is a common mistake.
            if p.suffix.lower() not in {".txt", ".json", ".yaml", ".yml", ".md", ".caption"}:
                log.warning("skipping %s: not an image file (suffix %r)", p, p.suffix)
            continue
        out.append(p)
    return out


def build_dataset(
    concepts: list, resolution: int, center_crop: bool, interpolation: str, store=None, base_dir: Path | None = None,
    background: str = "white",
) -> Dataset:
    """Load every concept's images (see module doc). `concepts`: objects with token, property,
    images, templates, caption_from_filename, filename_split_char, num_blank_prompts, num_a_prompts."""
    ds = Dataset(pixels=[], concept=[], caption=[], names=[], templates=[], tokens=[])
    problems = []
    for ci, c in enumerate(concepts):
        ds.tokens.append(c.token)
        ds.templates.append(
            templates_for(c.property, c.templates, getattr(c, "num_blank_prompts", 0), getattr(c, "num_a_prompts", 0))
        )
        folder = materialise(c.images, store, base_dir)
        paths = list_images(folder)
        n_ok = 0
        for p in paths:
            img = load_image(p, background)
            if img is None:
                continue
            ds.pixels.append(fit(img, resolution, center_crop, interpolation))
            ds.sizes.append(img.size)
            ds.concept.append(ci)
            ds.caption.append(caption_from_name(p.name, c.filename_split_char) if c.caption_from_filename else "")
            ds.names.append(f"{c.token}/{p.relative_to(folder).as_posix() if p != folder else p.name}")
            n_ok += 1
        if n_ok == 0:
            problems.append(f"concept {c.token!r}: no usable images in {c.images} ({len(paths)} candidate files)")
        else:
            log.info("concept %r: %d images from %s", c.token, n_ok, c.images)
    if problems:
        raise DataError("no training images: " + "; ".join(problems))
    return ds


def to_tensor(pixels: list[np.ndarray]):
    """uint8 HxWx3 arrays -> float tensor [N,3,H,W] in [-1, 1]."""
    import torch

    arr = np.stack(pixels).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()
