"""Values no model can be built or trained with, and files that are not what a flag wants, are one line naming the
flag or file, exit code 2, and no run folder left: the model and data constructors check their arguments before
anything trains, a raw pickle or a broken .npz is no traceback, and Lightning's info lines ("Seed set to 0",
"GPU available: ...") no longer come before a user error."""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import user_error, write_trainable_codes

from common.checkpoint import read_checkpoint
from common.codes import MAX_CODEBOOK_SIZE
from common.logging import LIGHTNING_INFO_NOISE, quiet_lightning
from stage1_vqvae.model import VQModel
from stage1_vqvae.train import main as train_stage1
from stage2_prior.prior import Prior
from stage2_prior.train import main as train_stage2
from tools.evaluate import main as evaluate
from tools.sample_files import load_samples, sample_labels, stage1_of_samples

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

# ---------------------------------------------------------------------------------- model and data values
STAGE1_ROWS = [  # (extra flags, what the one line says)
    (["--model.codebook_size", "0"], "--model.codebook_size must be an integer in 1..65536"),
    # trained, then extract_codes failed: the codes are uint16
    (["--model.codebook_size", "100000"], "--model.codebook_size must be an integer in 1..65536"),
    (["--model.width", "0"], "--model.width must be an integer >= 1, got 0"),
    (["--model.res_width", "0"], "--model.res_width must be an integer >= 1, got 0"),
    (["--model.res_blocks", "-1"], "--model.res_blocks must be an integer >= 0, got -1"),
    (["--model.code_dim", "0"], "--model.code_dim must be an integer >= 1, got 0"),
    (["--model.lookup_dim", "-2"], "--model.lookup_dim must be an integer >= 1"),
    (["--model.downsample", "3"], "--model.downsample must be 2, 4, 8 or 16, got 3"),
    (["--model.downsample", "16", "--data.image_size", "8"], "--model.downsample 16 leaves no code grid of 8-px"),
    (["--model.quantizer", "fsq", "--model.fsq_levels", "[1, 4]"],
     "--model.fsq_levels must be a list of integers >= 2"),
    (["--model.quantizer", "fsq", "--model.fsq_levels", "[16, 16, 16, 16, 2]"],
     "--model.fsq_levels [16, 16, 16, 16, 2] make 131072 codes, more than the 65536"),
    (["--model.levels", "[{name: bottom, downsample: 2}, {name: top, downsample: 4, codebook_size: 0}]"],
     "--model.levels[1].codebook_size must be an integer in 1..65536"),
    (["--model.levels", "[{name: bottom, downsample: 2}, {name: top, downsample: 32}]"],
     "--model.levels: level top's downsample must be 2, 4, 8 or 16, got 32"),
    (["--model.decay", "1.0"], "--model.decay must be in [0, 1), got 1.0"),
    (["--model.beta", "-1"], "--model.beta must be a finite number >= 0, got -1"),
    # YAML's .inf passed `not x > 0`-style checks: each trained NaN weights and exited 0 (a helper's audit)
    (["--model.beta", ".inf"], "--model.beta must be a finite number >= 0, got inf"),
    (["--model.lr", ".inf"], "--model.lr must be a finite number > 0, got inf"),
    (["--model.weight_decay", ".inf"], "--model.weight_decay must be a finite number >= 0, got inf"),
    (["--model.restart_threshold", ".inf"], "--model.restart_threshold must be a finite number >= 0"),
    (["--model.levels", "[{name: b, downsample: 0}, {name: t, downsample: 4}]"],  # a ZeroDivisionError traceback
     "--model.levels: level b's downsample must be 2, 4, 8 or 16, got 0"),
    # after the model summary, leaving the run's config.yaml (the check ran in the training loader)
    (["--data.batch_size", "100000"], "data: the train split has 48 images, fewer than batch_size=100000"),
    (["--data.num_workers", "100000"], "data: num_workers=100000 (must be <= 64"),  # hung starting them
    (["--data.seed", "-1"], "data: seed=-1 (must be >= 0)"),  # numpy's "expected non-negative integer"
    (["--model.warmup_steps", "-1"], "--model.warmup_steps must be an integer >= 0, got -1"),
    (["--log.every_n_steps", "0"], "--log.every_n_steps must be an integer >= 1, got 0"),  # logged nothing, exit 0
    (["--model.levels", "[{name: b, downsample: 2.9}, {name: t, downsample: 4}]"],  # trained as 2
     "--model.levels[0].downsample must be 2, 4, 8 or 16, got 2.9"),
    (["--model.condition_levels", "true"], "--model.condition_levels conditions each level on the one above: it "
     "needs two or more --model.levels"),  # ignored without a word
    (["--seed_everything", "-1"], "--seed_everything must be an integer in 0..4294967295"),  # named no flag
    (["--model.adversarial_weight", "-0.1"], "--model.adversarial_weight must be a finite number >= 0 (0: off)"),
    (["--model.adversarial_weight", ".nan"], "--model.adversarial_weight must be a finite number >= 0 (0: off)"),
    (["--model.adversarial_start", "-1"], "--model.adversarial_start must be an integer >= 0, got -1"),
    (["--model.adversarial_weight", "0.1", "--model.discriminator_width", "0"],
     "--model.discriminator_width must be an integer >= 1, got 0"),
]  # fmt: skip

STAGE2_ROWS = [
    (["--data.batch_size", "0"], "--data.batch_size must be an integer >= 1, got 0"),
    (["--data.num_workers", "-1"], "--data.num_workers must be an integer in 0..64"),
    (["--data.num_workers", "100000"], "--data.num_workers must be an integer in 0..64"),
    (["--model.n_layer", "0"], "--model.n_layer must be an integer >= 1"),
    (["--model.n_head", "0"], "--model.n_head must be an integer >= 1"),
    (["--model.n_embd", "0"], "--model.n_embd must be an integer >= 1"),
    (["--model.n_head", "3"], "--model.n_embd 64 must be divisible by --model.n_head 3"),
    (["--model.kind", "pixelcnn", "--model.channels", "0"], "--model.channels must be an integer >= 1"),
    (["--model.kind", "pixelcnn", "--model.n_head", "8"], "--model.n_head is not an argument of the pixelcnn prior, "
     "which would ignore it; it takes --model.n_layer, --model.channels, --model.dropout"),  # fmt: skip  (dropped)
    (["--model.channels", "64"], "--model.channels is not an argument of the transformer prior, which would ignore "
     "it; it takes --model.n_layer, --model.n_head, --model.n_embd, --model.dropout"),  # fmt: skip
    (["--model.dropout", "1.0"], "--model.dropout must be in [0, 1), got 1.0"),
    (["--model.label_dropout", "1.5"], "--model.label_dropout must be in [0, 1), got 1.5"),
    (["--model.warmup_steps", "-1"], "--model.warmup_steps must be an integer >= 0, got -1"),
    (["--model.lr", ".inf"], "--model.lr must be a finite number > 0, got inf"),
    (["--data.batch_size", "100000"], "--data.batch_size 100000 is larger than the 32 train code grids"),  # traceback
    (["--sample_every_n_epochs", "-1"], "--sample_every_n_epochs must be an integer >= 0 (0: never), got -1"),
    (["--log.every_n_steps", "-5"], "--log.every_n_steps must be an integer >= 1, got -5"),
]


@pytest.fixture(scope="module")
def trainable_codes(tmp_path_factory) -> Path:
    return write_trainable_codes(tmp_path_factory.mktemp("argument_checks"))


def assert_no_run_left(root: Path) -> None:
    """No version_* folder (nor the root the run would have created) is left behind."""
    assert not root.exists() or not list(root.glob("version_*")), sorted(p.name for p in root.iterdir())


@pytest.mark.parametrize("extra, message", STAGE1_ROWS, ids=[" ".join(e) for e, _ in STAGE1_ROWS])
def test_bad_stage1_value_is_one_line_and_leaves_no_run(extra, message, shapes_folder, tmp_path, capsys):
    root = tmp_path / "runs"
    args = ["fit", "--config", str(CONFIGS / "stage1/tiny.yaml"), "--trainer.default_root_dir", str(root),
            "--trainer.max_steps", "1", "--data.dataset", "image_folder", "--data.root", str(shapes_folder),
            "--data.image_size", "16", "--data.val_size", "8", "--data.test_size", "8", "--data.batch_size", "16",
            *extra]  # fmt: skip
    assert message in user_error(train_stage1, args, capsys)
    assert_no_run_left(root)


@pytest.mark.parametrize("extra, message", STAGE2_ROWS, ids=[" ".join(e) for e, _ in STAGE2_ROWS])
def test_bad_stage2_value_is_one_line_and_leaves_no_run(extra, message, trainable_codes, tmp_path, capsys):
    root = tmp_path / "runs"
    args = ["fit", "--config", str(CONFIGS / "stage2/tiny.yaml"), "--data.codes_dir", str(trainable_codes),
            "--trainer.default_root_dir", str(root), "--trainer.max_steps", "1", "--data.batch_size", "8",
            "--sample_every_n_epochs", "0", *extra]  # fmt: skip
    assert message in user_error(train_stage2, args, capsys)
    assert_no_run_left(root)


def tiny_vq(**kwargs) -> VQModel:
    return VQModel(**{"in_channels": 1, "image_size": 8, "width": 8, "res_blocks": 0, "res_width": 4,
                      "downsample": 2, "code_dim": 2, **kwargs})  # fmt: skip


def test_the_largest_codebook_the_codes_format_holds_is_accepted():
    assert tiny_vq(codebook_size=MAX_CODEBOOK_SIZE).codebook_size == MAX_CODEBOOK_SIZE
    assert tiny_vq(quantizer="fsq", fsq_levels=[16, 16, 16, 16]).codebook_size == MAX_CODEBOOK_SIZE
    with pytest.raises(ValueError, match="--model.codebook_size"):
        tiny_vq(codebook_size=MAX_CODEBOOK_SIZE + 1)
    assert tiny_vq(res_blocks=0, lookup_dim=None).codebook_size == 512  # the defaults pass


def test_the_prior_checks_its_values_before_building():
    with pytest.raises(ValueError, match=r"--model\.n_embd 64 must be divisible by --model\.n_head 3"):
        Prior(8, (2, 2), 0, kind="maskgit", size="tiny", n_head=3)
    with pytest.raises(ValueError, match=r"--model\.dropout must be in \[0, 1\)"):
        Prior(8, (2, 2), 0, kind="pixelcnn", size="tiny", dropout=-0.5)
    assert Prior(8, (2, 2), 0, kind="transformer", size="tiny", n_head=4).net is not None  # 64 / 4


# ---------------------------------------------------------------------------------- a raw pickle checkpoint
def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter (what a user's shell sees: warnings and Lightning's logging go to stderr)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip


@pytest.fixture
def raw_pickle(tmp_path) -> Path:
    path = tmp_path / "raw.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {}, "hyper_parameters": {}}, f, protocol=4)
    return path


def test_reading_a_raw_pickle_warns_nothing(raw_pickle):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match="is not a PyTorch checkpoint"):
            read_checkpoint(raw_pickle, "--ckpt", want="stage1")
    assert not caught, [str(w.message) for w in caught]


@pytest.mark.parametrize("module, flag, out", [("stage1_vqvae.extract", "--ckpt", "codes"),
                                               ("tools.sample", "--prior", "grid.png")])  # fmt: skip
def test_a_raw_pickle_checkpoint_is_one_stderr_line(module, flag, out, raw_pickle, tmp_path):
    proc = run_python(f"from {module} import main\nmain([{flag!r}, {str(raw_pickle)!r}, '--out', {out!r}])", tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr
    assert f"{flag} {raw_pickle} is not a PyTorch checkpoint" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw.ckpt"]  # nothing written


# ---------------------------------------------------------------------------------- Lightning's info lines
@pytest.mark.parametrize("command, args, message", [
    ("stage2_prior.train", ["fit", "--config", str(CONFIGS / "stage2/tiny.yaml"), "--data.codes_dir", "nope"],
     "train_stage2: error: codes directory nope does not exist"),
    ("stage1_vqvae.train", ["fit", "--config", str(CONFIGS / "stage1/tiny.yaml"), "--data.dataset", "image_folder",
                            "--data.root", "nope"], "train_stage1: error: image folder nope"),
])  # fmt: skip
def test_a_training_user_error_is_the_only_stderr_line(command, args, message, tmp_path):
    args = [*args, "--trainer.default_root_dir", str(tmp_path / "runs")]
    proc = run_python(f"from {command} import main\nmain({args!r})", tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "runs").exists()


class Records(logging.Handler):
    """The records that get past a logger's filters (a handler on the logger itself sees only those)."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_a_run_prints_its_own_lines_but_not_lightnings_noise(trainable_codes, tmp_path, capsys):
    quiet_lightning()  # as train_main does; the filters stay for the process either way
    handlers = {name: Records() for name, _ in LIGHTNING_INFO_NOISE}
    for name, handler in handlers.items():
        logging.getLogger(name).addHandler(handler)
    try:
        train_stage2(["fit", "--config", str(CONFIGS / "stage2/tiny.yaml"), "--data.codes_dir", str(trainable_codes),
                      "--trainer.default_root_dir", str(tmp_path / "runs"), "--trainer.max_steps", "2",
                      "--data.batch_size", "8", "--sample_every_n_epochs", "0"])  # fmt: skip
    finally:
        for name, handler in handlers.items():
            logging.getLogger(name).removeHandler(handler)
    seen = [m for h in handlers.values() for m in h.messages]
    noise = ("Seed set to", "GPU available:", "TPU available:")
    assert not [m for m in seen if m.startswith(noise)], seen
    out = capsys.readouterr().out
    assert f"codes: {trainable_codes}:" in out and "run folder:" in out and "samples:" in out, out


# ---------------------------------------------------------------------------------- a broken samples .npz
def broken_npz(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.npz"
    np.savez(tmp_path / "whole.npz", images=np.zeros((4, 1, 8, 8), np.uint8))
    whole = (tmp_path / "whole.npz").read_bytes()
    (tmp_path / "whole.npz").unlink()
    data = {"truncated": whole[: len(whole) // 2], "garbage": b"PK\x03\x04 not really a zip", "empty": b"",
            "text": b"images = [1, 2, 3]\n"}  # fmt: skip
    if kind == "bad_crc":  # a whole archive whose member's bytes changed
        data[kind] = whole[:100] + bytes([whole[100] ^ 0xFF]) + whole[101:]
    if kind == "npy":  # one array saved by np.save under a .npz name
        np.save(tmp_path / "one.npy", np.zeros((4, 1, 8, 8), np.uint8))
        data[kind] = (tmp_path / "one.npy").read_bytes()
        (tmp_path / "one.npy").unlink()
    path.write_bytes(data[kind])
    return path


@pytest.mark.parametrize("kind", ["truncated", "garbage", "empty", "text", "bad_crc", "npy"])
def test_a_broken_samples_npz_is_one_line_naming_it(kind, tmp_path, capsys, monkeypatch):
    path = broken_npz(tmp_path, kind)
    monkeypatch.chdir(tmp_path)
    # --data.*: no stage 1 named is not the error (a bad CRC shows only when the images are read)
    data = ["--data.dataset", "image_folder", "--data.root", str(tmp_path / "real")]
    err = user_error(evaluate, ["samples", "--samples", str(path), *data], capsys)
    assert err.startswith(f"evaluate: error: --samples {path} is not a readable .npz ("), err
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # nothing written
    assert sample_labels(path) is None
    # stage1_of_samples reads only the members naming the stage 1: a changed image member is found by load_samples
    for read in (load_samples,) if kind == "bad_crc" else (load_samples, stage1_of_samples):
        with pytest.raises(ValueError, match=f"--samples {path} is not a readable .npz"):
            read(str(path))
