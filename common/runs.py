"""Shared LightningCLI pieces: run folders, the default logger, checkpoints, exact resume, progress output,
and user errors as one line.

Every training entry point (`train_stage1`, `train_stage2`) is a thin `main()` over
:func:`common.run_entry.train_main`, which runs :class:`VQGenCLI`:

* each `fit` gets its own folder ``<trainer.default_root_dir>/<name>`` (``version_N`` unless
  ``--log.name`` is given; see :mod:`common.launch`) holding ``config.yaml``, ``checkpoints/{best,last}.ckpt``
  and the logs; ``<root>/latest`` moves to it once it has written a checkpoint, so a run that fails early
  never hides the last good one;
* ``--ckpt_path last`` resumes the newest run (or ``--log.name NAME``) in place: optimizer, step, EMA
  codebook and the global RNG states are in the checkpoint; the metrics logged after it are dropped; a resume
  with other settings records them in ``config_resume_step<N>.yaml`` (config.yaml stays the run's); one process
  trains in a run folder at a time (:mod:`common.run_lock`); checkpoints are written atomically;
* the logger comes from ``--log.backend`` (W&B offline by default, see :mod:`common.logging`);
* a progress bar on a terminal, one readable line every ``--log.every_n_steps`` steps otherwise;
* a user error (a bad flag, a missing or unusable file, data that cannot be read) is one line
  ``<prog>: error: <message>`` and exit code 2, as in :mod:`common.cli`.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch.distributed as dist
from lightning_fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from pytorch_lightning import Trainer
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar, TQDMProgressBar
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.utilities.exceptions import MisconfigurationException

from common.checkpoint import keep_loaded, read_checkpoint
from common.cli import UserError, out_of_memory
from common.init_weights import check_init_weights, load_initial_weights
from common.interrupt import AT_ONCE, Interrupted, SignalGuard, StopOnInterrupt, Stopped, signal_words
from common.io import no_space
from common.launch import (
    LIGHTNING_CKPT_NAMES,
    RUN_ENV,
    Run,
    check_launcher_devices,
    choose_run,
    config_fingerprint,
    evaluation_checkpoint,
    join_run,
    lightning_child,
    machine_error,
    on_rank_zero,
    write_slurm_record,
)
from common.loaders import WORKER_TIMEOUT_MESSAGE, worker_timeout_hint
from common.logging import LogConfig, finish_logger, make_logger
from common.precision import announce, resolve_cpu_bf16
from common.progress import LineProgressBar, Throughput
from common.resume_checks import check_checkpoint_fits, checkpoint_model_config, folder_of_checkpoint
from common.run_callbacks import (
    NewestCheckpoint,
    RngState,
    RunConfig,
    RunWatch,
    ScheduleCheck,
    StopOnDivergence,
    use_atomic_io,
)  # fmt: skip
from common.run_entry import OneLineParser
from common.run_lock import release_run

MAX_SEED = 2**32 - 1  # what seed_everything takes (numpy's seeds)

class VQGenCLI(LightningCLI):
    """LightningCLI with vqgen's run-folder, logger, checkpoint, resume and progress conventions."""

    checkpoint_kind: str | None = None  # "stage1" or "prior": what a --ckpt_path must hold

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("save_config_callback", RunConfig)  # a resume leaves the run's config.yaml as it was
        kwargs.setdefault("parser_class", OneLineParser)
        self.run: Run | None = None
        self.run_dir: Path | None = None
        self._watch: RunWatch | None = None
        self._prog = kwargs.get("parser_kwargs", {}).get("prog", "train")
        self._rank0 = True
        self._settings = ""  # the fit's config fingerprint (config_fingerprint)
        self._guard = SignalGuard()  # until the training loop takes the signals over (common.interrupt)
        try:
            with self._guard, keep_loaded():  # a --ckpt_path is loaded once, for every check and Lightning's restore
                super().__init__(*args, **kwargs)  # parses, instantiates and runs the subcommand
        except (ValueError, OSError, MisconfigurationException, TypeError) as e:
            # Before training these come from the config, the data, the machine or the file system (a
            # constructor's argument check, a GPU config on a CPU machine, an unreadable file); after it starts
            # they are bugs and keep their traceback. A TypeError is ours only for Lightning's device count.
            if isinstance(e, OSError) and no_space(e):  # a log or histogram file, during training too
                raise UserError(f"cannot write {e.filename or 'a file of the run'} ({e.strerror}); free some space, "
                                "then go on with --ckpt_path last") from None  # fmt: skip
            if isinstance(e, UserError) or (self._watch is not None and self._watch.started):
                raise
            flags, note = "--trainer.accelerator, devices, strategy and precision", "; the *_gpu.yaml configs need one"
            if (machine := machine_error(e, flags, note)) is not None:
                raise machine from e
            if isinstance(e, TypeError):
                raise
            raise UserError(str(e)) from e
        except RuntimeError as e:
            if (what := out_of_memory(e)) is not None:  # a batch too large for the machine: one line, exit 2
                raise UserError(self._out_of_memory_message(what)) from None
            if not str(e).startswith(WORKER_TIMEOUT_MESSAGE):
                raise
            raise RuntimeError(worker_timeout_hint(e)) from e
        finally:  # after every after_<subcommand> hook, also of subclasses
            failed = sys.exc_info()[0] is not None
            trainer = getattr(self, "trainer", None)
            unstarted = failed and not (self._watch is not None and self._watch.started)
            stop = sys.exc_info()[1]  # a signal's stop: its exit code on the dashboard, and a requeue as preempted
            signalled = isinstance(stop, (Interrupted, Stopped))
            finish_logger(getattr(trainer, "logger", None), failed=failed, quiet=unstarted,
                          exit_code=stop.exit_code if signalled else None,
                          preempting=isinstance(stop, Interrupted) and stop.requeued)  # fmt: skip
            if failed and self._discard_unstarted_run() and isinstance(stop, Stopped) and stop.when == AT_ONCE:
                # a second Ctrl-C in the sanity check: "last.ckpt holds the last one saved" named a removed folder
                stop.args = (f"stopped by {signal_words(stop.signum)} before training began: nothing was saved, and "
                             f"the new run folder {self.run.dir} was removed",)  # fmt: skip
            release_run()  # the run folder's lock (common.run_lock), held since it was chosen (or on the way)
            os.environ.pop(RUN_ENV, None)  # a later run in the same process picks its own folder

    def _out_of_memory_message(self, what: str) -> str:
        """What ran out, the batch size to lower (in fit, with the accumulation that keeps the optimiser's batch)
        and where the checkpoints saved so far are, if there are any."""
        sub = getattr(self, "subcommand", None)
        data = self.config[sub].get("data") if sub and getattr(self, "config", None) else None
        size = data.get("batch_size") if data is not None else None
        message = f"{what}; pass a smaller --data.batch_size" + (f" (now {size})" if size else "")
        if sub == "fit":
            message += " and, to keep the batch the learning rate was set for, --trainer.accumulate_grad_batches"
        saved = self.run_dir / "checkpoints" if self.run_dir is not None else None
        if saved is not None and any(saved.glob("*.ckpt")):
            message += f"; the checkpoints saved so far are in {saved}"
        return message

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """fit, validate, test: `predict` has no meaning here (codes come from extract_codes, images from sample)."""
        return {k: v for k, v in LightningCLI.subcommands().items() if k != "predict"}

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_class_arguments(LogConfig, "log")
        parser.add_argument("--init_weights", type=str | None, default=None,
                            help="fit: start a new run from this checkpoint's weights (fine-tuning on other data, "
                                 "adding the adversarial loss), with a new optimiser, schedule and step 0; "
                                 "--ckpt_path resumes a run instead")  # fmt: skip
        parser.add_argument("--cpu_bf16", type=bool, default=False,
                            help="train in bf16-mixed instead of a 32-bit --trainer.precision when training on a CPU "
                                 "with native bf16 instructions (AVX512-BF16, AMX); elsewhere no change")  # fmt: skip

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        # Right after parsing LightningCLI reads a --ckpt_path file's hyperparameters into the config, and
        # fit resumes from it: check it first, so that a missing file, the other stage's checkpoint or a
        # pickle that is more than tensors (it could run code) is a one-line error. "last" is ours (below).
        sub = self.config.get("subcommand")
        seed = self.config[sub].get("seed_everything") if sub else None
        if not isinstance(seed, bool) and seed is not None and not 0 <= seed <= MAX_SEED:  # numpy's "-1 is not in
            # bounds, numpy accepts from 0 to 4294967295" named no flag
            raise UserError(f"--seed_everything must be an integer in 0..{MAX_SEED} (or true for a random seed), "
                            f"got {seed}")  # fmt: skip
        ckpt = self.config[sub].get("ckpt_path") if sub else None
        if ckpt is not None and ckpt not in LIGHTNING_CKPT_NAMES:
            read_checkpoint(ckpt, "--ckpt_path", want=self.checkpoint_kind)
        if (init := self.config[sub].get("init_weights") if sub else None) is not None:  # network: before_fit
            check_init_weights(init, sub, ckpt, self.checkpoint_kind)

    def _parse_ckpt_path(self) -> None:  # LightningCLI's (private) hook, reading the file through read_checkpoint
        sub = self.config.get("subcommand")
        if sub and (merge := checkpoint_model_config(sub, self.config[sub].get("ckpt_path"), self.checkpoint_kind)):
            self.config = self.parser.parse_object(merge, self.config)

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand]
        ckpt = cfg.get("ckpt_path")
        root = Path(cfg["trainer"].get("default_root_dir") or "runs")
        name = cfg["log"]["name"]
        if self.subcommand != "fit":
            cfg["ckpt_path"] = evaluation_checkpoint(self.subcommand, ckpt, root, name, self.checkpoint_kind)
            folder_of_checkpoint(cfg, self.checkpoint_kind)
            return
        self._rank0 = not lightning_child()
        check_launcher_devices(cfg["trainer"])
        self._settings = settings = config_fingerprint(cfg)

        def choose() -> Run:
            return choose_run(root, name, ckpt, self.checkpoint_kind, settings)

        if not self._rank0:  # started by Lightning's launcher: join the folder rank 0 chose
            run = join_run(ckpt)
        elif (shared := on_rank_zero(choose)) is not None:
            run, self._rank0 = shared  # torchrun, srun, ...: rank 0 chose for all
        else:
            run = choose()
        cfg["ckpt_path"] = run.ckpt_path
        folder_of_checkpoint(cfg, self.checkpoint_kind)
        os.environ[RUN_ENV] = str(run.dir)
        if (precision := resolve_cpu_bf16(cfg.get("cpu_bf16", False), cfg["trainer"])) is not None:
            cfg["trainer"]["precision"] = precision  # config.yaml records what the run trained in
            if self._rank0:
                announce(precision)
        self.run, self.run_dir, self._root = run, run.dir, root

    def _discard_unstarted_run(self) -> bool:
        """A new run that failed before training (a config or data error) leaves no folder behind: neither its
        own nor a --trainer.default_root_dir (and parents) it created, unless something else is in them now. Before
        its first training batch: under several processes each rank checks its share of the data only then, after
        the sanity check (the folder stayed, and its --log.name was refused on the corrected run)."""
        run = self.run
        if (run is not None and run.created and self._rank0 and not (self._watch and self._watch.trained)
                and not any((run.dir / "checkpoints").glob("*.ckpt"))):  # fmt: skip (a checkpoint is kept)
            if not dist.is_initialized() or dist.get_rank() == 0:
                shutil.rmtree(run.dir, ignore_errors=True)
                for folder in run.parents_created:
                    try:
                        folder.rmdir()  # only when empty
                    except OSError:
                        break
                return True
        return False

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        if self.run_dir is None:  # validate/test: no run folder, and nothing written unless asked for
            trainer_cfg = self._get(self.config_init, "trainer", default={})
            if trainer_cfg.get("logger") is None:  # Lightning's default would write lightning_logs/ into the root
                kwargs.setdefault("logger", False)
            kwargs.setdefault("enable_checkpointing", False)  # nothing trains
            self.save_config_callback = None  # it would (over)write config.yaml in the root: a fit's run has one
            return use_atomic_io(super().instantiate_trainer(**kwargs))
        log = self._get(self.config_init, "log")
        model = self._get(self.config_init, "model")
        trainer_cfg = self._get(self.config_init, "trainer", default={})
        callbacks = list(trainer_cfg.get("callbacks") or [])
        monitor, mode = getattr(model, "monitor", ("val/loss", "min"))
        run_dir, settings = self.run_dir, self._settings
        self._watch = RunWatch(self._root, run_dir, on_start=lambda: write_slurm_record(run_dir, settings))
        ckpts = self.run_dir / "checkpoints"
        callbacks += [self._watch, RngState(), StopOnInterrupt(self._prog, ckpts / "last.ckpt", self._guard),
                      ScheduleCheck(self._prog), StopOnDivergence()]
        callbacks += [  # the first ModelCheckpoint is trainer.checkpoint_callback (best_model_path)
            ModelCheckpoint(dirpath=ckpts, filename="best", monitor=monitor, mode=mode, enable_version_counter=False),
            NewestCheckpoint(ckpts),
        ]
        if not any(isinstance(c, ProgressBar) for c in callbacks):
            tty = sys.stderr.isatty()
            callbacks.append(TQDMProgressBar() if tty else LineProgressBar(log.every_n_steps))
        # --trainer.logger of the user's own (MLflow, ...) or false is kept (ours replaced it); else --log.backend's
        given = trainer_cfg.get("logger")
        logger = given if given not in (None, True) else make_logger(log, self.run_dir, self.run_dir.name,
                                                                    self.run.resume_step, self.checkpoint_kind)
        kwargs["logger"] = logger or False
        if logger and not any(isinstance(c, LearningRateMonitor) for c in callbacks):
            callbacks += [LearningRateMonitor(logging_interval="step"), Throughput()]  # the schedule (warm-up,
            # a cosine over steps or max_time; a resume may change it) and the speed on the dashboard
        if self.save_config_callback is RunConfig:
            self.save_config_kwargs = {**self.save_config_kwargs, "resume_step": self.run.resume_step}
        kwargs.setdefault("log_every_n_steps", log.every_n_steps)
        kwargs.setdefault("default_root_dir", str(self.run_dir))
        if SLURMEnvironment.detect() and not TorchElasticEnvironment.detect() and not trainer_cfg.get("plugins"):
            # the environment Lightning would choose, without its handler of the warning signal (ours saves the
            # step and requeues; Lightning's saved mid-step into a folder no restart read) nor its SIGTERM bypass
            kwargs.setdefault("plugins", [SLURMEnvironment(auto_requeue=False)])
        return use_atomic_io(super().instantiate_trainer(callbacks=callbacks, **kwargs))

    # Model hyperparameters the data links in (stage 1: its image size and channels): the weights of a
    # convolutional net load at any size, so a --ckpt_path of another size would resume or be scored silently.
    data_linked: tuple[str, ...] = ()
    data_advice = "pass its run's config (config.yaml beside its checkpoints) or the same --data options"

    def linked_values(self, hparams: dict) -> dict[str, Any]:
        """What the data links into a model's hyperparameters, comparable (lists as tuples)."""
        return {k: tuple(v) if isinstance(v, list) else v for k, v in hparams.items() if k in self.data_linked}

    def _check_checkpoint_fits(self) -> None:
        """A --ckpt_path (resume, test, validate) trained on other data or with another network: one line naming the
        differences, before anything is written (a network that did not fit was a load_state_dict traceback, after
        the run's config.yaml had been rewritten)."""
        ckpt = self.config[self.subcommand].get("ckpt_path")
        if not ckpt or not Path(ckpt).is_file():
            return
        check_checkpoint_fits(ckpt, self.checkpoint_kind, self.model, self.linked_values, self.data_advice)

    def before_fit(self) -> None:
        self._check_checkpoint_fits()
        if (init := self.config[self.subcommand].get("init_weights")) is not None:
            resumed = self.config[self.subcommand].get("ckpt_path")  # a resume (a requeued job's too) restores all
            note = (f"--init_weights {init} not used: the run resumes from {resumed}" if resumed
                    else load_initial_weights(self.model, init, self.checkpoint_kind))  # fmt: skip
            if self._rank0:
                print(f"{self._prog}: {note}", file=sys.stderr, flush=True)
        if self.trainer.world_size == 1:  # read the data now: Lightning starts the logger (W&B's lines, its
            self.datamodule.prepare_data()  # files in the run folder) before it sets the data up, so an unreadable
            self.datamodule.setup("fit")  # folder came after them (once per process: the splits are kept)
        if self.run is not None and self.run.note and self._rank0:  # after the checks: a refused run is one line
            print(f"{self._prog}: {self.run.note}", file=sys.stderr, flush=True)

    def before_test(self) -> None:
        self._check_checkpoint_fits()

    def before_validate(self) -> None:
        self._check_checkpoint_fits()

    def after_fit(self) -> None:
        if self.run_dir is not None and self.trainer.is_global_zero:
            print(f"run folder: {self.run_dir}  (checkpoints: {self.run_dir / 'checkpoints'})", flush=True)
