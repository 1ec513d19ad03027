"""The trainer's commands: ``tinv train``, ``tinv generate``, ``tinv reproduce`` (the last two live in
:mod:`.generate_cli`) and helpers; ``python -m tinv.trainer COMMAND ...`` runs the same.

    tinv train JOB.yaml [--model SRC] [--storage URI] [--steps N] [--device cpu|cuda]
                        [--micro-batch N] [--metrics-port P] [--termination-message-path P]
                        [--fresh] [--no-resume] [--no-validation] [--progress/--no-progress]
    python -m tinv.trainer samples OUT_DIR [--count 8] [--size 128] [--seed 0]
    python -m tinv.trainer inspect EMBEDDING_FILE_OR_FOLDER
    python -m tinv.trainer tiny-model OUT_DIR [--variant tiny|tiny-v]

Multi-GPU / multi-node: ``torchrun --nproc-per-node N -m tinv.trainer train JOB.yaml``.

Exit codes are the contract's (:class:`tinv.api.models.ExitCode`): 0 ok, 1 internal error,
2 invalid input, 69 dependency unreachable, 75 pre-empted (a retry resumes from the newest
checkpoint; the last line says what was saved), 130 Ctrl-C. Every command's errors are mapped to
them in ONE place, :func:`outcome_of`, and :func:`main` is the one dispatcher.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

# The trainer extra: without it this import fails, and tinv.api.cli answers with exit code 3 and
# "pip install 'tinv[trainer]'" instead of a traceback.
import torch  # noqa: F401

from . import generate_cli
from .errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_INVALID, EXIT_OK, EXIT_UNAVAILABLE, TinvError
from .runtime import Stopped, setup_logging, termination_path, write_termination_message

log = logging.getLogger("tinv.trainer")


@dataclass
class Context:
    """What a command tells the dispatcher: where its termination message goes (the operator reads it)."""

    termination: Path | None = None


@dataclass
class Outcome:
    code: int
    reason: str
    message: str
    state: str  # the termination message's state: "failed", or "running" for a stopped run that a retry continues


def outcome_of(e: BaseException) -> Outcome:
    """The exit code, reason and message of any error a command raises -- the one mapping."""
    from tinv.api.storage import StorageError
    from tinv.api.validation import InvalidResource

    if isinstance(e, Stopped):
        return Outcome(e.exit_code, e.reason, str(e), "running")
    if isinstance(e, TinvError):
        return Outcome(e.exit_code, e.reason, str(e), "failed")
    if isinstance(e, InvalidResource):
        return Outcome(EXIT_INVALID, "InvalidSpec", str(e), "failed")
    if isinstance(e, StorageError):  # object store unreachable, access denied, bucket missing
        return Outcome(EXIT_UNAVAILABLE, "StorageUnreachable", str(e), "failed")
    if isinstance(e, KeyboardInterrupt):
        return Outcome(EXIT_INTERRUPTED, "Interrupted", "interrupted (Ctrl-C)", "running")
    return Outcome(EXIT_INTERNAL, "InternalError", f"{type(e).__name__}: {e}", "failed")


def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tinv train",
        description="Train the concepts of a TextualInversionJob; checkpoints go to spec.storage.uri "
        "(or ./tinv-runs). Run it again to continue from the newest checkpoint.",
    )
    p.add_argument("job", help="the TextualInversionJob YAML (what the operator mounts into the pod)")
    p.add_argument("--model", help="override spec.model.source (e.g. builtin:tiny, a folder, s3://...)")
    p.add_argument("--storage", help="override spec.storage.uri")
    p.add_argument("--steps", type=int, help="override spec.training.steps")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--micro-batch", type=int, default=int(os.environ.get("TINV_MICRO_BATCH", "0")) or None,
                   help="samples per forward pass (env TINV_MICRO_BATCH; default: a whole step's local samples, halved on OOM)")
    p.add_argument("--metrics-port", type=int, default=int(os.environ.get("TINV_METRICS_PORT", "0")) or None,
                   help="serve Prometheus /metrics on this port (env TINV_METRICS_PORT)")
    p.add_argument("--termination-message-path", help="JSON summary written at exit (default: /dev/termination-log when present)")
    p.add_argument("--fresh", action="store_true", help="delete this run's existing checkpoints and progress, then start over")
    p.add_argument("--no-resume", action="store_true", help="do not continue from this run's own newest checkpoint")
    p.add_argument("--no-validation", action="store_true", help="skip validation images")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (GPU; slower start, faster steps)")
    bar = p.add_mutually_exclusive_group()
    bar.add_argument("--progress", dest="progress", action="store_true", default=None, help="force the progress bar")
    bar.add_argument("--no-progress", dest="progress", action="store_false", help="plain log lines even on a terminal")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def cmd_train(argv: list[str], ctx: Context) -> int:
    args = _train_parser().parse_args(argv)
    setup_logging(args.verbose)
    from tinv.api.models import TextualInversionJob
    from tinv.api.validation import load_resource

    from . import storage
    from .train import Options, train

    ctx.termination = termination_path(args.termination_message_path)
    job = load_resource(args.job, TextualInversionJob)
    if args.fresh:
        st = storage.Store(storage.S3Settings.from_spec(job.spec.storage))
        md = job.metadata
        root = storage.run_root(args.storage or job.spec.storage.uri, md.namespace, md.name or "job", md.uid)
        log.info("--fresh: deleting %s", root)
        st.delete_prefix(storage.join(root, storage.CHECKPOINTS_DIR))
        st.delete(storage.join(root, storage.PROGRESS_FILE))
    opts = Options(
        device=args.device,
        model=args.model,
        storage=args.storage,
        steps=args.steps,
        micro_batch=args.micro_batch,
        metrics_port=args.metrics_port,
        termination_path=str(ctx.termination) if ctx.termination else None,
        auto_resume=not args.no_resume,
        progress_bar=args.progress,
        validation=not args.no_validation,
        compile=args.compile,
        base_dir=os.path.dirname(os.path.abspath(args.job)),
    )
    result = train(job, opts)
    write_termination_message(ctx.termination, result.summary())
    latest = result.latest
    if result.exit_code == EXIT_OK:
        print(
            f"done: step {result.step}/{result.total_steps}, loss {result.loss if result.loss is None else round(result.loss, 5)}; "
            f"latest checkpoint {latest.uuid if latest else '-'} at {latest.uri if latest else result.run_uri}",
            file=sys.stderr,
        )
    else:
        print(f"tinv train: {result.phase.lower()}: {result.message}", file=sys.stderr)
    return result.exit_code


def cmd_samples(argv: list[str], ctx: Context) -> int:
    p = argparse.ArgumentParser(prog="python -m tinv.trainer samples", description="Draw det-logo sample images.")
    p.add_argument("out")
    p.add_argument("--count", type=int, default=8)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    from .samples import write_samples

    for path in write_samples(a.out, a.count, a.size, a.seed):
        print(path)
    return EXIT_OK


def cmd_inspect(argv: list[str], ctx: Context) -> int:
    p = argparse.ArgumentParser(prog="python -m tinv.trainer inspect", description="Show the tokens and shapes in an embedding file or checkpoint.")
    p.add_argument("location")
    a = p.parse_args(argv)
    from .formats import read_embeddings

    emb = read_embeddings(a.location)
    for tok, e in emb.items():
        if isinstance(e, dict):
            print(tok, {k: tuple(v.shape) for k, v in e.items()})
        else:
            print(f"{tok}\t{tuple(e.shape)}\tmean norm {float(e.norm(dim=1).mean()):.4f}")
    return EXIT_OK


def cmd_tiny_model(argv: list[str], ctx: Context) -> int:
    p = argparse.ArgumentParser(prog="python -m tinv.trainer tiny-model", description="Write builtin:tiny as a diffusers folder.")
    p.add_argument("out")
    p.add_argument("--variant", default="tiny", choices=["tiny", "tiny-v"])
    a = p.parse_args(argv)
    from .tiny import save

    print(save(a.out, f"builtin:{a.variant}"))
    return EXIT_OK


COMMANDS = {
    "train": cmd_train,
    "generate": generate_cli.cmd_generate,
    "reproduce": generate_cli.cmd_reproduce,
    "samples": cmd_samples,
    "inspect": cmd_inspect,
    "tiny-model": cmd_tiny_model,
}


def main(argv: list[str] | None = None) -> int:
    """The one dispatcher; argv[0] is the command name (``train``, ...), as tinv.api.cli passes it.
    Whatever a command raises becomes one line on stderr, the termination message and the exit
    code of :func:`outcome_of`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return EXIT_OK if argv else EXIT_INVALID
    cmd = COMMANDS.get(argv[0])
    if cmd is None:
        print(f"unknown command {argv[0]!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return EXIT_INVALID
    ctx = Context()
    try:
        return cmd(argv[1:], ctx)
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - every error ends here, mapped once
        out = outcome_of(e)
        if out.code == EXIT_INTERNAL:  # a bug or a hardware fault: keep the traceback in the log
            traceback.print_exc()
        print(f"tinv {argv[0]}: {out.message}", file=sys.stderr, flush=True)
        write_termination_message(ctx.termination, {"state": out.state, "exit_code": out.code, "reason": out.reason,
                                                    "message": out.message[:2000]})
        e.reported = True  # a stop watchdog (runtime.StopFlag) must not say it twice
        return out.code
