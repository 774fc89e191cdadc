"""Ctrl-C during `fit`: finish the training step under way (an epoch's last: the next one) and the validation
due after it, save it as ``last.ckpt`` and stop, so that ``--ckpt_path last`` goes on from the step the user
stopped at (Lightning's own handling keeps only the last validation's checkpoint: up to 1,000 steps of the
default configs lost). A second Ctrl-C stops at once, the Lightning way. The saved run resumes
bit-identically to one never stopped (tests/test_runs.py). Loader workers ignore Ctrl-C
(common.loaders.worker_ignores_ctrl_c), so a terminal's, which reaches them too, does not break the fetches.

One process only: under DDP every rank gets the Ctrl-C at a different step, and saving would need them to
agree on one, so several processes keep Lightning's handling.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

from pytorch_lightning import Callback, LightningModule, Trainer

from common.cli import ctrl_c_reaches_us


class Interrupted(Exception):
    """Raised out of the fit once the step is saved, so no test or grid follows (Lightning's should_stop would
    also run a validation the uninterrupted run never made: an RNG draw more)."""

    def __init__(self, step: int, checkpoint: Path) -> None:
        super().__init__(f"stopped by Ctrl-C at step {step}, saved as {checkpoint}")
        self.step, self.checkpoint = step, checkpoint


class StopOnInterrupt(Callback):
    """Installs a SIGINT handler for the training loop of a one-process fit; raises Interrupted when saved."""

    def __init__(self, prog: str, checkpoint: Path) -> None:
        self.prog, self.checkpoint = prog, checkpoint
        self.requested = False
        self._saved: int | None = None  # the step saved as last.ckpt
        self._previous: Any = None
        self._installed = False

    def _request(self, signum: int, frame: Any) -> None:
        self.requested = True
        self._restore()  # a second Ctrl-C raises KeyboardInterrupt inside the step
        print(f"\n{self.prog}: Ctrl-C: stopping after this training step (the next, if this one ends an epoch) "
              f"and saving it to {self.checkpoint} "
              "(Ctrl-C again to stop at once, keeping only the last validation's checkpoint)",
              file=sys.stderr, flush=True)  # fmt: skip

    def _restore(self) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.world_size == 1 and ctrl_c_reaches_us():
            previous = signal.getsignal(signal.SIGINT)
            self._previous = previous if previous is not None else signal.default_int_handler
            signal.signal(signal.SIGINT, self._request)
            self._installed = True

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        """Saves the finished step; Interrupted follows at the next batch's start, after Lightning has logged the
        step and run the validation due after it, if any (ModelCheckpoint then writes last.ckpt again, after it,
        as in a run never stopped: saved before it, the resumed run's validation drew from the RNG before the
        saved states were restored). An epoch's last step is not saved: the next epoch's first is (a run resumed
        from a checkpoint written at an epoch's end, without a validation there, shuffled the next epoch
        differently)."""
        if self.requested and self._saved is None:
            if batch_idx + 1 < trainer.num_training_batches or trainer.num_training_batches == 1:
                self.requested = False
                # the full checkpoint (optimizer, loops, callbacks), as ModelCheckpoint writes it; Lightning's
                # second argument says what is saved, not how a file is loaded (every load here is weights-only)
                trainer.save_checkpoint(self.checkpoint, False)
                self._saved = trainer.global_step

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if self._saved is not None:
            raise Interrupted(self._saved, self.checkpoint)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore()  # the step pressed on was the last one (max_steps): the run ends as usual

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore()
