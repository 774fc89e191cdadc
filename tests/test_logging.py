"""Logger-agnostic image/histogram logging works on every backend (W&B offline, TensorBoard-free CSV)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.logging import LogConfig, log_histogram, log_image, make_logger, wandb_bins


@pytest.mark.parametrize("caption", ["", "top: originals"])
def test_wandb_offline_image_and_histogram(tmp_path, monkeypatch, caption):
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = make_logger(LogConfig(backend="wandb", project="vqgen-test"), tmp_path / "run", "run")
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    try:
        log_image(logger, "samples", image, step=1, caption=caption)  # caption="" must not reach W&B as None
        log_histogram(logger, "codes", np.arange(4), step=1)
        log_histogram(logger, "codes_1000", np.arange(1000), step=1)  # over W&B's 512 bins (FSQ 8-5-5-5, K 1,024)
    finally:
        logger.experiment.finish()
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))


def test_csv_image_and_histogram_files(tmp_path):
    logger = make_logger(LogConfig(backend="csv"), tmp_path / "run", "run")
    log_image(logger, "val/grid", np.full((4, 6, 1), 255, dtype=np.uint8), step=3)
    log_histogram(logger, "val/codes", np.array([1, 0, 2]), step=3)
    assert (tmp_path / "run" / "images" / "val_grid_step0000003.png").exists()
    assert np.array_equal(np.load(tmp_path / "run" / "histograms" / "val_codes_step0000003.npy"), [1, 0, 2])


def test_wandb_bins_sum_runs_of_codes_to_at_most_512():
    bins, edges = wandb_bins(np.arange(4))
    assert bins.tolist() == [0, 1, 2, 3] and edges.tolist() == [0, 1, 2, 3, 4]  # small codebooks: one bin a code
    counts = np.random.default_rng(0).integers(0, 9, 1025)
    bins, edges = wandb_bins(counts)
    assert len(bins) == 342 and len(edges) == 343 and bins.sum() == counts.sum()  # runs of 3 codes
    assert bins[0] == counts[:3].sum() and bins[-1] == counts[1023:].sum() and edges[-1] == 1025


@pytest.mark.parametrize("mode, resume_step, user_id, continued", [
    ("online", 40, None, True),  # a resume in place logged online: the same W&B run, one curve
    ("online", None, None, False),  # a new run (a fresh folder has no earlier run; here one is planted)
    ("offline", 40, None, False),  # an offline run cannot be continued: a run of its own, as before
    ("online", 40, "mine", False),  # WANDB_RUN_ID: the user's choice wins
])  # fmt: skip
def test_a_resume_continues_its_online_wandb_run(tmp_path, monkeypatch, mode, resume_step, user_id, continued):
    run = tmp_path / "run"
    for name in ("run-20261129_101010-older111", "run-20261130_101010-newer222", "offline-run-20261130_111111-off333"):
        (run / "wandb" / name).mkdir(parents=True)
    monkeypatch.setenv("WANDB_MODE", mode)
    if user_id:
        monkeypatch.setenv("WANDB_RUN_ID", user_id)
    logger = make_logger(LogConfig(backend="wandb"), run, "run", resume_step=resume_step)
    assert logger._wandb_init["id"] == ("newer222" if continued else None)  # what wandb.init is given
    assert logger._wandb_init["resume"] == "allow"


def test_the_projects_own_warnings_are_one_plain_line(capsys):
    """A warning raised in the project's code (the quantizer's restart-threshold advice, which every 256-px run
    of the shipped config printed with its source path and category) is `warning: <message>`; others keep
    Python's format."""
    import warnings

    import stage1_vqvae.quantizer
    from common.logging import quiet_lightning

    saved = warnings.formatwarning
    try:
        quiet_lightning()
        own = warnings.formatwarning("restart_threshold 1 is 3.1% ...", UserWarning, stage1_vqvae.quantizer.__file__,
                                     167)  # fmt: skip
        other = warnings.formatwarning("x is deprecated", DeprecationWarning, "/usr/lib/python3/x.py", 3, "")
    finally:
        warnings.formatwarning = saved
    assert own == "warning: restart_threshold 1 is 3.1% ...\n"
    assert other.startswith("/usr/lib/python3/x.py:3: DeprecationWarning: x is deprecated")


def test_the_speed_leaves_out_validations_and_the_checkpoint_saves_after_them(monkeypatch):
    """train/img_per_s counts the images trained since the last log over the time they took: a validation, and
    the checkpoint saves Lightning runs after every other callback's on_validation_end, are left out (the
    re-audit: a save slowed by 0.5 s read 268 img/s instead of about 2,400)."""
    from types import SimpleNamespace

    import common.progress
    from common.progress import Throughput

    clock = {"t": 0.0}
    monkeypatch.setattr(common.progress.time, "perf_counter", lambda: clock["t"])
    logged = []
    module = SimpleNamespace(throughput_unit="img", log=lambda name, value, **kw: logged.append((name, value)))
    trainer = SimpleNamespace(world_size=1, global_step=0, log_every_n_steps=2)
    batch = (torch.zeros(32, 1, 4, 4), torch.zeros(32))
    speed = Throughput()
    speed.on_train_start(trainer, module)

    def step(seconds: float) -> None:
        speed.on_train_batch_start(trainer, module, batch, 0)
        clock["t"] += seconds
        trainer.global_step += 1
        speed.on_train_batch_end(trainer, module, None, batch, 0)

    step(0.01), step(0.01)  # 64 images in 0.02 s
    speed.on_validation_start(trainer, module)
    clock["t"] += 5.0  # the validation
    speed.on_validation_end(trainer, module)
    clock["t"] += 0.5  # the checkpoint saves after it
    step(0.01), step(0.01)
    assert [name for name, _ in logged] == ["train/img_per_s"] * 2
    assert [round(value) for _, value in logged] == [3200, 3200]


def test_an_id_with_dashes_is_kept_whole(tmp_path):
    from common.logging import earlier_wandb_run

    (tmp_path / "wandb" / "run-20261130_101010-my-run-1").mkdir(parents=True)  # WANDB_RUN_ID=my-run-1 earlier
    assert earlier_wandb_run(tmp_path) == "my-run-1"  # was "1"
