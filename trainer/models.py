"""Loading a Stable Diffusion model for training or generation.

``load(source, ...)`` accepts (the ``spec.model.source`` forms):

- ``builtin:tiny`` / ``builtin:tiny-v`` (``?seed=N``): the tiny model built in code (:mod:`.tiny`)
- a diffusers folder: a local path, ``file:///abs``, ``pvc://claim/path``
- ``s3://bucket/prefix`` holding a diffusers folder: downloaded once into
  ``<cache>/models/<hash>/`` (``$TINV_CACHE_DIR``, or the model-cache PVC the operator mounts
  there); a ``.tinv-complete`` marker makes a half-finished download count as absent, and a lock
  file keeps the ranks of one node from downloading twice
- a Hugging Face id ``org/name`` (``revision``, ``variant``; token from ``$HF_TOKEN``, which the
  operator fills from ``tokenSecretRef``): the local HF cache is tried first; then, unless
  ``HF_HUB_OFFLINE`` is set, the hub endpoint is probed with a short TCP connect
  (``$TINV_HUB_TIMEOUT``, default 10 s) so an unreachable hub fails fast with
  :class:`UnavailableError` instead of hanging in retries.

Loading has two steps, so that model-dependent checks (a concept token already in the vocabulary)
run from the tokenizer alone, before any weights are read: :func:`locate` (download or find the
folder; build a builtin), then :meth:`Located.tokenizer` and :meth:`Located.load`. :func:`load`
does both.

The result is a :class:`ModelBundle`. SD 1.x and 2.x have one text encoder; the bundle keeps a
*list* of (name, tokenizer, encoder) so SDXL's second encoder is an addition, not a rewrite. The
bundle's ``family`` ("sd" or "sdxl") is recognised from the folder's components (SDXL: two text
encoders and tokenizers; :mod:`.sdxl`), and the family-specific parts -- the text conditioning the
UNet gets, the diffusers pipeline class, the native resolution -- are asked of the bundle.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import socket
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import storage
from .errors import ModelError, UnavailableError
from .runtime import hf_token

log = logging.getLogger("tinv.trainer")

SD_COMPONENTS = ("tokenizer", "text_encoder", "vae", "unet", "scheduler")
DEFAULT_RESOLUTION = 512  # training.resolution when unset, for SD 1.x/2.x (SDXL: its native size)


@dataclass
class TextEncoderSlot:
    name: str  # pipeline component name: "text_encoder" (SDXL adds "text_encoder_2")
    tokenizer: object
    encoder: torch.nn.Module
    format_key: str | None = None  # SDXL file key ("clip_l", "clip_g"); None for SD 1.x/2.x

    @property
    def width(self) -> int:
        return int(self.encoder.get_input_embeddings().embedding_dim)


@dataclass
class ModelBundle:
    source: str
    family: str  # "sd" (1.x/2.x) or "sdxl"
    unet: torch.nn.Module
    vae: torch.nn.Module
    scheduler: object  # the model's training noise scheduler (DDPMScheduler)
    text: list[TextEncoderSlot] = field(default_factory=list)
    path: str | None = None  # local diffusers folder, when loaded from one

    @property
    def tokenizer(self):
        return self.text[0].tokenizer

    @property
    def text_encoder(self):
        return self.text[0].encoder

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def widths(self) -> list[int]:
        """Token-embedding width of each text encoder (SD 1.x [768], SD 2.x [1024], SDXL [768, 1280])."""
        return [s.width for s in self.text]

    @property
    def native_resolution(self) -> int:
        """The image size the model was trained at: the default training resolution."""
        return int(self.unet.config.sample_size) * self.vae_scale

    def encode(self, vocab, prompts: list[str], initializer: bool = False):
        """(encoder_hidden_states, pooled text embeds or None): the text conditioning of this family."""
        if self.family == "sdxl":
            from . import sdxl

            return sdxl.encode(self, vocab, prompts, initializer=initializer)
        dev = next(self.text_encoder.parameters()).device
        return self.text_encoder(vocab.batch(prompts, initializer).to(dev))[0], None

    def pipeline(self, scheduler=None):
        """A diffusers pipeline (StableDiffusionPipeline, or StableDiffusionXLPipeline for SDXL) over
        these very modules (no copy)."""
        from diffusers import StableDiffusionPipeline

        if self.family == "sdxl":
            from . import sdxl

            return sdxl.pipeline(self, scheduler)

        return StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=scheduler or self.scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )


def default_resolution(bundle: ModelBundle) -> int:
    """training.resolution when the spec sets none: 512 for SD 1.x/2.x (as always), the native size for
    SDXL (1024 for SDXL base and builtin:sdxl-random; 64 for builtin:tiny-xl)."""
    return bundle.native_resolution if bundle.family == "sdxl" else DEFAULT_RESOLUTION


def from_components(source: str, c: dict, path: str | None = None) -> ModelBundle:
    """A bundle over already built components (tokenizer, text_encoder, vae, unet, scheduler; SDXL also
    tokenizer_2, text_encoder_2)."""
    if "text_encoder_2" in c:  # SDXL: both encoders, in the order of the UNet's concatenated input
        from . import sdxl

        text = [TextEncoderSlot("text_encoder", c["tokenizer"], c["text_encoder"], sdxl.FORMAT_KEYS[0]),
                TextEncoderSlot("text_encoder_2", c["tokenizer_2"], c["text_encoder_2"], sdxl.FORMAT_KEYS[1])]
        family = sdxl.FAMILY
    else:
        text, family = [TextEncoderSlot("text_encoder", c["tokenizer"], c["text_encoder"])], "sd"
    return ModelBundle(source=source, family=family, unet=c["unet"], vae=c["vae"], scheduler=c["scheduler"], text=text, path=path)


def load_folder(path: Path, source: str, variant: str | None = None) -> ModelBundle:
    """Load the components of a diffusers Stable Diffusion folder."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path = Path(path)
    index = path / "model_index.json"
    if not index.exists():
        missing = [c for c in SD_COMPONENTS if not (path / c).is_dir()]
        if missing:
            raise ModelError(
                f"{source} is not a diffusers Stable Diffusion folder: no model_index.json and no {', '.join(missing)}/"
            )
    from . import sdxl

    if sdxl.is_sdxl_folder(path):
        return from_components(source, sdxl.load_folder(path, source, variant), str(path))
    kw = {"variant": variant} if variant else {}
    try:
        tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", attn_implementation="sdpa", **kw)
        vae = AutoencoderKL.from_pretrained(path / "vae", **kw)
        unet = UNet2DConditionModel.from_pretrained(path / "unet", **kw)
        scheduler = DDPMScheduler.from_pretrained(path / "scheduler")
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise ModelError(f"cannot load the model at {source}: {e}") from e
    for m in (text_encoder, vae, unet):
        m.eval()
        m.requires_grad_(False)
    return from_components(
        source,
        {"tokenizer": tokenizer, "text_encoder": text_encoder, "vae": vae, "unet": unet, "scheduler": scheduler},
        str(path),
    )


class _Lock:
    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(self.path, "w")
        fcntl.flock(self.f, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()


def fetch_s3_folder(uri: str, store: storage.Store | None = None) -> Path:
    """Download a diffusers folder from object storage once; later calls reuse the cache."""
    digest = hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]
    dest = storage.cache_dir() / "models" / digest
    marker = dest / ".tinv-complete"
    with _Lock(dest.with_suffix(".lock")):
        if marker.exists():
            log.info("model %s: using the cached copy in %s", uri, dest)
            return dest
        store = store or storage.Store()
        try:
            if not any(True for _ in store.list(uri)):
                raise ModelError(f"no objects under {uri}: expected a diffusers folder there")
            log.info("model %s: downloading into %s", uri, dest)
            store.download_prefix(uri, dest)
        except ModelError:
            raise
        except Exception as e:
            raise UnavailableError(f"cannot download the model from {uri}: {e}") from e
        marker.write_text(uri)
    return dest


def _hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def probe_hub(timeout: float | None = None) -> None:
    """Raise UnavailableError unless a TCP connection to the hub endpoint opens within timeout."""
    timeout = float(os.environ.get("TINV_HUB_TIMEOUT", "10")) if timeout is None else timeout
    url = urllib.parse.urlparse(_hub_endpoint())
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as e:
        raise UnavailableError(
            f"cannot reach the Hugging Face hub at {url.scheme}://{host}:{port} ({e.__class__.__name__}: {e}). "
            "Put the model in object storage or on a PVC and use s3:// or pvc:// as model.source, "
            "or pre-fill the cache and set HF_HUB_OFFLINE=1"
        ) from e


def fetch_hub(repo_id: str, revision: str | None, variant: str | None, token: str | None) -> Path:
    """A local snapshot of a hub model: from the cache if present, else downloaded (fail fast)."""
    from huggingface_hub import snapshot_download

    cache = os.environ.get("HF_HUB_CACHE") or str(storage.cache_dir() / "hf")
    weights = f"*.{variant}.safetensors" if variant else "*.safetensors"
    allow = ["model_index.json"]
    for sub in ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "unet", "vae", "scheduler"):  # SDXL has the _2 ones
        allow += [f"{sub}/*.json", f"{sub}/*.txt", f"{sub}/{weights}"]
    ignore = [] if variant else ["*.fp16.*", "*.non_ema.*", "*.ema.*"]
    kw = dict(repo_id=repo_id, revision=revision, cache_dir=cache, allow_patterns=allow, ignore_patterns=ignore, token=token)
    try:
        return Path(snapshot_download(local_files_only=True, **kw))
    except Exception:
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if offline:
        raise UnavailableError(
            f"model {repo_id!r} is not in the local Hugging Face cache ({cache}) and HF_HUB_OFFLINE is set"
            f" (if you meant a local folder: ./{repo_id} does not exist)"
        )
    probe_hub()
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "20")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "60")
    try:
        return Path(snapshot_download(**kw))
    except Exception as e:
        name = type(e).__name__
        if name in ("RepositoryNotFoundError", "RevisionNotFoundError", "GatedRepoError", "EntryNotFoundError"):
            raise ModelError(f"cannot use {repo_id!r} from the hub ({name}): {e}. Check the id, revision and token") from e
        raise UnavailableError(f"downloading {repo_id!r} from the hub failed ({name}: {e})") from e


def is_hub_id(source: str) -> bool:
    if "://" in source or source.startswith(("/", ".", "~", "builtin:")):
        return False
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not Path(source).exists()


def _tiny(source: str) -> dict:
    from . import tiny

    return tiny.build(source)


def _tiny_xl(source: str) -> dict:
    from . import sdxl

    return sdxl.build(source)


#: builtin:<name> models built in code: name -> components (tokenizer, text_encoder, vae, unet, scheduler;
#: SDXL's also tokenizer_2, text_encoder_2).
BUILTINS: dict[str, Callable[[str], dict]] = {
    "tiny": _tiny,
    "tiny-v": _tiny,
    "sd15-random": _tiny,  # SD 1.5's architecture with random weights: benchmarks only
    "tiny-xl": _tiny_xl,  # a tiny SDXL (two encoders, text_time conditioning): tests
    "sdxl-random": _tiny_xl,  # SDXL base's architecture with random weights: benchmarks only
}


def builtin_name(source: str) -> str:
    """'builtin:tiny-v?seed=3' -> 'tiny-v'."""
    return source.split(":", 1)[1].partition("?")[0]


@dataclass
class Located:
    """A model found on this machine (downloaded when it had to be), not loaded yet."""

    source: str
    variant: str | None = None
    path: Path | None = None  # a diffusers folder
    components: dict | None = None  # a builtin, built in code

    def tokenizer(self):
        """The model's tokenizer alone (no weights read)."""
        if self.components is not None:
            return self.components["tokenizer"]
        from transformers import CLIPTokenizer

        try:
            return CLIPTokenizer.from_pretrained(self.path / "tokenizer")
        except (OSError, ValueError) as e:
            raise ModelError(f"cannot load the tokenizer of the model at {self.source}: {e}") from e

    def load(self) -> ModelBundle:
        if self.components is not None:
            return from_components(self.source, self.components)
        return load_folder(self.path, self.source, self.variant)


def locate(
    source: str,
    revision: str | None = None,
    variant: str | None = None,
    token: str | None = None,
    store: storage.Store | None = None,
) -> Located:
    """Find (or download, or build) a model of any supported source (see the module doc)."""
    if source == "builtin:shapes":  # the pretrained shapes-world model shipped in the package (tinv.trainer.world)
        from .world import weights

        return Located(source, path=weights.model_folder())
    if source.startswith("builtin:"):
        build = BUILTINS.get(builtin_name(source))
        if build is None:
            raise ModelError(f"unknown builtin model {source!r}: the builtin models are {', '.join('builtin:' + n for n in BUILTINS)}")
        return Located(source, components=build(source))
    if storage.is_s3(source):
        return Located(source, variant, path=fetch_s3_folder(source, store))
    if is_hub_id(source):
        return Located(source, variant, path=fetch_hub(source, revision, variant, token or hf_token()))
    try:
        path = storage.local_path(source)
    except (ValueError, storage.StorageError) as e:
        raise ModelError(str(e)) from e
    if path is None or not path.exists():
        raise ModelError(f"model folder {source} does not exist")
    return Located(source, variant, path=Path(path))


def load(
    source: str,
    revision: str | None = None,
    variant: str | None = None,
    token: str | None = None,
    store: storage.Store | None = None,
    vae: str | None = None,
) -> ModelBundle:
    """Load a model bundle from any supported source (see the module doc); `vae`: spec.model.vae."""
    bundle = locate(source, revision, variant, token, store).load()
    swap_vae(bundle, vae, token, store)
    return bundle


def swap_vae(bundle: ModelBundle, source: str | None, token: str | None = None, store: storage.Store | None = None) -> None:
    """Replace the bundle's VAE by spec.model.vae (a hub id or a diffusers AutoencoderKL folder, or a
    pipeline folder holding vae/), e.g. an fp16-safe SDXL VAE; nothing when `source` is None."""
    if not source:
        return
    from diffusers import AutoencoderKL

    if storage.is_s3(source):
        path = fetch_s3_folder(source, store)
    elif is_hub_id(source):
        from huggingface_hub import snapshot_download

        cache = os.environ.get("HF_HUB_CACHE") or str(storage.cache_dir() / "hf")
        allow = ["config.json", "diffusion_pytorch_model.safetensors", "vae/config.json", "vae/diffusion_pytorch_model.safetensors"]
        try:
            path = Path(snapshot_download(repo_id=source, cache_dir=cache, allow_patterns=allow, token=token, local_files_only=True))
        except Exception:  # noqa: BLE001 - not cached: download (fails fast when the hub is unreachable)
            if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
                raise UnavailableError(f"model.vae {source!r} is not in the local Hugging Face cache ({cache}) and HF_HUB_OFFLINE is set")
            probe_hub()
            try:
                path = Path(snapshot_download(repo_id=source, cache_dir=cache, allow_patterns=allow, token=token))
            except Exception as e:
                raise UnavailableError(f"downloading model.vae {source!r} from the hub failed ({type(e).__name__}: {e})") from e
    else:
        try:
            path = storage.local_path(source)
        except (ValueError, storage.StorageError) as e:
            raise ModelError(f"model.vae: {e}") from e
        if path is None or not Path(path).exists():
            raise ModelError(f"model.vae folder {source} does not exist")
    path = Path(path)
    if not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
        path = path / "vae"
    try:
        vae = AutoencoderKL.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelError(f"model.vae {source}: not a diffusers AutoencoderKL folder ({e})") from e
    if vae.config.latent_channels != bundle.vae.config.latent_channels:
        raise ModelError(f"model.vae {source} has {vae.config.latent_channels} latent channels; the model's VAE has "
                         f"{bundle.vae.config.latent_channels}: it is a VAE for another model family")
    vae.eval()
    vae.requires_grad_(False)
    bundle.vae = vae
    log.info("VAE from %s (force_upcast %s)", source, bool(getattr(vae.config, "force_upcast", False)))
