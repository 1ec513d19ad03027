"""The operator's own watches of its children: the Jobs and pods it labelled, kept as small views.

kopf watched them before (an index and an event handler for each kind). For every Job and pod
event kopf built its wrappers, ran both handlers through its handler machinery, kept a memory and
a worker task per object and held each event for its batch window: with 5,000 resources that is
10,000 objects whose every change fed only two small views (`status.job_view`, `status.pod_view`).
A `ChildWatch` is the list-then-watch loop of a client-go informer and nothing more: one LIST (in
pages, so 5,000 pods never arrive as one document) and then one watch stream per namespace and
kind, each event decoded once and reduced to its view at once; on `410 Gone` (or any broken
stream) a new LIST whose differences are delivered as the events that were missed.

Views are stored as `Children` -- `get(key)` returns a list, the shape the registry reads (and the
shape of kopf's index stores, which tests still build as plain dicts of lists). Callbacks run on
the watch thread; the registry and the controller they call are thread-safe.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from . import builders as B
from .kube import ApiError
from .registry import compact
from .status import job_view, pod_view

log = logging.getLogger("tinv.operator.watch")

SELECTOR = f"{B.LABEL_MANAGED_BY}={B.MANAGED_BY}"
PAGE = 500  # objects per LIST page
SERVER_TIMEOUT = 300  # seconds the apiserver keeps one watch open (it adds jitter)
READ_TIMEOUT = SERVER_TIMEOUT + 30  # no byte for this long: the connection is dead, reconnect (kopf: the same)

Event = Callable[[str, str, str, dict[str, Any]], None]  # (type, namespace, key name, view)


class Children:
    """Views by (namespace, name) -- a Job's name, or the Job name of a pod -- each a dict by uid."""

    def __init__(self) -> None:
        self._by_key: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
        self._key_of: dict[str, tuple[str, str]] = {}
        self._version: dict[str, str | None] = {}  # uid -> resourceVersion of the stored view
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str], default: Any = None) -> list[dict[str, Any]] | Any:
        with self._lock:
            views = self._by_key.get(key)
            return list(views.values()) if views else default

    def put(self, key: tuple[str, str], uid: str, view: dict[str, Any], version: str | None = None) -> None:
        with self._lock:
            old = self._key_of.get(uid)
            if old is not None and old != key:  # the label naming its Job changed: move it
                self._drop(old, uid)
            self._by_key.setdefault(key, {})[uid] = view
            self._key_of[uid] = key
            self._version[uid] = version

    def version(self, uid: str) -> str | None:
        with self._lock:
            return self._version.get(uid)

    def remove(self, uid: str) -> tuple[str, str] | None:
        with self._lock:
            self._version.pop(uid, None)
            key = self._key_of.pop(uid, None)
            if key is not None:
                self._drop(key, uid)
            return key

    def _drop(self, key: tuple[str, str], uid: str) -> None:
        views = self._by_key.get(key)
        if views is not None:
            views.pop(uid, None)
            if not views:
                del self._by_key[key]

    def uids(self, namespace: str | None) -> set[str]:
        with self._lock:
            return {uid for uid, key in self._key_of.items() if namespace is None or key[0] == namespace}

    def __len__(self) -> int:
        with self._lock:
            return len(self._key_of)


@dataclass(frozen=True)
class Kind:
    """One kind of child: where it is listed, its view, and the name it is filed under."""

    name: str  # for logs: "Job" | "Pod"
    api: str  # "/apis/batch/v1" | "/api/v1"
    plural: str
    view: Callable[[dict[str, Any]], dict[str, Any]]
    key_name: Callable[[dict[str, Any]], str | None]  # the object -> its Job's name (None: not ours)

    def path(self, namespace: str | None) -> str:
        return f"{self.api}/namespaces/{namespace}/{self.plural}" if namespace else f"{self.api}/{self.plural}"


def _job_name_of_pod(body: dict[str, Any]) -> str | None:
    labels = (body.get("metadata") or {}).get("labels") or {}
    return labels.get(B.JOB_NAME_LABEL) or labels.get("job-name")


JOBS = Kind("Job", "/apis/batch/v1", "jobs", job_view, lambda body: (body.get("metadata") or {}).get("name"))
PODS = Kind("Pod", "/api/v1", "pods", pod_view, _job_name_of_pod)


class Gone(Exception):
    """The watch's resourceVersion is too old (410): list again."""


class ChildWatch:
    """List, then watch, one kind of child in one namespace (None: every namespace) on a daemon
    thread, until `stop()`. `on_event(type, namespace, name, view)` follows each change; `synced`
    is set once the first LIST is stored."""

    def __init__(self, kube: Any, kind: Kind, namespace: str | None, store: Children, on_event: Event):
        self.kube = kube
        self.kind = kind
        self.namespace = namespace
        self.store = store
        self.on_event = on_event
        self.synced = threading.Event()
        self._stop = threading.Event()
        self._response: Any = None
        self._thread = threading.Thread(target=self._run, name=f"tinv watch {kind.plural} {namespace or '*'}", daemon=True)
        self.resource_version = ""

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        response = self._response
        if response is None:
            return
        # Closing a socket does not wake a thread blocked reading it; shutting it down does.
        sock = getattr(getattr(response, "connection", None), "sock", None)
        try:
            if sock is not None:
                sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            response.close()
        except Exception:  # noqa: BLE001
            pass

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    # ------------------------------------------------------------------ the loop
    def _run(self) -> None:
        delay = 0.0
        while not self._stop.is_set():
            try:
                if not self.resource_version:
                    self._list()
                    self.synced.set()
                self._watch()
                delay = 0.0
            except Exception as err:  # noqa: BLE001 - a broken stream, the apiserver restarting ...
                if isinstance(err, Gone) or getattr(err, "status", None) == 410:
                    self.resource_version = ""  # the version is too old: list again at once
                    continue
                if self._stop.is_set():
                    break
                delay = min(30.0, max(0.5, delay * 2))
                log.warning("watch of %s in %s broke (%s); again in %.1f s", self.kind.plural, self.namespace or "every namespace", err, delay)
                self._stop.wait(delay)

    def _list(self) -> None:
        """One LIST in pages; what the store has and the LIST has not was deleted meanwhile."""
        seen: set[str] = set()
        token = ""
        while True:
            query = [("labelSelector", SELECTOR), ("limit", str(PAGE))]
            if token:
                query.append(("continue", token))
            try:
                page = self.kube.request("GET", self.kind.path(self.namespace), query=query)
            except ApiError as err:
                if err.status == 410:  # the continue token expired: start over
                    seen.clear()
                    token = ""
                    continue
                raise
            for item in page.get("items") or []:
                uid = self._apply("ADDED", item, quiet_if_same=True)
                if uid:
                    seen.add(uid)
            meta = page.get("metadata") or {}
            token = meta.get("continue") or ""
            if not token:
                self.resource_version = str(meta.get("resourceVersion") or "")
                break
        for uid in self.store.uids(self.namespace) - seen:
            self._deleted(uid, {})

    def _watch(self) -> None:
        query = [("labelSelector", SELECTOR), ("watch", "true"), ("allowWatchBookmarks", "true"),
                 ("resourceVersion", self.resource_version), ("timeoutSeconds", str(SERVER_TIMEOUT))]
        response = self.kube.stream(self.kind.path(self.namespace), query=query, read_timeout=READ_TIMEOUT)
        self._response = response
        try:
            if self._stop.is_set():
                return
            for line in response:
                if self._stop.is_set():
                    return
                if line.strip():
                    self._event(json.loads(line))
        finally:
            self._response = None
            response.close()

    def _event(self, event: dict[str, Any]) -> None:
        type_, obj = event.get("type"), event.get("object") or {}
        if type_ == "ERROR":
            if obj.get("code") == 410:
                raise Gone(obj.get("message") or "410 Gone")
            raise RuntimeError(f"watch error: {obj.get('message') or obj}")
        rv = (obj.get("metadata") or {}).get("resourceVersion")
        if type_ == "BOOKMARK":
            if rv:
                self.resource_version = str(rv)
            return
        if type_ == "DELETED":
            self._deleted((obj.get("metadata") or {}).get("uid"), obj)
        elif type_ in ("ADDED", "MODIFIED"):
            self._apply(type_, obj)
        if rv:
            self.resource_version = str(rv)

    # ------------------------------------------------------------------ one object
    def _apply(self, type_: str, obj: dict[str, Any], quiet_if_same: bool = False) -> str | None:
        meta = obj.get("metadata") or {}
        uid, ns, name = meta.get("uid"), meta.get("namespace"), self.kind.key_name(obj)
        if not uid or not ns:
            return None
        if not name:  # no Job name on it (not one of ours after all): as if deleted
            self._deleted(uid, obj)
            return None
        version = meta.get("resourceVersion")
        if quiet_if_same and version and self.store.version(uid) == version:
            return uid  # a relist found it unchanged
        view = compact(self.kind.view(obj))
        self.store.put((ns, name), uid, view, version)
        self._tell(type_, ns, name, view)
        return uid

    def _deleted(self, uid: str | None, obj: dict[str, Any]) -> None:
        if not uid:
            return
        key = self.store.remove(uid)
        if key is None:
            return
        view = compact(self.kind.view(obj)) if obj else {}
        self._tell("DELETED", key[0], key[1], view)

    def _tell(self, type_: str, ns: str, name: str, view: dict[str, Any]) -> None:
        try:
            self.on_event(type_, ns, name, view)
        except Exception:  # noqa: BLE001 - one bad callback must not stop the watch
            log.exception("%s %s/%s: handling its %s event failed", self.kind.name, ns, name, type_)


class Watches:
    """The Job and pod watches of every watched namespace, their stores and their start and stop."""

    def __init__(self, kube: Any, namespaces: tuple[str, ...] | list[str] | None, on_job: Event, on_pod: Event):
        self.jobs, self.pods = Children(), Children()
        scopes: list[str | None] = list(namespaces) if namespaces else [None]
        self.watches = [ChildWatch(kube, JOBS, ns, self.jobs, on_job) for ns in scopes]
        self.watches += [ChildWatch(kube, PODS, ns, self.pods, on_pod) for ns in scopes]

    def start(self) -> None:
        for w in self.watches:
            w.start()

    def wait_synced(self, timeout: float) -> bool:
        """Block until every first LIST is stored (the reconciles must see existing Jobs)."""
        deadline = time.monotonic() + timeout
        return all(w.synced.wait(max(0.0, deadline - time.monotonic())) for w in self.watches)

    def stop(self, timeout: float = 1.0) -> None:
        """Stop every watch; wait at most `timeout` seconds in all (the threads are daemons: a
        stopping operator must hand its Lease over at once, not wait on a read)."""
        for w in self.watches:
            w.stop()
        deadline = time.monotonic() + timeout
        for w in self.watches:
            w.join(max(0.0, deadline - time.monotonic()))
