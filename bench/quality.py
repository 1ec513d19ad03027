#!/usr/bin/env python
"""Does tinv learn? Concept fidelity of Textual Inversion on builtin:shapes, per held-out concept.

    python bench/quality.py                                  # every held-out concept, tinv's defaults
    python bench/quality.py --concepts det-logo --n 96       # one concept
    python bench/quality.py --recipes "steps=200;steps=1000;lr=5e-3;vectors=2;init=a shape"
    python bench/quality.py --model /path/to/run/model --evaluator-from /path/to/run   # a training run

Per concept and recipe: train it with tinv's trainer (tinv's defaults; `object` or `style`
templates and the concept's initializer phrase), render the concept alone and in new contexts
with tinv's generator (``--n`` images with distinct seeds per prompt), score them with the
world's evaluator, and do the same for the initializer phrase alone (the baseline) and for real
held-out concept images (the ceiling). One JSON line per figure: concept fidelity (evaluator-
feature cosine, the CLIP-I analog; with real-vs-other-concepts to show the features separate the
concepts), attribute accuracy, and prompt fidelity (context rendered; against the base model's
rate with plain words), each with the fraction of the way from baseline to ceiling. A concept
counts only where its baseline is clearly below the ceiling (``counts``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from common import Results

REPO = Path(__file__).resolve().parent.parent
MARGIN = 0.05  # a baseline within this of the ceiling makes the concept reachable by words alone


def parse_recipes(text: str):
    from tinv.trainer.world.quality import Recipe

    out = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        if part == "defaults":
            out.append(Recipe())
            continue
        kw: dict = {}
        for kv in part.split(","):
            k, _, v = kv.partition("=")
            key = {"steps": "steps", "lr": "learning_rate", "vectors": "vectors", "init": "initializer", "images": "images"}[k.strip()]
            kw[key] = v if key == "initializer" else (float(v) if key == "learning_rate" else int(v))
        out.append(Recipe(**kw))
    return out


def _f(v) -> str:
    return "—" if v is None or v != v else f"{v:.2f}"


def table(rows: list[dict]) -> str:
    """The result rows as one Markdown line per concept and recipe (what the README quotes)."""
    out = ["| concept | recipe | fidelity learned / initializer / real (real vs other) | fraction of the way | counts "
           "| attribute learned / initializer / real | prompt fidelity learned / plain words (ratio) |",
           "|---|---|---|---|---|---|---|"]
    by: dict[tuple, dict] = {}
    for r in rows:
        by.setdefault((r["config"]["concept"], r["config"]["recipe"]), {})[r["name"]] = r
    for (concept, recipe), m in by.items():
        f = m["concept_fidelity_fraction"]["raw"]
        a = (m.get("attribute_accuracy") or {}).get("raw") or {}
        p = (m.get("prompt_fidelity_ratio") or {}).get("raw") or {}
        out.append(
            f"| {concept} | {recipe} | {_f(f['learned'])} / {_f(f['initializer'])} / {_f(f['real'])} ({_f(f['real_vs_other_concepts'])}) "
            f"| {_f(f['fraction'])} | {'yes' if m['concept_fidelity_fraction']['counts'] else 'no'} "
            f"| {_f(a.get('learned'))} / {_f(a.get('initializer'))} / {_f(a.get('real'))} "
            f"| {_f(p.get('learned'))} / {_f(p.get('plain_words'))} ({_f(p.get('ratio'))}) |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="builtin:shapes", help="base model (default builtin:shapes)")
    p.add_argument("--evaluator-from", default=None, help="folder with evaluator.safetensors + manifest.json (default: the shipped weights)")
    p.add_argument("--concepts", default=None, help="comma-separated held-out concepts (default: all)")
    p.add_argument("--recipes", default="defaults", help="';'-separated recipes, e.g. 'defaults;steps=1000;vectors=2'")
    p.add_argument("--n", type=int, default=96, help="images per prompt (distinct seeds)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--record", action="store_true", help="append the results to bench/results/quality.jsonl")
    a = p.parse_args(argv)

    import torch

    from tinv.trainer.world import evaluate, quality, scenes, weights

    torch.set_num_threads(1)
    ev = evaluate.load_evaluator(Path(a.evaluator_from) if a.evaluator_from else weights.WEIGHTS)
    names = a.concepts.split(",") if a.concepts else list(scenes.CONCEPT_NAMES)
    res = Results("quality", record=a.record)
    for recipe in parse_recipes(a.recipes):
        for name in names:
            c = scenes.concept(name)
            t0 = time.monotonic()
            m = quality.measure(c, a.model, ev, recipe, n=a.n, seed=a.seed)
            f = m["fidelity"]
            counts = f["real"] - f["initializer"] > MARGIN
            config = {"model": a.model, "concept": name, "kind": c.kind, "recipe": recipe.label(), "n": a.n, "seed": a.seed}
            res.emit("concept_fidelity_fraction", f["fraction"] if f["fraction"] is not None else float("nan"), "fraction", config,
                     raw=f, counts=counts)
            if m["attribute"]["learned"] is not None:
                res.emit("attribute_accuracy", m["attribute"]["learned"], "fraction", config, raw=m["attribute"])
            if m["prompt"]["learned"] is not None:
                res.emit("prompt_fidelity_ratio", m["prompt"]["ratio"] if m["prompt"]["ratio"] is not None else float("nan"), "ratio",
                         config, raw=m["prompt"])
            print(json.dumps({"concept": name, "recipe": recipe.label(), "per_prompt": m["per_prompt"],
                              "train_seconds": m["train_seconds"], "seconds": round(time.monotonic() - t0, 1)}), file=sys.stderr)
    res.close()
    print(table(res.rows), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    raise SystemExit(main())
