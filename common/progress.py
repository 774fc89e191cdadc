"""The progress line printed off a terminal (CI, nohup, Slurm logs): one line every N steps with the speed,
the time elapsed and an estimate of the time left, and one line of validation metrics; and the speed logged to
the dashboard (Throughput)."""

from __future__ import annotations

import time
from typing import Any

from pytorch_lightning import LightningModule, Trainer
from pytorch_lightning.callbacks import Callback, ProgressBar, Timer


class LineProgressBar(ProgressBar):
    """Off a terminal (CI, nohup, Slurm logs) a bar is noise: print one line every N steps instead, with the
    time since this process started training and an estimate of the time left (by steps, or by --trainer.max_time
    when that ends the run first: then the step total shown is the estimate, "~N")."""

    def __init__(self, every_n_steps: int = 50) -> None:
        super().__init__()
        self.every_n_steps = max(1, every_n_steps)
        self._enabled = True
        self._t0 = time.perf_counter()
        self._seen = 0
        self._step0 = 0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._t0, self._seen, self._step0 = time.perf_counter(), 0, trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._seen += len(batch[0]) * trainer.world_size
        step = trainer.global_step
        if not (self._enabled and trainer.is_global_zero and step % self.every_n_steps == 0):
            return
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        metrics = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num"}
        parts = " ".join(f"{k}={_fmt(v)}" for k, v in sorted(metrics.items()) if k.startswith("train"))
        unit = getattr(pl_module, "throughput_unit", "img")  # the prior counts code maps
        total, left = run_length(trainer, step, elapsed / max(step - self._step0, 1))
        when = f" {_clock(elapsed)} elapsed" + (f", ~{_clock(left)} left" if left is not None else "")
        print(f"epoch {trainer.current_epoch} step {step}/{total} {self._seen / elapsed:.0f} {unit}/s{when} {parts}",
              flush=True)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not (self._enabled and trainer.is_global_zero) or trainer.sanity_checking:
            return
        metrics = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("val")}
        parts = " ".join(f"{k}={_fmt(v)}" for k, v in sorted(metrics.items()))
        print(f"epoch {trainer.current_epoch} step {trainer.global_step} {parts}", flush=True)


class Throughput(Callback):
    """Log the training speed with the losses, every --log.every_n_steps: `train/img_per_s` (the prior's
    `train/maps_per_s`), the images of all ranks trained since the last log over the wall time, validations left
    out. No CUDA synchronisation: Lightning's ThroughputMonitor synchronises every step, which stalls a
    launch-bound GPU run; over a window of many steps the queue's lag is a step or two at most."""

    def __init__(self) -> None:
        self._t0, self._seen, self._validated = time.perf_counter(), 0, False

    def _restart(self, *_: Any) -> None:
        self._t0, self._seen, self._validated = time.perf_counter(), 0, False

    on_train_start = _restart

    def on_validation_start(self, *_: Any) -> None:
        self._validated = True

    def on_train_batch_start(self, *_: Any) -> None:
        if self._validated:  # the window starts after a validation and the checkpoint saves that follow it (they
            self._restart()  # run after this callback's on_validation_end: Lightning calls checkpointing last)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._seen += len(batch[0]) * trainer.world_size
        if trainer.global_step % max(trainer.log_every_n_steps, 1):  # Lightning logs the losses at these steps
            return
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        unit = getattr(pl_module, "throughput_unit", "img")
        pl_module.log(f"train/{unit}_per_s", self._seen / elapsed, on_step=True, on_epoch=False, rank_zero_only=True)
        self._restart()


def run_length(trainer: Trainer, step: int, seconds_per_step: float) -> tuple[str, float | None]:
    """The run's step total as printed and the seconds left: by the steps still to go (max_steps, or the epochs'
    batches), or by the time budget (a Timer callback: --trainer.max_time) when that ends the run first."""
    try:
        steps = float(trainer.estimated_stepping_batches)  # max_steps, else max_epochs x batches; inf if neither
    except Exception:  # noqa: BLE001 - no estimate (e.g. an iterable data set without a length): none shown
        steps = float("inf")
    left = (steps - step) * seconds_per_step if steps != float("inf") else None
    total = f"{int(steps)}" if steps != float("inf") else "?"
    timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
    budget = timer.time_remaining() if timer is not None else None
    if budget is not None and (left is None or budget < left):
        left = max(budget, 0.0)
        total = f"~{step + int(left / seconds_per_step)}"
    return total, left


def _clock(seconds: float) -> str:
    """1:02:03, 2:03 or 0:07."""
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _fmt(v: Any) -> str:
    try:
        return f"{float(v):.4g}"
    except (TypeError, ValueError):
        return str(v)
