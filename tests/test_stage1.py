"""Stage 1 end to end on a tiny generated image folder: networks, the VQVAE codes interface, and
`train_stage1 fit` through `stage1_vqvae.train.main` (run folders, resume, bf16, loggers, progress
lines, DDP on CPU, config errors). Every fit is a few steps of configs/stage1/tiny.yaml on 16x16 images."""

from __future__ import annotations

import contextlib
import csv
import os
import re
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import user_error
from PIL import Image
from pytorch_lightning.callbacks import Timer

from common.datamodule import ImageDataModule
from common.grids import make_grid
from common.images import from_uint8
from common.progress import _clock, run_length
from stage1_vqvae.networks import Decoder, Encoder, latent_size
from stage1_vqvae.train import main
from stage1_vqvae.vqvae import VQVAE

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "stage1" / "tiny.yaml"
PROBE = "tests.ddp_probe.DumpCodebook"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """Each fit picks its own run folder, as a fresh process would."""
    monkeypatch.delenv("VQGEN_RUN_DIR", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)


def fit_args(data: Path, root: Path, steps: int = 8, *extra: str, probe: Path | None = None) -> list[str]:
    args = [
        "fit", "--config", str(TINY),
        "--data.dataset", "image_folder", "--data.root", str(data), "--data.image_size", "16",
        "--data.val_size", "8", "--data.test_size", "8", "--data.batch_size", "8", "--data.limit", "null",
        "--trainer.default_root_dir", str(root), "--trainer.max_steps", str(steps),
        "--trainer.val_check_interval", str(max(1, steps // 2)), "--trainer.enable_model_summary", "false",
        "--log.backend", "csv", "--log.every_n_steps", "1",
    ]  # fmt: skip
    if probe is not None:
        args += [f"--trainer.callbacks+={PROBE}", f"--trainer.callbacks.out={probe}"]
    return args + list(extra)


def fit_in_subprocess(args: list[str], cwd: Path, launcher: tuple[str, ...] = (),
                      timeout: float = 300) -> tuple[int, str]:  # fmt: skip
    """train_stage1 in its own process group (DDP re-launches sys.argv, so not in-process), optionally under a
    launcher module (torchrun): (exit code, output). A hang is killed whole after `timeout` s, after every process
    printed where it was (SIGABRT with faulthandler on: a rare DDP hang was seen without that)."""
    env = {k: v for k, v in os.environ.items() if k not in ("VQGEN_RUN_DIR", "LOCAL_RANK", "WORLD_SIZE", "RANK")}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1",
               WANDB_MODE="offline", PYTHONFAULTHANDLER="1")  # fmt: skip
    proc = subprocess.Popen([sys.executable, *launcher, "-m", "stage1_vqvae.train", *args], cwd=cwd, env=env,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGABRT)  # each Python process dumps its threads' stacks, then dies
        try:
            out, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            out = None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # rank 1 is a grandchild: end the whole process group
        if out is None:
            out, _ = proc.communicate()
        out = f"[hung: killed after {timeout:g} s; each process's stacks follow]\n" + without_module_lists(out)
    return proc.returncode, out


def without_module_lists(out: str) -> str:
    """faulthandler ends each process's dump with a list of its ~110 extension modules: kilobytes that would
    push the stacks, the part that says where a hang was, out of an assertion message's tail. The processes'
    dumps interleave mid-line, so a line is dropped when it is mostly such a list."""
    return "\n".join(line for line in out.splitlines()
                     if 'File "' in line or len(re.findall(r"[\w.]+, ", line)) < 4)  # fmt: skip


def train_losses(run: Path) -> dict[int, float]:
    with open(run / "metrics.csv", newline="") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


# ------------------------------------------------------------------------------------- networks
@pytest.mark.parametrize("image_size", [28, 32])
@pytest.mark.parametrize("downsample", [2, 4, 8])
def test_encoder_decoder_shapes(image_size, downsample):
    torch.manual_seed(0)
    enc = Encoder(in_channels=3, width=16, res_blocks=1, res_width=8, downsample=downsample, code_dim=4)
    dec = Decoder(out_channels=3, width=16, res_blocks=1, res_width=8, downsample=downsample, code_dim=4,
                  image_size=image_size)  # fmt: skip
    images = torch.randn(2, 3, image_size, image_size)
    z = enc(images)
    side = latent_size(image_size, downsample)
    assert side == image_size // downsample
    assert z.shape == (2, 4, side, side)
    assert dec(z).shape == images.shape  # exactly the input size, also 28 px with downsample 8 (grid 3)


def test_networks_reject_bad_downsample():
    with pytest.raises(ValueError, match="downsample"):
        Encoder(downsample=3)
    with pytest.raises(ValueError, match="downsample"):
        latent_size(28, 5)


# ------------------------------------------------------------------------------------- VQVAE interface
@pytest.mark.parametrize("quantizer", ["vq", "fsq"])
def test_vqvae_codes_interface(quantizer):
    torch.manual_seed(0)
    model = VQVAE(in_channels=1, image_size=28, width=16, res_blocks=1, res_width=8, downsample=4, code_dim=4,
                  quantizer=quantizer, codebook_size=8, fsq_levels=[2, 3])  # fmt: skip
    assert model.codebook_size == (8 if quantizer == "vq" else 6)
    assert model.grid_shape == (7, 7)
    images = torch.rand(3, 1, 28, 28) * 2 - 1
    model.train()
    codes = model.encode_to_codes(images)
    assert model.training  # encode_to_codes restores the mode it found
    assert codes.shape == (3, 7, 7) and codes.dtype == torch.long
    assert 0 <= int(codes.min()) and int(codes.max()) < model.codebook_size
    assert torch.equal(codes, model.encode_to_codes(images))  # deterministic
    out = model.decode_codes(codes)
    assert out.shape == (3, 1, 28, 28)
    assert out.min() >= -1 and out.max() <= 1
    for bad in (model.codebook_size, -1):
        wrong = codes.clone()
        wrong[0, 0, 0] = bad
        with pytest.raises(ValueError, match=r"codes must lie in \[0, "):
            model.decode_codes(wrong)


# ------------------------------------------------------------------------------------- training runs
@pytest.fixture(scope="module")
def trained(shapes_folder, tmp_path_factory):
    """One 40-step fit shared by the tests that only read its outputs: (root, run folder, probe folder)."""
    root, probe = tmp_path_factory.mktemp("runs"), tmp_path_factory.mktemp("probe")
    os.environ.pop("VQGEN_RUN_DIR", None)
    main(fit_args(shapes_folder, root, 40, probe=probe))
    return root, root / "version_0", probe


def test_fit_lowers_loss_and_writes_the_run_folder(trained):
    root, run, _ = trained
    assert (root / "latest").is_symlink() and (root / "latest").resolve() == run.resolve()
    for name in ("config.yaml", "checkpoints/last.ckpt", "checkpoints/best.ckpt", "reconstructions.png"):
        assert (run / name).is_file(), name
    losses = train_losses(run)
    steps = sorted(losses)
    assert len(steps) >= 30
    early = np.mean([losses[s] for s in steps[:5]])
    late = np.mean([losses[s] for s in steps[-5:]])
    assert late < 0.8 * early, (early, late)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 40
    # The data's channels and size are linked into the model, not typed twice.
    assert ckpt["hyper_parameters"]["in_channels"] == 1 and ckpt["hyper_parameters"]["image_size"] == 16


def test_load_from_checkpoint_alone_rebuilds_the_model(trained, shapes_folder):
    _, run, probe = trained
    model = VQVAE.load_from_checkpoint(run / "checkpoints" / "last.ckpt")  # nothing else: hparams are in it
    assert model.codebook_size == 32 and model.grid_shape == (4, 4)
    dm = ImageDataModule("image_folder", root=str(shapes_folder), image_size=16, val_size=8, test_size=8)
    x = from_uint8(dm.split_arrays("test")[0])
    codes = model.encode_to_codes(x[:8])
    trained_codes = torch.load(probe / "end_rank0.pt")["test_codes"]  # the in-memory model's, at on_train_end
    assert torch.equal(codes, trained_codes)
    # And the same pixels as the reconstructions.png the trained model wrote after fit.
    recon = model.decode_codes(model.encode_to_codes(x[:16]))
    grid = make_grid(torch.cat([x[:8], recon[:8], x[8:], recon[8:]]), nrow=8, scale=2)
    assert np.array_equal(np.asarray(Image.open(run / "reconstructions.png")), grid[..., 0])


def test_second_fit_gets_its_own_folder(trained, shapes_folder):
    root, first, _ = trained
    before = (first / "checkpoints" / "last.ckpt").read_bytes()
    main(fit_args(shapes_folder, root, 2))
    second = root / "version_1"
    assert (second / "checkpoints" / "last.ckpt").is_file()
    assert (root / "latest").resolve() == second.resolve()
    assert (first / "checkpoints" / "last.ckpt").read_bytes() == before  # the first run is untouched


def test_resume_last_continues_in_place(shapes_folder, tmp_path):
    root = tmp_path / "runs"
    main(fit_args(shapes_folder, root, 6, probe=tmp_path / "first"))
    first_end = torch.load(tmp_path / "first" / "end_rank0.pt")
    main(fit_args(shapes_folder, root, 12, "--ckpt_path", "last", probe=tmp_path / "resumed"))
    assert sorted(p.name for p in root.iterdir()) == ["latest", "version_0"]  # same folder, no version_1
    run = root / "version_0"
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 12
    start = torch.load(tmp_path / "resumed" / "start_rank0.pt")
    assert start["global_step"] == 6
    for name in ("embed", "cluster_size", "embed_sum", "initialized"):  # the EMA codebook came back
        assert torch.equal(start[name], first_end[name]), name
    # The training curve of the first part is kept, and the resumed part starts where it stopped.
    assert sorted(train_losses(run)) == list(range(12))


def test_bf16_mixed_fit(shapes_folder, tmp_path):
    root = tmp_path / "runs"
    main(fit_args(shapes_folder, root, 4, "--trainer.precision", "bf16-mixed"))
    ckpt = torch.load(root / "version_0" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 4
    state = ckpt["state_dict"]
    for name in ("embed", "cluster_size", "embed_sum"):
        assert state[f"quantizer.{name}"].dtype == torch.float32
        assert torch.isfinite(state[f"quantizer.{name}"]).all()
    assert np.isfinite(list(train_losses(root / "version_0").values())).all()


def test_line_progress_off_a_terminal(shapes_folder, tmp_path, capsys):
    main(fit_args(shapes_folder, tmp_path / "runs", 6, "--log.every_n_steps", "5"))
    out = capsys.readouterr().out
    # rate, time since training started and the estimate left (1 step of 6 to go), then the training metrics
    line = r"^epoch 0 step 5/6 \d+ img/s \d+:\d\d elapsed, ~\d+:\d\d left .*train/loss=[0-9.e+-]+"
    assert re.search(line, out, re.M), out
    assert not re.search(r"step [1-4]/6", out)  # one line every 5 steps, not every step
    assert re.search(r"^epoch \d+ step 6 .*val/psnr=", out, re.M)  # a line per validation


def test_progress_line_estimates_the_time_left():
    """Steps left at the measured pace, unless --trainer.max_time ends the run first: then the time budget's
    remainder, and the step total becomes an estimate ("~N") instead of max_steps' 1,000,000."""
    by_steps = SimpleNamespace(estimated_stepping_batches=100, callbacks=[])
    assert run_length(by_steps, 40, 0.5) == ("100", 30.0)
    budget = SimpleNamespace(estimated_stepping_batches=1_000_000, callbacks=[Timer(duration=timedelta(seconds=100))])
    assert run_length(budget, 40, 0.5) == ("~240", 100.0)
    short = SimpleNamespace(estimated_stepping_batches=60, callbacks=[Timer(duration=timedelta(seconds=100))])
    assert run_length(short, 40, 0.5) == ("60", 10.0)  # the steps end it before the budget
    endless = SimpleNamespace(estimated_stepping_batches=float("inf"), callbacks=[])
    assert run_length(endless, 40, 0.5) == ("?", None)
    assert (_clock(7), _clock(123), _clock(3723)) == ("0:07", "2:03", "1:02:03")


def test_wandb_without_credentials_logs_offline(shapes_folder, tmp_path, monkeypatch, capfd):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc, W&B's caches under tmp_path
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR"):
        monkeypatch.delenv(var, raising=False)
    root = tmp_path / "runs"
    main(fit_args(shapes_folder, root, 2, "--log.backend", "wandb"))
    run = root / "version_0"
    assert list((run / "wandb").glob("offline-run-*")), "no offline W&B run in the run folder"
    err = capfd.readouterr().err
    assert f"wandb sync {run}/wandb/offline-run-*" in err
    assert os.environ["WANDB_MODE"] == "offline"
    assert wandb.run is None  # finished, so a later fit in this process gets its own W&B run


def test_missing_wandb_falls_back_to_csv(shapes_folder, tmp_path, monkeypatch, capfd):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    root = tmp_path / "runs"
    main(fit_args(shapes_folder, root, 2, "--log.backend", "wandb"))
    assert "wandb is not installed" in capfd.readouterr().err
    assert train_losses(root / "version_0")


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--model.quantizer", "bogus", "model.quantizer must be 'vq' or 'fsq'"),
        ("--model.downsample", "3", "downsample must be 2, 4, 8 or 16"),
        ("--model.levels", "[{downsample: 4}, {downsample: 4}]", "2, 4, 8 or 16 times the one below, got 4 then 4"),
        ("--model.levels", "[{downsample: 4}, {downsample: 6}]", "downsample must be 2, 4, 8 or 16, got 6"),
        ("--model.levels", "[{name: a, downsample: 2}, {name: a, downsample: 4}]", "names must differ"),
        ("--log.backend", "bogus", "--log.backend must be one of wandb, csv, tensorboard, none"),
    ],
)
def test_bad_config_is_a_clear_error(shapes_folder, tmp_path, capsys, flag, value, message):
    root = tmp_path / "runs"
    main(fit_args(shapes_folder, root, 1))  # a good run first: a typo must not hide it from --ckpt_path last
    assert message in user_error(main, fit_args(shapes_folder, root, 2, flag, value), capsys)
    assert (root / "latest").resolve() == (root / "version_0").resolve()
    assert sorted(p.name for p in root.iterdir()) == ["latest", "version_0"]  # no empty version_1 left


# ------------------------------------------------------------------------------------- DDP
@pytest.mark.slow
def test_ddp_two_cpu_processes_keep_identical_codebooks(shapes_folder, tmp_path):
    """Two gloo ranks in a subprocess (DDP re-launches sys.argv, so not in-process): k-means init, EMA sums and
    restarts are reduced/broadcast, so both ranks end with the same codebook; both share rank 0's folder.
    Validation at step 4 only: a validation forward would re-broadcast rank 0's buffers and hide a rank whose
    last EMA update used only its own data."""
    root, probe = tmp_path / "runs", tmp_path / "probe"
    args = fit_args(shapes_folder, root, 6, "--trainer.accelerator", "cpu", "--trainer.devices", "2",
                    "--trainer.strategy", "ddp", "--data.batch_size", "4", "--trainer.val_check_interval", "4",
                    probe=probe)  # fmt: skip
    code, out = fit_in_subprocess(args, tmp_path)
    assert code == 0, out[-20000:]
    ranks = [torch.load(probe / f"end_rank{r}.pt") for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["global_step"] for r in ranks] == [6, 6]
    for name in ("embed", "cluster_size", "embed_sum", "initialized"):
        assert torch.equal(ranks[0][name], ranks[1][name]), name
    assert bool(ranks[0]["initialized"])
    assert sorted(p.name for p in root.iterdir()) == ["latest", "version_0"]  # rank 1 joined rank 0's folder
    run = root / "version_0"
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "reconstructions.png").is_file()
    # The code histogram counts the codes of the whole val split (8 images x 4x4 codes), all ranks together.
    histograms = sorted((run / "histograms").glob("*.npy"))
    assert histograms and np.load(histograms[-1]).sum() == 8 * 16


def test_data_on_device_trains_exactly_like_the_loader(shapes_folder, tmp_path):
    """--data.on_device keeps the splits as tensors on the training device and sends only row numbers per
    batch; the batches (same sampler, same order) and so the trained weights are identical to the usual path."""
    main(fit_args(shapes_folder, tmp_path / "loader", 6))
    main(fit_args(shapes_folder, tmp_path / "device", 6, "--data.on_device", "true"))
    a, b = (torch.load(tmp_path / d / "latest/checkpoints/last.ckpt", weights_only=True)["state_dict"]
            for d in ("loader", "device"))  # fmt: skip
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert train_losses(tmp_path / "loader/latest") == train_losses(tmp_path / "device/latest")
