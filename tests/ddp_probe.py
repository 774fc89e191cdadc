"""Callbacks the stage-1 tests pass on the command line (``--trainer.callbacks``). `DumpCodebook` looks inside
a run: it saves each rank's quantizer state at the start and end of training as
``<out>/{start,end}_rank{r}.pt`` (with the rank's run folder), and at the end also the trained model's codes
for the first test images. `FailAt` makes a run fail in training before it writes any checkpoint;
`InterruptAt` presses Ctrl-C; `RecordingLogger` records what a dashboard would get
(or sends another signal)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytorch_lightning as pl
import torch

from common.images import from_uint8


class DumpCodebook(pl.Callback):
    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def _dump(self, trainer: pl.Trainer, pl_module: pl.LightningModule, when: str) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().clone() for k, v in pl_module.quantizer.state_dict().items()}
        state["global_step"] = trainer.global_step
        state["world_size"] = trainer.world_size
        state["run_dir"] = str(trainer.default_root_dir)
        if when == "end":
            images, _ = trainer.datamodule.split_arrays("test")
            state["test_codes"] = pl_module.encode_to_codes(from_uint8(images[:8]).to(pl_module.device)).cpu()
        torch.save(state, self.out / f"{when}_rank{trainer.global_rank}.pt")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._dump(trainer, pl_module, "start")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._dump(trainer, pl_module, "end")


class FailAt(pl.Callback):
    """Raises at the start of the batch that would make step `step` + 1, or (in_backward) inside that
    training step, after every callback's batch start: a crash in the model's own code."""

    def __init__(self, step: int = 0, in_backward: bool = False, rank: int | None = None) -> None:
        self.step, self.in_backward, self.rank = step, in_backward, rank  # rank: only that one fails (None: all)

    def _fail(self, trainer: pl.Trainer) -> None:
        if trainer.global_step >= self.step and self.rank in (None, trainer.global_rank):
            raise RuntimeError(f"injected failure at step {trainer.global_step}")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx) -> None:
        if not self.in_backward:
            self._fail(trainer)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss) -> None:
        if self.in_backward:
            self._fail(trainer)


class InterruptAt(pl.Callback):
    """Sends this process a signal (SIGINT: a Ctrl-C) `times` times at the start of the batch that makes step
    `step` + 1 (when="sanity": in the sanity check's first batch), once; with `rank`, only that rank's process; with
    `once_file`, only if that file does not exist yet (it is made then): the same command run again (a SLURM job
    started again) trains on."""

    def __init__(self, step: int = 0, signal_name: str = "SIGINT", rank: int | None = None,
                 once_file: str | None = None, times: int = 1, when: str = "batch") -> None:  # fmt: skip
        self.step, self.signum, self.rank, self.sent = step, signal.Signals[signal_name], rank, False
        self.once_file, self.times, self.when = Path(once_file) if once_file else None, times, when

    def _send(self, trainer: pl.Trainer) -> None:
        if self.sent or self.rank not in (None, trainer.global_rank):
            return
        self.sent = True
        if self.once_file is not None:
            if self.once_file.exists():
                return
            self.once_file.touch()
        for _ in range(self.times):
            os.kill(os.getpid(), self.signum)

    def on_validation_batch_start(self, trainer: pl.Trainer, *args) -> None:
        if self.when == "sanity" and trainer.sanity_checking:
            self._send(trainer)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx) -> None:
        if self.when == "batch" and trainer.global_step >= self.step:
            self._send(trainer)


class RecordingLogger(pl.loggers.Logger):
    """A dashboard stand-in (``--trainer.logger``): what a run sends it, as JSON lines in ``<out>``."""

    def __init__(self, out: str) -> None:
        super().__init__()
        self.out = Path(out)

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> str:
        return "0"

    def _write(self, record: dict) -> None:
        import json

        self.out.parent.mkdir(parents=True, exist_ok=True)
        with self.out.open("a") as f:
            f.write(json.dumps(record, default=str) + "\n")

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        self._write({"hyperparams": dict(params) if not isinstance(params, dict) else params})

    def log_metrics(self, metrics, step=None) -> None:
        self._write({"metrics": {k: float(v) for k, v in metrics.items()}, "step": step})
