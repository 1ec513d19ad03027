"""``tinv generate GRID.yaml [--shard i/n]`` and ``tinv reproduce IMAGE.png [--out X.png]``.

    tinv generate GRID.yaml [--shard i/n] [--device cpu|cuda] [--precision auto|bf16|fp16|fp32]
                            [--batch-size N] [--model SRC] [--storage URI] [--compile] [--force]
                            [--no-tensorboard] [--no-gallery] [--gallery-only] [--dry-run]
                            [--progress/--no-progress] [--termination-message-path P] [-v]
    tinv reproduce IMAGE.png|URI [--out X.png] [--device D] [--single] [--check]

``generate`` renders the shard ``--shard i/n`` (default: ``$JOB_COMPLETION_INDEX`` of
``spec.resources.workers`` -- or ``$TINV_SHARDS`` -- when run by the operator as an Indexed Job,
else the whole grid) into ``<storage>/<namespace>/<name>-<uid8>/images/``; run it again and it
skips every image already written. ``reproduce`` re-renders one image from the parameters in its
PNG metadata and, with ``--check``, exits 1 unless the pixels are identical.

Exit codes (:mod:`tinv.trainer.errors`): 0 ok, 1 internal error, 2 invalid input, 69 storage or
hub unreachable, 75 pre-empted after the current batch was written (re-run to resume), 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from pathlib import Path

from .errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_INVALID, EXIT_OK, EXIT_UNAVAILABLE, TinvError

log = logging.getLogger("tinv.trainer")


def _setup_logging(verbose: bool) -> None:
    try:
        from .cli import setup_logging
    except Exception:  # noqa: BLE001 - the trainer CLI is another module; fall back to basic logging
        logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                            datefmt="%H:%M:%S", stream=sys.stderr, force=True)
        return
    setup_logging(verbose)


def _generate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tinv generate",
        description="Render a GenerationGrid (or shard i of n of it) into its storage: PNGs with their parameters in the "
        "metadata, index.json, contact sheets, index.html and TensorBoard summaries. Re-running skips finished images.",
    )
    p.add_argument("grid", help="the GenerationGrid YAML (what the operator mounts into the pod)")
    p.add_argument("--shard", help="i/n: render shard i of n (from 0); default $JOB_COMPLETION_INDEX of spec.resources.workers, else 0/1")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], help="override spec.precision")
    p.add_argument("--batch-size", type=int, help="override spec.batchSize (images per forward pass)")
    p.add_argument("--vae-batch", type=int, help="decode at most this many images per VAE pass (default: the whole batch)")
    p.add_argument("--model", help="override spec.model.source (e.g. builtin:tiny)")
    p.add_argument("--storage", help="override spec.storage.uri")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet and VAE decoder (GPU: slower start, faster batches)")
    p.add_argument("--force", action="store_true", help="render every image again, even those already written")
    p.add_argument("--no-tensorboard", action="store_true", help="skip TensorBoard image summaries")
    p.add_argument("--no-gallery", action="store_true", help="skip index.json, contact sheets and index.html")
    p.add_argument("--gallery-only", action="store_true", help="only (re)build index.json, contact sheets and index.html")
    p.add_argument("--dry-run", action="store_true", help="print this shard's images as JSON lines and exit")
    p.add_argument("--termination-message-path", help="JSON summary written at exit (default: /dev/termination-log when present)")
    bar = p.add_mutually_exclusive_group()
    bar.add_argument("--progress", dest="progress", action="store_true", default=None, help="force the progress bar")
    bar.add_argument("--no-progress", dest="progress", action="store_false", help="plain log lines even on a terminal")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _term(explicit: str | None):
    try:
        from .reporting import termination_path, write_termination_message
    except Exception:  # noqa: BLE001
        return None, lambda path, doc: None
    return termination_path(explicit), write_termination_message


def cmd_generate(argv: list[str]) -> int:
    args = _generate_parser().parse_args(argv)
    _setup_logging(args.verbose)
    term, write_term = _term(args.termination_message_path)

    def fail(code: int, reason: str, message: str) -> int:
        print(f"tinv generate: {message}", file=sys.stderr)
        write_term(term, {"state": "failed", "exit_code": code, "reason": reason, "message": message[:2000]})
        return code

    from tinv.api.storage import StorageError
    from tinv.api.validation import InvalidResource, load_resource
    from tinv.api.models import GenerationGrid

    try:
        grid = load_resource(args.grid, GenerationGrid)
    except InvalidResource as e:
        return fail(EXIT_INVALID, "InvalidSpec", str(e))

    from . import generate as G

    try:
        shard = G.parse_shard(args.shard) if args.shard else None
        if args.dry_run or args.gallery_only:
            images = G.expand(grid.spec)
            i, n = G.shard_from_env(grid.spec, shard)
            if args.dry_run:
                mine = G.shard(images, i, n)
                for img in mine:
                    print(json.dumps({"index": img.index, "file": img.filename, "prompt_index": img.prompt_index,
                                      "guidance_scale": img.guidance_scale, "steps": img.steps, "scheduler": img.scheduler,
                                      "width": img.width, "height": img.height, "seed": img.seed}))
                print(f"shard {i}/{n}: {len(mine)} of {len(images)} images", file=sys.stderr)
                return EXIT_OK
            from tinv.api import storage as api_storage

            from . import gallery

            store = api_storage.Store(api_storage.S3Settings.from_spec(grid.spec.storage))
            images_uri = api_storage.join(G.grid_root(grid, args.storage), api_storage.IMAGES_DIR)
            built = gallery.build(store, grid, images, images_uri)
            print(f"gallery: {built.gallery_uri} ({built.present} of {len(images)} images)")
            return EXIT_OK
        opts = G.GridOptions(
            shard=shard, device=args.device, precision=args.precision, batch_size=args.batch_size, model=args.model,
            storage=args.storage, compile=args.compile, vae_batch=args.vae_batch, tensorboard=not args.no_tensorboard,
            gallery=not args.no_gallery, force=args.force, progress_bar=args.progress,
        )
        result = G.run_grid(grid, opts)
    except KeyboardInterrupt:
        return fail(EXIT_INTERRUPTED, "Interrupted", "interrupted (Ctrl-C); the images written so far are kept")
    except TinvError as e:
        code = e.exit_code
        if code == 75:
            print(f"tinv generate: {e}", file=sys.stderr)
            write_term(term, {"state": "running", "exit_code": code, "reason": e.reason, "message": str(e)})
            return code
        return fail(code, e.reason, str(e))
    except StorageError as e:
        return fail(EXIT_UNAVAILABLE, "StorageUnreachable", str(e))
    except Exception as e:  # noqa: BLE001 - a bug or a device fault: say so, retryable
        traceback.print_exc()
        return fail(EXIT_INTERNAL, "InternalError", f"{type(e).__name__}: {e}")
    summary = result.summary()
    write_term(term, {**summary, "exit_code": 0, "reason": "Completed"})
    rate = f", {result.images_per_second:.2f} images/s" if result.images_per_second else ""
    print(f"shard {result.shard[0]}/{result.shard[1]}: {result.rendered} rendered, {result.skipped} already there "
          f"({result.shard_total} of {result.images_total} grid images){rate}")
    print(f"images: {result.images_uri}")
    if result.gallery_uri:
        state = "complete" if result.complete else "partial: other shards still running"
        print(f"gallery: {result.gallery_uri} ({state})")
    return EXIT_OK


def _reproduce_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tinv reproduce",
        description="Render an image again from the parameters in its PNG metadata (prompt, seed, guidance, steps, "
        "scheduler, size, model, concept checkpoints). On the same device the pixels are identical.",
    )
    p.add_argument("image", help="a PNG written by tinv generate (a path, file://, pvc:// or s3:// URI)")
    p.add_argument("--out", help="where to write the new PNG (default: <name>.reproduced.png in the current folder)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--single", action="store_true", help="render the image alone, not in a batch of its original shape")
    p.add_argument("--check", action="store_true", help="exit 1 unless the pixels equal the original's")
    p.add_argument("--print", dest="print_meta", action="store_true", help="only print the image's metadata")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def cmd_reproduce(argv: list[str]) -> int:
    args = _reproduce_parser().parse_args(argv)
    _setup_logging(args.verbose)
    from tinv.api import storage as api_storage

    from . import generate as G

    store = api_storage.Store()
    try:
        data = store.read_bytes(args.image)
    except api_storage.NotFound:
        print(f"tinv reproduce: {args.image}: no such file", file=sys.stderr)
        return EXIT_INVALID
    except api_storage.StorageError as e:
        print(f"tinv reproduce: {e}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    try:
        meta = G.read_png_metadata(data)
        if args.print_meta:
            print(json.dumps(meta, indent=2))
            return EXIT_OK
        pixels, new_meta = G.reproduce(meta, device=args.device, single=args.single, store=store)
    except TinvError as e:
        print(f"tinv reproduce: {e}", file=sys.stderr)
        return e.exit_code
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        print(f"tinv reproduce: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_INTERNAL
    out = args.out or f"{Path(args.image.rsplit('/', 1)[-1]).stem}.reproduced.png"
    G.put(store, out, G.encode_png(pixels, new_meta), "image/png")
    original = G.decode_png(data)
    same = original.shape == pixels.shape and bool((original == pixels).all())
    if same:
        verdict = "identical pixels"
    elif original.shape != pixels.shape:
        verdict = f"DIFFERENT size {pixels.shape[1]}x{pixels.shape[0]} vs {original.shape[1]}x{original.shape[0]}"
    else:
        import numpy as np

        diff = np.abs(original.astype(int) - pixels.astype(int))
        verdict = f"DIFFERENT pixels: {int((diff.max(axis=2) > 0).sum())} differ, max difference {int(diff.max())}/255"
        if new_meta.get("device") != meta.get("device"):
            verdict += f" (made on {meta.get('device')}, reproduced on {new_meta.get('device')})"
    print(f"{out}: {verdict}")
    return EXIT_OK if same or not args.check else EXIT_INTERNAL
