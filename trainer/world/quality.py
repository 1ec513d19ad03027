"""Concept fidelity of Textual Inversion on the shapes model: what ``bench/quality.py`` and the
learning test measure.

For one held-out concept (:data:`scenes.CONCEPTS`): draw fresh concept images, train the concept
with tinv's real trainer (``tinv.trainer.train.train`` on a TextualInversionJob, tinv's defaults
unless a recipe overrides them), render prompts with tinv's real generator
(:class:`tinv.trainer.pipeline.ConceptPipeline`), and score the images with the world's evaluator:

- concept fidelity: mean cosine of evaluator features between generated and real concept images
  (the CLIP-I / DINO analog); ``separation`` reports real-vs-real against real-vs-other-concepts,
  to show the features tell the concepts apart;
- attribute accuracy: how often the evaluator sees the concept's attributes (its mark, its shape
  and colour, the striped style);
- prompt fidelity: how often a context prompt's context is rendered (its background or shape),
  the CLIP-T analog, against the base model's rate for the same context in plain words.

Each figure comes with two baselines from the same run: the initializer phrase in place of the
placeholder (no training), and real held-out concept images (the ceiling).
"""

from __future__ import annotations

import random
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import evaluate, scenes

SCHEDULER, STEPS, GUIDANCE = "ddim", 20, evaluate.GUIDANCE


@dataclass
class Recipe:
    """What a Textual Inversion run changes from tinv's defaults (None: the default)."""

    steps: int | None = None
    learning_rate: float | None = None
    vectors: int | None = None
    initializer: str | None = None  # None: the concept's own initializer phrase
    images: int = 8

    def training(self) -> dict:
        t: dict = {"resolution": scenes.SIZE, "checkpointEvery": 10**6, "logEvery": 50}
        if self.steps is not None:
            t["steps"] = self.steps
        if self.learning_rate is not None:
            t["learningRate"] = self.learning_rate
        return t

    def label(self) -> str:
        parts = [f"{k}={v}" for k, v in (("steps", self.steps), ("lr", self.learning_rate), ("vectors", self.vectors),
                                         ("init", self.initializer)) if v is not None]
        return ",".join(parts) or "defaults"


def concept_job(c: scenes.Concept, images: Path, model: str, storage: Path, recipe: Recipe):
    from tinv.api.models import TextualInversionJob

    concept = {"token": c.name, "property": c.property, "initializer": recipe.initializer or c.initializer, "images": str(images)}
    if recipe.vectors is not None:
        concept["vectors"] = recipe.vectors
    return TextualInversionJob.model_validate({
        "apiVersion": "tinv.io/v1alpha1",
        "kind": "TextualInversionJob",
        "metadata": {"name": f"quality-{c.name}"},
        "spec": {"model": {"source": model}, "concepts": [concept], "training": recipe.training(), "storage": {"uri": str(storage)}},
    })


def write_images(c: scenes.Concept, folder: Path, count: int, seed: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(c.images(seed, count)):
        img.save(folder / f"{c.name}-{i:03d}.png")
    return folder


def learn(c: scenes.Concept, model: str, workdir: Path, recipe: Recipe, seed: int = 0, train_fn=None) -> tuple[str, float]:
    """Train the concept with tinv's trainer; returns (checkpoint URI, seconds)."""
    import time

    from tinv.trainer.train import Options, train

    images = write_images(c, workdir / "images", recipe.images, seed)
    job = concept_job(c, images, model, workdir / "runs", recipe)
    t0 = time.monotonic()
    r = (train_fn or train)(job, Options(device="cpu", validation=False, progress_bar=False, auto_resume=False))
    if r.latest is None:
        raise RuntimeError(f"training {c.name} wrote no checkpoint: {r.message}")
    return r.latest.uri, time.monotonic() - t0


def render(pipe, prompts: list[str], n: int, seed: int = 1000) -> list:
    """n images per prompt (distinct seeds), through tinv's generator."""
    out = []
    for p in prompts:
        out += pipe(p, num_images=n, seed=seed, guidance_scale=GUIDANCE, steps=STEPS, scheduler=SCHEDULER, batch_size=96)
    return out


def _context_target(prompt: str, word: str = "") -> dict[str, str]:
    """What a context prompt asks for besides the concept (`word`, removed first, so that a
    placeholder such as 'purple-star' is not read as a context 'star'): a background or a shape."""
    if word:
        prompt = prompt.replace(word, " ")
    m = re.search(r"on an? (.+?) background", prompt)
    if m:
        return {"background": m.group(1)}
    for s in scenes.SHAPES:
        if re.search(rf"\b{s}\b", prompt):
            return {"what": s}
    return {}


def _rate(pred: dict, want: dict) -> float | None:
    if not want:
        return None
    n = len(pred["what"])
    return sum(all(pred[k][i] == v for k, v in want.items()) for i in range(n)) / n


def attributes(c: scenes.Concept) -> dict[str, str]:
    """The evaluator's view of the concept (what must be drawn for it to count)."""
    s = c.scene(random.Random(0))
    if c.kind == "mark":
        return {"what": s.shape}
    if c.kind == "style":
        return {"style": "striped"}
    return {"what": s.shape, "colour": s.colour}


@dataclass
class Figures:
    fidelity: float
    attribute: float | None
    prompt: float | None
    per_prompt: dict = field(default_factory=dict)


def score(ev, images: list, real_feats: torch.Tensor, c: scenes.Concept, prompts: list[str], n: int, word: str = "") -> Figures:
    feats = evaluate.features(ev, images)
    pred = evaluate.predict(ev, images)
    want = attributes(c)
    attr = _rate(pred, want)
    ctx, per = [], {}
    for i, p in enumerate(prompts):
        sl = {k: v[i * n : (i + 1) * n] for k, v in pred.items()}
        r = _rate(sl, _context_target(p, word))
        per[p] = {"attribute": round(_rate(sl, want), 4), "context": None if r is None else round(r, 4)}
        if r is not None:
            ctx.append(r)
    return Figures(evaluate.fidelity(feats, real_feats), attr, sum(ctx) / len(ctx) if ctx else None, per)


def real_figures(ev, c: scenes.Concept, real_feats: torch.Tensor, n: int, seed: int = 77) -> tuple[Figures, float]:
    """The ceiling: fresh real concept images scored like generated ones; and real-vs-other fidelity."""
    imgs = c.images(seed, n)
    feats = evaluate.features(ev, imgs)
    pred = evaluate.predict(ev, imgs)
    others = [o for o in scenes.CONCEPTS if o.name != c.name]
    other = sum(evaluate.fidelity(feats, evaluate.features(ev, o.images(seed, n))) for o in others) / len(others)
    return Figures(evaluate.fidelity(feats, real_feats), _rate(pred, attributes(c)), None), other


def prompts_for(c: scenes.Concept, word: str) -> list[str]:
    """The concept alone, then in its contexts, with `word` as the concept's words."""
    alone = "a {} circle".format(word) if c.kind == "style" else f"a {word}"
    return [alone] + [p.format(word) for p in c.contexts]


def plain_context_prompts(c: scenes.Concept) -> list[str]:
    """The contexts with plain words the model was trained on, for its own prompt-following rate."""
    plain = {"mark": "logo", "style": "dotted", "combination": "shape"}[c.kind]
    return [p.format(plain) for p in c.contexts]


def fraction(value: float | None, base: float | None, ceiling: float | None) -> float | None:
    if value is None or base is None or ceiling is None or ceiling - base <= 1e-6:
        return None
    return round((value - base) / (ceiling - base), 4)


def measure(c: scenes.Concept, model: str, ev, recipe: Recipe, n: int = 96, seed: int = 0, workdir: Path | None = None,
            train_fn=None, contexts: bool = True) -> dict:
    """One concept under one recipe: learned, initializer baseline and real ceiling, in one run.
    ``contexts=False`` renders the concept alone only (the quick learning test)."""
    from tinv.trainer.pipeline import ConceptPipeline

    with tempfile.TemporaryDirectory(prefix=f"tinv-quality-{c.name}-") as tmp:
        work = Path(workdir or tmp)
        uri, seconds = learn(c, model, work, recipe, seed, train_fn)
        real_feats = evaluate.features(ev, c.images(seed + 1, n))  # scoring references: not the training images
        learned_pipe = ConceptPipeline.load(model, [uri], device="cpu", precision="fp32")
        base_pipe = ConceptPipeline.load(model, device="cpu", precision="fp32")
        k = None if contexts else 1
        p_learned = prompts_for(c, c.name)[:k]
        p_init = prompts_for(c, recipe.initializer or c.initializer)[:k]
        learned = score(ev, render(learned_pipe, p_learned, n), real_feats, c, p_learned, n, c.name)
        base = score(ev, render(base_pipe, p_init, n), real_feats, c, p_init, n, recipe.initializer or c.initializer)
        p_plain = plain_context_prompts(c) if contexts else []
        plain = score(ev, render(base_pipe, p_plain, n), real_feats, c, p_plain, n) if p_plain else Figures(0.0, None, None)
        ceiling, other = real_figures(ev, c, real_feats, n)
    return {
        "concept": c.name,
        "kind": c.kind,
        "recipe": recipe.label(),
        "images_per_prompt": n,
        "train_seconds": round(seconds, 1),
        "fidelity": {"learned": round(learned.fidelity, 4), "initializer": round(base.fidelity, 4),
                     "real": round(ceiling.fidelity, 4), "real_vs_other_concepts": round(other, 4),
                     "fraction": fraction(learned.fidelity, base.fidelity, ceiling.fidelity)},
        "attribute": {"learned": learned.attribute, "initializer": base.attribute, "real": ceiling.attribute,
                      "fraction": fraction(learned.attribute, base.attribute, ceiling.attribute)},
        "prompt": {"learned": learned.prompt, "plain_words": plain.prompt,
                   "ratio": None if not plain.prompt or learned.prompt is None else round(learned.prompt / plain.prompt, 4)},
        "per_prompt": learned.per_prompt,
    }
