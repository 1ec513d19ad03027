"""`tinv`: the command-line front door.

It lives in tinv.api because it must start with only the base install (no torch, no kopf):
`validate` and `crds` run here; the other commands are handed to tinv.trainer or
tinv.operator, imported only when asked for.

Exit codes: 0 success; 1 the work failed; 2 bad input (invalid resource, bad arguments,
missing file); 3 a needed extra is not installed; 75 interrupted and checkpointed, retry
(pre-emption); 130 interrupted by Ctrl-C.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_MISSING_EXTRA = 0, 1, 2, 3

# command -> (module, extra, one-line help). Each module has `main(argv: list[str]) -> int`,
# where argv[0] is the command name.
DELEGATED: dict[str, tuple[str, str, str]] = {
    "train": ("tinv.trainer.cli", "trainer", "train the concepts of a TextualInversionJob (what the operator's pods run)"),
    "generate": ("tinv.trainer.cli", "trainer", "render a GenerationGrid, or one shard of it (--shard i/n)"),
    "run": ("tinv.trainer.cli", "trainer", "run a job or grid locally, start to finish, with a progress bar"),
    "checkpoints": ("tinv.trainer.cli", "trainer", "list a job's checkpoints (uuid, step, loss, URI) from its storage"),
    "fetch": ("tinv.trainer.cli", "trainer", "download one checkpoint by uuid into a folder"),
    "reproduce": ("tinv.trainer.cli", "trainer", "re-render one grid image from the parameters in its PNG metadata"),
    "import-determined": ("tinv.trainer.cli", "trainer", "convert the Determined example's configs into tinv resources"),
    "operator": ("tinv.operator.main", "operator", "run the kopf operator for one or more namespaces"),
}


def _usage() -> str:
    lines = [
        "usage: tinv COMMAND [ARGS...]",
        "",
        "Textual Inversion for Stable Diffusion, on a laptop or as Kubernetes resources.",
        "",
        "commands:",
        f"  {'validate':<18} check resources offline, exactly as the apiserver would (schema + CEL rules)",
        f"  {'crds':<18} print the CustomResourceDefinitions (kubectl apply -f <(tinv crds))",
    ]
    lines += [f"  {name:<18} {help_}" for name, (_, _, help_) in DELEGATED.items()]
    lines += [
        "",
        "`tinv COMMAND --help` describes each command.",
        "exit codes: 0 ok, 1 failed, 2 bad input, 3 missing extra (pip install 'tinv[trainer]' or 'tinv[operator]'),",
        "            75 interrupted after a checkpoint (retry to resume), 130 interrupted by Ctrl-C",
    ]
    return "\n".join(lines)


def cmd_validate(argv: list[str]) -> int:
    from .validation import InvalidResource, load_documents, validate_document

    parser = argparse.ArgumentParser(
        prog="tinv validate",
        description="Validate TextualInversionJob and GenerationGrid files offline: every problem is printed with its field path.",
    )
    parser.add_argument("files", nargs="+", help="YAML files ('-' for standard input); several documents per file are fine")
    parser.add_argument("-q", "--quiet", action="store_true", help="print problems only")
    args = parser.parse_args(argv)
    bad = 0
    for name in args.files:
        try:
            docs = load_documents(name)
        except InvalidResource as err:
            print(err, file=sys.stderr)
            bad += 1
            continue
        except OSError as err:
            print(f"{name}: cannot read the file: {err.strerror}", file=sys.stderr)
            bad += 1
            continue
        for i, doc in enumerate(docs):
            if isinstance(doc, dict) and doc.get("kind") in ("Secret", "ConfigMap", "PersistentVolumeClaim"):
                continue
            label = name if len(docs) == 1 else f"{name} (document {i + 1})"
            resource, problems = validate_document(doc)
            if problems:
                bad += 1
                print(f"{label}: invalid", file=sys.stderr)
                for p in problems:
                    print(f"  - {p}", file=sys.stderr)
            elif not args.quiet:
                print(f"{label}: valid {resource.kind} {resource.metadata.name!r}")
    return EXIT_USAGE if bad else EXIT_OK


def cmd_crds(argv: list[str]) -> int:
    from .crdgen import render
    from .models import RESOURCES

    argparse.ArgumentParser(prog="tinv crds", description="Print the CRDs generated from tinv.api.models.").parse_args(argv)
    print("---\n".join(render(m) for m in RESOURCES.values()), end="")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return EXIT_OK if argv else EXIT_USAGE
    if argv[0] in ("--version", "-V"):
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"tinv {version('tinv')}")
        except PackageNotFoundError:
            print("tinv (not installed)")
        return EXIT_OK
    command, rest = argv[0], argv[1:]
    try:
        if command == "validate":
            return cmd_validate(rest)
        if command == "crds":
            return cmd_crds(rest)
        if command in DELEGATED:
            module_name, extra, _ = DELEGATED[command]
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as err:
                if err.name and err.name.startswith("tinv."):
                    raise
                print(
                    f"tinv {command}: needs the '{extra}' extra ({err.name} is not installed).\n"
                    f"hint: pip install 'tinv[{extra}]'",
                    file=sys.stderr,
                )
                return EXIT_MISSING_EXTRA
            return int(module.main([command, *rest]) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(f"tinv: unknown command {command!r}\nhint: `tinv --help` lists the commands", file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
