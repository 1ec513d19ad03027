"""operator/watch.py: the list-then-watch loop of the Jobs and pods, against a scripted apiserver.

The real control plane runs it in every tests/cluster test (the operator sees its Jobs and pods
only through it); these tests pin the parts a healthy cluster rarely shows: paged LISTs, 410 Gone,
a broken stream, objects deleted while no watch was open, and stop()."""

from __future__ import annotations

import contextlib
import json
import queue
import threading
import time
from typing import Any

from tinv.operator.kube import ApiError
from tinv.operator.watch import JOBS, PODS, SELECTOR, ChildWatch, Children, Watches

NS = "team-a"


def job(name: str, uid: str, rv: int, **status: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": NS, "uid": uid, "resourceVersion": str(rv),
                         "labels": {"tinv.io/owner-uid": "owner-" + name}},
            "spec": {"suspend": False}, "status": status}


def pod(name: str, uid: str, rv: int, job_name: str | None, phase: str = "Pending") -> dict[str, Any]:
    labels = {"batch.kubernetes.io/job-name": job_name} if job_name else {}
    return {"metadata": {"name": name, "namespace": NS, "uid": uid, "resourceVersion": str(rv), "labels": labels},
            "spec": {}, "status": {"phase": phase}}


class Stream:
    """A watch response: lines pushed by the test; close() ends the iteration."""

    def __init__(self) -> None:
        self.lines: queue.Queue = queue.Queue()
        self.closed = False

    def push(self, type_: str, obj: dict[str, Any]) -> None:
        self.lines.put(json.dumps({"type": type_, "object": obj}).encode() + b"\n")

    def end(self) -> None:
        self.lines.put(None)

    def close(self) -> None:
        self.closed = True
        self.lines.put(None)

    def __iter__(self):
        while True:
            line = self.lines.get()
            if line is None:
                return
            if isinstance(line, Exception):
                raise line
            yield line


class ScriptedKube:
    """LIST answers from `pages` (a list of item lists, one per page); each watch gets the next Stream."""

    def __init__(self, pages: list[list[dict[str, Any]]], rv: int = 10):
        self.pages = pages
        self.rv = rv
        self.lists: list[list[tuple[str, str]]] = []
        self.watches: list[list[tuple[str, str]]] = []
        self.streams: queue.Queue = queue.Queue()
        self.errors: list[ApiError] = []

    def request(self, method: str, path: str, query: list[tuple[str, str]] | None = None, **_: Any) -> dict[str, Any]:
        q = dict(query or [])
        self.lists.append(list(query or []))
        assert method == "GET" and q["labelSelector"] == SELECTOR and q["limit"] == "500"
        i = int(q.get("continue") or 0)
        meta: dict[str, Any] = {"resourceVersion": str(self.rv)}
        if i + 1 < len(self.pages):
            meta["continue"] = str(i + 1)
        return {"items": self.pages[i] if self.pages else [], "metadata": meta}

    def stream(self, path: str, query: list[tuple[str, str]] | None = None, **_: Any) -> Stream:
        self.watches.append(list(query or []))
        if self.errors:
            raise self.errors.pop(0)
        return self.streams.get(timeout=10)


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, str, dict[str, Any]]] = []
        self.cond = threading.Condition()

    def __call__(self, type_: str, ns: str, name: str, view: dict[str, Any]) -> None:
        with self.cond:
            self.events.append((type_, ns, name, view))
            self.cond.notify_all()

    def wait(self, n: int, timeout: float = 10.0) -> list[tuple[str, str, str, dict[str, Any]]]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(self.events) < n:
                left = deadline - time.monotonic()
                assert left > 0, f"only {len(self.events)} of {n} events: {self.events}"
                self.cond.wait(left)
            return list(self.events)


@contextlib.contextmanager
def running(kube: ScriptedKube, kind, *streams: Stream):
    """A started ChildWatch of `kind` in NS whose watches get `streams` in turn; stopped at the end."""
    for stream in streams:
        kube.streams.put(stream)
    rec, store = Recorder(), Children()
    w = ChildWatch(kube, kind, NS, store, rec)
    w.start()
    try:
        yield w, rec, store
    finally:
        w.stop()
        w.join(5)
    assert not w._thread.is_alive()


def _until(pred, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_a_paged_list_then_the_watch_from_its_resource_version():
    kube = ScriptedKube([[job("a-train", "u1", 3)], [job("b-train", "u2", 4, active=1)]], rv=7)
    stream = Stream()
    with running(kube, JOBS, stream) as (w, rec, store):
        assert w.synced.wait(5)
        assert [dict(q).get("continue") for q in kube.lists] == [None, "1"]  # two pages
        assert store.get((NS, "b-train"))[0]["active"] == 1 and store.get((NS, "nope")) is None
        _until(lambda: kube.watches)
        q = dict(kube.watches[0])
        assert q["resourceVersion"] == "7" and q["watch"] == "true" and q["allowWatchBookmarks"] == "true"
        stream.push("MODIFIED", job("a-train", "u1", 8, active=1, ready=1))
        stream.push("BOOKMARK", {"metadata": {"resourceVersion": "12"}})
        stream.push("DELETED", job("b-train", "u2", 13))
        events = rec.wait(4)
        assert [(t, n) for t, _, n, _ in events] == [("ADDED", "a-train"), ("ADDED", "b-train"), ("MODIFIED", "a-train"), ("DELETED", "b-train")]
        assert events[2][3]["ready"] == 1 and store.get((NS, "a-train"))[0]["ready"] == 1
        assert store.get((NS, "b-train")) is None and len(store) == 1
        _until(lambda: w.resource_version == "13")
    assert stream.closed


def test_410_gone_lists_again_and_delivers_what_the_gap_hid():
    kube = ScriptedKube([[job("a-train", "u1", 3), job("b-train", "u2", 4)]], rv=5)
    first = Stream()
    with running(kube, JOBS, first, Stream()) as (w, rec, store):
        rec.wait(2)
        # while no event came, b was deleted, c created and a left unchanged; then the version expired
        kube.pages, kube.rv = [[job("a-train", "u1", 3), job("c-train", "u3", 9)]], 20
        first.push("ERROR", {"kind": "Status", "code": 410, "message": "too old resource version: 5 (15)"})
        events = rec.wait(4)
        assert sorted((t, n) for t, _, n, _ in events[2:]) == [("ADDED", "c-train"), ("DELETED", "b-train")]  # a: unchanged, no event
        _until(lambda: len(kube.watches) == 2)
        assert dict(kube.watches[1])["resourceVersion"] == "20"
        assert {v["name"] for k in [(NS, "a-train"), (NS, "c-train")] for v in store.get(k)} == {"a-train", "c-train"}


def test_a_broken_stream_resumes_from_the_last_version_without_listing():
    kube = ScriptedKube([[job("a-train", "u1", 3)]], rv=5)
    first, second = Stream(), Stream()
    with running(kube, JOBS, first, second) as (w, rec, store):
        rec.wait(1)
        first.push("MODIFIED", job("a-train", "u1", 6, active=1))
        rec.wait(2)
        kube.errors.append(ApiError(0, "NetworkError", "connection refused"))  # the next watch fails once
        first.lines.put(OSError("connection reset"))
        _until(lambda: len(kube.watches) == 3, timeout=15)
        assert [dict(q)["resourceVersion"] for q in kube.watches] == ["5", "6", "6"]
        assert len(kube.lists) == 1  # no relist: the version was still good
        second.push("MODIFIED", job("a-train", "u1", 7, succeeded=1))
        assert rec.wait(3)[2][3]["succeeded"] == 1


def test_pods_are_filed_under_their_job_and_move_when_the_label_does():
    kube = ScriptedKube([[pod("a-0", "p1", 3, "a-train"), pod("a-1", "p2", 4, "a-train"), pod("stray", "p3", 5, None)]])
    stream = Stream()
    with running(kube, PODS, stream) as (w, rec, store):
        rec.wait(2)
        assert sorted(p["name"] for p in store.get((NS, "a-train"))) == ["a-0", "a-1"]
        assert len(store) == 2  # a pod without a Job name is not kept
        stream.push("MODIFIED", pod("a-1", "p2", 8, "b-train", phase="Running"))
        rec.wait(3)
        assert [p["name"] for p in store.get((NS, "a-train"))] == ["a-0"]
        assert store.get((NS, "b-train"))[0]["phase"] == "Running"
        stream.push("DELETED", pod("a-0", "p1", 9, "a-train"))
        assert rec.wait(4)[3][:3] == ("DELETED", NS, "a-train")
        assert store.get((NS, "a-train")) is None


def test_watches_of_every_namespace_start_synced_and_stop():
    kube = ScriptedKube([[]])
    for _ in range(4):
        kube.streams.put(Stream())
    got = Recorder()
    watches = Watches(kube, ("team-a", "team-b"), got, got)
    watches.start()
    try:
        assert watches.wait_synced(5)
        assert len(kube.lists) == 4  # Jobs and pods in each of the two namespaces
        assert {w.kind.path(w.namespace) for w in watches.watches} == {
            "/apis/batch/v1/namespaces/team-a/jobs", "/apis/batch/v1/namespaces/team-b/jobs",
            "/api/v1/namespaces/team-a/pods", "/api/v1/namespaces/team-b/pods"}
    finally:
        watches.stop()
    assert not any(w._thread.is_alive() for w in watches.watches)
    assert Watches(kube, None, got, got).watches[0].kind.path(None) == "/apis/batch/v1/jobs"  # cluster-wide


def test_stop_wakes_a_watch_blocked_reading_a_real_connection():
    """The real client (kubernetes' ApiClient over urllib3) against a server that keeps the watch
    open and silent: stop() must end the thread at once (a stopping leader hands its Lease over
    within seconds), not when the server's timeout ends the stream."""
    import http.server

    from kubernetes import client

    from tinv.operator.kube import Kube

    release = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):  # noqa: N802
            if "watch=true" not in self.path:
                body = json.dumps({"items": [job("a-train", "u1", 3)], "metadata": {"resourceVersion": "5"}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            line = json.dumps({"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "6"}}}).encode() + b"\n"
            self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
            self.wfile.flush()
            release.wait(30)  # then silence, as an idle watch is

        def log_message(self, *_):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        kube = Kube(client.ApiClient(client.Configuration(host=f"http://127.0.0.1:{server.server_port}")))
        rec, store = Recorder(), Children()
        w = ChildWatch(kube, JOBS, NS, store, rec)
        w.start()
        assert w.synced.wait(10) and rec.wait(1)[0][:3] == ("ADDED", NS, "a-train")
        _until(lambda: w.resource_version == "6")  # the watch is open and its first line read
        t0 = time.monotonic()
        w.stop()
        w.join(5)
        assert not w._thread.is_alive() and time.monotonic() - t0 < 1.0
    finally:
        release.set()
        server.shutdown()
