"""Child processes of the harness: each in its own process group, logged to a file, stopped for sure."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except Exception:  # not Linux/glibc: teardown still stops the process group
        pass


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_port_pair(host: str = "127.0.0.1") -> int:
    """A port p with p and p + 1 both free on ``host`` right now (the trainer's launcher puts its
    control store on the rendezvous port + 1 by default; an ephemeral p + 1 is often taken)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s, socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
            s.bind((host, 0))
            port = s.getsockname()[1]
            try:
                t.bind((host, port + 1))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no two consecutive free ports on {host}")


def claim_dir(directory: Path) -> None:
    """Mark a temporary directory as owned by this process (see ``reap_stale_dirs``)."""
    (Path(directory) / "owner.pid").write_text(str(os.getpid()))


def reap_stale_dirs(parent: Path, prefix: str) -> None:
    """Remove ``parent/prefix*`` directories whose owner process is gone (left by a killed session)."""
    import shutil

    for d in Path(parent).glob(prefix + "*"):
        try:
            pid = int((d / "owner.pid").read_text())
        except (OSError, ValueError):
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except PermissionError:
            pass


def tail(path: Path, lines: int = 40) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            text = f.read().decode("utf-8", "replace")
    except OSError as e:
        return f"<no log: {e}>"
    return "\n".join(text.splitlines()[-lines:])


class Process:
    """One long-running binary. ``start()`` spawns it in a new session (its own process group) with
    stdout and stderr going to ``log``; ``stop()`` sends SIGTERM to the group, then SIGKILL."""

    def __init__(self, name: str, argv: list[str], log: Path, *, env: dict[str, str] | None = None,
                 cwd: Path | None = None):
        self.name = name
        self.argv = [str(a) for a in argv]
        self.log = Path(log)
        self.env = env
        self.cwd = cwd
        self.popen: subprocess.Popen | None = None

    def start(self) -> "Process":
        logf = open(self.log, "ab")
        logf.write(("$ " + " ".join(self.argv) + "\n").encode())
        logf.flush()
        # PDEATHSIG fires when the *thread* that forked exits, so only use it from the main thread.
        preexec = _die_with_parent if threading.current_thread() is threading.main_thread() else None
        try:
            self.popen = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                env=self.env, cwd=self.cwd, start_new_session=True, preexec_fn=preexec,
            )
        finally:
            logf.close()
        return self

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def returncode(self) -> int | None:
        return self.popen.poll() if self.popen else None

    def stop(self, timeout: float = 10.0) -> None:
        if self.popen is None:
            return
        pgid = self.popen.pid  # start_new_session: the process group id is the child's pid
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            try:
                self.popen.wait(wait)
                # the leader is gone; make sure nothing it spawned in its group survives
                try:
                    os.killpg(pgid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                break
            except subprocess.TimeoutExpired:
                continue
        try:
            self.popen.wait(1)
        except subprocess.TimeoutExpired:
            pass

    def tail(self, lines: int = 40) -> str:
        return tail(self.log, lines)


def wait_until(predicate, timeout: float, interval: float = 0.2, what: str = "condition", on_timeout=None):
    """Poll ``predicate()`` until it returns a truthy value (returned); raise TimeoutError after ``timeout`` s.
    Exceptions from the predicate count as 'not yet' and the last one is reported."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except Exception as e:  # noqa: BLE001 - polled
            last_exc = e
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_exc!r})" if last_exc else ""
            if on_timeout:
                detail += "\n" + on_timeout()
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}{detail}")
        time.sleep(interval)
