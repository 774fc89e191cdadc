"""The shared optimiser schedule: warm-up, cosine over steps, and cosine over a wall-clock budget."""

import math
import time

import pytest
import torch
from pytorch_lightning.callbacks import Timer

from common.optim import adamw_warmup_cosine, time_budget_progress


def lrs(steps: int, total: float, progress=None, final: float = 0.0) -> list[float]:
    net = torch.nn.Linear(2, 2)
    sched = adamw_warmup_cosine(net, 1.0, 0.0, 2, total, final_fraction=final, time_progress=progress)
    sched = sched["lr_scheduler"]["scheduler"]
    out = []
    for _ in range(steps):
        out.append(sched.get_last_lr()[0])
        sched.optimizer.step()
        sched.step()
    return out


def test_step_schedule_warms_up_then_follows_the_cosine_to_the_final_fraction():
    got = lrs(12, 12, final=0.05)
    assert got[:2] == pytest.approx([0.5, 1.0])
    want = [0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 10)) for s in range(2, 12)]
    assert got[2:] == pytest.approx(want)


def test_time_budget_takes_over_when_it_runs_out_first():
    used = {"t": 0.0}
    got = lrs(4, 1000, progress=lambda: used["t"])
    assert got[2] == pytest.approx(1.0)  # step 2 of 1000, no time used: the top of the cosine
    used["t"] = 0.5
    net = torch.nn.Linear(2, 2)
    sched = adamw_warmup_cosine(net, 1.0, 0.0, 2, 1000, time_progress=lambda: used["t"])["lr_scheduler"]["scheduler"]
    for _ in range(3):
        sched.optimizer.step()
        sched.step()
    assert sched.get_last_lr()[0] == pytest.approx(0.5, abs=1e-3)  # half the time used: half-way down
    used["t"] = 1.0
    sched.optimizer.step()
    sched.step()
    assert sched.get_last_lr()[0] == pytest.approx(0.0, abs=1e-9)  # budget spent: the final learning rate


def test_steps_still_end_the_schedule_when_time_is_left():
    got = lrs(12, 12, progress=lambda: 0.0)
    assert got == pytest.approx(lrs(12, 12))


def test_infinite_step_estimate_with_a_time_budget_is_accepted():
    got = lrs(5, float("inf"), progress=lambda: 0.25)
    assert got[2:] == pytest.approx([0.5 * (1 + math.cos(math.pi * 0.25))] * 3)


def test_progress_reads_lightnings_timer_and_is_absent_without_one():
    class FakeTrainer:
        callbacks = []

    assert time_budget_progress(FakeTrainer()) is None
    timer = Timer(duration={"seconds": 100})
    FakeTrainer.callbacks = [Timer(), timer]  # a Timer without a duration is no budget
    progress = time_budget_progress(FakeTrainer())
    assert progress is not None and progress() == 0.0  # not started
    timer._start_time["train"] = time.monotonic() - 25.0
    assert progress() == pytest.approx(0.25, abs=0.01)
    timer._start_time["train"] = time.monotonic() - 250.0
    assert progress() == 1.0


def test_a_stage1_run_cut_by_max_time_ends_its_cosine():
    """Through a real Trainer: max_time stops a run with a huge max_steps, and the learning rate has come
    down the cosine to ~0 by then (step-based alone it would still sit at the top)."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    from stage1_vqvae.vqvae import VQVAE

    torch.manual_seed(0)
    model = VQVAE(in_channels=1, image_size=16, width=8, res_blocks=1, res_width=4, downsample=4, code_dim=4,
                  codebook_size=16, lr=1e-3, warmup_steps=2, kmeans_init=False)  # fmt: skip
    images = torch.rand(64, 1, 16, 16) * 2 - 1
    loader = DataLoader(TensorDataset(images, torch.zeros(64, dtype=torch.long)), batch_size=8, shuffle=True)
    trainer = pl.Trainer(accelerator="cpu", max_steps=1_000_000, max_time={"seconds": 2}, limit_val_batches=0,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)  # fmt: skip
    trainer.fit(model, loader)
    assert 10 < trainer.global_step < 1_000_000  # stopped by the time, after warm-up
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    assert lr < 0.05 * 1e-3, lr  # step-based: 1e-3 * (1 + cos(pi * steps / 1e6)) / 2, about 1e-3
