"""The notebook API: load a base model and learned concepts, then render prompts that use them.

    from tinv.trainer.pipeline import ConceptPipeline

    pipe = ConceptPipeline.load(
        "builtin:tiny",                      # or "runwayml/stable-diffusion-v1-5", a folder, s3://...
        concepts=[
            "job:tiny-det-logo",             # a TextualInversionJob's newest checkpoint (./tinv-runs or storage=...)
            "job:tiny-det-logo@<uuid>",      # ... or one checkpoint by uuid; a bare uuid works too
            "path/to/learned_embeds.safetensors",   # diffusers
            "path/to/det-logo.pt",           # AUTOMATIC1111 (token = file name)
            "path/to/learned_embeddings_dict.pt",   # the Determined example (its demo file too)
            "s3://bucket/prefix/checkpoints/<uuid>#new-token",  # '#token' renames a single concept
        ],
    )
    images = pipe("a watercolor painting of a det-logo", seed=0, num_images=4, guidance_scale=7.5,
                  steps=25, scheduler="dpm-solver++")
    pipe.sheet("a det-logo carved in marble", guidance_scales=[2, 4, 6], seeds=[0, 1])  # a labelled grid
    pipe.save(images, "out/")                # PNGs with the same metadata as `tinv generate` writes

Images are ``PIL.Image`` objects whose ``.info["tinv"]`` holds the JSON metadata (prompt, seed,
guidance, steps, scheduler, size, model, concept checkpoints), so ``tinv reproduce`` works on the
saved files too. Rendering is :class:`tinv.trainer.engine.Engine`, the very engine of grids.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Sequence

from . import engine as E
from . import pngmeta
from .grid import Request, check_scheduler
from .runtime import dtype_name


class ConceptPipeline:
    """A base model with learned concepts, ready to render."""

    def __init__(self, engine: E.Engine, *, model: str, refs: list, load_kwargs: dict):
        self.engine = engine
        self.model = model
        self._refs = list(refs)
        self._load_kwargs = load_kwargs

    # ------------------------------------------------------------------ construction
    @classmethod
    def load(
        cls,
        model: str = "builtin:tiny",
        concepts: Iterable[Any] = (),
        *,
        device: str | None = None,
        precision: str = "auto",
        storage: str | None = None,
        namespace: str | None = None,
        revision: str | None = None,
        variant: str | None = None,
        compile: bool = False,
        vae_batch: int | None = None,
        vae: str | None = None,
    ) -> "ConceptPipeline":
        """Load `model` (any spec.model.source form) and `concepts` (see the module doc).

        `storage` is where jobs' run folders are looked up (default ./tinv-runs), `namespace` their
        namespace (default 'default'). Raises ConfigError with a clear message for a missing job or
        checkpoint, an embedding of the wrong width, or a token already in the vocabulary.
        """
        kw = dict(device=device, precision=precision, storage_uri=storage, namespace=namespace, revision=revision,
                  variant=variant, compile=compile, vae_batch=vae_batch, vae=vae)
        refs = list(concepts)
        engine = E.load_engine(model, refs, **kw)
        return cls(engine, model=model, refs=refs, load_kwargs=kw)

    def _engine_with(self, concept_list: list) -> E.Engine:
        old = self.engine
        lower = [c.token.lower() for c in concept_list]
        dup = next((t for t in lower if lower.count(t) > 1), None)
        if dup:
            from .errors import ConfigError

            raise ConfigError(f"concept token {dup!r} is loaded twice; give one of them another token ('path#newtoken')")
        return E.Engine(old.bundle, concept_list, device=old.device, precision=dtype_name(old.dtype),
                        compile=old.compiled, optimize=old.optimized, vae_batch=old.vae_batch, model_info=old.model_info)

    def _read(self, refs) -> list:
        from tinv.api import storage as api_storage

        from . import concepts as C

        kw = self._load_kwargs
        return C.load_all(refs, store=api_storage.Store(), storage_uri=kw["storage_uri"], namespace=kw["namespace"])

    def add_concepts(self, *concepts: Any) -> "ConceptPipeline":
        """Load more concepts into this pipeline (the model is reused)."""
        self.engine = self._engine_with(self.engine.concepts + self._read(concepts))
        self._refs += list(concepts)
        return self

    def with_concepts(self, *concepts: Any) -> "ConceptPipeline":
        """A second pipeline on the same model (no reload) with exactly these concepts."""
        return ConceptPipeline(self._engine_with(self._read(concepts)), model=self.model, refs=list(concepts),
                               load_kwargs=self._load_kwargs)

    # ------------------------------------------------------------------ information
    @property
    def tokens(self) -> list[str]:
        """The concept tokens prompts may use."""
        return self.engine.tokens

    @property
    def concepts(self) -> list[dict]:
        """Each concept's token, vector count, source URI and checkpoint uuid."""
        return [c.to_json() for c in self.engine.concepts]

    @property
    def native_size(self) -> int:
        return self.engine.native_size

    def __repr__(self) -> str:
        return (f"ConceptPipeline(model={self.model!r}, concepts={self.tokens}, device={self.engine.device}, "
                f"precision={dtype_name(self.engine.dtype)})")

    # ------------------------------------------------------------------ rendering
    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str = "",
        *,
        num_images: int = 1,
        seed: int = 0,
        guidance_scale: float = 7.5,
        steps: int = 25,
        scheduler: str = "dpm-solver++",
        width: int | None = None,
        height: int | None = None,
        batch_size: int = 8,
    ) -> list:
        """Images for each prompt: `num_images` per prompt with seeds seed, seed+1, ...

        A prompt that mentions none of the loaded concepts is rendered, with a warning.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        check_scheduler(scheduler)
        self.engine.check_prompts(prompts)
        w = int(width or self.native_size)
        h = int(height or self.native_size)
        reqs = [
            Request(prompt=p, negative_prompt=negative_prompt, seed=int(seed) + k, guidance_scale=float(guidance_scale),
                      steps=int(steps), scheduler=scheduler, width=w, height=h)
            for p in prompts
            for k in range(int(num_images))
        ]
        return [self._to_pil(r) for r in self.engine.render_many(reqs, batch_size)]

    def sheet(
        self,
        prompt: str,
        negative_prompt: str = "",
        *,
        guidance_scales: Sequence[float] = (2, 4, 6),
        seeds: Sequence[int] = (0, 1),
        steps: int = 25,
        scheduler: str = "dpm-solver++",
        width: int | None = None,
        height: int | None = None,
        batch_size: int = 8,
    ):
        """A labelled contact sheet of one prompt: guidance scales across, seeds down (a PIL image)."""
        from . import gallery

        check_scheduler(scheduler)
        self.engine.check_prompts([prompt])
        w = int(width or self.native_size)
        h = int(height or self.native_size)
        reqs = [Request(prompt=prompt, negative_prompt=negative_prompt, seed=int(s), guidance_scale=float(g), steps=int(steps),
                          scheduler=scheduler, width=w, height=h) for s in seeds for g in guidance_scales]
        out = self.engine.render_many(reqs, batch_size)
        cells, labels = {}, {}
        for r in out:
            row = (r.request.seed,)
            labels[row] = [f"seed {r.request.seed}", f"{scheduler}, {steps} steps"]
            cells[(row, r.request.guidance_scale)] = self._to_pil(r)
        rows = [(int(s),) for s in seeds]
        box = max(128, min(256, max(w, h)))
        return gallery.contact_sheet(prompt, cells, [float(g) for g in guidance_scales], rows, labels, box=box)

    def _to_pil(self, r: E.Rendered):
        from PIL import Image

        img = Image.fromarray(r.pixels, "RGB")
        meta = self.engine.metadata(r)
        img.info["tinv"] = json.dumps(meta, sort_keys=True)
        img.info["parameters"] = pngmeta.a1111_parameters(meta)
        return img

    @staticmethod
    def save(images: Iterable, folder: str | Path, prefix: str = "image") -> list[Path]:
        """Write images as PNGs with their tinv metadata (so `tinv reproduce` works on them)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        out = []
        for i, img in enumerate(images):
            import numpy as np

            meta = json.loads(img.info["tinv"])
            path = folder / f"{prefix}-{i:03d}-seed{meta['seed']}.png"
            path.write_bytes(pngmeta.encode_png(np.asarray(img.convert("RGB")), meta))
            out.append(path)
        return out


def load(model: str = "builtin:tiny", concepts: Iterable[Any] = (), **kwargs) -> ConceptPipeline:
    """Shorthand for :meth:`ConceptPipeline.load`."""
    return ConceptPipeline.load(model, concepts, **kwargs)
