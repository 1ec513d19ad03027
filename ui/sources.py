"""Where the UI's runs come from: local run folders, or a namespace of a cluster. One interface.

A `Run` is what both sources know of a TextualInversionJob or GenerationGrid without touching its
storage: identity, phase, progress summary, newest checkpoint, GPU class, age, the resource as
submitted (when known) and its run root. Storage (progress.json, manifests, TensorBoard, images)
is read by `storage_view` through the `Store` the source hands out for a run: locally the file
system; in a cluster the operator's own mechanism (the resource's effective storage settings plus
this process's AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, see tinv.operator.poller).
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tinv.api.models import GROUP, VERSION, GenerationGrid, TextualInversionJob
from tinv.api.storage import LOCAL_ROOT, PROGRESS_FILE, NotFound, S3Settings, Store, StorageError, join, local_path, run_root

KINDS = {"TextualInversionJob": "job", "GenerationGrid": "grid"}
PLURALS = {"job": TextualInversionJob.__crd__.plural, "grid": GenerationGrid.__crd__.plural}
KIND_NAMES = {v: k for k, v in KINDS.items()}
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
# (connect, read) seconds: pods/log is proxied to the node's kubelet, which may be unreachable
API_TIMEOUT = (5, 20)
LOG_TIMEOUT = (3, 8)


def snake(key: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", key).lower()


def snake_keys(d: dict[str, Any] | None) -> dict[str, Any]:
    """status.progress is camelCase, progress.json snake_case: the views read one spelling."""
    return {snake(k): v for k, v in (d or {}).items()}


@dataclass
class Run:
    """One resource as a source lists it (no storage reads)."""

    kind: str  # "job" or "grid"
    namespace: str
    name: str
    phase: str | None = None
    progress: dict[str, Any] = field(default_factory=dict)  # snake_case keys
    latest_checkpoint: dict[str, Any] | None = None
    gpu_class: str | None = None
    created: str | None = None  # RFC 3339
    root: str | None = None  # run root URI
    doc: dict[str, Any] | None = None  # the resource as submitted (apiVersion, kind, metadata, spec)
    status: dict[str, Any] = field(default_factory=dict)  # camelCase, as the operator wrote it
    storage: dict[str, Any] = field(default_factory=dict)  # spec.storage as the operator fills it
    problem: str | None = None  # something the user should see on this run (e.g. storage unreachable)
    job_name: str | None = None  # the child batch/v1 Job (cluster only)

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.kind, self.namespace, self.name)

    @property
    def kind_name(self) -> str:
        return KIND_NAMES[self.kind]


@dataclass
class WorkerLog:
    pod: str
    lines: list[str]
    error: str | None = None
    phase: str | None = None


class Source(Protocol):
    """What the app needs from a source."""

    label: str
    cluster: bool

    def runs(self) -> list[Run]: ...

    def run(self, kind: str, namespace: str, name: str) -> Run | None: ...

    def store(self, run: Run) -> Store: ...

    def events(self, run: Run) -> list[dict[str, Any]]: ...

    def logs(self, run: Run, tail: int) -> list[WorkerLog]: ...


# --------------------------------------------------------------------------- local


def _phase_of(progress: dict[str, Any]) -> str | None:
    """The phase a local run's progress.json implies (the operator's phases, for one vocabulary)."""
    if progress.get("phase"):
        return str(progress["phase"])
    state = progress.get("state")
    if state == "succeeded":
        return "Succeeded"
    if state == "failed":
        return "Failed"
    if state == "running":
        return "Suspended" if progress.get("stopped") else "Running"
    return None


def _kind_of(folder: Path, progress: dict[str, Any]) -> str:
    if progress.get("kind") == "GenerationGrid" or "images_total" in progress:
        return "grid"
    if "total_steps" in progress or progress.get("kind") == "TextualInversionJob":
        return "job"
    return "grid" if (folder / "images").is_dir() or (folder / "shards").is_dir() else "job"


class LocalSource:
    """Run folders under a local root (`<root>/<namespace>/<name>-<uid8>/`, what `tinv run` writes),
    plus the resources of YAML files given on the command line (their run roots may be anywhere,
    s3:// included; their specs are shown exactly as written)."""

    cluster = False

    def __init__(self, root: str | Path = LOCAL_ROOT, files: list[str] | None = None, env: dict[str, str] | None = None):
        self.root = Path(root)
        self.files = list(files or [])
        self.env = env
        self.label = f"local: {self.root}" + (f" + {len(self.files)} file(s)" if self.files else "")
        self._stores: dict[tuple[Any, ...], Store] = {}
        self._progress_cache: dict[str, tuple[tuple[int, int], Any]] = {}

    def _from_files(self) -> list[Run]:
        from tinv.api.storage import root_of
        from tinv.api.validation import InvalidResource, load_documents, validate_document

        out = []
        for f in self.files:
            try:
                docs = [d for d in load_documents(f) if isinstance(d, dict) and d.get("kind") in KINDS]
            except (InvalidResource, OSError) as err:
                out.append(Run(kind="job", namespace="default", name=Path(f).stem, problem=f"{f}: {err}"))
                continue
            for doc in docs:
                res, problems = validate_document(doc)
                if res is None or problems:
                    name = (doc.get("metadata") or {}).get("name") or Path(f).stem
                    out.append(Run(kind=KINDS[doc["kind"]], namespace="default", name=str(name), doc=doc,
                                   problem=f"{f}: invalid: " + "; ".join(str(p) for p in problems[:3])))
                    continue
                md = res.metadata
                out.append(
                    Run(
                        kind=KINDS[res.kind],
                        namespace=md.namespace or "default",
                        name=md.name,
                        # no storage.uri: `tinv run` wrote it below ./tinv-runs, i.e. below --root here
                        root=root_of(res) if res.spec.storage.uri else run_root(str(self.root), md.namespace, md.name, md.uid),
                        doc=doc,  # exactly as written, not with the defaults filled in
                        storage=(doc.get("spec") or {}).get("storage") or {},
                        gpu_class=res.spec.resources.gpu_class,
                    )
                )
        return out

    def _from_folders(self) -> list[Run]:
        out = []
        if not self.root.is_dir():
            return out
        for ns_dir in sorted(p for p in self.root.iterdir() if p.is_dir()):
            for folder in sorted(p for p in ns_dir.iterdir() if p.is_dir()):
                name = folder.name.rsplit("-", 1)[0]  # <name>-<uid8>; progress.json names a job exactly
                out.append(Run(kind="job", namespace=ns_dir.name, name=name, root=str(folder)))
        return out

    def runs(self) -> list[Run]:
        runs: dict[tuple[str, str], Run] = {}
        for run in self._from_folders() + self._from_files():
            runs[(run.namespace, _same_root(run.root) or run.name)] = run  # a file's resource wins over its bare folder
        out = [self._fill(r) for r in runs.values()]
        return sorted(out, key=lambda r: (r.namespace, r.name, r.kind))

    def _progress(self, run: Run) -> Any:
        """progress.json of a run; a local file is parsed again only when its mtime or size changed
        (the list page reads every run's progress on each refresh)."""
        uri = join(run.root, PROGRESS_FILE)
        if "://" in uri and not uri.startswith("file://"):
            return self.store(run).read_json(uri)
        path = local_path(uri)
        try:
            st = path.stat()
        except FileNotFoundError:
            raise NotFound(f"{uri}: no such file") from None
        stamp = (st.st_mtime_ns, st.st_size)
        hit = self._progress_cache.get(str(path))
        if hit and hit[0] == stamp:
            return hit[1]
        value = json.loads(path.read_bytes())
        self._progress_cache[str(path)] = (stamp, value)
        return value

    def _fill(self, run: Run) -> Run:
        """Phase, progress and newest checkpoint from progress.json (local runs have no status)."""
        if run.root is None or run.problem:
            return run
        try:
            progress = self._progress(run)
        except NotFound:
            progress = None
        except StorageError as err:
            run.problem = str(err)
            progress = None
        except (OSError, ValueError):
            progress = None  # half-written: next refresh
        if isinstance(progress, dict):
            run.progress = progress
            run.phase = _phase_of(progress)
            run.latest_checkpoint = progress.get("latest_checkpoint")
            run.created = progress.get("started_at")
            if run.doc is None:
                try:
                    run.kind = _kind_of(local_path(run.root), progress)
                except StorageError:
                    pass
                run.name = (progress.get("job") or progress.get("grid") or {}).get("name") or run.name
        elif run.phase is None:
            run.phase = "Pending"
        return run

    def run(self, kind: str, namespace: str, name: str) -> Run | None:
        return next((r for r in self.runs() if r.key == (kind, namespace, name)), None)

    def store(self, run: Run) -> Store:
        st = run.storage or {}
        key = (st.get("endpoint"), st.get("addressingStyle"), st.get("region"))
        if key not in self._stores:
            self._stores[key] = Store(S3Settings.from_spec(_StorageSpec(st), self.env))
        return self._stores[key]

    def events(self, run: Run) -> list[dict[str, Any]]:
        return []

    def logs(self, run: Run, tail: int) -> list[WorkerLog]:
        return []


def _same_root(root: str | None) -> str | None:
    if root is None or "://" in root and not root.startswith("file://"):
        return root
    return os.path.abspath(local_path(root))


@dataclass
class _StorageSpec:
    """The three attributes S3Settings.from_spec reads, from a camelCase storage doc."""

    doc: dict[str, Any]

    @property
    def endpoint(self):
        return self.doc.get("endpoint")

    @property
    def addressing_style(self):
        return self.doc.get("addressingStyle")

    @property
    def region(self):
        return self.doc.get("region")


# --------------------------------------------------------------------------- cluster


def _time(value: Any) -> str | None:
    if value is None:
        return None
    return value.isoformat().replace("+00:00", "Z") if hasattr(value, "isoformat") else str(value)


class KubeSource:
    """One namespace through the Kubernetes API: the two kinds, their Jobs, pods, pods/log, Events.

    The runs list comes from an in-memory copy of both kinds kept current by a LIST + WATCH per
    kind (`watch()`, what `tinv ui --kube` starts), so a page costs the apiserver nothing however
    many browsers poll it. Until both watches have listed, or without them, `runs()` LISTs, cached
    for `ttl` seconds. Detail pages always GET the resource fresh.
    """

    cluster = True

    def __init__(self, namespace: str, api_client: Any, env: dict[str, str] | None = None, ttl: float = 2.0):
        from kubernetes import client

        self.namespace = namespace
        self.label = f"namespace {namespace}"
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self.batch = client.BatchV1Api(api_client)
        self.env = env
        self.ttl = ttl
        self._cache: tuple[float, list[Run]] | None = None
        self._lock = threading.Lock()
        self._reader = None
        self._config = None
        self._watched: dict[str, dict[str, Run]] = {}  # kind -> name -> Run, for kinds whose watch has listed
        self._sorted: list[Run] | None = None
        self._stop = threading.Event()
        self.watch_errors: list[str] = []

    # -- listing
    def _list_raw(self, kind: str) -> dict[str, Any]:
        # _preload_content=False: the JSON is parsed once by json.loads, not into model objects
        resp = self.custom.list_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURALS[kind], _preload_content=False, _request_timeout=API_TIMEOUT)
        return json.loads(resp.data)

    def runs(self) -> list[Run]:
        with self._lock:
            if len(self._watched) == len(PLURALS):
                if self._sorted is None:
                    self._sorted = sorted((r for by in self._watched.values() for r in by.values()), key=lambda r: (r.namespace, r.name, r.kind))
                return self._sorted
            if self._cache and time.monotonic() - self._cache[0] < self.ttl:
                return self._cache[1]
        runs = [self._run(kind, obj) for kind in PLURALS for obj in self._list_raw(kind).get("items", [])]
        runs.sort(key=lambda r: (r.namespace, r.name, r.kind))
        with self._lock:
            self._cache = (time.monotonic(), runs)
        return runs

    def watch(self) -> "KubeSource":
        """Start one LIST + WATCH thread per kind; they run until `close()`."""
        for kind in PLURALS:
            threading.Thread(target=self._watch_loop, args=(kind,), name=f"tinv-ui-watch-{kind}", daemon=True).start()
        return self

    def close(self) -> None:
        self._stop.set()

    @property
    def synced(self) -> bool:
        """Whether both kinds are served from the watches (not by LIST)."""
        with self._lock:
            return len(self._watched) == len(PLURALS)

    def _watch_loop(self, kind: str) -> None:
        from kubernetes import watch

        while not self._stop.is_set():
            try:
                listed = self._list_raw(kind)
                version = listed["metadata"]["resourceVersion"]
                by_name = {obj["metadata"]["name"]: self._run(kind, obj) for obj in listed.get("items", [])}
                with self._lock:
                    self._watched[kind], self._sorted = by_name, None
                w = watch.Watch()
                for event in w.stream(self.custom.list_namespaced_custom_object, GROUP, VERSION, self.namespace, PLURALS[kind],
                                      resource_version=version, allow_watch_bookmarks=True, timeout_seconds=240):
                    if self._stop.is_set():
                        w.stop()
                        return
                    obj = event["object"]
                    if event["type"] == "ERROR":
                        break  # e.g. 410 Gone: the version is too old; list again
                    if event["type"] != "BOOKMARK":
                        name = obj["metadata"]["name"]
                        with self._lock:
                            if event["type"] == "DELETED":
                                by_name.pop(name, None)
                            else:
                                by_name[name] = self._run(kind, obj)
                            self._sorted = None
            except Exception as err:  # noqa: BLE001 - the apiserver went away: fall back to LIST and retry
                with self._lock:
                    self._watched.pop(kind, None)
                    self.watch_errors.append(f"{kind}: {type(err).__name__}: {err}")
                    del self.watch_errors[:-20]
                self._stop.wait(2.0)

    def _run(self, kind: str, obj: dict[str, Any]) -> Run:
        md = obj.get("metadata") or {}
        spec = obj.get("spec") or {}
        status = obj.get("status") or {}
        ns, name, uid = md.get("namespace") or self.namespace, md.get("name", ""), md.get("uid")
        storage = spec.get("storage") or {}
        root = status.get("outputUri") or (run_root(storage["uri"], ns, name, uid) if storage.get("uri") else None)
        doc = {
            "apiVersion": obj.get("apiVersion"),
            "kind": obj.get("kind"),
            "metadata": {k: v for k, v in md.items() if k in ("name", "namespace", "labels", "annotations")},
            "spec": spec,
        }
        return Run(
            kind=kind,
            namespace=ns,
            name=name,
            phase=status.get("phase") or "Pending",
            progress=snake_keys(status.get("progress")),
            latest_checkpoint=status.get("latestCheckpoint"),
            gpu_class=(spec.get("resources") or {}).get("gpuClass"),
            created=md.get("creationTimestamp"),
            root=root,
            doc=doc,
            status=status,
            storage=storage,
            job_name=(status.get("workload") or {}).get("jobName"),
        )

    def run(self, kind: str, namespace: str, name: str) -> Run | None:
        from kubernetes.client.exceptions import ApiException

        if namespace != self.namespace or kind not in PLURALS:
            return None
        try:
            obj = self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURALS[kind], name, _request_timeout=API_TIMEOUT)
        except ApiException as err:
            if err.status == 404:
                return None
            raise
        run = self._run(kind, obj)
        run.storage, problem = self._effective_storage(obj)
        if run.root is None and run.storage.get("uri"):
            md = obj["metadata"]
            run.root = run_root(run.storage["uri"], md.get("namespace"), md.get("name"), md.get("uid"))
        if run.root and run.root.startswith("pvc://"):
            problem = problem or f"{run.root}: the UI cannot read pvc:// storage (the claim is mounted only in the run's pods); Kubernetes status, Events and logs still show"
        run.problem = run.problem or problem
        return run

    # -- storage: the operator's own mechanism
    def _effective_storage(self, obj: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
        """spec.storage with the operator's defaults filled in (TINV_DEFAULT_STORAGE_* of this process,
        as the chart sets them for both the operator and the UI)."""
        from tinv.api.validation import validate_document
        from tinv.operator import builders

        body = {k: obj.get(k) for k in ("apiVersion", "kind", "metadata", "spec")}
        model, problems = validate_document(body)
        if problems or model is None:
            return (obj.get("spec") or {}).get("storage") or {}, None
        try:
            eff = builders.effective(model, self._operator_config())
        except builders.SpecError as err:
            return model.to_doc()["spec"].get("storage") or {}, str(err)
        return eff.model.spec.storage.to_doc(), None

    def _operator_config(self):
        from tinv.operator.config import from_args

        if self._config is None:
            self._config = from_args([], self.env)
        return self._config

    def store(self, run: Run) -> Store:
        """The operator's own reader: its clients, timeouts and allowed endpoints (policy.allowedStorageEndpoints),
        so the UI never calls an endpoint with these credentials that the operator would not; raises
        StorageError (EndpointRefused) for one outside the policy."""
        from tinv.operator.poller import PollLimits, StorageReader

        with self._lock:
            if self._reader is None:
                self._reader = StorageReader(self.env, limits=PollLimits.from_config(self._operator_config()), workers=1)
        return self._reader.store_for(run.storage)

    # -- children
    def pods(self, run: Run) -> list[Any]:
        if not run.job_name:
            return []
        pods = self.core.list_namespaced_pod(self.namespace, label_selector=f"{JOB_NAME_LABEL}={run.job_name}", _request_timeout=API_TIMEOUT).items
        return sorted(pods, key=lambda p: (p.metadata.creation_timestamp is None, p.metadata.creation_timestamp, p.metadata.name))

    def events(self, run: Run) -> list[dict[str, Any]]:
        names = {run.name}
        if run.job_name:
            names.add(run.job_name)
            names.update(p.metadata.name for p in self.pods(run))
        out = []
        for ev in self.core.list_namespaced_event(self.namespace, _request_timeout=API_TIMEOUT).items:
            obj = ev.involved_object
            if obj is None or obj.name not in names:
                continue
            when = ev.last_timestamp or ev.event_time or ev.first_timestamp or ev.metadata.creation_timestamp
            out.append({
                "time": _time(when),
                "type": ev.type,
                "reason": ev.reason,
                "object": f"{obj.kind}/{obj.name}",
                "message": ev.message,
                "count": ev.count or 1,
            })
        out.sort(key=lambda e: e["time"] or "")
        return out

    def logs(self, run: Run, tail: int) -> list[WorkerLog]:
        from kubernetes.client.exceptions import ApiException

        out = []
        for pod in self.pods(run):
            name = pod.metadata.name
            try:
                text = self.core.read_namespaced_pod_log(name, self.namespace, tail_lines=tail, _preload_content=False, _request_timeout=LOG_TIMEOUT).data.decode(errors="replace")
                out.append(WorkerLog(name, text.splitlines(), phase=pod.status.phase if pod.status else None))
            except ApiException as err:
                out.append(WorkerLog(name, [], error=f"{err.status} {err.reason}: {_api_message(err)}", phase=pod.status.phase if pod.status else None))
            except Exception as err:  # noqa: BLE001 - the kubelet behind pods/log may be unreachable
                out.append(WorkerLog(name, [], error=f"{type(err).__name__}: {err}", phase=pod.status.phase if pod.status else None))
        return out


def _api_message(err: Any) -> str:
    try:
        return json.loads(err.body).get("message") or ""
    except (TypeError, ValueError):
        return str(err.body or "")[:500]


def kube_source(namespace: str | None, kubeconfig: str | None = None, context: str | None = None, env: dict[str, str] | None = None) -> KubeSource:
    """A KubeSource from a kubeconfig, or from the pod's ServiceAccount when running in a cluster.

    The namespace: --namespace, else the pod's (its ServiceAccount's, or POD_NAMESPACE as the
    chart sets it), else the kubeconfig context's, else default."""
    import os

    from kubernetes import client, config

    environ = os.environ if env is None else env
    namespace = namespace or environ.get("POD_NAMESPACE") or None
    if kubeconfig is None and environ.get("KUBERNETES_SERVICE_HOST") and not environ.get("KUBECONFIG"):
        config.load_incluster_config()
        if namespace is None:
            namespace = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace").read_text().strip()
        api = client.ApiClient()
    else:
        cfg = client.Configuration()
        config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=cfg)
        if namespace is None:
            _, active = config.list_kube_config_contexts(config_file=kubeconfig)
            namespace = (active.get("context") or {}).get("namespace")
        api = client.ApiClient(cfg)
    return KubeSource(namespace or "default", api, env=env).watch()
