"""The process around a run, written once for training and generation: distributed ranks, the stop
flag, device and dtype, the clock, the Hugging Face token, the version string and logging.

Stopping (SIGTERM from Kubernetes, SIGINT from a terminal) has two phases, so that pre-emption at
any moment ends with the documented exit code (``tinv.api.models.ExitCode``) and one line saying
what was saved:

- while a run is *starting* (reading images, downloading or loading the model, encoding latents)
  a signal raises :class:`Stopped` at once: there is nothing to finish, and waiting for a download
  to end could outlast the pod's grace period;
- once the loop runs (:meth:`StopFlag.defer`), a signal only sets the flag: the loop finishes the
  current step or batch, writes what it has, and returns.

A SIGTERM during start-up may land while a library waits on worker threads stuck on the network
(a hub download): the exception then cannot unwind until their sockets time out. So it also arms a
watchdog: unless the process has exited ``TINV_STOP_GRACE`` seconds later (default 5), the
watchdog prints the same line, writes the termination message and ends the process with the
same code. (SIGINT never arms it: at a terminal or in a notebook, Ctrl-C must not kill a kernel.)
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from .errors import EXIT_INTERRUPTED, EXIT_PREEMPTED, ConfigError, TinvError

log = logging.getLogger("tinv.trainer")


# ---------------------------------------------------------------------------- small facts


def now() -> str:
    """The clock every tinv file uses: UTC, RFC 3339 with microseconds."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def version() -> str:
    """tinv's version: the installed distribution's, else the source tree's."""
    try:
        from importlib.metadata import version as dist_version

        return dist_version("tinv")
    except Exception:  # noqa: BLE001 - running from a source tree
        from . import __version__

        return __version__


def hf_token() -> str | None:
    """The Hugging Face token (the operator fills HF_TOKEN from the job's tokenSecretRef)."""
    return os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or None


def setup_logging(verbose: bool = False) -> None:
    """Log lines on stderr (with the rank when several run); library chatter kept out."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format=f"%(asctime)s %(levelname)s {prefix}%(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    for noisy in ("urllib3", "botocore", "boto3", "s3transfer", "PIL", "filelock", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def termination_path(explicit: str | None = None) -> Path | None:
    """Where the termination message goes: the flag, $TINV_TERMINATION_MESSAGE_PATH, else
    /dev/termination-log when writable (in a pod); None outside a pod."""
    p = explicit or os.environ.get("TINV_TERMINATION_MESSAGE_PATH")
    if p:
        return Path(p)
    default = Path("/dev/termination-log")
    return default if default.exists() and os.access(default, os.W_OK) else None


def write_termination_message(path: Path | None, doc: dict) -> None:
    """The JSON summary the kubelet hands the operator (kept under its 4 KiB)."""
    if path is None:
        return
    data = json.dumps(doc, separators=(",", ":"))
    if len(data) > 4000:  # kubelet keeps 4096 bytes
        doc = dict(doc, message=(doc.get("message") or "")[:1000])
        data = json.dumps(doc, separators=(",", ":"))[:4000]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(data)
    except OSError as e:
        log.warning("cannot write the termination message to %s: %s", path, e)


# ---------------------------------------------------------------------------- devices and dtypes


def pick_device(requested: str | None = None, local_rank: int = 0):
    """The device to run on: the one asked for (a bare 'cuda' is this rank's GPU), else cuda when visible."""
    import torch

    if requested:
        d = torch.device(requested)
        if d.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {requested!r} was asked for, but no CUDA GPU is visible")
        if d.type == "cuda" and d.index is None:
            d = torch.device("cuda", local_rank)
        return d
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def pick_dtype(precision: str | None, device):
    """Compute dtype by name: auto (bf16 on GPUs that have it, else fp16; fp32 on CPU), bf16, fp16,
    fp32 -- and "no", training's name for fp32."""
    import torch

    precision = {"no": "fp32", None: "auto", "": "auto"}.get(precision, precision)
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("precision fp16 needs a GPU (CUDA); use fp32 (or bf16) on a CPU")
    try:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    except KeyError:
        raise ConfigError(f"unknown precision {precision!r}: use auto, bf16, fp16 or fp32") from None


def dtype_name(dtype) -> str:
    return str(dtype).rsplit(".", 1)[-1].replace("float32", "fp32").replace("bfloat16", "bf16").replace("float16", "fp16")


def device_name(device) -> str:
    """For metadata: 'cpu', or 'cuda:<GPU model>' (pixels are reproducible per device model)."""
    if device.type == "cuda":
        import torch

        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


def configure_device(device, cpu_threads_one: bool = False) -> None:
    """Per-process device settings: TF32 matmuls and cuDNN autotuning on GPUs; on a CPU with a tiny
    model, one thread (OpenMP's spin-waiting makes 2 threads up to 20x slower on a shared CPU)."""
    import torch

    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    elif cpu_threads_one and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)


# ---------------------------------------------------------------------------- distributed


@dataclass
class Dist:
    """This process's place among the ranks (torchrun's WORLD_SIZE / RANK / LOCAL_RANK)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owned: bool = False  # we initialised the process group, so we tear it down

    @classmethod
    def init(cls, device_kind: str) -> "Dist":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch
        import torch.distributed as dist

        owned = False
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if not dist.is_initialized():
            if device_kind == "cuda":
                torch.cuda.set_device(local)
            dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
            owned = True
        return cls(dist.get_rank(), dist.get_world_size(), local, owned)

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def all_reduce(self, t):
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(t)
        return t

    def all_gather(self, t) -> list:
        if self.world == 1:
            return [t]
        import torch
        import torch.distributed as dist

        out = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(out, t.contiguous())
        return out

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.owned:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


# ---------------------------------------------------------------------------- stopping


class Stopped(TinvError):
    """A signal stopped the run; exit 75 (SIGTERM, pre-empted) or 130 (SIGINT). The message says
    what was saved."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
        self.exit_code = EXIT_INTERRUPTED if signum == signal.SIGINT else EXIT_PREEMPTED
        self.reason = "Interrupted" if signum == signal.SIGINT else "Preempted"

    @property
    def stopped(self) -> str:
        """progress.json's "stopped" value."""
        return "interrupted" if self.signum == signal.SIGINT else "preempted"


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class StopFlag:
    """SIGTERM/SIGINT while starting raise :class:`Stopped`; after :meth:`defer` they set ``signal``
    and the loop stops at its next boundary. A second Ctrl-C always stops at once. Use as a
    context manager: the previous handlers come back on exit."""

    def __init__(self, doing: str = "run", *, prog: str = "tinv", termination_path: str | None = None):
        self.doing = doing
        self.prog = prog
        self.termination_path = termination_path
        # What a stop during start-up leaves behind; the trainer updates it once it knows.
        self.saved = "nothing saved (no step had run); a retry starts over"
        self.signal: int | None = None
        self.deferred = False
        self._old: dict = {}

    def __enter__(self) -> "StopFlag":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                try:
                    self._old[sig] = signal.signal(sig, self._handle)
                except ValueError:  # pragma: no cover - embedded interpreters
                    pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            try:
                signal.signal(sig, old)
            except (ValueError, TypeError):
                pass
        self._old = {}

    def defer(self) -> None:
        """From now on a signal only sets the flag (the loop is running)."""
        self.deferred = True

    @property
    def set(self) -> bool:
        return self.signal is not None

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signal = signum
        if not self.deferred:
            e = Stopped(signum, f"{signal_name(signum)} while the {self.doing} was starting: {self.saved}")
            if signum == signal.SIGTERM:
                self._watch(e)
            raise e
        log.warning("received %s: finishing the current %s, saving, then exiting", signal_name(signum),
                    "step" if self.doing == "training" else "batch")

    def _watch(self, e: Stopped) -> None:
        """End the process with e's code if unwinding takes longer than the grace period."""
        grace = float(os.environ.get("TINV_STOP_GRACE", "5"))

        def fire() -> None:
            if not getattr(e, "reported", False):
                print(f"{self.prog}: {e}", file=sys.stderr, flush=True)
                write_termination_message(termination_path(self.termination_path),
                                          {"state": "running", "exit_code": e.exit_code, "reason": e.reason, "message": str(e)})
            sys.stderr.flush()
            os._exit(e.exit_code)

        timer = threading.Timer(grace, fire)
        timer.daemon = True
        timer.start()
