"""A run folder over days: one process trains in it at a time, a resume leaves its config.yaml as the run was
started, a checkpoint of another network is one line (not a load_state_dict traceback), and a resume or test on
an image folder that changed since training says so and keeps saying so (an audit's findings)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import user_error, write_shapes, write_trainable_codes
from test_stage1 import fit_args

from common.run_lock import lock_run, release_run
from stage1_vqvae.train import main as train_stage1
from stage2_prior.train import main as train_stage2

ROOT = Path(__file__).resolve().parents[1]
HOLD = """import sys, time
sys.path.insert(0, {root!r})
from common.run_lock import lock_run
lock_run({folder!r}, "--log.name held")
print("held", flush=True)
time.sleep(120)
"""


def hold_lock(folder: Path) -> subprocess.Popen:
    """Another process that holds the run folder's lock (as a fit training there would) until killed."""
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", HOLD.format(root=str(ROOT), folder=str(folder))],
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_run_folder_another_process_trains_in_is_refused(shapes_folder, tmp_path, capsys):
    root = tmp_path / "runs"
    holder = hold_lock(root / "exp")  # a fit with --log.name exp started a moment earlier: its folder is empty
    try:
        err = user_error(train_stage1, fit_args(shapes_folder, root, 2, "--log.name", "exp"), capsys)
        assert f"--log.name exp: {(root / 'exp').resolve()} is being trained by another process (a fit started " \
            "before this one, or the same job submitted twice)" in err, err  # fmt: skip
        assert list((root / "exp").iterdir()) == []  # its folder left alone (and no lock file in it)
        (root / "exp" / "config.yaml").write_text("seed_everything: 0\n")  # written, no checkpoint yet
        err = user_error(train_stage1, fit_args(shapes_folder, root, 2, "--log.name", "exp", "--ckpt_path", "last"),
                         capsys)  # fmt: skip
        assert "is being trained by another process" in err and "delete" not in err, err  # not "stopped: delete"
        (root / "exp" / "config.yaml").unlink()
    finally:
        holder.kill()
        holder.wait()
    # the kernel drops a killed process's lock: the same command now trains there, and can resume in place
    train_stage1(fit_args(shapes_folder, root, 2, "--log.name", "exp"))
    assert (root / "exp" / "checkpoints" / "last.ckpt").is_file()
    holder = hold_lock(root / "exp")  # its folder holds a run now, still training: that is what is said
    try:
        err = user_error(train_stage1, fit_args(shapes_folder, root, 2, "--log.name", "exp"), capsys)
        assert "is being trained by another process" in err and "already holds a run" not in err, err
    finally:
        holder.kill()
        holder.wait()
    holder = hold_lock(root / "exp")  # a job submitted twice: the second resume of one run is refused
    try:
        err = user_error(train_stage1, fit_args(shapes_folder, root, 4, "--log.name", "exp", "--ckpt_path", "last"),
                         capsys)  # fmt: skip
        assert "--ckpt_path last:" in err and "is being trained by another process" in err, err
        assert torch.load(root / "exp/checkpoints/last.ckpt", weights_only=True)["global_step"] == 2
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_is_this_process_until_released(tmp_path):
    lock_run(tmp_path, "--log.name x")
    lock_run(tmp_path, "--log.name x")  # held already: no error in the same process
    proc = subprocess.run([sys.executable, "-c", HOLD.format(root=str(ROOT), folder=str(tmp_path))],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 1 and "is being trained by another process" in proc.stderr
    release_run(tmp_path)
    holder = hold_lock(tmp_path)  # released: another process takes it
    holder.kill()
    holder.wait()


def test_a_resume_keeps_the_runs_config_and_records_its_own(shapes_folder, tmp_path):
    root = tmp_path / "runs"
    train_stage1(fit_args(shapes_folder, root, 2))
    run = root / "version_0"
    first = (run / "config.yaml").read_text()
    train_stage1(fit_args(shapes_folder, root, 2, "--ckpt_path", "last"))  # the same command again (a requeue)
    assert sorted(p.name for p in run.glob("config*.yaml")) == ["config.yaml"]
    train_stage1(fit_args(shapes_folder, root, 4, "--ckpt_path", "last"))  # extended: rewrote config.yaml before
    assert (run / "config.yaml").read_text() == first
    resumed = yaml.safe_load((run / "config_resume_step2.yaml").read_text())
    assert resumed["trainer"]["max_steps"] == 4 and yaml.safe_load(first)["trainer"]["max_steps"] == 2
    train_stage1(fit_args(shapes_folder, root, 4, "--ckpt_path", "last"))  # that resume again: its config is there
    assert sorted(p.name for p in run.glob("config*.yaml")) == ["config.yaml", "config_resume_step2.yaml"]


def test_a_resume_reads_its_checkpoint_once(shapes_folder, tmp_path, monkeypatch):
    """The run's choice, the image folder's file list, the check that the network fits and Lightning's restore
    each loaded last.ckpt (4 reads of a file that may be GBs); now the first read serves them all."""
    root = tmp_path / "runs"
    train_stage1(fit_args(shapes_folder, root, 2))
    last = root / "version_0" / "checkpoints" / "last.ckpt"
    loads, load = [], torch.load

    def counted(f, *args, **kwargs):
        ckpt = load(f, *args, **kwargs)
        loads.append(ckpt.get("global_step"))
        return ckpt

    monkeypatch.setattr(torch, "load", counted)
    train_stage1(fit_args(shapes_folder, root, 4, "--ckpt_path", "last"))
    assert loads == [2]  # last.ckpt at step 2, read once
    monkeypatch.setattr(torch, "load", load)
    assert torch.load(last, weights_only=True)["global_step"] == 4  # went on from step 2 (resumes: test_runs.py)
    # a file: LightningCLI's own read of its hyperparameters (_parse_ckpt_path) goes through the kept one too
    loads.clear()
    monkeypatch.setattr(torch, "load", counted)
    train_stage1(fit_args(shapes_folder, root, 6, "--ckpt_path", str(last)))
    assert loads == [4]


@pytest.mark.parametrize("subcommand, extra, differ", [
    ("fit", ["--model.codebook_size", "64"], "codebook_size 32 (this config: 64)"),
    ("test", ["--model.width", "64"], "width 32 (this config: 64)"),
])  # fmt: skip
def test_a_checkpoint_of_another_network_is_one_line(subcommand, extra, differ, shapes_folder, tmp_path, capsys):
    root = tmp_path / "runs"
    train_stage1(fit_args(shapes_folder, root, 2))
    before = {p: p.read_bytes() for p in (root / "version_0").rglob("*") if p.is_file()}
    args = fit_args(shapes_folder, root, 4, "--ckpt_path", "last", *extra)
    args[0] = subcommand
    err = user_error(train_stage1, args, capsys)  # was a load_state_dict traceback, exit 1
    assert "holds another network than this config builds (" + differ in err, err
    assert "pass its run's config (config.yaml beside its checkpoints)" in err
    assert {p: p.read_bytes() for p in (root / "version_0").rglob("*") if p.is_file()} == before


def test_a_resume_or_test_on_a_changed_folder_says_so_and_keeps_saying_so(tmp_path, capsys):
    data, root = write_shapes(tmp_path / "shapes", n=48), tmp_path / "runs"
    train_stage1(fit_args(data, root, 2))
    capsys.readouterr()
    for i in range(0, 48, 3):  # a third of the images removed: every split is drawn anew
        next(data.rglob(f"{i:03d}.png")).unlink()
    warning = "is not the one the checkpoint's splits were drawn from"
    test_args = fit_args(data, root, 2, "--ckpt_path", "last")
    test_args[0] = "test"
    train_stage1(test_args)
    assert warning in capsys.readouterr().err
    train_stage1(fit_args(data, root, 4, "--ckpt_path", "last"))  # no word before, and it recorded the new list
    assert warning in capsys.readouterr().err
    saved = torch.load(root / "version_0/checkpoints/last.ckpt", weights_only=True)
    assert saved["global_step"] == 4
    assert saved["datamodule_hyper_parameters"]["folder_key"].startswith("48:")  # the splits first drawn
    shutil.copy(root / "version_0/checkpoints/last.ckpt", tmp_path / "copy.ckpt")
    test_args = fit_args(data, root, 2, "--ckpt_path", str(tmp_path / "copy.ckpt"))
    test_args[0] = "test"
    train_stage1(test_args)
    assert warning in capsys.readouterr().err  # still: its test split may hold images it trained on


def test_a_transformer_config_resuming_a_masked_priors_run_is_one_line(tmp_path, capsys):
    """configs/stage2/tiny.yaml fixes its root: a masked prior trained with --model.kind maskgit becomes its latest
    run, and the Transformer config's --ckpt_path last then resumed it (Missing/Unexpected keys, a traceback)."""
    codes, root = write_trainable_codes(tmp_path), tmp_path / "runs"
    args = ["fit", "--config", str(ROOT / "configs/stage2/tiny.yaml"), "--data.codes_dir", str(codes),
            "--trainer.default_root_dir", str(root), "--trainer.max_steps", "2", "--data.batch_size", "8",
            "--sample_every_n_epochs", "0"]  # fmt: skip
    train_stage2([*args, "--model.kind", "maskgit"])
    err = user_error(train_stage2, [*args, "--trainer.max_steps", "4", "--ckpt_path", "last"], capsys)
    assert "holds another network than this config builds (kind maskgit (this config: transformer)" in err, err


def test_a_full_disk_while_saving_keeps_the_last_checkpoint(shapes_folder, tmp_path, capsys, monkeypatch):
    """Lightning wrote a checkpoint in the system's temp folder and copied it over the old one when the run folder
    was on another file system: a disk that filled during the copy truncated the good last.ckpt (an audit, on a
    small tmpfs). Now it is written beside it and renamed; a full disk is one line, and last.ckpt is intact."""
    import contextlib
    import errno

    import common.run_callbacks

    root = tmp_path / "runs"
    train_stage1(fit_args(shapes_folder, root, 2))
    last = root / "version_0/checkpoints/last.ckpt"
    good = last.read_bytes()
    real = common.run_callbacks.atomic_file

    @contextlib.contextmanager
    def filling(path, **kwargs):
        with real(path, **kwargs) as f:

            class Full:
                def write(self, data):
                    f.write(bytes(data)[:1000])
                    raise OSError(errno.ENOSPC, "No space left on device")

            yield Full()

    monkeypatch.setattr(common.run_callbacks, "atomic_file", filling)
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:  # (a longer schedule: its note on the learning rate comes first)
        train_stage1(fit_args(shapes_folder, root, 4, "--ckpt_path", "last"))
    stderr = capsys.readouterr().err
    err = stderr.strip().splitlines()[-1]
    assert info.value.code == 2 and "Traceback" not in stderr, stderr
    assert err.startswith("train_stage1: error: cannot write the checkpoint ") and "No space left on device" in err
    assert "the checkpoints saved before it are intact: free some space, then go on with --ckpt_path last" in err
    assert last.read_bytes() == good
    assert sorted(p.name for p in last.parent.iterdir()) == ["best.ckpt", "last.ckpt"]  # no temporary file left


def test_a_new_run_folder_is_not_reported_as_used(shapes_folder, tmp_path, capsys):
    """A lock file in the run folder made a new run's CSV logger warn that the folder "exists and is not empty" and
    its files "will be deleted" (the re-audit): the folder itself is locked, and a new run says nothing of it."""
    train_stage1(fit_args(shapes_folder, tmp_path / "runs", 2))
    out = capsys.readouterr()
    assert "exists and is not empty" not in out.err + out.out


def test_a_run_choice_that_fails_leaves_no_lock_behind(shapes_folder, tmp_path, capsys):
    """A command that fails after its run folder was chosen and locked (here: the resume's network is not the
    config's) releases the lock, so another process, or the next command of this one (a notebook), takes it."""
    root = tmp_path / "runs"
    train_stage1(fit_args(shapes_folder, root, 2, "--log.name", "exp"))
    args = fit_args(shapes_folder, root, 4, "--log.name", "exp", "--ckpt_path", "last", "--model.codebook_size", "64")
    assert "holds another network" in user_error(train_stage1, args, capsys)
    holder = hold_lock(root / "exp")  # another process takes it: nothing here holds it any more
    holder.kill()
    holder.wait()


def test_the_dashboard_gets_the_whole_config_the_learning_rate_and_aligned_images(shapes_folder, tmp_path):
    """A W&B audit: the dashboard had only the model's and data's hyperparameters (no trainer, seed, precision),
    no learning rate, no speed (printed, not logged), and each validation's images one step after its scalars.
    A stand-in logger records what a dashboard gets; the CSV logger's files show the steps."""
    import csv
    import json

    root, record = tmp_path / "runs", tmp_path / "record.jsonl"
    train_stage1(fit_args(shapes_folder, root, 4, "--trainer.logger", "tests.ddp_probe.RecordingLogger",
                          "--trainer.logger.out", str(record)))  # fmt: skip
    sent = [json.loads(line) for line in record.read_text().splitlines()]
    configs = [r["hyperparams"]["config"] for r in sent if "config" in r.get("hyperparams", {})]
    assert len(configs) == 1 and configs[0]["trainer"]["max_steps"] == 4 and configs[0]["seed_everything"] == 0
    lrs = [r["metrics"] for r in sent if any(k.startswith("lr-AdamW") for k in r.get("metrics", {}))]
    assert len(lrs) == 4 and len({r["lr-AdamW/pg1"] for r in lrs}) > 1  # every step: warm-up and cosine visible
    speeds = [r["metrics"] for r in sent if "train/img_per_s" in r.get("metrics", {})]  # with the losses
    assert len(speeds) == 4 and all(r["train/img_per_s"] > 0 and "train/loss" in r for r in speeds), speeds

    root = tmp_path / "csv_runs"  # the CSV logger: images and histograms named by step, beside metrics.csv
    train_stage1(fit_args(shapes_folder, root, 4))
    run = root / "version_0"
    with open(run / "metrics.csv") as f:
        val_steps = sorted({int(r["step"]) for r in csv.DictReader(f) if r.get("val/psnr")})
    image_steps = sorted(int(p.stem.rsplit("_step", 1)[1]) for p in (run / "images").glob("val_originals*.png"))
    assert val_steps == image_steps == [1, 3], (val_steps, image_steps)


def test_sample_grids_come_at_every_nth_validation(tmp_path):
    """--sample_every_n_epochs counted epochs while the configs validate every few steps: grids came at every
    validation of some epochs and at none of the others (a W&B audit). Now every N-th validation, at the step of
    that validation's scalars."""
    codes, root = write_trainable_codes(tmp_path), tmp_path / "runs"
    train_stage2(["fit", "--config", str(ROOT / "configs/stage2/tiny.yaml"), "--data.codes_dir", str(codes),
                  "--trainer.default_root_dir", str(root), "--trainer.max_steps", "8", "--data.batch_size", "8",
                  "--trainer.val_check_interval", "2", "--sample_every_n_epochs", "2"])  # fmt: skip
    grids = sorted(int(p.stem.rsplit("_step", 1)[1]) for p in (root / "version_0/images").glob("samples_*.png"))
    assert grids == [3, 7], grids  # validations after steps 2, 4, 6, 8 are logged at 1, 3, 5, 7


def test_a_run_a_signal_stops_ends_on_the_dashboard_with_the_signals_exit_code(shapes_folder, tmp_path, capsys,
                                                                                  monkeypatch):  # fmt: skip
    """W&B's convention for a signal: exit code 128 + its number (a SIGTERM'd run was 1, "failed", like a crash)."""
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    finished = []
    real = wandb.finish
    monkeypatch.setattr(wandb, "finish", lambda exit_code=None, **k: (finished.append(exit_code), real(exit_code)))
    args = fit_args(shapes_folder, tmp_path / "runs", 6, "--log.backend", "wandb",
                    "--trainer.callbacks+=tests.ddp_probe.InterruptAt", "--trainer.callbacks.step", "2",
                    "--trainer.callbacks.signal_name", "SIGTERM")  # fmt: skip
    with pytest.raises(SystemExit) as info:
        train_stage1(args)
    assert info.value.code == 143 and finished == [143], (info.value.code, finished)
