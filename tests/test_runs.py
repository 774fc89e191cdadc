"""Run folders, resume and user errors of `train_stage1` / `train_stage2` (common/runs.py, common/launch.py):
one-line errors with exit code 2 (also for a checkpoint crafted to run code, which is never unpickled),
`--log.name` never overwriting a run, `latest` moving only to a run that has a checkpoint, one run folder
under torchrun, no duplicate metrics after a resume, and a resumed run equal to an uninterrupted one."""

from __future__ import annotations

import csv
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_same_last_checkpoint, user_error, write_trainable_codes
from test_stage1 import ROOT, fit_args, fit_in_subprocess, train_losses

from common.codes import CodesMeta, read_meta, sha256_file
from common.codes_writer import CodesWriter
from common.logging import LIGHTNING_NOISE
from stage1_vqvae.train import main as train_stage1
from stage2_prior.train import main as train_stage2

FAIL = "tests.ddp_probe.FailAt"
INTERRUPT = "tests.ddp_probe.InterruptAt"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """Each fit picks its own run folder, as a fresh process would."""
    for var in ("VQGEN_RUN_DIR", "LOCAL_RANK", "WORLD_SIZE", "RANK", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(var, raising=False)


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------- one-line user errors
class RunsCode:
    """Unpickling this runs a shell command: what a crafted checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("extra", [[], ["--weights_only", "false"]])
def test_crafted_checkpoint_is_never_unpickled(shapes_folder, tmp_path, capsys, extra):
    marker, evil = tmp_path / "pwned", tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "global_step": 0, "x": RunsCode(marker)}, evil)
    err = user_error(train_stage1, fit_args(shapes_folder, tmp_path / "runs", 2, "--ckpt_path", str(evil), *extra),
                     capsys)  # fmt: skip
    assert err.startswith(f"train_stage1: error: --ckpt_path {evil} holds a Python object"), err
    assert not marker.exists()
    assert not (tmp_path / "runs").exists()  # refused before a run folder was claimed


def test_missing_checkpoint_and_last_without_a_run(shapes_folder, tmp_path, capsys):
    root, missing = tmp_path / "runs", tmp_path / "some" / "missing.ckpt"
    err = user_error(train_stage1, fit_args(shapes_folder, root, 2, "--ckpt_path", str(missing)), capsys)
    assert f"--ckpt_path {missing}: no such file" in err
    err = user_error(train_stage1, fit_args(shapes_folder, root, 2, "--ckpt_path", "last"), capsys)
    assert f"--ckpt_path last: no checkpoint at {root / 'latest' / 'checkpoints' / 'last.ckpt'}" in err
    assert not root.exists()


def test_a_run_stopped_before_its_first_checkpoint_is_named_with_what_to_delete(shapes_folder, tmp_path, capsys):
    """A run killed (SIGKILL) before its first checkpoint leaves config.yaml and metrics: its name is refused, and
    both refusals say which folder to delete ("--ckpt_path last" used to advise training without it, which is the
    refusal of the name in use: a circle)."""
    root = tmp_path / "runs"
    run = root / "killed"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("seed_everything: 0\n")
    err = user_error(train_stage1, fit_args(shapes_folder, root, 2, "--log.name", "killed"), capsys)
    assert (f"--log.name killed: {run.resolve()} already holds a run; it holds no checkpoint to resume and no run "
            f"trains there now; delete {run.resolve()} to start over, or choose another --log.name") in err, err
    err = user_error(train_stage1, fit_args(shapes_folder, root, 2, "--log.name", "killed", "--ckpt_path", "last"),
                     capsys)  # fmt: skip
    assert "its run stopped before its first one: delete " in err and "then train without --ckpt_path" in err, err
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml"]  # nothing removed


def test_unreadable_image_in_the_folder(shapes_folder, tmp_path, capsys):
    data, root = tmp_path / "data", tmp_path / "runs"
    shutil.copytree(shapes_folder, data)
    (data / "squares" / "broken.png").write_bytes(b"not a png")
    err = user_error(train_stage1, fit_args(data, root / "new" / "stage1", 2), capsys)
    assert err.startswith("train_stage1: error: ") and "broken.png: cannot read image" in err
    assert not root.exists()  # a run that never started leaves no folder behind, nor the root folders it made
    (root / "kept").mkdir(parents=True)  # a root that was there stays, and so does what is in it
    user_error(train_stage1, fit_args(data, root, 2), capsys)
    assert [p.name for p in root.iterdir()] == ["kept"]


def test_bad_flag_is_one_line(shapes_folder, tmp_path, capsys):
    err = user_error(train_stage1, fit_args(shapes_folder, tmp_path / "runs", 2, "--trainer.max_stepz", "3"), capsys)
    assert err.startswith("train_stage1: error: ") and "--trainer.max_stepz" in err


def test_a_config_may_name_only_lightnings_and_our_classes(shapes_folder, tmp_path, capsys):
    """A class_path in a config file (or on the command line) outside Lightning's and vqgen's packages is refused
    before it is imported: `this` would print the Zen of Python at import, as any module's import-time code would
    run. Lightning's own callbacks still load."""
    evil = tmp_path / "evil.yaml"
    evil.write_text("trainer:\n  callbacks:\n    - class_path: this.Whatever\n")
    err = user_error(train_stage1, [*fit_args(shapes_folder, tmp_path / "runs", 2), "--config", str(evil)], capsys)
    assert "trainer.callbacks: class_path this.Whatever is refused: a config may name classes of pytorch_lightning" \
        in err and "export VQGEN_IMPORT_PATHS=PACKAGE" in err, err  # fmt: skip
    assert "Beautiful is better than ugly" not in capsys.readouterr().out and not (tmp_path / "runs").exists()
    train_stage1([*fit_args(shapes_folder, tmp_path / "ok", 2),
                  "--trainer.callbacks+=pytorch_lightning.callbacks.LearningRateMonitor"])  # fmt: skip
    assert (tmp_path / "ok/latest/checkpoints/last.ckpt").exists()


def test_a_checkpoint_of_another_image_size_is_refused(shapes_folder, tmp_path, capsys):
    """A convolutional stage 1's weights load at any size: resuming (or testing) a 16-px checkpoint with a 32-px
    config trained or scored the wrong thing without a word. Refused in one line, no run folder left."""
    train_stage1(fit_args(shapes_folder, tmp_path / "runs", 2))
    ckpt = str(tmp_path / "runs/latest/checkpoints/last.ckpt")
    for sub in ("fit", "test"):
        args = [sub, *fit_args(shapes_folder, tmp_path / "other", 4, "--ckpt_path", ckpt)[1:]]
        args[args.index("--data.image_size") + 1] = "32"
        err = user_error(train_stage1, args, capsys)
        assert f"--ckpt_path {ckpt} was trained with image_size 16 (this config: 32): a resume or a test needs" \
            in err, err  # fmt: skip
        assert not (tmp_path / "other").exists()


def test_a_default_root_dir_that_cannot_hold_runs_is_named(shapes_folder, tmp_path, capsys):
    (tmp_path / "keep.csv").write_text("a file\n")
    err = user_error(train_stage1, fit_args(shapes_folder, tmp_path / "keep.csv", 2), capsys)
    assert f"--trainer.default_root_dir {tmp_path / 'keep.csv'}: cannot make a run folder there" in err, err
    assert (tmp_path / "keep.csv").read_text() == "a file\n"


def test_a_wandb_run_that_fails_before_training_says_nothing_of_its_deleted_files(shapes_folder, tmp_path, capfd):
    """W&B's closing lines ("You can sync this run ... wandb sync runs/version_0/wandb/...", "Find logs at ...")
    came before the one-line error and named the run folder that is then deleted."""
    args = fit_args(shapes_folder, tmp_path / "runs", 2, "--log.backend", "wandb", "--data.val_size", "60")
    with pytest.raises(SystemExit):
        train_stage1(args)
    err = capfd.readouterr().err
    assert "leave none to train on" in err and "Find logs at" not in err and "wandb sync" not in err, err
    assert "Tracking run" not in err, err  # the data is read before Lightning starts the logger
    assert not (tmp_path / "runs").exists()


def test_tensorboard_backend_without_tensorboard_is_one_line(shapes_folder, tmp_path, capsys):
    """--log.backend tensorboard without the package (not a dependency) was a ModuleNotFoundError traceback."""
    import importlib.util

    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        pytest.skip("tensorboard is installed here")
    err = user_error(train_stage1, fit_args(shapes_folder, tmp_path / "runs", 2, "--log.backend", "tensorboard"),
                     capsys)  # fmt: skip
    assert "--log.backend tensorboard needs the tensorboard package" in err and "pip install tensorboard" in err
    assert not (tmp_path / "runs").exists()


def test_missing_jsonargparse_extras_are_one_line(shapes_folder, tmp_path, capsys, monkeypatch):
    """An environment without jsonargparse[signatures] (installed with --no-deps, say): Lightning raises its
    ModuleNotFoundError; the command says what is missing and how to install it, in one line, exit 2."""
    import pytorch_lightning.cli

    class Missing:  # Lightning's RequirementCache, as it reads when the extras are absent
        def __bool__(self) -> bool:
            return False

        def __str__(self) -> str:
            return "Requirement 'jsonargparse[signatures]>=4.27.7' not met. HINT: Try running `pip install -U ...`"

    monkeypatch.setattr(pytorch_lightning.cli, "_JSONARGPARSE_SIGNATURES_AVAILABLE", Missing())
    err = user_error(train_stage1, fit_args(shapes_folder, tmp_path / "runs", 2), capsys)
    assert "lacks (Requirement 'jsonargparse[signatures]>=4.27.7' not met" in err
    assert err.endswith("install it: pip install 'jsonargparse[signatures]>=4.27.7' (or `make setup`)")


def write_codes(out: Path, tmp_path: Path) -> Path:
    """A small, valid codes directory (8 codes, 2x2 grids, 2 classes)."""
    stage1 = tmp_path / "stage1.ckpt"
    stage1.write_bytes(b"stands in for the stage-1 checkpoint; only its hash is checked")
    meta = CodesMeta(codebook_size=8, grid_shape=(2, 2), num_classes=2, class_names=["a", "b"], image_size=8,
                     channels=1, stage1_ckpt=str(stage1), stage1_sha256=sha256_file(stage1))  # fmt: skip
    rng = np.random.default_rng(0)
    with CodesWriter(out, meta) as writer:
        for split, n in (("train", 16), ("val", 8), ("test", 8)):
            writer.add_split(split, n).write(0, rng.integers(0, 8, (n, 2, 2)), np.arange(n) % 2)
        writer.commit()
    return out


def _no_meta(d: Path) -> None:
    (d / "meta.json").unlink()


def _bad_json(d: Path) -> None:
    (d / "meta.json").write_text("{not json")


def _int32_codes(d: Path) -> None:
    np.save(d / "train" / "codes.npy", np.load(d / "train" / "codes.npy").astype(np.int32))


def _code_out_of_range(d: Path) -> None:
    np.save(d / "train" / "codes.npy", np.full((16, 2, 2), 8, np.uint16))


@pytest.mark.parametrize(
    "damage, message",
    [(_no_meta, "has no meta.json"), (_bad_json, "not valid JSON"), (_int32_codes, "dtype int32, expected uint16"),
     (_code_out_of_range, "code 8 out of range for codebook_size 8")],
)  # fmt: skip
def test_stage2_bad_codes_are_one_line(tmp_path, capsys, damage, message):
    codes, root = write_codes(tmp_path / "codes", tmp_path), tmp_path / "runs"
    damage(codes)
    args = ["fit", "--config", str(ROOT / "configs" / "stage2" / "tiny.yaml"), "--data.codes_dir", str(codes),
            "--data.batch_size", "4", "--trainer.default_root_dir", str(root)]  # fmt: skip
    err = user_error(train_stage2, args, capsys)
    assert err.startswith("train_stage2: error: ") and message in err, err
    assert not list(root.glob("version_*"))


# ------------------------------------------------------------------------------------- run names and latest
def test_a_run_name_in_use_is_refused_and_resumed_with_last(shapes_folder, tmp_path, capsys):
    root = tmp_path / "runs"
    train_stage1(fit_args(shapes_folder, root, 4, "--log.name", "exp"))
    run = root / "exp"
    before = files(run)
    err = user_error(train_stage1, fit_args(shapes_folder, root, 4, "--log.name", "exp"), capsys)
    assert f"--log.name exp: {run.resolve()} already holds a run; pass --ckpt_path last" in err
    assert "or choose another --log.name" in err
    assert files(run) == before  # config, hparams, checkpoints and metrics of the first run untouched
    train_stage1(fit_args(shapes_folder, root, 2))  # a newer run: latest -> version_0
    train_stage1(fit_args(shapes_folder, root, 6, "--log.name", "exp", "--ckpt_path", "last"))
    assert sorted(p.name for p in root.iterdir()) == ["exp", "latest", "version_0"]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 6 and sorted(train_losses(run)) == list(range(6))


def test_latest_moves_only_to_a_run_with_a_checkpoint(shapes_folder, tmp_path, capsys):
    root = tmp_path / "runs"
    train_stage1(fit_args(shapes_folder, root, 2))
    # before training, one line says what was read, so a wrong folder or labels show at once
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("data: ")]
    assert said == [f"data: image_folder {shapes_folder}: train 48 / val 8 / test 8 images, 16x16 grayscale, "
                    "2 classes (discs, squares)"]  # fmt: skip
    with pytest.raises(RuntimeError, match="injected failure"):  # a bug in training keeps its traceback
        train_stage1(fit_args(shapes_folder, root, 4, f"--trainer.callbacks+={FAIL}", "--trainer.callbacks.step=1"))
    assert (root / "version_1").is_dir()  # the failed run keeps its logs
    assert (root / "latest").resolve() == (root / "version_0").resolve()
    train_stage1(fit_args(shapes_folder, root, 4, "--ckpt_path", "last"))  # still finds the good run
    ckpt = torch.load(root / "version_0" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4


# ------------------------------------------------------------------------------------- resume
def test_resume_drops_the_metrics_logged_after_the_checkpoint(shapes_folder, tmp_path):
    root, every5 = tmp_path / "runs", ("--trainer.val_check_interval", "5")
    train_stage1(fit_args(shapes_folder, root, 5, *every5))
    run = root / "version_0"
    original = (run / "metrics.csv").read_text()
    # Killed at step 7 after its step-5 checkpoint, a run may have flushed rows for steps 6 and 7 (logged as
    # step 5 and 6: Lightning logs optimizer step s as s - 1) and a validation.
    header = original.splitlines()[0].split(",")
    with open(run / "metrics.csv", "a", newline="") as f:
        late = csv.DictWriter(f, fieldnames=header)
        late.writerows([{"epoch": 0, "step": 5, "train/loss": 99}, {"epoch": 1, "step": 6, "train/loss": 99},
                        {"epoch": 1, "step": 6, "val/loss": 99}])  # fmt: skip
    train_stage1(fit_args(shapes_folder, root, 10, *every5, "--ckpt_path", "last"))
    logged = rows(run)
    assert (run / "metrics.csv").read_text().startswith(original)  # the rows up to the checkpoint, as they were
    assert "99" not in {r.get("train/loss") for r in logged} | {r.get("val/loss") for r in logged}
    keys = [(r["step"], tuple(k for k, v in sorted(r.items()) if v and k not in ("epoch", "step"))) for r in logged]
    assert len(keys) == len(set(keys)), keys
    assert [int(r["step"]) for r in logged if r["train/loss"]] == list(range(10))
    assert [int(r["step"]) for r in logged if r["val/loss"]] == [4, 9]


@pytest.mark.parametrize("option", ["--trainer.overfit_batches=2", "--trainer.limit_train_batches=0.5"])
def test_trainer_options_that_change_the_training_loader(shapes_folder, tmp_path, option):
    """overfit_batches makes Lightning rebuild the training loader around a sequential sampler (no position to
    keep); limit_train_batches ends each epoch early. Both train and checkpoint as usual."""
    train_stage1(fit_args(shapes_folder, tmp_path / "runs", 6, option))
    ckpt = torch.load(tmp_path / "runs" / "latest" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 6


def test_a_crash_just_after_the_first_checkpoint_leaves_latest_on_the_run(shapes_folder, tmp_path):
    """The first checkpoint is written by a mid-epoch validation, after the batch-end hook; a crash inside
    the next training step must still find `latest` pointing at it, so `--ckpt_path last` resumes."""
    root, every3 = tmp_path / "runs", ("--trainer.val_check_interval", "3")
    with pytest.raises(RuntimeError, match="injected failure at step 3"):
        train_stage1(fit_args(shapes_folder, root, 12, *every3, f"--trainer.callbacks+={FAIL}",
                              "--trainer.callbacks.step=3", "--trainer.callbacks.in_backward=true"))  # fmt: skip
    assert (root / "latest").resolve() == (root / "version_0").resolve()
    train_stage1(fit_args(shapes_folder, root, 12, *every3, "--ckpt_path", "last"))
    ckpt = torch.load(root / "version_0" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 12


@pytest.mark.parametrize(
    "crash,workers,extra", [(6, 0, ()), (4, 0, ()), (4, 2, ()), (4, 0, ("--data.hflip", "true"))],
    ids=["epoch_boundary", "mid_epoch", "mid_epoch_workers", "mid_epoch_hflip"],
)  # fmt: skip
def test_resumed_run_equals_an_uninterrupted_one(shapes_folder, tmp_path, crash, workers, extra):
    """12 steps straight vs a 12-step run that crashes at step `crash`, resumed to 12 from its last
    checkpoint (6 batches per epoch, a checkpoint every 3 steps: step 6 ends an epoch, step 3 is in the
    middle of one, and the crash at 4 throws step 4 away). The same weights and losses,
    bit for bit: the checkpoint carries the RNG states that shuffle epoch 2 and, mid-epoch, the epoch's
    permutation and how many of its batches were trained (common.shuffle). With loader workers, each
    validation's iterator draws a worker seed from the global RNG in both runs alike."""
    every3 = ("--trainer.val_check_interval", "3", "--data.num_workers", str(workers), *extra)
    train_stage1(fit_args(shapes_folder, tmp_path / "straight", 12, *every3))
    with pytest.raises(RuntimeError, match=f"injected failure at step {crash}"):
        train_stage1(fit_args(shapes_folder, tmp_path / "resumed", 12, *every3, f"--trainer.callbacks+={FAIL}",
                              f"--trainer.callbacks.step={crash}"))  # fmt: skip
    train_stage1(fit_args(shapes_folder, tmp_path / "resumed", 12, *every3, "--ckpt_path", "last"))
    assert_same_last_checkpoint(tmp_path, 12)
    assert train_losses(tmp_path / "straight" / "version_0") == train_losses(tmp_path / "resumed" / "version_0")



def test_hflip_mirrors_half_of_each_training_batch_by_the_step(shapes_folder):
    """--data.hflip: each image of a training batch is itself or its mirror image, about half mirrored, chosen by
    the step (the same step: the same choice; another step: another); nothing changes outside training."""
    from types import SimpleNamespace

    from common.datamodule import ImageDataModule

    dm = ImageDataModule(dataset="image_folder", root=str(shapes_folder), image_size=16, hflip=True)
    images, labels = torch.rand(64, 1, 16, 16), torch.arange(64)
    dm.trainer = SimpleNamespace(training=True, global_step=3, global_rank=0)
    out, out_labels = dm.on_after_batch_transfer((images, labels), 0)
    mirrored = (out == images.flip(-1)).flatten(1).all(1)
    assert ((out == images).flatten(1).all(1) ^ mirrored).all() and torch.equal(out_labels, labels)
    assert 16 < int(mirrored.sum()) < 48
    assert torch.equal(dm.on_after_batch_transfer((images, labels), 0)[0], out)  # a resume redraws the same
    dm.trainer = SimpleNamespace(training=True, global_step=4, global_rank=0)
    assert not torch.equal(dm.on_after_batch_transfer((images, labels), 0)[0], out)
    dm.trainer = SimpleNamespace(training=False, global_step=4, global_rank=0)  # validation, test
    assert dm.on_after_batch_transfer((images, labels), 0)[0] is images


@pytest.mark.parametrize("press,every", [(2, 3), (3, 3), (8, 3), (5, 3), (5, 10)],
                         ids=["first_checkpoint_before_a_validation", "mid_epoch", "before_a_validation",
                              "an_epochs_last_batch", "an_epochs_last_batch_no_validation"])  # fmt: skip
def test_ctrl_c_saves_the_step_and_the_resumed_run_equals_an_uninterrupted_one(shapes_folder, tmp_path, capsys,
                                                                                 press, every):  # fmt: skip
    """Ctrl-C during step `press` + 1 (6 batches per epoch, a validation and checkpoint every `every` steps):
    that step is finished and saved as last.ckpt (an epoch's last step: the next one), the run exits with 130
    and says how to go on (no test or grid first), `latest` points at it (also when it is the run's first
    checkpoint), the SIGINT handler is the caller's again, and `--ckpt_path last` then ends with the weights
    and logged losses of a run never stopped, bit for bit. Pressed during step 3 or 9, the validation due
    after it runs before the run stops, as it would have."""
    every3 = ("--trainer.val_check_interval", str(every))
    train_stage1(fit_args(shapes_folder, tmp_path / "straight", 12, *every3))
    capsys.readouterr()
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as stop:
        train_stage1(fit_args(shapes_folder, tmp_path / "resumed", 12, *every3, f"--trainer.callbacks+={INTERRUPT}",
                              f"--trainer.callbacks.step={press}"))  # fmt: skip
    assert stop.value.code == 130 and signal.getsignal(signal.SIGINT) is handler
    run = tmp_path / "resumed" / "version_0"
    last = run / "checkpoints" / "last.ckpt"
    err = capsys.readouterr().err
    saved = press + 1 if (press + 1) % 6 else press + 2
    assert f"train_stage1: stopped by Ctrl-C at step {saved}, saved as {last}" in err, err
    assert "--ckpt_path last" in err and not (run / "reconstructions.png").exists()
    assert torch.load(last, weights_only=True)["global_step"] == saved
    assert (tmp_path / "resumed" / "latest").resolve() == run.resolve()
    train_stage1(fit_args(shapes_folder, tmp_path / "resumed", 12, *every3, "--ckpt_path", "last"))
    assert_same_last_checkpoint(tmp_path, 12)  # the final step, also when no validation falls on it
    assert train_losses(tmp_path / "straight" / "version_0") == train_losses(run)

# ------------------------------------------------------------------------------------- launchers
@pytest.mark.slow
def test_torchrun_ranks_share_one_run_folder(shapes_folder, tmp_path):
    """torchrun starts both ranks at once (no run folder in the environment): rank 0 chooses, broadcasts."""
    root, probe = tmp_path / "runs", tmp_path / "probe"
    args = fit_args(shapes_folder, root, 4, "--trainer.accelerator", "cpu", "--trainer.devices", "2",
                    "--trainer.strategy", "ddp", "--data.batch_size", "4", probe=probe)  # fmt: skip
    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    code, out = fit_in_subprocess(args, tmp_path, torchrun)
    assert code == 0, out[-20000:]
    assert sorted(p.name for p in root.iterdir()) == ["latest", "version_0"], out[-3000:]
    run = (root / "version_0").resolve()
    ranks = [torch.load(probe / f"end_rank{r}.pt") for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["global_step"] for r in ranks] == [4, 4]
    assert [Path(r["run_dir"]) for r in ranks] == [run, run]
    assert torch.equal(ranks[0]["embed"], ranks[1]["embed"])
    assert (run / "checkpoints" / "last.ckpt").is_file() and (root / "latest").resolve() == run


def test_torchrun_with_one_device_in_the_config_is_refused(shapes_folder, tmp_path):
    """torchrun's 2 processes with --trainer.devices 1 (the configs' value) each trained alone on all the data
    into one run folder and exited 0: now one line naming --trainer.devices, and no run folder."""
    root = tmp_path / "runs"
    args = fit_args(shapes_folder, root, 2, "--trainer.accelerator", "cpu", "--trainer.devices", "1")
    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    code, out = fit_in_subprocess(args, tmp_path, torchrun)
    assert code != 0 and "started 2 processes, but --trainer.devices 1 x --trainer.num_nodes 1 is 1" in out, out[-3000:]
    assert "pass --trainer.devices 2" in out and not root.exists()


def test_a_ddp_shard_smaller_than_the_batch_is_refused(shapes_folder, tmp_path):
    """48 training images over 2 processes are 24 a rank: a batch of 32 gave every rank no batches, and the run
    ended at step 0 with exit 0 (one process trains). Refused naming the batch and the devices, once, and the run
    folder is gone as after any error before training (it stayed: each rank checks its share only after the
    sanity check, and the corrected run's --log.name was then refused as in use)."""
    args = fit_args(shapes_folder, tmp_path / "runs", 4, "--trainer.accelerator", "cpu", "--trainer.devices", "2",
                    "--trainer.strategy", "ddp", "--data.batch_size", "32", "--log.name", "x")  # fmt: skip
    code, out = fit_in_subprocess(args, tmp_path)
    assert code == 2 and "24 images on each of 2 processes, fewer than batch_size=32" in out, out[-3000:]
    assert out.count("lower --data.batch_size or --trainer.devices") == 1, out[-3000:]
    assert not (tmp_path / "runs").exists()


def test_a_rank_whose_peer_ended_says_so_in_one_line(shapes_folder, tmp_path):
    """Rank 0 fails alone (here a crash; a full disk on its checkpoint likewise): the other rank's next collective
    failed with gloo's "Connection closed by peer" and a traceback that buried rank 0's own error. Now one line."""
    args = fit_args(shapes_folder, tmp_path / "runs", 8, "--trainer.accelerator", "cpu", "--trainer.devices", "2",
                    "--trainer.strategy", "ddp", "--data.batch_size", "4", f"--trainer.callbacks+={FAIL}",
                    "--trainer.callbacks.step=2", "--trainer.callbacks.rank=0")  # fmt: skip
    code, out = fit_in_subprocess(args, tmp_path)
    assert code != 0 and "injected failure at step 2" in out, out[-6000:]  # rank 0's, with its traceback (a bug)
    assert "train_stage1: rank 1 stopped: another process of this launch ended first (its error is above; gloo: " \
        "connection closed by peer)" in out, out[-6000:]  # fmt: skip
    assert "Connection closed by peer" not in out and "[rank1]:" not in out, out[-6000:]  # no traceback of rank 1


@pytest.mark.slow
def test_ddp_resumed_mid_epoch_equals_an_uninterrupted_run(shapes_folder, tmp_path):
    """Two DDP ranks, 6 batches of 4 per rank and epoch: 12 steps straight vs crashed at step 4 and resumed
    from the step-3 (mid-epoch) checkpoint. Each rank's shard comes back at the batch it had reached.
    Without loader workers (resuming with them is tested in one process above): a worker forked by a DDP rank
    on Python 3.11.7 hung in the fork now and then (README, *Loaders*), and with it this test, once in CI."""
    ddp = ("--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
           "--data.batch_size", "4", "--trainer.val_check_interval", "3")  # fmt: skip
    code, out = fit_in_subprocess(fit_args(shapes_folder, tmp_path / "straight", 12, *ddp), tmp_path)
    assert code == 0, out[-20000:]
    crash = (f"--trainer.callbacks+={FAIL}", "--trainer.callbacks.step=4")
    code, out = fit_in_subprocess(fit_args(shapes_folder, tmp_path / "resumed", 12, *ddp, *crash), tmp_path)
    assert code != 0 and "injected failure at step 4" in out, out[-6000:]
    resume = fit_args(shapes_folder, tmp_path / "resumed", 12, *ddp, "--ckpt_path", "last")
    code, out = fit_in_subprocess(resume, tmp_path)
    assert code == 0, out[-20000:]
    assert_same_last_checkpoint(tmp_path, 12)


def test_last_ckpt_is_the_newest_step_when_validation_gets_worse(tmp_path, capsys, caplog):
    """These codes overfit after the first validation (best.ckpt stays at step 3): last.ckpt must still be the
    newest step at every validation (Lightning 2.6's save_last wrote it only beside a new best) and at the end
    of training between validations; a run resumed from a checkpoint written before this (one ModelCheckpoint
    state in it) goes on from its step."""
    codes = write_trainable_codes(tmp_path)

    def fit(root: Path, steps: int, *extra: str) -> Path:
        train_stage2(["fit", "--config", str(ROOT / "configs" / "stage2" / "tiny.yaml"), "--data.codes_dir",
                      str(codes), "--data.batch_size", "8", "--trainer.max_steps", str(steps),
                      "--trainer.val_check_interval", "3", "--sample_every_n_epochs", "0",
                      "--trainer.default_root_dir", str(root), *extra])  # fmt: skip
        return root / "latest" / "checkpoints"

    caplog.set_level(logging.INFO)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ckpts = fit(tmp_path / "runs", 12)
    best, last = (torch.load(ckpts / name, weights_only=True) for name in ("best.ckpt", "last.ckpt"))
    assert best["global_step"] == 3 and last["global_step"] == 12
    # the test after fit names best.ckpt itself: "best" made Lightning warn that it takes the first of the two
    assert not [w for w in caught if "multiple `ModelCheckpoint`" in str(w.message)]
    # ... and says so itself, without Lightning's "Restoring states ...", which read like a resume
    test_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("test: "))
    assert re.search(r"test/bits_per_code=\S+ .*\(best\.ckpt: val/bits_per_code \d+\.\d{4}\)$", test_line), test_line
    assert not [r for r in caplog.records if "Restoring states" in r.getMessage()]
    caplog.clear()
    old = {k: v for k, v in last.items() if k != "callbacks"}  # as the single-ModelCheckpoint runs wrote it
    old["callbacks"] = {k: v for k, v in last["callbacks"].items() if "'monitor': None" not in k}
    torch.save(old, tmp_path / "old.ckpt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ckpts = fit(tmp_path / "resumed", 14, "--ckpt_path", str(tmp_path / "old.ckpt"))
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 14  # saved at the end, too
    # a new folder from a file: one line of ours, not Lightning's "The dirpath has changed ... won't be reloaded"
    assert not [w for w in caught if "dirpath has changed" in str(w.message)]
    new_run = (tmp_path / "resumed" / "latest").resolve()
    assert f"a new run in {new_run}, starting from the weights and step of --ckpt_path {tmp_path / 'old.ckpt'} " \
           "(--ckpt_path last goes on in the run's own folder instead)" in capsys.readouterr().err
    restored = [r.getMessage() for r in caplog.records if "Restor" in r.getMessage()]
    assert restored and all("old.ckpt" in m for m in restored)  # a resume still says where it started


def test_a_prior_does_not_go_on_from_codes_of_another_stage1(tmp_path, capsys):
    """A prior's --ckpt_path on codes another stage 1 made (the same grid and codebook: nothing failed) was taken
    silently, and the new last.ckpt was labelled with the new stage 1 though its weights had learnt the old
    codes; fit, test and validate now refuse it in one line, with no run folder left."""
    (tmp_path / "ours").mkdir(), (tmp_path / "theirs").mkdir()
    ours, theirs = write_trainable_codes(tmp_path / "ours"), write_trainable_codes(tmp_path / "theirs")
    sha = {name: read_meta(codes).stage1_sha256 for name, codes in (("ours", ours), ("theirs", theirs))}
    assert sha["ours"] != sha["theirs"]  # two tiny VQVAEs of other random weights

    def args(sub: str, codes: Path, root: Path, *extra: str) -> list[str]:
        return [sub, "--config", str(ROOT / "configs" / "stage2" / "tiny.yaml"), "--data.codes_dir", str(codes),
                "--data.batch_size", "8", "--trainer.max_steps", "3", "--sample_every_n_epochs", "0",
                "--log.backend", "none", "--trainer.default_root_dir", str(root), *extra]  # fmt: skip

    train_stage2(args("fit", ours, tmp_path / "runs"))
    ckpt = tmp_path / "runs" / "latest" / "checkpoints" / "last.ckpt"
    for sub in ("fit", "test"):
        err = user_error(train_stage2, args(sub, theirs, tmp_path / "other", "--ckpt_path", str(ckpt)), capsys)
        assert err == (f"train_stage2: error: --ckpt_path {ckpt} was trained with stage 1 SHA-256 {sha['ours'][:12]} "
                       f"(this config: SHA-256 {sha['theirs'][:12]}): a resume or a test needs the data it was "
                       "trained on; pass the codes it was trained on (--data.codes_dir; its run's config.yaml names "
                       "them), or train a new prior on these codes without --ckpt_path"), err
        assert not (tmp_path / "other").exists()


def test_a_resume_that_changes_the_schedule_says_so(tmp_path, capsys):
    """Extending a finished run with a larger --trainer.max_steps restarts its cosine from the new length (the
    rate went from its floor back to near the peak without a word); one line says so. A resume with the run's
    own settings (a crash at step 4 of 12) says nothing."""
    codes = write_trainable_codes(tmp_path)

    def fit(root: Path, steps: int, *extra: str) -> str:
        train_stage2(["fit", "--config", str(ROOT / "configs" / "stage2" / "tiny.yaml"), "--data.codes_dir",
                      str(codes), "--data.batch_size", "8", "--trainer.max_steps", str(steps),
                      "--trainer.val_check_interval", "3", "--sample_every_n_epochs", "0", "--log.backend", "none",
                      "--trainer.default_root_dir", str(root), *extra])  # fmt: skip
        return capsys.readouterr().err

    fit(tmp_path / "runs", 6)
    err = fit(tmp_path / "runs", 12, "--ckpt_path", "last")
    assert re.search(r"train_stage2: the learning rate at step 6 is \S+ under this command's schedule and was \S+ "
                     r"under the run's: the warm-up and cosine span --trainer.max_steps \(or max_time\), which differ "
                     r"from the run's", err), err
    with pytest.raises(RuntimeError, match="injected failure at step 4"):
        fit(tmp_path / "crashed", 12, "--trainer.callbacks+=tests.ddp_probe.FailAt", "--trainer.callbacks.step=4")
    err = fit(tmp_path / "crashed", 12, "--ckpt_path", "last")
    assert "the learning rate at step" not in err, err


def test_a_warm_up_longer_than_half_the_run_is_cut_with_a_note(tmp_path, capsys):
    """--model.warmup_steps beyond half the run's steps is cut to half (the cosine needs the rest): it was cut
    without a word; one line says so now, and a warm-up that fits says nothing."""
    codes = write_trainable_codes(tmp_path)

    def fit(root: Path, warmup: int) -> str:
        train_stage2(["fit", "--config", str(ROOT / "configs" / "stage2" / "tiny.yaml"), "--data.codes_dir",
                      str(codes), "--data.batch_size", "8", "--trainer.max_steps", "6", "--model.warmup_steps",
                      str(warmup), "--sample_every_n_epochs", "0", "--log.backend", "none",
                      "--trainer.default_root_dir", str(root)])  # fmt: skip
        return capsys.readouterr().err

    assert ("train_stage2: note: --model.warmup_steps 500 is more than half of this run's 6 steps; it warms up over "
            "3 (half the run) and decays over the rest") in fit(tmp_path / "long", 500)
    assert "warmup_steps" not in fit(tmp_path / "short", 3)


def test_a_run_that_diverges_ends_in_one_line_before_saving_nan_weights(shapes_folder, tmp_path, capsys):
    """--model.lr 1e30 trained NaN weights to the end, wrote its grid and exited 0 (stage 2 then crashed drawing
    from NaN probabilities); now the first non-finite loss ends it before its update, exit 2, and the checkpoint
    written before it is named and still finite."""
    codes = write_trainable_codes(tmp_path)
    root = tmp_path / "runs2"
    args = ["fit", "--config", str(ROOT / "configs" / "stage2" / "tiny.yaml"), "--data.codes_dir", str(codes),
            "--data.batch_size", "8", "--trainer.max_steps", "40", "--trainer.val_check_interval", "1",
            "--sample_every_n_epochs", "0", "--log.backend", "none", "--trainer.default_root_dir", str(root),
            "--model.lr", "1e30", "--model.warmup_steps", "0"]  # fmt: skip
    err = user_error(train_stage2, args, capsys)
    last = root / "version_0" / "checkpoints" / "last.ckpt"
    said = (r"train_stage2: error: training diverged at step (\d+) \(loss nan\): lower --model.lr \(the rate was \S+ "
            rf"there\) or check the data; the run's last checkpoint before it: {last}")
    assert re.fullmatch(said, err), err
    saved = torch.load(last, weights_only=True)["state_dict"]
    assert all(v.isfinite().all() for v in saved.values() if v.is_floating_point())
    err = user_error(train_stage1, fit_args(shapes_folder, tmp_path / "runs1", 20, "--model.lr", "1e30"), capsys)
    assert re.fullmatch(r"train_stage1: error: training diverged at step \d+ \(loss nan\): lower --model.lr .*", err)


def test_divergence_is_caught_on_a_gpu_by_reading_a_flag_every_n_steps_and_before_checkpoints(tmp_path):
    """The device path of StopOnDivergence (no GPU here: forced with each_step=False on CPU tensors): a NaN loss
    at step 3 is not read at once (no host wait each step) but at the next multiple of `every`, or before a
    validation (whose checkpoint would hold the weights) or the end; finite losses never raise."""
    from types import SimpleNamespace

    from common.cli import UserError
    from common.run_callbacks import StopOnDivergence

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    trainer = SimpleNamespace(global_step=0, optimizers=[opt], checkpoint_callback=SimpleNamespace(dirpath=tmp_path))
    for read in ("every", "validation", "end"):
        cb = StopOnDivergence(every=10, each_step=False)
        with pytest.raises(UserError, match=r"training diverged by step (10|5|6): lower --model.lr \(the rate was "
                                            r"0.5 there\) or check the data; nothing was saved"):  # fmt: skip
            for step in range(10 if read == "every" else 5):
                trainer.global_step = step
                cb.on_before_backward(trainer, None, torch.tensor(float("nan") if step == 3 else 1.0))
            assert read != "every", "read only at step 10"
            (cb.on_validation_start if read == "validation" else cb.on_train_end)(trainer, None)
    cb = StopOnDivergence(every=2, each_step=False)
    for step in range(6):
        trainer.global_step = step
        cb.on_before_backward(trainer, None, torch.tensor(1.0))
    cb.on_validation_start(trainer, None), cb.on_train_end(trainer, None)


def test_stage2_on_unlabelled_codes_ending_before_any_validation(tmp_path, capsys):
    """Labels -1 ("unlabelled") train the null class; a run that ends before its first validation (so with
    no best.ckpt) is tested with its final weights and still writes its sample grid."""
    codes = write_trainable_codes(tmp_path, labelled=False)
    root = tmp_path / "runs"
    train_stage2(["fit", "--config", str(ROOT / "configs" / "stage2" / "tiny.yaml"), "--data.codes_dir",
                  str(codes), "--data.batch_size", "4", "--trainer.max_steps", "3",
                  "--trainer.default_root_dir", str(root)])  # fmt: skip
    run = root / "latest"
    assert (run / "checkpoints" / "last.ckpt").is_file() and not (run / "checkpoints" / "best.ckpt").exists()
    assert (run / "samples.png").is_file()
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("codes: ")]
    assert said == [f"codes: {codes}: train 32 / val 16 / test 16 code maps of 2x2, codebook 8, 2 classes"]


def test_a_wandb_run_with_a_large_codebook_logs_and_prints_no_noise(shapes_folder, tmp_path, monkeypatch, capfd,
                                                                    caplog):  # fmt: skip
    """W&B (offline) through the real command with K 1,024: the code-usage histogram is binned to W&B's 512
    (it raised at the first validation), and neither Lightning's litlogger tip nor wandb's "anonymous
    setting" warning is printed."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    train_stage1(fit_args(shapes_folder, tmp_path / "runs", 2, "--log.backend", "wandb",
                          "--model.codebook_size", "1024"))  # fmt: skip
    printed = "".join(capfd.readouterr()) + "".join(r.getMessage() for r in caplog.records)  # wandb; Lightning
    assert "litlogger" not in printed and "anonymous setting" not in printed, printed[-3000:]
    assert list((tmp_path / "runs" / "version_0" / "wandb").glob("offline-run-*"))




def test_a_hung_loader_worker_ends_the_run_with_what_to_do(shapes_folder, tmp_path, monkeypatch):
    """A worker that never answers (as a fork deadlocked before Python 3.12 does) stops the run after the
    loaders' timeout, with an error that says what it means and how to go on, instead of waiting for good."""
    from torch.utils.data import get_worker_info

    import common.loaders

    real = common.loaders.UInt8ImageDataset.__getitems__

    def hangs_in_a_worker(self, indices):
        if get_worker_info() is not None:  # a forked worker inherits this patch; the main process never calls it
            time.sleep(3600)
        return real(self, indices)

    monkeypatch.setattr(common.loaders.UInt8ImageDataset, "__getitems__", hangs_in_a_worker)
    monkeypatch.setattr(common.loaders, "WORKER_TIMEOUT_S", 2.0)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"DataLoader timed out after 2.0 seconds: a loader worker sent nothing "
                                           r"for that long, so it hung.*--data.num_workers 0 and --ckpt_path last"):
        train_stage1(fit_args(shapes_folder, tmp_path / "runs", 4, "--data.num_workers", "1"))
    assert time.monotonic() - t0 < 60


def test_ctrl_c_from_a_terminal_with_loader_workers(shapes_folder, tmp_path):
    """A terminal's Ctrl-C reaches the whole process group: loader workers must not die of it (the next fetch
    crashed with a traceback and no `latest`), so the run still saves its step and exits with 130."""
    env = {k: v for k, v in os.environ.items() if k not in ("VQGEN_RUN_DIR", "LOCAL_RANK")}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    args = fit_args(shapes_folder, tmp_path / "runs", 100000, "--data.num_workers", "2")
    proc = subprocess.Popen([sys.executable, "-m", "stage1_vqvae.train", *args], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        lines = []
        for line in proc.stdout:  # wait for training to run (a progress line), then press Ctrl-C
            lines.append(line)
            if re.match(r"epoch \d+ step \d+/", line):
                os.killpg(proc.pid, signal.SIGINT)
                break
        out = "".join(lines) + proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130 and "Traceback" not in out, out[-3000:]
    assert re.search(r"train_stage1: stopped by Ctrl-C at step \d+, saved as ", out), out[-3000:]
    assert (tmp_path / "runs" / "latest" / "checkpoints" / "last.ckpt").is_file()

def test_lightning_advice_that_does_not_apply_is_not_printed(shapes_folder, tmp_path, monkeypatch, recwarn):
    """Lightning's worker advice (any machine with more than 2 cores, though vqgen's loaders only index arrays
    in memory), its log-interval warning (epochs shorter than --log.every_n_steps: logging counts global steps)
    and its bf16 model-summary note were printed by every such run. The same run without quiet_lightning shows
    all three, so the test sees them fire (the last three of LIGHTNING_NOISE)."""
    from pytorch_lightning.trainer.connectors import data_connector

    monkeypatch.setattr(data_connector, "suggested_max_num_workers", lambda num_devices: 7)  # an 8-core machine
    extra = ("--trainer.precision", "bf16-mixed", "--trainer.enable_model_summary", "true",
             "--log.every_n_steps", "100")  # fmt: skip

    def noise(root: Path) -> set[str]:
        recwarn.clear()
        train_stage1(fit_args(shapes_folder, root, 2, *extra))
        return {p for p, _ in LIGHTNING_NOISE[-3:] if any(re.search(p, str(w.message)) for w in recwarn.list)}

    with monkeypatch.context() as m:
        m.setattr("common.run_entry.quiet_lightning", lambda: None)
        assert noise(tmp_path / "loud") == {p for p, _ in LIGHTNING_NOISE[-3:]}
    assert noise(tmp_path / "quiet") == set()

def test_trainer_settings_the_machine_cannot_run_are_one_line(shapes_folder, tmp_path, capsys):
    """A GPU config on a CPU machine (here: Apple's MPS, which no Linux machine has) was a Lightning traceback."""
    root = tmp_path / "runs"
    err = user_error(train_stage1, fit_args(shapes_folder, root, 2, "--trainer.accelerator", "mps"), capsys)
    assert err.startswith("train_stage1: error: ") and "MPSAccelerator" in err and "--trainer.accelerator" in err
    assert len(err.strip().splitlines()) == 1 and not root.exists()
    # Lightning's TypeError for a device count a CPU cannot take ("all devices" is a GPU idiom) was a traceback
    err = user_error(train_stage1, fit_args(shapes_folder, root, 2, "--trainer.accelerator", "cpu",
                                            "--trainer.devices", "-1"), capsys)  # fmt: skip
    assert err.startswith("train_stage1: error: `devices` selected with `CPUAccelerator` should be an int > 0. "
                          "(check --trainer.accelerator, devices, strategy and precision"), err
    assert len(err.strip().splitlines()) == 1 and not root.exists()


def test_test_and_validate_evaluate_a_checkpoint_and_write_nothing(shapes_folder, tmp_path, capsys):
    """`train_stage1 test|validate --ckpt_path last|best|FILE`: stage 1 has test metrics (test/psnr ...); the
    run folder's files are untouched and nothing is added to the root (no lightning_logs/, no config.yaml);
    without --ckpt_path (untrained weights) it is a one-line error."""
    root = tmp_path / "runs"
    train_stage1(fit_args(shapes_folder, root, 2))
    before = sorted((p.relative_to(root), p.stat().st_mtime_ns) for p in root.rglob("*"))
    for sub, ckpt in (("test", "last"), ("validate", "best")):
        train_stage1([sub, *fit_args(shapes_folder, root, 2)[1:], "--ckpt_path", ckpt])
        assert f"{'test' if sub == 'test' else 'val'}/psnr" in capsys.readouterr().out
    assert sorted((p.relative_to(root), p.stat().st_mtime_ns) for p in root.rglob("*")) == before
    err = user_error(train_stage1, ["test", *fit_args(shapes_folder, root, 2)[1:]], capsys)
    assert "test needs --ckpt_path" in err and "untrained weights" in err
    err = user_error(train_stage1, ["predict", *fit_args(shapes_folder, root, 2)[1:]], capsys)  # was a TypeError
    assert "invalid choice: 'predict' (choose from 'fit', 'validate', 'test')" in err
