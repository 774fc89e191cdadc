"""Stopping a fit on a signal without losing its steps: finish the training step under way (an epoch's last: the
next one) and the validation due after it, save it as ``last.ckpt`` and stop, so that the run goes on from the
step it stopped at (Lightning's own handling keeps only the last validation's checkpoint: up to 1,000 steps of
the default configs lost, and its SIGTERM ended the run with exit code 0). The signals:

* SIGINT, a Ctrl-C: ``--ckpt_path last`` goes on. A second Ctrl-C stops at once, losing the step under way;
* SIGTERM, a scheduler's stop (SLURM at a job's time limit or on preemption, Kubernetes, ``kill``), likewise;
* inside a SLURM batch job, SLURM's warning signal SIGUSR1 (``#SBATCH --signal=USR1@120``): after the save
  rank 0 requeues the job (``scontrol requeue``), and the job, started again with the same command, continues
  the same run folder (common.launch.slurm_restarted_run). Lightning's own handler of that signal saved at
  whatever point of a step the signal came, into a folder the requeued job never looked in (common.runs turns
  it off).

Several processes (DDP, torchrun, srun) each get the signal at a different step, or one of them gets it:
after every step the ranks' requests are reduced (one integer, next to Lightning's own broadcast of SIGTERM),
so every rank saves the same step. Outside the training loop (`SignalGuard`: parsing, reading the data, the
test after it) the same signals end the command with one line. The saved run resumes bit-identically to one
never stopped (tests/test_runs.py, tests/test_preemption.py). Loader workers ignore Ctrl-C
(common.loaders.worker_ignores_ctrl_c), so a terminal's, which reaches them too, does not break the fetches.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from pytorch_lightning import Callback, LightningModule, Trainer

from common.cli import EXIT_INTERRUPTED
from common.launch import requeue_slurm_job, slurm_job

REQUEUE_SIGNAL = signal.SIGUSR1  # SLURM's --signal default in Lightning's docs and ours (README, Preemption)


def signal_words(signum: int) -> str:
    if signum == signal.SIGINT:
        return "Ctrl-C"
    if signum == REQUEUE_SIGNAL:
        return f"SLURM's warning signal ({signal.Signals(signum).name})"
    return signal.Signals(signum).name


def exit_code(signum: int) -> int:
    """As a shell reports a command a signal stopped (128 + its number): `make` and `set -e` scripts stop too."""
    return EXIT_INTERRUPTED if signum == signal.SIGINT else 128 + signum


def handled_signals() -> list[int]:
    """The signals a fit handles: SIGINT and SIGTERM, and SLURM's warning signal inside a batch job; none off the
    main thread (only it may set handlers), nor one the process ignores (a shell's background job ignores SIGINT:
    no Ctrl-C reaches it; leave it so)."""
    if threading.current_thread() is not threading.main_thread():
        return []
    wanted = [signal.SIGINT, signal.SIGTERM] + ([REQUEUE_SIGNAL] if slurm_job() else [])
    return [s for s in wanted if signal.getsignal(s) is not signal.SIG_IGN]


def requeue_note(signum: int, rank0: bool) -> str | None:
    """After SLURM's warning signal inside a batch job, rank 0 requeues it: "" when done, else why not; None for
    other signals, outside a job, and on the other ranks."""
    job = slurm_job()
    if signum != REQUEUE_SIGNAL or job is None or not rank0:
        return None
    return requeue_slurm_job(job)


def requeue_words(requeue: str | None) -> str:
    if requeue is None:
        return ""
    if requeue == "":
        return f"; SLURM job {slurm_job()} is requeued"
    return f"; requeuing SLURM job {slurm_job()} failed ({requeue})"


class Interrupted(Exception):
    """Raised out of the fit once the step is saved, so no test or grid follows (Lightning's should_stop would
    also run a validation the uninterrupted run never made: an RNG draw more). `rank0`: the process that
    reports it (the others exit with the same code, quietly)."""

    def __init__(self, step: int, checkpoint: Path, signum: int, rank0: bool, requeue: str | None) -> None:
        super().__init__(f"stopped by {signal_words(signum)} at step {step}, saved as {checkpoint}")
        self.step, self.checkpoint, self.rank0, self.exit_code = step, checkpoint, rank0, exit_code(signum)
        self.requeued = requeue == ""  # the SLURM job was requeued: it goes on by itself
        if self.requeued:
            self.next_step = f"SLURM job {slurm_job()} is requeued: started again, the same command goes on from there"
        else:
            failed = f"requeuing SLURM job {slurm_job()} failed ({requeue}), so " if requeue else ""
            self.next_step = failed + "to go on from there, run the same command with --ckpt_path last"


AT_ONCE = "at once (the step under way is lost; last.ckpt holds the last one saved)"  # a second Ctrl-C's Stopped


class Stopped(BaseException):
    """A signal where no step can be saved: before the training loop (parsing, reading the data), a second Ctrl-C
    (at once), or after the loop (the test, the grid). A BaseException, as KeyboardInterrupt is, so that no
    `except Exception` on the way swallows it; the command ends with one line and 128 + the signal's number."""

    def __init__(self, signum: int, when: str) -> None:
        super().__init__(f"stopped by {signal_words(signum)} {when}")
        self.signum, self.exit_code, self.when = signum, exit_code(signum), when


class SignalGuard:
    """Outside the training loop the handled signals raise Stopped (a SIGTERM while the data loads ended the
    process with no word, a Ctrl-C with a traceback, SLURM's warning signal without the requeue it asks for).
    The fit's StopOnInterrupt takes them over for the loop and gives them back after it (`after_training`)."""

    def __init__(self) -> None:
        self.after_training = False
        self._previous: dict[int, Any] = {}

    def _raise(self, signum: int, frame: Any) -> None:
        when = "after training (its checkpoints are saved)" if self.after_training else "before training began"
        raise Stopped(signum, when)

    def __enter__(self) -> SignalGuard:
        for signum in handled_signals():
            self._previous[signum] = signal.signal(signum, self._raise)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}


class StopOnInterrupt(Callback):
    """Installs the handlers for the training loop (its sanity check included) and keeps them until it ends: a
    second SIGTERM or warning signal (torchrun forwards one; SLURM sends SIGTERM to a job it requeues) changes
    nothing, a second Ctrl-C stops at once (Stopped). Raises Interrupted on every rank once the step is saved."""

    def __init__(self, prog: str, checkpoint: Path, guard: SignalGuard | None = None) -> None:
        self.prog, self.checkpoint, self.guard = prog, checkpoint, guard
        self.requested = 0  # the signal received and not yet acted on (0: none)
        self._saved: tuple[int, int] | None = None  # (step saved as last.ckpt, the signal)
        self._requeue: str | None = None  # after the warning signal: "" requeued, else why not
        self._previous: dict[int, Any] = {}
        self._rank0 = True

    def _request(self, signum: int, frame: Any) -> None:
        if self.requested or self._saved is not None:  # a second signal
            if signum == signal.SIGINT:
                raise Stopped(signum, AT_ONCE)
            return
        self.requested = signum
        if self._rank0:
            print(f"\n{self.prog}: {signal_words(signum)}: stopping after this training step (the next, if this one "
                  f"ends an epoch) and saving it to {self.checkpoint}"
                  + (" (Ctrl-C again stops at once, losing that step)" if signum == signal.SIGINT else ""),
                  file=sys.stderr, flush=True)  # fmt: skip

    def _restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}

    def _install(self, trainer: Trainer) -> None:
        """After Lightning's own handlers (set when the fit began), which these replace until the loop ends."""
        self._rank0 = trainer.is_global_zero
        if self._previous:
            return
        for signum in handled_signals():
            previous = signal.getsignal(signum)
            self._previous[signum] = previous if previous is not None else signal.SIG_DFL
            signal.signal(signum, self._request)

    def on_sanity_check_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._install(trainer)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._install(trainer)

    def _agreed(self, trainer: Trainer) -> int:
        """The signal every rank acts on now: any rank's (the highest number if several differ; each rank calls
        this once a step, in step)."""
        if trainer.world_size == 1 or not dist.is_available() or not dist.is_initialized():
            return self.requested
        flag = torch.tensor([self.requested], dtype=torch.int32, device=trainer.strategy.root_device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        """Saves the finished step; Interrupted follows at the next batch's start, after Lightning has logged the
        step and run the validation due after it, if any (ModelCheckpoint then writes last.ckpt again, after it,
        as in a run never stopped: saved before it, the resumed run's validation drew from the RNG before the
        saved states were restored). An epoch's last step is not saved: the next epoch's first is (a run resumed
        from a checkpoint written at an epoch's end, without a validation there, shuffled the next epoch
        differently)."""
        signum = self._agreed(trainer)
        if signum and self._saved is None:
            if batch_idx + 1 < trainer.num_training_batches or trainer.num_training_batches == 1:
                self.requested = 0
                # the full checkpoint (optimizer, loops, callbacks), as ModelCheckpoint writes it; Lightning's
                # second argument says what is saved, not how a file is loaded (every load here is weights-only)
                trainer.save_checkpoint(self.checkpoint, False)  # every rank: Lightning's barrier is inside
                self._saved = (trainer.global_step, signum)
                self._requeue = requeue_note(signum, trainer.is_global_zero)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        if self._saved is not None:
            step, signum = self._saved
            raise Interrupted(step, self.checkpoint, signum, trainer.is_global_zero, self._requeue)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore()  # the step signalled in was the last one (max_steps): the run ends as usual
        if self.guard is not None:
            self.guard.after_training = True

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore()
