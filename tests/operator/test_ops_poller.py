"""The storage poller against hostile or broken endpoints (issue 14, item 6): one resource's
endpoint that hangs or trickles cannot stall the others, oversized objects are refused by name,
incomplete checkpoint folders are not re-fetched every round, the client cache is bounded and
the allow-list keeps the operator's credentials away from other endpoints.

The slow endpoints are real HTTP servers on 127.0.0.1 (a socket that accepts and never answers;
one that answers a byte at a time), the healthy resources real file:// run roots.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from pathlib import Path

import pytest

from tinv.api.storage import Store
from tinv.operator.poller import PollLimits, StorageReader, Target, endpoint_allowed

CREDS = {"AWS_ACCESS_KEY_ID": "operator", "AWS_SECRET_ACCESS_KEY": "operator-secret"}


class Server:
    """A TCP server on 127.0.0.1: `hang` accepts and never answers; `trickle` answers an S3 GET
    with a large body, one byte every `delay` seconds."""

    def __init__(self, mode: str, delay: float = 0.5):
        self.mode, self.delay = mode, delay
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.stop = threading.Event()
        self.conns: list[socket.socket] = []
        self.requests = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.requests += 1
            self.conns.append(conn)
            if self.mode == "trickle":
                threading.Thread(target=self._trickle, args=(conn,), daemon=True).start()

    def _trickle(self, conn: socket.socket) -> None:
        try:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n")
            while not self.stop.is_set():
                conn.sendall(b" ")
                time.sleep(self.delay)
        except OSError:
            pass

    def close(self) -> None:
        self.stop.set()
        for c in self.conns:
            c.close()
        self.sock.close()


@pytest.fixture
def hang():
    s = Server("hang")
    yield s
    s.close()


@pytest.fixture
def trickle():
    s = Server("trickle", delay=0.3)
    yield s
    s.close()


def write_progress(root: Path, step: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / ".p").write_text(json.dumps({"step": step, "total_steps": 100, "updated_at": f"t{step}"}))
    (root / ".p").rename(root / "progress.json")


def run_rounds(reader: StorageReader, targets: list[Target], rounds: int, budget: float) -> list[tuple[float, dict]]:
    async def go():
        out = []
        for _ in range(rounds):
            t0 = time.monotonic()
            got = dict(await reader.poll(targets, budget))
            out.append((time.monotonic() - t0, got))
        return out

    return asyncio.run(go())


@pytest.mark.parametrize("server", ["hang", "trickle"])
def test_a_hanging_endpoint_does_not_stall_the_others(server, request, tmp_path):
    slow = request.getfixturevalue(server)
    reader = StorageReader(env=CREDS, limits=PollLimits(read_timeout=1.0, per_endpoint=2), workers=8)
    try:
        good = [Target(("job", f"g{i}"), f"file://{tmp_path / f'g{i}'}", None, True) for i in range(4)]
        bad = [Target(("job", f"b{i}"), f"s3://bucket/b{i}", {"endpoint": slow.url, "addressingStyle": "path"}, True) for i in range(6)]
        step = 0

        async def go():
            nonlocal step
            seen: dict = {}
            durations = []
            await reader.poll(good, budget=5.0)  # warm-up: the first S3 use imports boto3 (once per process)
            for r in range(10):  # 10 rounds of a 0.5 s poll interval
                step += 1
                for i in range(4):
                    write_progress(tmp_path / f"g{i}", step)
                t0 = time.monotonic()
                got = dict(await reader.poll(good + bad, budget=0.5))
                durations.append(time.monotonic() - t0)
                # every healthy resource shows the progress written before this very round
                assert all(got[t.key].progress["step"] == step for t in good), (r, got)
                seen.update({k: v for k, v in got.items() if k[1].startswith("b")})
                assert reader.inflight <= 2  # the slow endpoint holds at most per_endpoint threads
                await asyncio.sleep(0.5 - durations[-1])  # the rest of the poll interval
            return seen, durations

        seen, durations = asyncio.run(go())
        assert max(durations) < 1.0, durations
        # the slow endpoint's reads ended within their time box, with an error naming the object
        assert seen and all(v.error and "s3://bucket/b" in v.error for v in seen.values()), seen
    finally:
        reader.close()


def test_oversized_objects_are_refused_by_name(tmp_path):
    reader = StorageReader(limits=PollLimits(max_object_bytes=4096))
    root = tmp_path / "run"
    write_progress(root, 3)
    ok = root / "checkpoints" / "ok"
    ok.mkdir(parents=True)
    (ok / "manifest.json").write_text(json.dumps({"uuid": "ok", "step": 2}))
    big = root / "checkpoints" / "big"
    big.mkdir()
    (big / "manifest.json").write_text(json.dumps({"uuid": "big", "step": 3, "pad": "x" * 10_000}))
    view = reader.read(("job", "r"), f"file://{root}", None, checkpoints=True)
    assert view.error and f"{big}/manifest.json" in view.error and "over the limit of 4096 bytes" in view.error
    (big / "manifest.json").write_text(json.dumps({"uuid": "big", "step": 3}))
    view = reader.read(("job", "r"), f"file://{root}", None, checkpoints=True, force_list=True)
    assert view.error is None and [c["uuid"] for c in view.checkpoints] == ["ok", "big"]
    (root / "progress.json").write_text(json.dumps({"step": 4, "summary": "y" * 10_000}))
    view = reader.read(("job", "r"), f"file://{root}", None, checkpoints=True)
    assert view.error and "progress.json" in view.error and "10" in view.error
    assert view.progress["step"] == 3 and len(view.checkpoints) == 2  # the last good view stays, with the error


def test_incomplete_checkpoint_folders_are_not_refetched_every_round(tmp_path, monkeypatch):
    reads: list[str] = []
    original = Store.read_bytes

    def counting(self, uri, **kw):
        reads.append(uri)
        return original(self, uri, **kw)

    monkeypatch.setattr(Store, "read_bytes", counting)
    reader = StorageReader(limits=PollLimits(incomplete_backoff=4))
    root = tmp_path / "run"
    for n in range(3):
        (root / "checkpoints" / f"partial{n}").mkdir(parents=True)
    targets = [Target(("job", "r"), f"file://{root}", None, True)]
    for step in range(8):
        write_progress(root, step)  # progress changes every round: checkpoints are listed every round
        run_rounds(reader, targets, 1, 5.0)
    manifest_reads = [u for u in reads if u.endswith("manifest.json")]
    assert len(manifest_reads) == 3 * 2, manifest_reads  # rounds 1 and 5, not all 8
    (root / "checkpoints" / "partial0" / "manifest.json").write_text(json.dumps({"uuid": "partial0", "step": 1}))
    # once complete, it is listed within incomplete_backoff rounds
    got = run_rounds(reader, targets, 4, 5.0)
    assert [c["uuid"] for c in got[-1][1][("job", "r")].checkpoints] == ["partial0"]


def test_client_cache_is_bounded_and_endpoints_allow_listed(tmp_path):
    reader = StorageReader(env=CREDS, limits=PollLimits(max_clients=3, allowed_endpoints=("https://object.ord1.coreweave.com", "cwobject.com")))
    for i in range(10):
        reader.store_for({"endpoint": "https://cwobject.com", "region": f"r{i}"})  # 10 distinct clients
    assert reader.clients == 3
    view = reader.read(("job", "x"), "s3://b/x", {"endpoint": "http://169.254.169.254"}, checkpoints=True)
    assert view.error and "spec.storage.endpoint http://169.254.169.254 is not in the operator's allowed endpoints" in view.error
    assert endpoint_allowed("https://object.ord1.coreweave.com/", ["https://object.ord1.coreweave.com"])
    assert endpoint_allowed("http://cwobject.com:8080", ["cwobject.com"])
    assert not endpoint_allowed("https://cwobject.com.evil.example", ["cwobject.com"])
    assert endpoint_allowed(None, ["cwobject.com"]) and endpoint_allowed("http://x", [])
    reader.close()
