"""Command line of the shapes world (see :mod:`tinv.trainer.world.train`)."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import shutil
import sys
import time
from pathlib import Path

from . import nets, train, weights


def _steps(text: str) -> dict[str, int]:
    steps = dict(train.FULL_STEPS)
    for kv in filter(None, text.split(",")):
        k, _, v = kv.partition("=")
        if k not in steps:
            raise argparse.ArgumentTypeError(f"--steps: unknown stage {k!r}; stages: {', '.join(train.STAGES)}")
        steps[k] = int(v)
    return steps


def _stages(text: str) -> tuple[str, ...]:
    names = tuple(filter(None, text.split(",")))
    bad = [n for n in names if n not in train.STAGES]
    if bad:
        raise argparse.ArgumentTypeError(f"--stages: unknown stage {bad[0]!r}; stages: {', '.join(train.STAGES)}")
    return names


def _reproduce(a: argparse.Namespace, cfg: train.Config, records: dict[str, dict]) -> str:
    """The command(s) that redo this run without a budget: one per thread count the stages used."""
    tail = f" --pool {cfg.pool}" + (" --micro" if a.micro else "") + (f" --device {a.device}" if a.device != "cpu" else "")
    steps = ",".join(f"{k}={r['steps']}" for k, r in records.items())
    by_threads: dict[int, list[str]] = {}
    for k, r in records.items():
        by_threads.setdefault(r.get("threads", a.threads), []).append(k)
    return " && ".join(
        f"python -m tinv.trainer.world train OUT --seed {a.seed} --steps {steps} --threads {n}"
        + ("" if len(by_threads) == 1 else f" --stages {','.join(names)}") + tail
        for n, names in by_threads.items()
    )


def cmd_train(a: argparse.Namespace, argv: list[str]) -> int:
    out = Path(a.out)
    cfg = train.Config(out=out, seed=a.seed, steps=a.steps, budget_minutes=a.budget_minutes,
                       sizes=nets.MICRO if a.micro else nets.FULL)
    cfg.threads, cfg.device = a.threads, a.device
    if a.pool:
        cfg.pool = a.pool
    if a.micro:
        cfg.pool, cfg.batch, cfg.checkpoint_every, cfg.vae_check_every = 64, {k: 4 for k in cfg.batch}, 10**9, 2
    t0 = time.time()
    ran = train.train(cfg, stages=a.stages)
    records = {n: r for n in train.STAGES if (r := ran.get(n) or train.done(cfg, n))}
    if set(records) != set(train.STAGES):
        # Some stages still to run (e.g. clip and evaluator in two processes side by side): no model yet.
        print(json.dumps({"out": str(out), "stages": ran}))
        return 0
    shutil.copy2(cfg.stage_dir("evaluator") / "evaluator.safetensors", out / "evaluator.safetensors")
    command = "python -m tinv.trainer.world " + shlex.join(argv)
    earlier = json.loads((out / weights.MANIFEST).read_text()) if (out / weights.MANIFEST).exists() else {}
    # the invocations that made the stages before this one (a run continued, or unpacked weights)
    history = earlier.get("history", []) + ([earlier["command"]] if earlier.get("command") not in (None, command) else [])
    manifest = {
        "command": command,
        "history": history,
        "reproduce": _reproduce(a, cfg, records),
        "seed": a.seed,
        "sizes": cfg.sizes.as_dict(),
        "pool": cfg.pool,
        "batch": cfg.batch,
        "stages": records,
        "wall_seconds_this_invocation": round(time.time() - t0, 1),
        "versions": weights.versions(),
        "threads": a.threads,
        "device": a.device,
    }
    (out / weights.MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    print(json.dumps({"out": str(out), "stages": records}))
    return 0


def cmd_install(a: argparse.Namespace, argv: list[str]) -> int:
    dest = weights.install(Path(a.run), Path(a.dest) if a.dest else weights.WEIGHTS)
    print(dest)
    return 0


def cmd_unpack(a: argparse.Namespace, argv: list[str]) -> int:
    print(json.dumps(weights.unpack(Path(a.weights) if a.weights else weights.WEIGHTS, Path(a.out))))
    return 0


def cmd_evaluate(a: argparse.Namespace, argv: list[str]) -> int:
    from . import evaluate

    root = Path(a.model)
    rows = evaluate.report(root, n=a.n, seed=a.seed, steps=a.steps, per_pair=a.per_pair, seen=a.seen)
    for r in rows:
        print(json.dumps(r))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m tinv.trainer.world")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train the shapes model (staged; resumes at the first unfinished stage)")
    t.add_argument("out")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--budget-minutes", type=float, default=None, help="wall-clock cap over all stages (default: none)")
    t.add_argument("--steps", type=_steps, default=dict(train.FULL_STEPS),
                   help="steps per stage, e.g. clip=300,evaluator=3000,vae=6000,unet=5500,refine=2500,decoder=0 (the default; decoder=1500 trains the decoder on whole scenes)")
    t.add_argument("--pool", type=int, default=None, help=f"scenes in the UNet/VAE pool (default {train.POOL})")
    t.add_argument("--device", default="cpu", help="cpu (default) or cuda; the seed fixes every draw, the device the arithmetic")
    t.add_argument("--threads", type=int, default=1, help="torch threads (default 1; reproducible per count)")
    t.add_argument("--stages", type=_stages, default=train.STAGES,
                   help="only these stages, e.g. clip,evaluator (independent: two processes can run them side by side)")
    t.add_argument("--micro", action="store_true", help="a micro model and pool (tests: seconds)")
    i = sub.add_parser("install", help="copy a finished run into the package's weights/ with its manifest")
    i.add_argument("run")
    i.add_argument("--dest", default=None)
    u = sub.add_parser("unpack", help="lay the shipped weights out as a finished run, to continue with later stages")
    u.add_argument("out")
    u.add_argument("--weights", default=None, help="a weights folder (default: the package's)")
    e = sub.add_parser("evaluate", help="evaluator accuracy and prompt following of a run or weights folder")
    e.add_argument("model", help="a run folder or weights folder (holding model/ and evaluator.safetensors)")
    e.add_argument("--n", type=int, default=96, help="images per prompt")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--steps", type=int, default=20, help="sampling steps")
    e.add_argument("--per-pair", type=int, default=2, help="held-out prompts per held-out shape/colour pair (backgrounds)")
    e.add_argument("--seen", type=int, default=6, help="prompts with seen combinations (the control)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return {"train": cmd_train, "install": cmd_install, "unpack": cmd_unpack, "evaluate": cmd_evaluate}[a.cmd](a, argv)
