"""Preemption and time limits (common/interrupt.py, common/launch.py): SIGTERM saves the step as Ctrl-C does;
inside a SLURM batch job the warning signal (SIGUSR1) saves it and requeues the job, and the job, started
again with the same command, continues its own run folder (not another fit of the same job) to the weights of
a run never stopped; under DDP a signal to one rank stops every rank at the same step."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from conftest import assert_same_last_checkpoint
from test_stage1 import fit_args, fit_in_subprocess, train_losses

from common.launch import SLURM_RECORD, requeue_slurm_job, slurm_job
from stage1_vqvae.train import main as train_stage1

INTERRUPT = "tests.ddp_probe.InterruptAt"
EVERY3 = ("--trainer.val_check_interval", "3")
SLURM_ENV = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
             "SLURM_NODEID": "0", "SLURM_JOB_NAME": "vqgen", "SLURM_NODELIST": "localhost"}  # fmt: skip


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """Each fit picks its own run folder, as a fresh process would; no SLURM job unless a test makes one."""
    for var in ("VQGEN_RUN_DIR", "LOCAL_RANK", "WORLD_SIZE", "RANK", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    for var in [v for v in os.environ if v.startswith("SLURM_")]:
        monkeypatch.delenv(var)


def fake_scontrol(folder: Path, monkeypatch, script: str) -> Path:
    """An `scontrol` first on PATH running `script`; returns the file each call's arguments go to."""
    folder.mkdir(exist_ok=True)
    calls = folder / "calls"
    (folder / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n{script}\n')
    (folder / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    return calls


def interrupt(step: int, signal_name: str, *extra: str) -> tuple[str, ...]:
    return (f"--trainer.callbacks+={INTERRUPT}", f"--trainer.callbacks.step={step}",
            f"--trainer.callbacks.signal_name={signal_name}", *extra)  # fmt: skip


def test_sigterm_saves_the_step_and_the_resumed_run_equals_an_uninterrupted_one(shapes_folder, tmp_path, capsys):
    """A scheduler's SIGTERM during step 5 (6 batches per epoch): step 5 is saved as last.ckpt, the run exits
    with 143 (128 + SIGTERM) and says how to go on, the handler is the caller's again, and `--ckpt_path last`
    ends with the weights and logged losses of a run never stopped. Lightning's own SIGTERM handling stopped at
    once and kept only the step-3 checkpoint."""
    train_stage1(fit_args(shapes_folder, tmp_path / "straight", 12, *EVERY3))
    capsys.readouterr()
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stop:
        train_stage1(fit_args(shapes_folder, tmp_path / "resumed", 12, *EVERY3, *interrupt(4, "SIGTERM")))
    assert stop.value.code == 143 and signal.getsignal(signal.SIGTERM) is handler
    run = tmp_path / "resumed" / "version_0"
    last = run / "checkpoints" / "last.ckpt"
    err = capsys.readouterr().err
    assert (f"train_stage1: stopped by SIGTERM at step 5, saved as {last}; to go on from there, run the same "
            "command with --ckpt_path last") in err, err  # fmt: skip
    assert torch.load(last, weights_only=True)["global_step"] == 5 and not (run / SLURM_RECORD).exists()
    train_stage1(fit_args(shapes_folder, tmp_path / "resumed", 12, *EVERY3, "--ckpt_path", "last"))
    assert_same_last_checkpoint(tmp_path, 12)
    assert train_losses(tmp_path / "straight" / "version_0") == train_losses(run)


def test_a_slurm_job_requeued_by_its_warning_signal_continues_its_own_run(shapes_folder, tmp_path, capsys,
                                                                            monkeypatch):  # fmt: skip
    """`#SBATCH --signal=USR1@120`: SIGUSR1 during step 5 saves step 5, `scontrol requeue 4242` runs once and
    the run exits with 138 saying the job is requeued. Another fit of the same job (another seed: a sweep) then
    takes version_1 and `latest`. Started again (SLURM_RESTART_COUNT=1), the same command, without
    --ckpt_path, continues version_0 from step 5, says so, and ends with the weights and losses of a run never
    stopped; no third folder. The job's other fit, run again, finds its own finished run and ends."""
    for var, value in SLURM_ENV.items():
        monkeypatch.setenv(var, value)
    calls = fake_scontrol(tmp_path / "bin", monkeypatch, "exit 0")
    train_stage1(fit_args(shapes_folder, tmp_path / "straight", 12, *EVERY3))
    root = tmp_path / "resumed"
    command = fit_args(shapes_folder, root, 12, *EVERY3, *interrupt(4, "SIGUSR1"),
                       f"--trainer.callbacks.once_file={tmp_path / 'signalled'}")  # fmt: skip
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        train_stage1(command)
    run = root / "version_0"
    last = run / "checkpoints" / "last.ckpt"
    err = capsys.readouterr().err
    assert stop.value.code == 138 and calls.read_text() == "requeue 4242\n"
    assert (f"train_stage1: stopped by SLURM's warning signal (SIGUSR1) at step 5, saved as {last}; SLURM job "
            "4242 is requeued: started again, the same command goes on from there") in err, err  # fmt: skip
    train_stage1(fit_args(shapes_folder, root, 4, "--seed_everything", "1"))  # the job's next fit
    assert (root / "latest").resolve() == (root / "version_1").resolve()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    capsys.readouterr()
    train_stage1(command)
    err = capsys.readouterr().err
    assert (f"train_stage1: SLURM job 4242 started again (restart 1): continuing {run.resolve()} from its "
            "last.ckpt (step 5)") in err, err  # fmt: skip
    assert sorted(p.name for p in root.iterdir()) == ["latest", "version_0", "version_1"]
    assert_same_last_checkpoint(tmp_path, 12)
    assert train_losses(tmp_path / "straight" / "version_0") == train_losses(run)
    assert calls.read_text() == "requeue 4242\n"
    train_stage1(fit_args(shapes_folder, root, 4, "--seed_everything", "1"))  # the finished fit: ends at once
    assert f"continuing {(root / 'version_1').resolve()} from its last.ckpt (step 4)" in capsys.readouterr().err
    assert sorted(p.name for p in root.iterdir()) == ["latest", "version_0", "version_1"]


@pytest.mark.parametrize("signal_name,times,when,code,said", [
    ("SIGTERM", 2, "batch", 143, "stopped by SIGTERM at step 5, saved as"),  # torchrun and SLURM send another
    ("SIGINT", 2, "batch", 130, "stopped by Ctrl-C at once (the step under way is lost; last.ckpt holds the last"),
    ("SIGTERM", 1, "sanity", 143, "stopped by SIGTERM at step 1, saved as"),
    # a second Ctrl-C in the sanity check: nothing trained, the new folder goes, and the line no longer names a
    # last.ckpt in it
    ("SIGINT", 2, "sanity", 130, "stopped by Ctrl-C before training began: nothing was saved, and the new run "
                                 "folder"),
])  # fmt: skip
def test_a_second_signal_and_one_in_the_sanity_check(shapes_folder, tmp_path, capsys, signal_name, times, when, code,
                                                      said):  # fmt: skip
    """A second SIGTERM changes nothing (Lightning's handler came back after the first and ended the run with
    exit code 0, or under DDP in a gloo abort); a second Ctrl-C stops at once with one line (last.ckpt stays the
    step-3 validation's); a SIGTERM in the sanity check saves the first step (it exited 0 with nothing saved)."""
    with pytest.raises(SystemExit) as stop:
        train_stage1(fit_args(shapes_folder, tmp_path, 12, *EVERY3, *interrupt(4, signal_name),
                              f"--trainer.callbacks.times={times}", f"--trainer.callbacks.when={when}"))  # fmt: skip
    err = capsys.readouterr().err
    assert stop.value.code == code and f"train_stage1: {said}" in err and "Traceback" not in err, err
    last = tmp_path / "version_0" / "checkpoints" / "last.ckpt"
    if when == "sanity" and signal_name == "SIGINT":
        assert not (tmp_path / "version_0").exists()
        return
    assert torch.load(last, weights_only=True)["global_step"] == {"SIGINT": 3, "SIGTERM": 5 if when == "batch" else 1}[
        signal_name]


@pytest.mark.parametrize("signal_name,slurm", [("SIGTERM", False), ("SIGINT", False), ("SIGUSR1", True)])
def test_a_signal_while_the_data_loads_is_one_line_and_leaves_nothing(shapes_folder, tmp_path, capsys, monkeypatch,
                                                                       signal_name, slurm):  # fmt: skip
    """Before training (the data being read): SIGTERM killed the process without a word and left an empty run
    folder, Ctrl-C printed a traceback, SLURM's warning signal killed it without the requeue it asks for. Now
    one line, 128 + the signal's number, no run folder; the warning signal requeues the job."""
    from common.datamodule import ImageDataModule

    if slurm:
        for var, value in SLURM_ENV.items():
            monkeypatch.setenv(var, value)
    calls = fake_scontrol(tmp_path / "bin", monkeypatch, "exit 0")
    setup = ImageDataModule.setup

    def signalled_setup(self, stage=None):
        os.kill(os.getpid(), signal.Signals[signal_name])
        return setup(self, stage)

    monkeypatch.setattr(ImageDataModule, "setup", signalled_setup)
    with pytest.raises(SystemExit) as stop:
        train_stage1(fit_args(shapes_folder, tmp_path / "runs", 12))
    err = capsys.readouterr().err.strip()
    words = {"SIGTERM": "SIGTERM", "SIGINT": "Ctrl-C", "SIGUSR1": "SLURM's warning signal (SIGUSR1)"}[signal_name]
    requeued = "; SLURM job 4242 is requeued" if slurm else ""
    assert err == f"train_stage1: stopped by {words} before training began{requeued}", err
    assert stop.value.code == 128 + signal.Signals[signal_name] and not (tmp_path / "runs").exists()
    assert calls.exists() == slurm


def test_a_restarted_slurm_job_whose_run_saved_nothing_starts_it_over_in_its_folder(shapes_folder, tmp_path,
                                                                                     capsys, monkeypatch):  # fmt: skip
    """`--log.name cifar`, stopped at once (a second Ctrl-C; SIGKILL alike) before its first checkpoint: the
    folder holds the job's record and logs, no last.ckpt. The job started again was refused ("cifar already
    holds a run"); now it empties the folder it made, trains there from step 0 and ends as a run never
    stopped."""
    for var, value in SLURM_ENV.items():
        monkeypatch.setenv(var, value)
    train_stage1(fit_args(shapes_folder, tmp_path / "straight", 12, *EVERY3))
    root = tmp_path / "resumed"
    once = f"--trainer.callbacks.once_file={tmp_path / 'signalled'}"
    command = fit_args(shapes_folder, root, 12, *EVERY3, "--log.name", "cifar", *interrupt(1, "SIGINT"),
                       "--trainer.callbacks.times=2", once)  # fmt: skip
    with pytest.raises(SystemExit) as stop:
        train_stage1(command)
    run = root / "cifar"
    assert stop.value.code == 130 and (run / SLURM_RECORD).is_file() and not (run / "checkpoints").exists()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    capsys.readouterr()
    train_stage1(command)
    err = capsys.readouterr().err
    assert f"SLURM job 4242 started again (restart 1): {run} has no checkpoint; starting it over there" in err, err
    a, b = (torch.load(d / "checkpoints" / "last.ckpt", weights_only=True)
            for d in (tmp_path / "straight" / "version_0", run))  # fmt: skip
    assert a["global_step"] == b["global_step"] == 12
    assert all(torch.equal(v, b["state_dict"][k]) for k, v in a["state_dict"].items())


def test_requeue_failures_and_which_jobs_count(tmp_path, monkeypatch):
    """scontrol refusing or missing is a reason in one line (the run then says to pass --ckpt_path last); an
    array task is JOB_TASK; an interactive allocation (job name bash) is no batch job to requeue."""
    calls = fake_scontrol(tmp_path / "bin", monkeypatch, 'echo "slurm_requeue error: Requested operation is '
                                                         'presently disabled" >&2; exit 1')  # fmt: skip
    assert requeue_slurm_job("7") == "slurm_requeue error: Requested operation is presently disabled"
    assert calls.read_text() == "requeue 7\n"
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert "No such file or directory" in requeue_slurm_job("7")
    assert slurm_job() is None
    monkeypatch.setenv("SLURM_JOB_ID", "12")
    assert slurm_job() == "12"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "10")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert slurm_job() == "10_3"
    monkeypatch.setenv("SLURM_JOB_NAME", "bash")
    assert slurm_job() is None


@pytest.mark.slow
def test_ddp_a_signal_to_one_rank_stops_both_at_the_same_step(shapes_folder, tmp_path):
    """Two DDP ranks (6 batches of 4 per rank and epoch); SIGTERM to rank 1 only, during step 5: both ranks
    save step 5 and stop (a rank that went on alone would hang in its next all-reduce), one line says so, and
    the resumed run ends with the weights of a run never stopped. Lightning's handling stopped both at once
    and kept only the step-3 checkpoint."""
    ddp = ("--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
           "--data.batch_size", "4", *EVERY3)  # fmt: skip
    code, out = fit_in_subprocess(fit_args(shapes_folder, tmp_path / "straight", 12, *ddp), tmp_path)
    assert code == 0, out[-20000:]
    rank1 = interrupt(4, "SIGTERM", "--trainer.callbacks.rank=1")
    args = fit_args(shapes_folder, tmp_path / "resumed", 12, *ddp, *rank1)
    code, out = fit_in_subprocess(args, tmp_path)
    last = tmp_path / "resumed" / "version_0" / "checkpoints" / "last.ckpt"
    assert code == 143 and out.count("stopped by SIGTERM at step 5") == 1, out[-6000:]
    assert torch.load(last, weights_only=True)["global_step"] == 5
    code, out = fit_in_subprocess(fit_args(shapes_folder, tmp_path / "resumed", 12, *ddp, "--ckpt_path", "last"),
                                  tmp_path)  # fmt: skip
    assert code == 0, out[-20000:]
    assert_same_last_checkpoint(tmp_path, 12)
