"""`python -m tinv.trainer.launch`: run the trainer's ranks and keep its exit code.

    python -m tinv.trainer.launch --nproc-per-node 2 train job.yaml            # one pod, 2 GPUs
    python -m tinv.trainer.launch --nnodes 2 --node-rank $JOB_COMPLETION_INDEX \\
        --master-addr $MASTER_ADDR --master-port $MASTER_PORT train job.yaml  # each pod of an Indexed Job

Why not torchrun: torchrun reports any failed worker as exit 1, so the Job's podFailurePolicy
(FailJob on 2 = bad input, Ignore on 75 = pre-empted after a checkpoint) never matches once a job
has more than one process; and when one rank dies the others sit in a collective until the
NCCL/gloo timeout. This launcher spawns the ranks itself (the env:// variables torch.distributed
reads: RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR, MASTER_PORT) and:

* exits with the exit code of the FIRST rank that failed (the cause, not the casualties); a rank
  killed by signal N counts as 128+N, like a shell; 0 when every rank succeeded;
* stops the other ranks as soon as one fails: SIGTERM, then SIGKILL after --stop-grace seconds;
* writes the pod's termination message (the JSON summary the operator reads) itself: each rank
  writes its own, and the pod's is the failed rank's, else the lowest rank's (rank 0 holds the
  checkpoint), with the launcher's exit code;
* forwards SIGTERM/SIGINT it receives (pre-emption) to every rank and waits for them (they write
  a checkpoint and exit 75);
* with several nodes, shares the first failure between the pods' launchers through a small
  control store on the master (torch's TCPStore, on --control-port, MASTER_PORT+1 by default):
  every pod then stops its ranks and exits with the same code, so a bad input (2) fails the
  Job from any pod and a pre-emption (75) is ignored on every pod. Each launcher also beats a
  counter in that store: a pod that vanished without a word (node lost, SIGKILL) is noticed
  after --peer-timeout seconds instead of an NCCL timeout, and the others exit 69 (retried).

Flags default to the variables the operator's pods set (TINV_NNODES, TINV_NPROC_PER_NODE,
JOB_COMPLETION_INDEX, MASTER_ADDR, MASTER_PORT). Everything after the flags is the command line
of `tinv` (default module tinv.api.cli, the front door), e.g. `train /etc/tinv/resource.yaml`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import shutil
import signal
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Sequence

from .errors import EXIT_INTERNAL, EXIT_INVALID, EXIT_OK, EXIT_UNAVAILABLE
from .reporting import termination_path, write_termination_message

log = logging.getLogger("tinv.launch")

#: How often the launcher looks at its ranks and the control store.
POLL_SECONDS = 0.2
#: Keys in the control store.
FAILED_KEY = "tinv/failed"  # "<node>:<rank>:<exit code>" of the first failure, set once
DONE_KEY = "tinv/done"  # counter: launchers whose ranks all finished (success or failure)


def exit_code(returncode: int) -> int:
    """A child's returncode as the exit status a shell (and the kubelet) would report."""
    return 128 - returncode if returncode < 0 else returncode


@dataclass
class Rank:
    rank: int
    local_rank: int
    proc: subprocess.Popen
    message_path: Path
    code: int | None = None
    failed_at: float | None = None

    def message(self) -> dict[str, Any] | None:
        try:
            doc = json.loads(self.message_path.read_text())
        except (OSError, ValueError):
            return None
        return doc if isinstance(doc, dict) else None


def split_termination_path(command: list[str]) -> tuple[list[str], str | None]:
    """Take `--termination-message-path P` (or `=P`) out of the trainer's command line."""
    out: list[str] = []
    path = None
    it = iter(command)
    for arg in it:
        if arg == "--termination-message-path":
            path = next(it, None)
        elif arg.startswith("--termination-message-path="):
            path = arg.split("=", 1)[1]
        else:
            out.append(arg)
    return out, path


def pod_message(ranks: list[Rank], outcome: "Outcome") -> dict[str, Any]:
    """The pod's termination message: the rank that failed first here, else the lowest rank; with
    the launcher's exit code (a peer's failure or a signal decides it, not this rank's)."""
    failed = sorted((r for r in ranks if r.failed_at is not None), key=lambda r: r.failed_at or 0.0)
    chosen = failed[0] if failed and not outcome.peer and outcome.signalled is None else min(ranks, key=lambda r: r.rank)
    doc = chosen.message() or {"state": "failed" if outcome.code else "succeeded", "message": outcome.why}
    if doc.get("exit_code") != outcome.code:
        doc = {**doc, "exit_code": outcome.code, "state": "failed" if outcome.code else doc.get("state"),
               "message": f"{outcome.why}; {doc.get('message') or ''}".strip("; ")}
    return doc


@dataclass
class Outcome:
    """The first failure seen (its code is the launcher's exit code), or none."""

    code: int = EXIT_OK
    why: str = ""
    stopping: bool = False  # ranks were told to stop (a failure, or a signal to the launcher)
    signalled: int | None = None
    peer: bool = False  # the failure came from another node

    def fail(self, code: int, why: str, *, peer: bool = False) -> bool:
        """Record a failure; True when it is the first (the one whose code we exit with)."""
        if self.code != EXIT_OK:
            return False
        self.code, self.why, self.peer = code, why, peer
        return True

    def overrule(self, code: int, why: str) -> None:
        """Another node failed first (the control store says so): its code is every pod's code."""
        self.code, self.why, self.peer = code, why, True


@dataclass
class Control:
    """The pods' shared view of the first failure: a TCPStore on node 0 (nothing with one node)."""

    nnodes: int
    node_rank: int
    store: Any = None
    peer_timeout: float = 60.0
    _beats: dict[int, tuple[int, float]] = field(default_factory=dict)
    _unreachable_since: float | None = None

    @classmethod
    def connect(cls, nnodes: int, node_rank: int, addr: str, port: int, timeout: float, peer_timeout: float) -> "Control":
        if nnodes <= 1:
            return cls(nnodes, node_rank)
        from torch.distributed import TCPStore

        store = TCPStore(addr, port, world_size=nnodes, is_master=node_rank == 0,
                         timeout=dt.timedelta(seconds=timeout), wait_for_workers=False)
        store.set(f"tinv/beat/{node_rank}", "0")
        return cls(nnodes, node_rank, store, peer_timeout)

    def publish(self, code: int, rank: int, settle: float = 1.0) -> tuple[int, str] | None:
        """Record this node's failure unless another node's came first; return the other node's
        (exit code, why) when it did. `settle` seconds are left for an earlier failure elsewhere to
        arrive: a rank that died of a broken connection to a failed peer must not take its place."""
        if self.store is None:
            return None
        try:
            deadline = time.monotonic() + settle
            while not self.store.check([FAILED_KEY]) and time.monotonic() < deadline:
                time.sleep(POLL_SECONDS / 2)
            # compare_set sets the key only when it is absent: the first failure wins, atomically
            first = self.store.compare_set(FAILED_KEY, "", f"{self.node_rank}:{rank}:{code}")
            return self._other(first)
        except Exception as err:  # noqa: BLE001 - the master is gone: the others learn it their own way
            log.warning("cannot tell the other pods about the failure: %s", err)
            return None

    def _other(self, value: bytes | str) -> tuple[int, str] | None:
        text = value.decode() if isinstance(value, bytes) else value
        node, rank, code = text.split(":")
        if int(node) == self.node_rank:
            return None
        return int(code), f"rank {rank} on node {node} failed with exit code {code}"

    def check(self, now: float) -> tuple[int, str] | None:
        """(exit code, why) when another pod failed or vanished; None while all is well."""
        if self.store is None:
            return None
        try:
            self.store.add(f"tinv/beat/{self.node_rank}", 1)
            if self.store.check([FAILED_KEY]):
                return self._other(self.store.get(FAILED_KEY))
            self._unreachable_since = None
            if self.node_rank == 0:
                for node in range(1, self.nnodes):
                    beat = self.store.add(f"tinv/beat/{node}", 0)
                    if beat == 0:
                        continue  # not started yet (its pod may still be scheduled): the rendezvous waits for it
                    last = self._beats.get(node)
                    if last is None or last[0] != beat:
                        self._beats[node] = (beat, now)
                    elif now - last[1] > self.peer_timeout:
                        return EXIT_UNAVAILABLE, f"node {node} stopped answering for {self.peer_timeout:.0f}s"
        except Exception as err:  # noqa: BLE001 - the control store (node 0) is unreachable
            first = self._unreachable_since = self._unreachable_since or now
            if now - first > self.peer_timeout:
                return EXIT_UNAVAILABLE, f"node 0 (the control store) unreachable for {self.peer_timeout:.0f}s: {err}"
        return None

    def finish(self, linger: float) -> None:
        """Count this node as done; node 0 keeps the store up until every node is (or `linger` passes)."""
        if self.store is None:
            return
        try:
            self.store.add(DONE_KEY, 1)
            deadline = time.monotonic() + linger
            while self.node_rank == 0 and time.monotonic() < deadline:
                if self.store.add(DONE_KEY, 0) >= self.nnodes:
                    break
                time.sleep(POLL_SECONDS)
        except Exception:  # noqa: BLE001 - shutting down anyway
            pass


class Launcher:
    def __init__(self, args: argparse.Namespace, command: list[str]):
        self.args = args
        self.command, explicit = split_termination_path(command)
        self.termination_path = termination_path(explicit)  # the pod's, read before the ranks get their own
        self.scratch = Path(tempfile.mkdtemp(prefix="tinv-launch-"))
        self.ranks: list[Rank] = []
        self.outcome = Outcome()
        self.stop_deadline: float | None = None

    # ------------------------------------------------------------------ processes
    def spawn(self) -> None:
        a = self.args
        world = a.nnodes * a.nproc_per_node
        for local in range(a.nproc_per_node):
            rank = a.node_rank * a.nproc_per_node + local
            env = {
                **os.environ,
                "RANK": str(rank), "LOCAL_RANK": str(local), "WORLD_SIZE": str(world),
                "LOCAL_WORLD_SIZE": str(a.nproc_per_node), "GROUP_RANK": str(a.node_rank),
                "ROLE_RANK": str(rank), "ROLE_WORLD_SIZE": str(world), "GROUP_WORLD_SIZE": str(a.nnodes),
                "MASTER_ADDR": a.master_addr, "MASTER_PORT": str(a.master_port),
                "TINV_TERMINATION_MESSAGE_PATH": str(self.scratch / f"rank-{rank}.json"),
            }
            # own process group per rank: a stop reaches its data-loader workers too
            proc = subprocess.Popen([sys.executable, "-m", a.module, *self.command], env=env, start_new_session=True)
            self.ranks.append(Rank(rank, local, proc, self.scratch / f"rank-{rank}.json"))

    def _signal_all(self, sig: int) -> None:
        for r in self.ranks:
            if r.code is None:
                try:
                    os.killpg(r.proc.pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass

    def stop(self, why: str, grace: float | None) -> None:
        """Ask every running rank to stop (SIGTERM); SIGKILL after `grace` seconds (None: wait)."""
        if not self.outcome.stopping:
            log.warning("stopping the ranks: %s", why)
            self.outcome.stopping = True
            self._signal_all(signal.SIGTERM)
        if grace is not None:
            deadline = time.monotonic() + grace
            self.stop_deadline = deadline if self.stop_deadline is None else min(self.stop_deadline, deadline)

    def on_signal(self, signum: int, _frame: Any) -> None:
        """Pre-emption (SIGTERM) or Ctrl-C: pass it on; the ranks checkpoint and exit 75/130."""
        self.outcome.signalled = signum
        self.outcome.stopping = True
        self._signal_all(signum)

    # ------------------------------------------------------------------ the loop
    def run(self, control: Control) -> int:
        a = self.args
        self.spawn()
        while True:
            now = time.monotonic()
            for r in self.ranks:
                if r.code is None and r.proc.poll() is not None:
                    r.code = exit_code(r.proc.returncode)
                    r.failed_at = now if r.code != EXIT_OK else None
                    if r.code != EXIT_OK and self.outcome.fail(r.code, f"rank {r.rank} exited with code {r.code}"):
                        log.error("rank %d exited with code %d", r.rank, r.code)
                        if self.outcome.signalled is None:
                            self.stop(f"rank {r.rank} failed (exit code {r.code})", a.stop_grace)
                        if not self.outcome.peer:
                            earlier = control.publish(r.code, r.rank)
                            if earlier is not None:
                                self.outcome.overrule(*earlier)
            running = [r for r in self.ranks if r.code is None]
            if not running:
                break
            peer = control.check(now) if not self.outcome.peer else None
            if peer is not None and self.outcome.fail(peer[0], peer[1], peer=True):
                self.stop(peer[1], a.stop_grace)
            if self.stop_deadline is not None and now >= self.stop_deadline:
                log.warning("%d rank(s) still running %.0fs after the stop: killing them", len(running), a.stop_grace)
                self._signal_all(signal.SIGKILL)
                self.stop_deadline = None
            time.sleep(POLL_SECONDS)
        control.finish(a.linger)
        self.write_termination_message()
        shutil.rmtree(self.scratch, ignore_errors=True)
        if self.outcome.code != EXIT_OK:
            log.error("exit code %d: %s", self.outcome.code, self.outcome.why)
        return self.outcome.code


    def write_termination_message(self) -> None:
        if self.ranks:
            write_termination_message(self.termination_path, pod_message(self.ranks, self.outcome))


def parser() -> argparse.ArgumentParser:
    env = os.environ
    p = argparse.ArgumentParser(
        prog="python -m tinv.trainer.launch",
        description="Run the trainer's ranks; exit with the first failing rank's exit code; stop the others at once.",
    )
    p.add_argument("--nproc-per-node", type=int, default=int(env.get("TINV_NPROC_PER_NODE") or 1), help="ranks in this pod [TINV_NPROC_PER_NODE]")
    p.add_argument("--nnodes", type=int, default=int(env.get("TINV_NNODES") or 1), help="pods (nodes) [TINV_NNODES]")
    p.add_argument("--node-rank", type=int, default=int(env.get("JOB_COMPLETION_INDEX") or 0), help="this pod's index [JOB_COMPLETION_INDEX]")
    p.add_argument("--master-addr", default=env.get("MASTER_ADDR") or "127.0.0.1", help="rank 0's address [MASTER_ADDR]")
    p.add_argument("--master-port", type=int, default=int(env.get("MASTER_PORT") or 29500), help="rank 0's port [MASTER_PORT]")
    p.add_argument("--control-port", type=int, default=None, help="the launchers' control store on node 0 (default MASTER_PORT+1)")
    p.add_argument("--rendezvous-timeout", type=float, default=float(env.get("TINV_RENDEZVOUS_TIMEOUT") or 600),
                   help="seconds to wait for node 0's control store [TINV_RENDEZVOUS_TIMEOUT]")
    p.add_argument("--stop-grace", type=float, default=15.0, help="seconds the other ranks get after one failed, then SIGKILL")
    p.add_argument("--peer-timeout", type=float, default=60.0, help="seconds without a sign of another pod before giving up (exit 69)")
    p.add_argument("--linger", type=float, default=30.0, help="node 0 keeps the control store this long for the other pods to finish")
    p.add_argument("-m", "--module", default="tinv.api.cli", help="the module each rank runs (default: tinv.api.cli)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="its arguments, e.g. train /etc/tinv/resource.yaml")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="tinv launch: %(message)s", stream=sys.stderr)
    try:
        args = parser().parse_args(argv)
    except SystemExit as exc:
        return EXIT_INVALID if exc.code else EXIT_OK
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command or args.nproc_per_node < 1 or args.nnodes < 1 or not 0 <= args.node_rank < args.nnodes:
        print("tinv launch: need a command, --nproc-per-node >= 1, --nnodes >= 1 and 0 <= --node-rank < --nnodes", file=sys.stderr)
        return EXIT_INVALID
    try:
        control = Control.connect(args.nnodes, args.node_rank, args.master_addr, args.control_port or args.master_port + 1,
                                  args.rendezvous_timeout, args.peer_timeout)
    except Exception as err:  # noqa: BLE001 - node 0 never came up: retryable
        print(f"tinv launch: cannot reach the control store on {args.master_addr}: {err}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    launcher = Launcher(args, command)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, launcher.on_signal)
    try:
        return launcher.run(control)
    except Exception:  # noqa: BLE001
        log.exception("the launcher failed")
        launcher._signal_all(signal.SIGKILL)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
