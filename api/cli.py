"""`tinv`: the command-line front door.

It lives in tinv.api because it must start with only the base install (no torch, no kopf):
`validate` and `crds` run here; the other commands are handed to tinv.trainer or
tinv.operator, imported only when asked for.

Exit codes: 0 success; 1 the work failed; 2 bad input (invalid resource, bad arguments,
missing file); 3 a needed extra is not installed; 69 a dependency (model hub, object store)
is unreachable, retry; 75 interrupted and checkpointed, retry (pre-emption); 130 interrupted
by Ctrl-C.
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
    "reproduce": ("tinv.trainer.cli", "trainer", "re-render one grid image from the parameters in its PNG metadata"),
    "operator": ("tinv.operator.main", "operator", "run the kopf operator for one or more namespaces"),
    "ui": ("tinv.ui.cli", "ui", "serve the read-only web UI: local runs, or a cluster namespace with --kube"),
}
LOCAL_HELP = {
    "validate": "check resources offline, exactly as the apiserver would (schema + CEL rules)",
    "run": "run a job or grid locally, start to finish, and print its checkpoints or gallery",
    "checkpoints": "list a job's checkpoints (uuid, step, loss, URI) from its storage or its cluster status",
    "fetch": "download one checkpoint by uuid into a folder",
    "import-determined": "convert the Determined example's configs into tinv resources",
    "crds": "print the CustomResourceDefinitions (kubectl apply -f <(tinv crds))",
}


def _usage() -> str:
    lines = [
        "usage: tinv COMMAND [ARGS...]",
        "",
        "Textual Inversion for Stable Diffusion, on a laptop or as Kubernetes resources.",
        "",
        "commands:",
    ]
    lines += [f"  {name:<18} {help_}" for name, help_ in LOCAL_HELP.items()]
    lines += [f"  {name:<18} {help_}" for name, (_, _, help_) in DELEGATED.items()]
    lines += [
        "",
        "`tinv COMMAND --help` describes each command.",
        "exit codes: 0 ok, 1 failed, 2 bad input, 3 missing extra (pip install 'tinv[trainer]' or 'tinv[operator]'),",
        "            69 model hub or object store unreachable (retryable), 75 interrupted after a checkpoint",
        "            (retry to resume), 130 interrupted by Ctrl-C",
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


def _delegate(command: str, argv: list[str]) -> int:
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
    return int(module.main([command, *argv]) or 0)


def _load(path: str):
    """Load and validate a resource file, or print its problems and return None."""
    from .validation import InvalidResource, load_resource

    try:
        return load_resource(path)
    except InvalidResource as err:
        print(err, file=sys.stderr)
        return None


def _store_for(resource):
    from .storage import S3Settings, Store

    return Store(S3Settings.from_spec(resource.spec.storage))


def _print_checkpoints(rows: list[dict]) -> None:
    if not rows:
        print("no complete checkpoints yet")
        return
    print(f"{'UUID':<38} {'STEP':>7} {'LOSS':>9}  {'CREATED':<28} URI")
    for row in rows:
        loss = row.get("loss")
        loss_text = f"{loss:.4g}" if isinstance(loss, (int, float)) else "-"
        created = row.get("created_at") or row.get("createdAt") or "-"
        print(f"{row['uuid']:<38} {row['step']:>7} {loss_text:>9}  {created:<28} {row['uri']}")


def cmd_run(argv: list[str]) -> int:
    from .models import GenerationGrid
    from .storage import list_checkpoints, root_of

    parser = argparse.ArgumentParser(
        prog="tinv run",
        description="Run a TextualInversionJob or a GenerationGrid here, in-process, start to finish; "
        "outputs go to spec.storage.uri or ./tinv-runs. Other options are passed to `tinv train` / `tinv generate`.",
    )
    parser.add_argument("file", help="the resource YAML")
    args, rest = parser.parse_known_args(argv)
    resource = _load(args.file)
    if resource is None:
        return EXIT_USAGE
    root = root_of(resource)
    if isinstance(resource, GenerationGrid):
        return _delegate("generate", [args.file, *rest])  # it prints the gallery's path
    code = _delegate("train", [args.file, *rest])
    if code in (EXIT_OK, 75):
        print(f"run root: {root}")
        _print_checkpoints(list_checkpoints(_store_for(resource), root))
    return code


def cmd_checkpoints(argv: list[str]) -> int:
    from .storage import StorageError, list_checkpoints, root_of

    parser = argparse.ArgumentParser(
        prog="tinv checkpoints",
        description="List a TextualInversionJob's complete checkpoints: from its storage given its YAML file, "
        "or from its status in the cluster given its name (uses your kubeconfig).",
    )
    parser.add_argument("job", help="a job YAML file, or the name of a TextualInversionJob in the cluster")
    parser.add_argument("-n", "--namespace", default=None, help="namespace (cluster mode); default: the kubeconfig's")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    if Path(args.job).is_file():
        resource = _load(args.job)
        if resource is None:
            return EXIT_USAGE
        try:
            rows = list_checkpoints(_store_for(resource), root_of(resource))
        except StorageError as err:
            print(f"tinv checkpoints: {err}", file=sys.stderr)
            return EXIT_FAILED
    else:
        rows = _cluster_checkpoints(args.job, args.namespace)
        if rows is None:
            return EXIT_FAILED
    if args.json:
        import json

        print(json.dumps(rows, indent=2))
    else:
        _print_checkpoints(rows)
    return EXIT_OK


def _cluster_checkpoints(name: str, namespace: str | None) -> list[dict] | None:
    try:
        from kubernetes import client, config
        from kubernetes.client.exceptions import ApiException
    except ModuleNotFoundError:
        print("tinv checkpoints: reading the cluster needs the 'operator' extra\nhint: pip install 'tinv[operator]', or pass the job's YAML file", file=sys.stderr)
        return None
    from .models import GROUP, VERSION

    try:
        config.load_kube_config()
        if namespace is None:
            namespace = config.list_kube_config_contexts()[1]["context"].get("namespace", "default")
        obj = client.CustomObjectsApi().get_namespaced_custom_object(GROUP, VERSION, namespace, "textualinversionjobs", name)
    except ApiException as err:
        print(f"tinv checkpoints: {namespace}/{name}: {err.reason} ({err.status})", file=sys.stderr)
        return None
    except Exception as err:  # noqa: BLE001 - kubeconfig problems come in many types
        print(f"tinv checkpoints: cannot reach the cluster: {err}\nhint: pass the job's YAML file to read its storage directly", file=sys.stderr)
        return None
    return [
        {"uuid": c["uuid"], "step": c["step"], "loss": c.get("loss"), "created_at": c.get("createdAt"), "uri": c["uri"]}
        for c in (obj.get("status") or {}).get("checkpoints", [])
    ]


def cmd_fetch(argv: list[str]) -> int:
    from .storage import NotFound, Store, StorageError, list_checkpoints, root_of

    parser = argparse.ArgumentParser(prog="tinv fetch", description="Download one complete checkpoint (all its files) into a folder.")
    parser.add_argument("uuid", help="checkpoint uuid (a unique prefix is enough)")
    parser.add_argument("dest", help="destination folder")
    parser.add_argument("--job", help="the job's YAML file (default: search ./tinv-runs)")
    args = parser.parse_args(argv)
    try:
        if args.job:
            resource = _load(args.job)
            if resource is None:
                return EXIT_USAGE
            store, roots = _store_for(resource), [root_of(resource)]
        else:
            store = Store()
            base = Path("tinv-runs")
            roots = [str(p) for p in sorted(base.glob("*/*")) if p.is_dir()] if base.is_dir() else []
        matches = [c for root in roots for c in list_checkpoints(store, root) if c["uuid"].startswith(args.uuid)]
        if len(matches) != 1:
            what = "no complete checkpoint" if not matches else f"{len(matches)} checkpoints"
            print(f"tinv fetch: {what} matches {args.uuid!r}\nhint: `tinv checkpoints JOB.yaml` lists them; pass --job JOB.yaml for remote storage", file=sys.stderr)
            return EXIT_USAGE
        files = store.download_prefix(matches[0]["uri"], args.dest)
    except (NotFound, StorageError) as err:
        print(f"tinv fetch: {err}", file=sys.stderr)
        return EXIT_FAILED
    print(f"fetched {matches[0]['uuid']} (step {matches[0]['step']}): {len(files)} files into {args.dest}")
    return EXIT_OK


def cmd_import_determined(argv: list[str]) -> int:
    import yaml

    from .determined import convert_finetune, convert_grid
    from .validation import validate_document

    parser = argparse.ArgumentParser(
        prog="tinv import-determined",
        description="Convert the Determined textual-inversion example's configs (finetune_const.yaml, finetune_advanced.yaml, "
        "generate_grid.yaml) into a TextualInversionJob and a GenerationGrid. Anything that cannot be mapped is warned about.",
    )
    parser.add_argument("finetune", help="finetune_const.yaml or finetune_advanced.yaml")
    parser.add_argument("grid", nargs="?", help="generate_grid.yaml (optional)")
    parser.add_argument("--images-prefix", default="s3://CHANGE-ME/", help="where the concept image folders were uploaded")
    parser.add_argument("-o", "--output", help="write the resources here (default: standard output)")
    args = parser.parse_args(argv)
    try:
        finetune = yaml.safe_load(Path(args.finetune).read_text()) or {}
        grid_cfg = yaml.safe_load(Path(args.grid).read_text()) or {} if args.grid else None
    except (OSError, yaml.YAMLError) as err:
        print(f"tinv import-determined: cannot read the config: {err}", file=sys.stderr)
        return EXIT_USAGE
    conv = convert_finetune(finetune, images_prefix=args.images_prefix)
    if grid_cfg is not None:
        grid_conv = convert_grid(grid_cfg, job_name=conv.resources[0]["metadata"]["name"])
        conv.resources += grid_conv.resources
        conv.warnings += [f"(grid) {w}" for w in grid_conv.warnings]
    for warning in conv.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    bad = False
    for doc in conv.resources:
        _, problems = validate_document(doc)
        for p in problems:
            bad = True
            print(f"error: {doc['kind']} {p}", file=sys.stderr)
    text = "---\n".join(yaml.safe_dump(d, sort_keys=False, width=120) for d in conv.resources)
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote {len(conv.resources)} resources to {args.output}", file=sys.stderr)
    else:
        print(text, end="")
    return EXIT_USAGE if bad else EXIT_OK


LOCAL = {
    "validate": cmd_validate,
    "run": cmd_run,
    "checkpoints": cmd_checkpoints,
    "fetch": cmd_fetch,
    "import-determined": cmd_import_determined,
    "crds": cmd_crds,
}


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
        if command in LOCAL:
            return LOCAL[command](rest)
        if command in DELEGATED:
            return _delegate(command, rest)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(f"tinv: unknown command {command!r}\nhint: `tinv --help` lists the commands", file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
