"""Logger factory and logger-agnostic image/histogram logging (the progress line: common/progress.py).

W&B is the default dashboard. Without credentials it runs offline (and says how to `wandb sync`), so a
laptop or CI never needs the network; `csv`, `tensorboard` and `none` are the alternatives, and a
missing wandb install falls back to CSV with a clear message.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from lightning_fabric.loggers.logger import rank_zero_experiment
from pytorch_lightning import Trainer
from pytorch_lightning.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter

from common.cli import UserError, wandb_offline_unless_logged_in
from common.io import write_atomic

BACKENDS = ("wandb", "csv", "tensorboard", "none")


@dataclass
class LogConfig:
    """How a run is logged.

    Args:
        backend: wandb (default; offline when not logged in), csv, tensorboard or none.
        project: W&B project name.
        name: run name; also the run's folder under the trainer's default_root_dir
            (default: version_N, the next free N).
        every_n_steps: how often training metrics are logged and, off a terminal, a progress line printed.
    """

    backend: str = "wandb"
    project: str = "vqgen"
    name: str | None = None
    every_n_steps: int = 50

    def __post_init__(self) -> None:  # 0 logged nothing at all (no metrics.csv, no progress lines)
        if isinstance(self.every_n_steps, bool) or not self.every_n_steps >= 1:
            raise ValueError(f"--log.every_n_steps must be an integer >= 1, got {self.every_n_steps}")


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing metrics.csv; this one keeps the rows of the steps before
    `resume_step` and appends. The rest were logged after the checkpoint the run resumes from (by a run
    killed after it) and will be logged again: kept, they would be duplicates."""

    def __init__(self, log_dir: str, resume_step: int) -> None:
        self.resume_step = resume_step
        super().__init__(log_dir=log_dir)

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        with open(path, newline="") as f:
            reader = csv.reader(f)
            self.metrics_keys = next(reader, [])  # the header; new keys rewrite it
            rows = list(reader)
        if "step" not in self.metrics_keys:
            return
        col = self.metrics_keys.index("step")
        # Lightning logs the metrics of optimizer step s (1-based) as step s - 1, also a validation after it.
        kept = [r for r in rows if not (len(r) > col and r[col].isdigit() and int(r[col]) >= self.resume_step)]
        if len(kept) < len(rows):
            text = io.StringIO(newline="")
            csv.writer(text).writerows([self.metrics_keys, *kept])
            write_atomic(path, text.getvalue().encode())  # a kill leaves the old file or the new one


class ResumedCSVLogger(CSVLogger):
    """CSVLogger for a run resumed in place from the checkpoint of step `resume_step`: the metrics of the
    steps before it stay in metrics.csv, those after it are dropped."""

    def __init__(self, *args, resume_step: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.resume_step = resume_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir, resume_step=self.resume_step)
        return self._experiment


def make_logger(cfg: LogConfig, run_dir: Path, run_name: str, resume_step: int | None = None,
                job_type: str | None = None) -> Logger | None:  # fmt: skip
    """Build the logger for a run whose files live in ``run_dir`` (``resume_step``: the global step of the
    checkpoint it continues from in place; None for a new run; ``job_type``: W&B's, "stage1" or "prior", which
    tells the two stages' runs apart in one project)."""
    if resume_step is None:
        csv_logger = CSVLogger
    else:
        csv_logger = functools.partial(ResumedCSVLogger, resume_step=resume_step)
    if cfg.backend not in BACKENDS:
        raise ValueError(f"--log.backend must be one of {', '.join(BACKENDS)}, got {cfg.backend!r}")
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.backend == "none":
        return None
    if cfg.backend == "wandb":
        try:
            import wandb  # noqa: F401
        except ImportError:
            print(f"wandb is not installed (pip install wandb); logging to CSV in {run_dir} instead.", file=sys.stderr)
            return csv_logger(save_dir=str(run_dir), name="", version="")
        if wandb_offline_unless_logged_in():
            print(
                "W&B: no credentials found, logging offline. To upload later: "
                f"wandb sync {run_dir}/wandb/offline-run-*  (after `wandb login`)",
                file=sys.stderr,
            )
        # W&B's own variables win over the defaults (they were silently overridden): WANDB_PROJECT unless
        # --log.project is given, WANDB_NAME for the run's name (its folder keeps run_name)
        project = os.environ.get("WANDB_PROJECT") if cfg.project == LogConfig.project else None
        # A resume in place continues the run's W&B run (Lightning's resume="allow"), so a preempted or crashed
        # run is one curve on the dashboard; offline runs cannot be continued (each resume is a run of its own)
        online = os.environ.get("WANDB_MODE", "online") not in ("offline", "dryrun", "disabled")
        version = None
        if resume_step is not None and online and "WANDB_RUN_ID" not in os.environ:  # the user's id wins
            version = earlier_wandb_run(run_dir)
        logger = WandbLogger(project=project or cfg.project, name=os.environ.get("WANDB_NAME") or run_name,
                             save_dir=str(run_dir), job_type=os.environ.get("WANDB_JOB_TYPE") or job_type,
                             version=version)  # fmt: skip
        # Lightning passes anonymous=None to wandb.init, and wandb warns on every run that the setting "has no
        # effect" whatever its value; without the key wandb says nothing (a dict of wandb.init's arguments).
        getattr(logger, "_wandb_init", {}).pop("anonymous", None)
        return logger
    if cfg.backend == "tensorboard":
        import importlib.util

        if not any(importlib.util.find_spec(m) for m in ("tensorboard", "tensorboardX")):  # not a dependency
            raise UserError("--log.backend tensorboard needs the tensorboard package, which this environment lacks: "
                            "pip install tensorboard (or use --log.backend wandb, csv or none)")  # fmt: skip
        return TensorBoardLogger(save_dir=str(run_dir), name="", version="")
    return csv_logger(save_dir=str(run_dir), name="", version="")


def earlier_wandb_run(run_dir: Path) -> str | None:
    """The id of the newest W&B run that logged online into `run_dir` (its `wandb/run-<time>-<id>` folder; offline
    runs are `offline-run-...`), or None."""
    runs = sorted(p.name for p in (run_dir / "wandb").glob("run-*-*") if p.is_dir())
    return runs[-1].split("-", 2)[2] if runs else None  # run-<date_time>-<id>; an id of the user's may hold "-"


def finish_logger(logger: Logger | None, failed: bool = False, quiet: bool = False, exit_code: int | None = None,
                  preempting: bool = False) -> None:  # fmt: skip
    """End the W&B run a command started: otherwise the next fit in the same process logs into it. `quiet`: a
    run that failed before training, whose folder goes: W&B's lines about syncing it would come before the
    one-line error and name files that are about to be deleted. `exit_code`: the command's (128 + the signal's
    number for a run a signal stopped, W&B's convention; 1 for any other failure); `preempting`: a run stopped to
    be requeued, which W&B then shows as preempted rather than failed."""
    if isinstance(logger, WandbLogger) and "wandb" in sys.modules and sys.modules["wandb"] is not None:
        import wandb

        if wandb.run is not None:
            with contextlib.ExitStack() as silenced:
                if quiet:
                    devnull = silenced.enter_context(open(os.devnull, "w"))
                    silenced.enter_context(contextlib.redirect_stdout(devnull))
                    silenced.enter_context(contextlib.redirect_stderr(devnull))
                if preempting:
                    wandb.run.mark_preempting()
                wandb.finish(exit_code=exit_code if exit_code is not None else int(failed))


def metrics_step(trainer: Trainer) -> int:
    """The step Lightning logs a validation's `self.log` metrics at inside training: the optimizer steps taken
    before it, one less than `trainer.global_step` then. Images and histograms of that validation go at the same
    step, so a reconstruction lines up with its PSNR (they were one step after, and the step axis went back)."""
    return int(getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step))


def log_image(logger: Logger | None, key: str, image: np.ndarray, step: int, caption: str = "") -> None:
    """Log one uint8 image (H, W, C) to whichever backend is in use (CSV: a PNG under log_dir/images)."""
    if logger is None:
        return
    if isinstance(logger, WandbLogger):
        extra = {"caption": [caption]} if caption else {}  # WandbLogger rejects caption=None
        logger.log_image(key=key, images=[image], step=step, **extra)
    elif isinstance(logger, TensorBoardLogger):
        logger.experiment.add_image(key, image, global_step=step, dataformats="HWC")
    else:
        from PIL import Image

        if getattr(logger, "log_dir", None) is None:  # a logger of the user's own without a folder: no file
            return
        out = Path(logger.log_dir) / "images"
        out.mkdir(parents=True, exist_ok=True)
        img = image[..., 0] if image.shape[-1] == 1 else image
        Image.fromarray(img).save(out / f"{key.replace('/', '_')}_step{step:07d}.png")


WANDB_MAX_BINS = 512  # wandb.Histogram refuses more (a ValueError that ended a K=1024 run at its first validation)


def wandb_bins(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-code counts (K,) -> (bin counts, bin edges) with at most 512 bins: runs of ceil(K / 512) codes summed
    (K 1,024: pairs), edges at code numbers, so the totals and the axis stay the codes'."""
    width = -(-len(counts) // WANDB_MAX_BINS)
    padded = np.concatenate([counts, np.zeros(-len(counts) % width, counts.dtype)])
    bins = padded.reshape(-1, width).sum(1)
    return bins, np.minimum(np.arange(len(bins) + 1) * width, len(counts)).astype(np.float64)


def log_histogram(logger: Logger | None, key: str, counts: np.ndarray, step: int) -> None:
    """Log a histogram of per-bin counts (e.g. how often each code was used)."""
    if logger is None:
        return
    if isinstance(logger, WandbLogger):
        import wandb

        bins, edges = wandb_bins(counts)
        logger.experiment.log({key: wandb.Histogram(np_histogram=(bins, edges)), "trainer/global_step": step})
    elif isinstance(logger, TensorBoardLogger):
        values = np.repeat(np.arange(len(counts)), counts.astype(np.int64))
        if values.size:
            logger.experiment.add_histogram(key, values, global_step=step)
    else:
        if getattr(logger, "log_dir", None) is None:
            return
        out = Path(logger.log_dir) / "histograms"
        out.mkdir(parents=True, exist_ok=True)
        np.save(out / f"{key.replace('/', '_')}_step{step:07d}.npy", counts)


# -------------------------------------------------------------------------------- Lightning's noise
# Lightning's warnings that say nothing a vqgen user can act on (message pattern, category); see quiet_lightning.
LIGHTNING_NOISE: tuple[tuple[str, type[Warning]], ...] = (
    # its own use of a class torch 2.13 deprecates
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
    # validate/test from a training checkpoint: its callbacks' states (RngState, ModelCheckpoint) are not needed
    (r"Be aware that when using `ckpt_path`, callbacks used to create", Warning),
    # a fit from a --ckpt_path file is a new run folder with its own best.ckpt (common.launch.choose_run says so)
    (r"The dirpath has changed from .* therefore `best_model_score`", Warning),
    # a resume in place (--ckpt_path last, a restarted SLURM job) finds its own checkpoints there: that is the point
    (r"Checkpoint directory .* exists and is not empty", Warning),
    # every vqgen loader gathers whole batches from arrays in memory (0.09 ms a batch of 32 Fashion-MNIST
    # images on the 2-core CPU, 1.8 ms for 2,048, which --data.on_device avoids): workers would take cores
    # from training for nothing; Lightning suggests them on any machine with more than 2 cores
    (r"The '\w+_dataloader' does not have many workers", Warning),
    # logging counts global steps across epochs, so short epochs (data held on a GPU, small folders) still log
    (r"The number of training batches \(\d+\) is smaller than the logging interval", Warning),
    # only the summary's size estimate; bf16 training itself is fine
    (r"Precision [\w-]+ is not supported by the model summary", Warning),
)


# Lightning's info lines (logger name, phrases) that every run printed on stderr, before its own error too: a
# user error came as three lines where one says it all.
LIGHTNING_INFO_NOISE: tuple[tuple[str, tuple[str, ...]], ...] = (
    # which accelerators exist: --trainer.accelerator says what is used (and a GPU left unused is still warned of);
    # Lightning 2.6 also advertises its cloud logger and model registry on runs that use neither
    ("pytorch_lightning.utilities.rank_zero",
     ("GPU available:", "TPU available:", "HPU available:", "IPU available:", "litlogger", "litmodels")),
    # "Seed set to 0": the seed is in the config (and the run folder's config.yaml)
    ("lightning_fabric.utilities.seed", ("Seed set to",)),
    # its SIGTERM handler's note, before vqgen's own line on the signal (common.interrupt)
    ("pytorch_lightning.trainer.connectors.signal_connector", ("Received SIGTERM",)),
)  # fmt: skip


def _no_noise(record: logging.LogRecord) -> bool:
    """False for a record of LIGHTNING_INFO_NOISE: dropped."""
    message = record.getMessage()
    return not any(record.name == name and any(p in message for p in phrases) for name, phrases in LIGHTNING_INFO_NOISE)


PROJECT_DIRS = tuple(str(Path(__file__).resolve().parents[1] / d) + os.sep
                     for d in ("common", "stage1_vqvae", "stage2_prior", "tools"))  # fmt: skip


def own_warning_format(message, category, filename, lineno, line=None, _python=warnings.formatwarning) -> str:
    """This project's warnings as one line, `warning: <message>` (Python's format adds the source file, line number
    and category: `.../quantizer.py:167: UserWarning: restart_threshold 1 is ...`); others as Python shows them."""
    if str(filename).startswith(PROJECT_DIRS):
        return f"warning: {message}\n"
    return _python(message, category, filename, lineno, line)


def quiet_lightning() -> None:
    """Silence LIGHTNING_NOISE and LIGHTNING_INFO_NOISE for the rest of the process (training and extraction),
    and print this project's own warnings as one line."""
    warnings.formatwarning = own_warning_format
    for message, category in LIGHTNING_NOISE:
        warnings.filterwarnings("ignore", message, category)
    for name, _ in LIGHTNING_INFO_NOISE:
        logger = logging.getLogger(name)  # a logger's own filters see only the records logged to it by name
        if _no_noise not in logger.filters:
            logger.addFilter(_no_noise)


@contextlib.contextmanager
def lightning_info_hidden(*phrases: str) -> Iterator[None]:
    """Inside the block, drop Lightning's info lines that contain any of `phrases` (for a step whose lines
    would mislead: the test after fit says it is "Restoring states" though nothing resumes)."""
    lightning_info = logging.getLogger("pytorch_lightning.utilities.rank_zero")

    def keep(record: logging.LogRecord) -> bool:
        return not any(phrase in record.getMessage() for phrase in phrases)

    lightning_info.addFilter(keep)
    try:
        yield
    finally:
        lightning_info.removeFilter(keep)


def say_once(owner: Any, line: str) -> None:
    """Print `line` the first time `owner` (a data module) asks, on the global-zero rank only: what a run read,
    before its first step."""
    trainer = getattr(owner, "trainer", None)
    if not getattr(owner, "_said", False) and (trainer is None or trainer.is_global_zero):
        print(line, flush=True)
        owner._said = True
