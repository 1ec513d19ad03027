"""Small helpers several test layers share (tests/ is on sys.path via pytest's `pythonpath`)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any


def merge(a: dict, b: dict) -> dict:
    """A deep copy of `a` with `b` merged in, recursively for nested mappings."""
    out = copy.deepcopy(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def write_resource(path: Path, resource: Any) -> Path:
    """Write a tinv.api resource as the YAML a user would apply; return the path."""
    import yaml

    path.write_text(yaml.safe_dump(resource.to_doc(), sort_keys=False))
    return path


class SlowEndpoint:
    """A real TCP server on 127.0.0.1 that misbehaves as a storage endpoint can: `hang` accepts
    connections and never answers; `trickle` answers an HTTP GET with headers, then one body byte
    every `delay` seconds. `url` is its http:// address, `conns` the connections it accepted."""

    def __init__(self, mode: str = "hang", delay: float = 0.5):
        import socket
        import threading

        self.mode, self.delay = mode, delay
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.stop = threading.Event()
        self.conns: list[Any] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        import threading

        self.sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.conns.append(conn)
            if self.mode == "trickle":
                threading.Thread(target=self._trickle, args=(conn,), daemon=True).start()

    def _trickle(self, conn: Any) -> None:
        import time

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
