"""Shared LightningCLI pieces: one run folder per run, the default logger, checkpoints and progress output.

Every training entry point (`train_stage1`, `train_stage2`) is a thin `main()` over :class:`VQGenCLI`:

* each `fit` gets its own folder ``<trainer.default_root_dir>/<name>`` (``version_N`` unless
  ``--log.name`` is given) holding ``config.yaml``, ``checkpoints/{best,last}.ckpt`` and the logs,
  and ``<root>/latest`` points at it, so a second run in the same directory never collides;
* ``--ckpt_path last`` resumes the newest run in place (optimizer, step, EMA codebook: all in the ckpt);
* the logger comes from ``--log.backend`` (W&B offline by default, see :mod:`common.logging`);
* a progress bar on a terminal, one readable line every ``--log.every_n_steps`` steps otherwise.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from pytorch_lightning import LightningModule, Trainer
from pytorch_lightning.callbacks import ModelCheckpoint, ProgressBar, TQDMProgressBar
from pytorch_lightning.cli import LightningCLI

from common.logging import LogConfig, finish_logger, make_logger

RUN_ENV = "VQGEN_RUN_DIR"  # lets DDP child processes (re-launched scripts) join rank 0's run folder


class LineProgressBar(ProgressBar):
    """Off a terminal (CI, nohup, Slurm logs) a bar is noise: print one line every N steps instead."""

    def __init__(self, every_n_steps: int = 50) -> None:
        super().__init__()
        self.every_n_steps = max(1, every_n_steps)
        self._enabled = True
        self._t0 = time.perf_counter()
        self._seen = 0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._t0, self._seen = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._seen += len(batch[0]) * trainer.world_size
        step = trainer.global_step
        if not (self._enabled and trainer.is_global_zero and step % self.every_n_steps == 0):
            return
        rate = self._seen / max(time.perf_counter() - self._t0, 1e-9)
        metrics = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k != "v_num"}
        parts = " ".join(f"{k}={_fmt(v)}" for k, v in sorted(metrics.items()) if k.startswith("train"))
        total = trainer.max_steps if trainer.max_steps > 0 else "?"
        unit = getattr(pl_module, "throughput_unit", "img")  # the prior counts code maps
        print(f"epoch {trainer.current_epoch} step {step}/{total} {rate:.0f} {unit}/s {parts}", flush=True)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not (self._enabled and trainer.is_global_zero) or trainer.sanity_checking:
            return
        metrics = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("val")}
        parts = " ".join(f"{k}={_fmt(v)}" for k, v in sorted(metrics.items()))
        print(f"epoch {trainer.current_epoch} step {trainer.global_step} {parts}", flush=True)


def _fmt(v: Any) -> str:
    try:
        return f"{float(v):.4g}"
    except (TypeError, ValueError):
        return str(v)


def next_version(root: Path) -> str:
    taken = [int(m.group(1)) for p in root.glob("version_*") if (m := re.fullmatch(r"version_(\d+)", p.name))]
    return f"version_{max(taken, default=-1) + 1}"


def point_latest(root: Path, run_dir: Path) -> None:
    """Atomically make <root>/latest a relative symlink to run_dir."""
    tmp = root / f".latest.{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(run_dir.name)
    os.replace(tmp, root / "latest")


class VQGenCLI(LightningCLI):
    """LightningCLI with vqgen's run-folder, logger, checkpoint and progress conventions."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        try:
            super().__init__(*args, **kwargs)  # parses, instantiates and runs the subcommand
        finally:  # after every after_<subcommand> hook, also of subclasses
            trainer = getattr(self, "trainer", None)
            finish_logger(getattr(trainer, "logger", None), failed=sys.exc_info()[0] is not None)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_class_arguments(LogConfig, "log")

    def before_instantiate_classes(self) -> None:
        self.run_dir: Path | None = None
        self._resume = False
        sub = self.subcommand
        if sub != "fit":
            return
        cfg = self.config[sub]
        root = Path(cfg["trainer"].get("default_root_dir") or "runs")
        child = os.environ.get("LOCAL_RANK", "0") != "0" and os.environ.get(RUN_ENV)
        self._child = bool(child)
        if child:  # a DDP child process: join the folder rank 0 chose
            run_dir = Path(os.environ[RUN_ENV])
        elif cfg.get("ckpt_path") == "last":
            latest = root / "latest"
            last = latest / "checkpoints" / "last.ckpt"
            if not last.exists():
                raise SystemExit(
                    f"--ckpt_path last: no checkpoint at {last}. Train first, or pass --ckpt_path PATH/TO.ckpt."
                )
            run_dir = latest.resolve()
            cfg["ckpt_path"] = str(last)
            self._resume = True
        else:
            run_dir = root / (cfg["log"]["name"] or next_version(root))
        run_dir.mkdir(parents=True, exist_ok=True)
        os.environ[RUN_ENV] = str(run_dir.resolve())
        self.run_dir, self._root = run_dir, root

    def before_fit(self) -> None:
        # Once everything is built (a config error must not hide the last good run from `--ckpt_path last`)
        # but before training, so that a killed run can be resumed with `last`.
        if self.run_dir is not None and not self._child:
            point_latest(self._root, self.run_dir)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        if self.run_dir is None:  # validate/test/predict: no run folder, no logger by default
            return super().instantiate_trainer(**kwargs)
        log = self._get(self.config_init, "log")
        model = self._get(self.config_init, "model")
        trainer_cfg = self._get(self.config_init, "trainer", default={})
        callbacks = list(trainer_cfg.get("callbacks") or [])
        monitor, mode = getattr(model, "monitor", ("val/loss", "min"))
        callbacks.append(
            ModelCheckpoint(
                dirpath=self.run_dir / "checkpoints",
                filename="best",
                monitor=monitor,
                mode=mode,
                save_last=True,
                enable_version_counter=False,
            )
        )
        if not any(isinstance(c, ProgressBar) for c in callbacks):
            tty = sys.stderr.isatty()
            callbacks.append(TQDMProgressBar() if tty else LineProgressBar(log.every_n_steps))
        kwargs.setdefault("logger", make_logger(log, self.run_dir, self.run_dir.name, self._resume) or False)
        kwargs.setdefault("log_every_n_steps", log.every_n_steps)
        kwargs.setdefault("default_root_dir", str(self.run_dir))
        return super().instantiate_trainer(callbacks=callbacks, **kwargs)

    def after_fit(self) -> None:
        os.environ.pop(RUN_ENV, None)  # a later run in the same process picks its own folder
        if self.run_dir is not None and self.trainer.is_global_zero:
            print(f"run folder: {self.run_dir}  (checkpoints: {self.run_dir / 'checkpoints'})", flush=True)
