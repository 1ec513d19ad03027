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

Errors become exit codes in :func:`tinv.trainer.cli.outcome_of` (the dispatcher): 0 ok, 1 internal
error, 2 invalid input, 69 storage or hub unreachable, 75 pre-empted after the current batch was
written (re-run to resume), 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import EXIT_INTERNAL, EXIT_OK, ConfigError
from .runtime import setup_logging, termination_path, write_termination_message


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


def cmd_generate(argv: list[str], ctx) -> int:
    args = _generate_parser().parse_args(argv)
    setup_logging(args.verbose)
    from tinv.api import storage as api_storage
    from tinv.api.models import GenerationGrid
    from tinv.api.validation import load_resource

    from . import grid as grids

    ctx.termination = termination_path(args.termination_message_path)
    grid = load_resource(args.grid, GenerationGrid)
    shard = grids.parse_shard(args.shard) if args.shard else None
    if args.dry_run or args.gallery_only:
        images = grids.expand(grid.spec)
        i, n = grids.shard_from_env(grid.spec, shard)
        if args.dry_run:
            mine = grids.shard(images, i, n)
            for img in mine:
                print(json.dumps({"index": img.index, "file": img.filename, "prompt_index": img.prompt_index,
                                  "guidance_scale": img.guidance_scale, "steps": img.steps, "scheduler": img.scheduler,
                                  "width": img.width, "height": img.height, "seed": img.seed}))
            print(f"shard {i}/{n}: {len(mine)} of {len(images)} images", file=sys.stderr)
            return EXIT_OK
        from . import gallery

        store = api_storage.Store(api_storage.S3Settings.from_spec(grid.spec.storage))
        images_uri = api_storage.join(grids.grid_root(grid, args.storage), api_storage.IMAGES_DIR)
        built = gallery.build(store, grid, images, images_uri)
        print(f"gallery: {built.gallery_uri} ({built.present} of {len(images)} images)")
        return EXIT_OK
    from .generate import GridOptions, run_grid

    opts = GridOptions(
        shard=shard, device=args.device, precision=args.precision, batch_size=args.batch_size, model=args.model,
        storage=args.storage, compile=args.compile, vae_batch=args.vae_batch, tensorboard=not args.no_tensorboard,
        gallery=not args.no_gallery, force=args.force, progress_bar=args.progress,
    )
    result = run_grid(grid, opts)
    write_termination_message(ctx.termination, {**result.summary(), "exit_code": 0, "reason": "Completed"})
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


def cmd_reproduce(argv: list[str], ctx) -> int:
    args = _reproduce_parser().parse_args(argv)
    setup_logging(args.verbose)
    from tinv.api import storage as api_storage

    from . import pngmeta
    from .engine import reproduce

    store = api_storage.Store()
    try:
        data = store.read_bytes(args.image)
    except api_storage.NotFound:
        raise ConfigError(f"{args.image}: no such file") from None
    meta = pngmeta.read_png_metadata(data)
    if args.print_meta:
        print(json.dumps(meta, indent=2))
        return EXIT_OK
    pixels, new_meta = reproduce(meta, device=args.device, single=args.single, store=store)
    out = args.out or f"{Path(args.image.rsplit('/', 1)[-1]).stem}.reproduced.png"
    store.write_bytes(out, pngmeta.encode_png(pixels, new_meta), content_type="image/png")
    original = pngmeta.decode_png(data)
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
