"""What a running trainer tells the world (rank 0 only; other ranks report nothing).

``progress.json`` at the run root, rewritten atomically every ``logEvery`` steps (at most every
``$TINV_PROGRESS_MIN_INTERVAL`` seconds, default 2, except at checkpoints and the end). The keys
of the contract (tinv.api.storage) plus tinv.trainer's extras::

    {"state": "running" | "succeeded" | "failed",
     "step": int, "total_steps": int, "loss": float | null,      # mean of the last logEvery steps
     "samples_per_second": float | null, "eta_seconds": int | null, "updated_at": RFC3339,
     "latest_checkpoint": {"uuid","step","uri","created_at","loss"} | null,
     # extras:
     "format": "tinv.progress/v1", "stopped": null | "preempted" | "interrupted",
     "learning_rate": float, "summary": "120/500 (24%)", "epoch": float, "world_size": int,
     "started_at": RFC3339, "checkpoints": [{...}, ...],          # complete ones kept, oldest first
     "job": {"name","namespace","uid"}, "message": str | null, "exit_code": int | null}

A run stopped by SIGTERM after its checkpoint stays ``"state": "running"`` with
``"stopped": "preempted"``: the operator retries it and the retry continues from that checkpoint.

The termination message (:func:`tinv.trainer.runtime.write_termination_message`; ``$TINV_TERMINATION_MESSAGE_PATH``, else ``/dev/termination-log`` when
it exists) is a JSON summary under 4 KiB, written at exit by every rank::

    {"state", "exit_code", "reason", "message", "step", "total_steps", "loss",
     "latest_checkpoint": {"uuid","step","uri"} | null, "output_uri"}

TensorBoard events go to ``<run>/tensorboard/`` (staged locally and uploaded at checkpoints and
at the end when the run is in object storage): ``train/loss``, ``train/learning_rate``,
``train/samples_per_second``, ``train/embedding_norm`` and ``validation/<i>`` images.

Prometheus (``--metrics-port`` / ``$TINV_METRICS_PORT``): ``tinv_trainer_step``,
``tinv_trainer_total_steps``, ``tinv_trainer_loss``, ``tinv_trainer_learning_rate``,
``tinv_trainer_samples_per_second``, ``tinv_trainer_eta_seconds``, ``tinv_trainer_checkpoints_total``.

On a terminal a progress bar (tqdm); otherwise one plain log line every ``logEvery`` steps.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from . import storage
from .checkpoint import CheckpointRef
from .runtime import now
from .runtime import termination_path, write_termination_message  # noqa: F401 - trainer/launch.py imports them from here

log = logging.getLogger("tinv.trainer")


class TensorBoard:
    """Event files under a remote folder: written there directly when it is local, else staged in a
    temporary folder and uploaded at each :meth:`sync` (object storage has no appends)."""

    def __init__(self, store: storage.Store, remote: str):
        self.store = store
        self.remote = remote
        self.writer = None
        self.staged: Path | None = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception as e:  # noqa: BLE001 - tensorboard not installed
            log.warning("TensorBoard logging disabled: %s", e)
            return
        local = storage.local_path(remote)
        if local is None:
            self.staged = Path(tempfile.mkdtemp(prefix="tinv-tb-"))
            logdir = self.staged
        else:
            logdir = local
            local.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(log_dir=str(logdir), flush_secs=30)

    def scalar(self, name: str, value: float | None, step: int) -> None:
        if self.writer is not None and value is not None:
            self.writer.add_scalar(name, value, step)

    def image(self, tag: str, pixels: np.ndarray, step: int, max_side: int | None = None) -> None:
        """An HWC uint8 image; shrunk to max_side pixels when it is larger."""
        if self.writer is None:
            return
        if max_side and max(pixels.shape[:2]) > max_side:
            from PIL import Image

            im = Image.fromarray(pixels)
            im.thumbnail((max_side, max_side))
            pixels = np.asarray(im)
        self.writer.add_image(tag, pixels, global_step=step, dataformats="HWC")

    def sync(self) -> None:
        if self.writer is None:
            return
        self.writer.flush()
        if self.staged is not None:
            for f in self.staged.rglob("*"):
                if f.is_file():
                    try:
                        self.store.upload_file(storage.join(self.remote, f.relative_to(self.staged).as_posix()), f)
                    except Exception as e:  # noqa: BLE001 - summaries are best effort
                        log.warning("cannot upload TensorBoard file %s: %s", f, e)

    def close(self) -> None:
        if self.writer is not None:
            self.sync()
            self.writer.close()
            self.writer = None
        if self.staged is not None:
            shutil.rmtree(self.staged, ignore_errors=True)
            self.staged = None


class Reporter:
    def __init__(
        self,
        *,
        enabled: bool,
        store: storage.Store,
        run: str,
        total_steps: int,
        world_size: int,
        job_meta: dict,
        log_every: int,
        metrics_port: int | None = None,
        progress_bar: bool | None = None,
        tensorboard: bool = True,
    ):
        self.enabled = enabled
        self.store = store
        self.run = run
        self.total = total_steps
        self.world = world_size
        self.job = job_meta
        self.log_every = max(1, log_every)
        self.started = now()
        self.t0 = time.monotonic()
        self.last_write = 0.0
        self.min_interval = float(os.environ.get("TINV_PROGRESS_MIN_INTERVAL", "2"))
        self.checkpoints: list[CheckpointRef] = []
        self.state = {"step": 0, "loss": None, "lr": None, "sps": None, "eta": None, "epoch": 0.0}
        self.bar = None
        self.tb: TensorBoard | None = None
        self.metrics = None
        if not enabled:
            return
        use_bar = sys.stderr.isatty() if progress_bar is None else progress_bar
        if use_bar:
            try:
                from tqdm.auto import tqdm

                try:
                    cols = os.get_terminal_size(sys.stderr.fileno()).columns
                except OSError:
                    cols = 0
                # a pty with no size (CI runners, `script`) reports 0 columns: tqdm would draw nothing
                size = {"dynamic_ncols": True} if cols > 0 else {"ncols": 100, "nrows": 40}
                self.bar = tqdm(total=total_steps, desc="tinv train", unit="step", **size)
                self._route_logs_through(tqdm)
            except Exception:
                self.bar = None
        if tensorboard:
            self.tb = TensorBoard(store, storage.join(run, storage.TENSORBOARD_DIR))
        if metrics_port:
            self._serve_metrics(metrics_port)

    def _route_logs_through(self, tqdm) -> None:
        """Log records go through tqdm.write while the bar is up, so lines never break it."""
        root = logging.getLogger()
        self._swapped = []
        for h in list(root.handlers):
            if isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) is sys.stderr:

                class _Through(logging.Handler):
                    def emit(self, record, _fmt=h.formatter):
                        tqdm.write((_fmt or logging.Formatter()).format(record), file=sys.stderr)

                new = _Through(h.level)
                root.removeHandler(h)
                root.addHandler(new)
                self._swapped.append((h, new))

    # ------------------------------------------------------------------ sinks
    def _serve_metrics(self, port: int) -> None:
        try:
            from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
        except Exception as e:
            log.warning("Prometheus metrics disabled: %s", e)
            return
        reg = CollectorRegistry()
        m = {
            "step": Gauge("tinv_trainer_step", "Optimisation steps done", registry=reg),
            "total": Gauge("tinv_trainer_total_steps", "Optimisation steps in the run", registry=reg),
            "loss": Gauge("tinv_trainer_loss", "Mean training loss over the last report interval", registry=reg),
            "lr": Gauge("tinv_trainer_learning_rate", "Current learning rate", registry=reg),
            "sps": Gauge("tinv_trainer_samples_per_second", "Training samples per second, all ranks", registry=reg),
            "eta": Gauge("tinv_trainer_eta_seconds", "Estimated seconds to completion", registry=reg),
            "ckpt": Counter("tinv_trainer_checkpoints", "Checkpoints written", registry=reg),
        }
        m["total"].set(self.total)
        try:
            server = start_http_server(port, registry=reg)
            self._metrics_server = server
            log.info("Prometheus metrics on :%d/metrics", port)
        except OSError as e:
            log.warning("cannot serve metrics on port %d: %s", port, e)
            return
        self.metrics = m

    # ------------------------------------------------------------------ events
    def tick(self, step: int) -> None:
        """Between reports: move the progress bar only (no device sync, no I/O)."""
        if self.enabled and self.bar is not None:
            self.bar.n = step
            self.bar.refresh()

    def step(
        self,
        step: int,
        loss: float | None,
        lr: float,
        sps: float | None,
        epoch: float,
        norm: float | None = None,
        force: bool = False,
        points: list[tuple[int, float]] | None = None,
        log_line: bool = True,
    ) -> None:
        """A report: `loss` is the smoothed loss; `points` every step's loss since the last one."""
        if not self.enabled:
            return
        eta = int((self.total - step) * (self.global_batch / sps)) if sps else None
        self.state.update(step=step, loss=loss, lr=lr, sps=sps, eta=eta, epoch=epoch)
        if self.tb is not None and loss is not None:
            for s_, v in points or [(step, loss)]:
                self.tb.scalar("train/loss", v, s_)
            self.tb.scalar("train/loss_smoothed", loss, step)
            self.tb.scalar("train/learning_rate", lr, step)
            self.tb.scalar("train/samples_per_second", sps or None, step)
            self.tb.scalar("train/embedding_norm", norm, step)
        if self.metrics is not None:
            self.metrics["step"].set(step)
            self.metrics["lr"].set(lr)
            if loss is not None:
                self.metrics["loss"].set(loss)
            if sps:
                self.metrics["sps"].set(sps)
            if eta is not None:
                self.metrics["eta"].set(eta)
        if self.bar is not None:
            self.bar.n = step
            post = {}
            if loss is not None:
                post["loss"] = f"{loss:.4f}"
            if sps:
                post["samples/s"] = f"{sps:.1f}"
            self.bar.set_postfix(post, refresh=False)
            self.bar.refresh()
        report = step % self.log_every == 0 or step == self.total
        if report and log_line and self.bar is None and loss is not None:
            log.info(
                "step %d/%d loss %.5f lr %.3g%s%s",
                step,
                self.total,
                loss,
                lr,
                f" {sps:.1f} samples/s" if sps else "",
                f" eta {eta}s" if eta is not None else "",
            )
        if force or (report and time.monotonic() - self.last_write >= self.min_interval):
            self.write_progress("running")

    global_batch = 1

    def checkpoint(self, ref: CheckpointRef, kept: list[CheckpointRef]) -> None:
        if not self.enabled:
            return
        self.checkpoints = kept
        log.info("checkpoint %s at step %d -> %s", ref.uuid, ref.step, ref.uri)
        if self.metrics is not None:
            self.metrics["ckpt"].inc()
        if self.tb is not None:
            self.tb.sync()
        self.write_progress("running")

    def images(self, tag: str, arrays, step: int) -> None:
        if self.enabled and self.tb is not None:
            for i, a in enumerate(arrays):
                self.tb.image(f"{tag}/{i}", a, step)

    def progress_doc(self, state: str, message: str | None = None, exit_code: int | None = None, stopped: str | None = None) -> dict:
        s = self.state
        latest = self.checkpoints[-1].to_json() if self.checkpoints else None
        pct = int(100 * s["step"] / self.total) if self.total else 0
        return {
            "format": "tinv.progress/v1",
            "state": state,
            "stopped": stopped,
            "step": s["step"],
            "total_steps": self.total,
            "loss": s["loss"],
            "learning_rate": s["lr"],
            "samples_per_second": s["sps"],
            "eta_seconds": s["eta"],
            "summary": f"{s['step']}/{self.total} ({pct}%)",
            "epoch": s["epoch"],
            "world_size": self.world,
            "started_at": self.started,
            "updated_at": now(),
            "latest_checkpoint": latest,
            "checkpoints": [c.to_json() for c in self.checkpoints],
            "job": self.job,
            "message": message,
            "exit_code": exit_code,
        }

    def write_progress(self, state: str, message: str | None = None, exit_code: int | None = None, stopped: str | None = None) -> None:
        if not self.enabled:
            return
        try:
            self.store.write_bytes(
                storage.join(self.run, storage.PROGRESS_FILE),
                json.dumps(self.progress_doc(state, message, exit_code, stopped), indent=2).encode(),
            )
            self.last_write = time.monotonic()
        except Exception as e:
            log.warning("cannot write progress.json: %s", e)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
            root = logging.getLogger()
            for old, new in getattr(self, "_swapped", []):
                root.removeHandler(new)
                root.addHandler(old)
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        srv = getattr(self, "_metrics_server", None)
        if srv is not None:
            try:
                srv[0].shutdown()
            except Exception:
                pass
