"""The callbacks every training run gets (common.runs adds them): run bookkeeping, the global RNG states in
each checkpoint, a last.ckpt that is always the newest step, a note when a resume changes the schedule, one
line when training diverges, the run's config.yaml kept through resumes, and checkpoints written atomically.
"""

from __future__ import annotations

import io
import os
import random
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning import Callback, LightningModule, Trainer
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import SaveConfigCallback
from pytorch_lightning.loggers import CSVLogger, WandbLogger

from common.checkpoint import forget_loaded, take_loaded
from common.cli import UserError
from common.io import atomic_file, no_space
from common.launch import point_latest
from common.optim import warmup_length


class RunWatch(Callback):
    """Bookkeeping inside the fit. `started`: training (or its sanity check) has begun, so an error from
    now on is a bug with a traceback, not a setup problem. `<root>/latest` moves to the run once its
    last.ckpt exists (Lightning runs checkpoint callbacks after this one, so that is seen one hook later,
    at the latest in on_fit_end). Logs are flushed before each checkpoint is written, so the metrics of
    the steps a checkpoint holds are on disk with it."""

    def __init__(self, root: Path, run_dir: Path, on_start: Callable[[], None] | None = None) -> None:
        self.root, self.run_dir, self.on_start = root, run_dir, on_start  # on_start: rank 0, once, as training starts
        self.started, self._pointed, self._resumed = False, False, False
        self.trained = False  # a training batch has begun: the run folder may hold what the user wants kept

    def _start(self, trainer: Trainer) -> None:
        if not self.started and self.on_start is not None and trainer.is_global_zero:
            self.on_start()
        self.started = True
        forget_loaded()  # restored by now (or a fresh run): keep no checkpoint read before (a stage 1) while training

    def _point(self, trainer: Trainer) -> None:
        if not self._pointed and trainer.is_global_zero and (self.run_dir / "checkpoints" / "last.ckpt").is_file():
            point_latest(self.root, self.run_dir)
            self._pointed = True

    def on_sanity_check_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start(trainer)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start(trainer)
        self._resumed = bool(trainer.ckpt_path)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        self.trained = True
        self._point(trainer)  # the first checkpoint may come from a validation after the last batch's end
        if self._resumed and pl_module.automatic_optimization and len(trainer.optimizers) == 1:
            # Lightning numbers the logged rows with this counter and, resuming from a checkpoint written at
            # a validation, adds the step it is short of only when the resumed run validates at the same
            # steps (its restart bookkeeping); otherwise the resumed rows would repeat step numbers. With
            # one optimizer it equals the global step. Set here, after that bookkeeping, before any log.
            trainer.fit_loop.epoch_loop._batches_that_stepped = trainer.global_step
        self._resumed = False

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        self._point(trainer)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._point(trainer)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._point(trainer)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._point(trainer)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        for logger in trainer.loggers:
            logger.save()


class RngState(Callback):
    """The global RNG states (torch, this process's CUDA device, numpy, random) go into every checkpoint and
    come back on resume, so a resumed run draws what the uninterrupted one would: a DataLoader seeds its
    shuffling from torch's global RNG, and so do dead-code restarts and label dropout. Plain tensors and
    tuples, so the checkpoint still loads weights-only. Rank 0's states are saved and restored on all ranks.

    They are restored at the first epoch or batch start, not on load: resuming at an epoch's end,
    Lightning creates a train iterator while it sets up (a draw the uninterrupted run never made) and then
    the next epoch's iterator, which must draw from the saved state."""

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        name, keys, pos, has_gauss, cached = np.random.get_state()
        numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))
        state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy_state}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending = state

    def _restore(self) -> None:
        state, self._pending = self._pending, None
        if state is None:
            return
        torch.set_rng_state(state["torch"])
        random.setstate(state["python"])
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore()

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        self._restore()  # resumed mid-epoch: Lightning calls no on_train_epoch_start before the first batch


class NewestCheckpoint(ModelCheckpoint):
    """last.ckpt: the newest step, written at every validation, better or not, and when training ends after
    its last validation (max_time, or no validation at all). Lightning 2.6's ``save_last=True`` writes it only
    beside a new best checkpoint, so a run whose validation got worse kept a stale last.ckpt and
    ``--ckpt_path last`` went back to the best step. Without a monitor, top-1 is simply the newest."""

    def __init__(self, dirpath: Path) -> None:
        super().__init__(dirpath=dirpath, filename="last", monitor=None, enable_version_counter=False)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if not self._should_skip_saving_checkpoint(trainer):  # fitting, and this step not saved yet
            self._save_none_monitor_checkpoint(trainer, self._monitor_candidates(trainer))


class ScheduleCheck(Callback):
    """On a resume, one line when this command's learning-rate schedule is not the run's at the step it goes on
    from: the warm-up and cosine span --trainer.max_steps (or max_time), so extending a finished run with a larger
    max_steps took its learning rate from 1 % of the peak back to the peak at once, without a word (found by a
    reproducibility audit). Going on that way is allowed (training longer is a choice); it is said. Any run: one
    line when --model.warmup_steps is cut to half the run's steps."""

    def __init__(self, prog: str, tolerance: float = 0.02) -> None:
        self.prog, self.tolerance = prog, tolerance  # tolerance: of the peak rate (a time budget moves a little)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        asked, total = getattr(pl_module.hparams, "warmup_steps", 0), trainer.estimated_stepping_batches
        if (warmup := warmup_length(asked, total)) < asked:  # was cut without a word (the docs audit)
            print(f"{self.prog}: note: --model.warmup_steps {asked} is more than half of this run's {int(total)} "
                  f"steps; it warms up over {warmup} (half the run) and decays over the rest", file=sys.stderr,
                  flush=True)  # fmt: skip
        if not trainer.ckpt_path:
            return
        for config in trainer.lr_scheduler_configs:
            sched = config.scheduler
            lambdas, saved = getattr(sched, "lr_lambdas", None), getattr(sched, "_last_lr", None)  # LambdaLR's
            if not lambdas or not saved:
                continue
            now = [base * f(sched.last_epoch) for base, f in zip(sched.base_lrs, lambdas)]  # restored step count
            if max(abs(a - b) for a, b in zip(now, saved)) > self.tolerance * max(sched.base_lrs):
                print(f"{self.prog}: the learning rate at step {trainer.global_step} is {now[0]:.3g} under this "
                      f"command's schedule and was {saved[0]:.3g} under the run's: the warm-up and cosine span "
                      "--trainer.max_steps (or max_time), which differ from the run's, so the rate follows the new "
                      "length from here; to finish the run as it was planned, resume with its own settings (the "
                      "config.yaml in its folder)", file=sys.stderr, flush=True)  # fmt: skip
                return


class StopOnDivergence(Callback):
    """A training loss that stops being finite (NaN or inf: a learning rate far too high, data gone wrong) ends the
    run with one line before its weights are saved: such runs trained NaN weights to the end, wrote their grids and
    exited 0 (a helper's audit, `--model.lr 1e30`). On the CPU every step's loss is checked before its backward
    pass, so no non-finite update is applied. On a GPU a check every step would make the host wait for the device
    each step, so the steps' flags are gathered on the device and read every `every` steps and before each
    validation and the end (whose checkpoints would hold the weights): up to `every` bad steps may be trained there,
    none saved. The earlier checkpoints of the run stay."""

    def __init__(self, every: int = 50, each_step: bool | None = None) -> None:
        self.every, self.each_step = every, each_step  # each_step None: on the CPU only (tests force either way)
        self._bad: torch.Tensor | None = None  # on the device: any non-finite loss since the last read

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        bad = ~torch.isfinite(loss.detach())
        each_step = self.each_step if self.each_step is not None else loss.device.type == "cpu"
        if each_step:
            if bool(bad):
                self._raise(trainer, trainer.global_step, float(loss.detach()))
            return
        self._bad = bad if self._bad is None else self._bad | bad
        if (trainer.global_step + 1) % self.every == 0:
            self._read(trainer)

    def _read(self, trainer: Trainer) -> None:
        if self._bad is not None and bool(self._bad):
            self._raise(trainer, None, float("nan"))
        self._bad = None

    def _raise(self, trainer: Trainer, step: int | None, loss: float) -> None:
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else float("nan")
        when = f"at step {step + 1} (loss {loss})" if step is not None else f"by step {trainer.global_step + 1}"
        saved = Path(getattr(trainer.checkpoint_callback, "dirpath", None) or ".") / "last.ckpt"
        kept = f"; the run's last checkpoint before it: {saved}" if saved.is_file() else "; nothing was saved"
        raise UserError(f"training diverged {when}: lower --model.lr (the rate was {lr:.3g} there) or check the "
                        f"data{kept}")  # fmt: skip

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._read(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._read(trainer)


class RunConfig(SaveConfigCallback):
    """config.yaml records how the run was started. A resume in place with other settings (another max_steps,
    limit, a mistaken config) rewrote it, so the file the messages point to ("pass its run's config") no longer
    described the run's checkpoints: such a resume's settings go to config_resume_step<N>.yaml beside it, and a
    resume with the same settings (a requeued job) writes nothing."""

    def __init__(self, *args: Any, resume_step: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.resume_step = resume_step

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        # the run folder (the Trainer's default_root_dir here), not Lightning's log_dir: a --trainer.logger of the
        # user's own (MLflow) may have no folder, and Lightning's callback then failed an assertion
        first = Path(trainer.default_root_dir) / self.config_filename
        # rank 0 decides (the processes Lightning's launcher starts do not know the resume step) and every rank
        # follows
        resumed = trainer.strategy.broadcast(self.resume_step is not None and first.is_file())
        if trainer.is_global_zero:
            if not resumed:
                self.parser.save(self.config, str(first), skip_none=False, overwrite=True, multifile=self.multifile)
            elif settings(self.parser.dump(self.config, skip_none=False)) != settings(newest_config(first).read_text()):
                self.parser.save(self.config, str(first.with_name(f"config_resume_step{self.resume_step}.yaml")),
                                 skip_none=False, overwrite=True, multifile=self.multifile)  # fmt: skip
            self.save_config(trainer, pl_module, stage)  # a resume is a new W&B run: it gets its config too
        self.already_saved = True

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """The command's whole settings to the dashboard, nested under `config` (W&B: config.trainer.max_steps):
        Lightning logs only the model's and the data's hyperparameters, flat, so the trainer (steps, devices,
        precision, accumulation), the seed, --cpu_bf16 and the logging options were missing. W&B's summary of the
        metric that picks best.ckpt is its best value, not its last. (Rank 0; the CSV logger has config.yaml.)"""
        logger = trainer.logger
        if logger is None or isinstance(logger, CSVLogger):
            return
        logger.log_hyperparams({"config": yaml.safe_load(self.parser.dump(self.config, skip_none=False))})
        if isinstance(logger, WandbLogger):
            monitor, mode = getattr(pl_module, "monitor", ("val/loss", "min"))
            logger.experiment.define_metric(monitor, summary=mode, step_metric="trainer/global_step")


def newest_config(first: Path) -> Path:
    """The run's config.yaml, or the config_resume_step<N>.yaml of its latest resume with other settings: the same
    resume again (a requeued job) then writes no copy of it."""
    resumes = [(int(m.group(1)), p) for p in first.parent.glob("config_resume_step*.yaml")
               if (m := re.fullmatch(r"config_resume_step(\d+)\.yaml", p.name))]  # fmt: skip
    return max(resumes)[1] if resumes else first


def settings(config_yaml: str) -> Any:
    """A saved config's settings, without what only a resume sets: --ckpt_path, and an image folder's file-list
    key read from the checkpoint (common.runs)."""
    values = yaml.safe_load(config_yaml)
    if not isinstance(values, dict):
        return values
    data = values.get("data")
    if isinstance(data, dict):
        values["data"] = {k: v for k, v in data.items() if k != "folder_key"}
    return {k: v for k, v in values.items() if k != "ckpt_path"}


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written beside their final name and renamed into place. Lightning's own save writes a temporary
    file in the system's temp folder and, when the run folder is on another file system (a scratch or network
    disk, /tmp on tmpfs), copies it over the old file: a disk that filled during the copy, or a kill, left a
    truncated last.ckpt where the good one was, and the run could not be resumed."""

    def load_checkpoint(self, path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The checkpoint this command read and checked already (common.checkpoint.keep_loaded), else the file."""
        kept = take_loaded(path) if "://" not in str(path) else None
        return kept if kept is not None else super().load_checkpoint(path, *args, **kwargs)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):  # a remote store: Lightning's own way
            return super().save_checkpoint(checkpoint, path, storage_options)
        buffer = io.BytesIO()  # whole first (as Lightning does): a full disk is then an OSError of the write below
        torch.save(checkpoint, buffer)
        try:
            with atomic_file(path, replace=True) as f:
                f.write(buffer.getbuffer())
        except OSError as e:
            if not no_space(e):
                raise
            why = e.strerror or os.strerror(e.errno)
            raise UserError(f"cannot write the checkpoint {path} ({why}); the checkpoints saved before it are "
                            "intact: free some space, then go on with --ckpt_path last") from None  # fmt: skip


def use_atomic_io(trainer: Trainer) -> Trainer:
    """AtomicCheckpointIO for the trainer, unless the user gave their own (--trainer.plugins): that one reads the
    checkpoint itself, so none is kept for it while training."""
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()
    else:
        forget_loaded()
    return trainer
