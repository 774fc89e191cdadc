"""Shared test setup: one torch thread, W&B offline, the repo on sys.path, Ctrl-C delivered, a tiny image folder."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `pytest` without `pip install -e .`: import the packages from the checkout
    sys.path.insert(0, str(ROOT))

# A background job of a non-interactive shell (`nohup make test &`) starts with SIGINT ignored, so Python
# installs no KeyboardInterrupt handler and the Ctrl-C tests (in this process and in the subprocesses it
# starts, which inherit an ignored signal) would see nothing. They test what a terminal's Ctrl-C does: give
# this process Python's handler back (a caught signal is reset to the default in a child it execs).
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# The tests' probe callbacks (tests.ddp_probe) named in --trainer.callbacks: a user's own package is allowed the
# same way (common.cli.IMPORT_PATHS_ENV); the training subprocesses inherit it.
os.environ["VQGEN_IMPORT_PATHS"] = "tests"


@pytest.fixture(autouse=True, scope="session")
def one_thread_offline():
    """Tiny tensors: one intra-op thread is far faster than contending for shared cores (~20x here).
    Tests never touch the network: W&B runs offline unless a test says otherwise."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    old_mode = os.environ.get("WANDB_MODE")
    os.environ["WANDB_MODE"] = "offline"
    yield
    torch.set_num_threads(threads)
    if old_mode is None:
        os.environ.pop("WANDB_MODE", None)
    else:
        os.environ["WANDB_MODE"] = old_mode


def write_shapes(folder: Path, n: int = 64, size: int = 16, seed: int = 0) -> Path:
    """n grayscale PNGs of one bright square or disc on black, half in each class sub-folder."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        cls = ("squares", "discs")[i % 2]
        (folder / cls).mkdir(parents=True, exist_ok=True)
        img = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(img)
        s = int(rng.integers(size // 4, size // 2))
        x, y = (int(v) for v in rng.integers(0, size - s, 2))
        shade = int(rng.integers(150, 256))
        (draw.rectangle if cls == "squares" else draw.ellipse)([x, y, x + s, y + s], fill=shade)
        img.save(folder / cls / f"{i:03d}.png")
    return folder


@pytest.fixture(scope="session")
def shapes_folder(tmp_path_factory) -> Path:
    """A session-wide image_folder dataset: 64 16x16 grayscale shapes in two classes."""
    return write_shapes(tmp_path_factory.mktemp("shapes"))


def user_error(main, args: list[str], capsys) -> str:
    """Run a command's main(args), expecting a user error: exit code 2 and exactly one line on stderr
    (no traceback). Returns that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2, f"exit code {info.value.code!r}, expected 2"
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def write_codes_dir(tmp_path: Path) -> Path:
    """A small valid codes directory (K 512, 7x7 grids, 10 classes; the stage-1 file is a stand-in)."""
    from common.codes import CodesMeta, sha256_file
    from common.codes_writer import CodesWriter

    stage1 = tmp_path / "stand_in_stage1.ckpt"
    stage1.write_bytes(b"only its hash is recorded")
    meta = CodesMeta(codebook_size=512, grid_shape=(7, 7), num_classes=10, class_names=[str(i) for i in range(10)],
                     image_size=28, channels=1, stage1_ckpt=str(stage1), stage1_sha256=sha256_file(stage1))  # fmt: skip
    rng = np.random.default_rng(0)
    with CodesWriter(tmp_path / "codes", meta) as writer:
        for split, n in (("train", 32), ("val", 8), ("test", 8)):
            writer.add_split(split, n).write(0, rng.integers(0, 512, (n, 7, 7)), np.arange(n) % 10)
        writer.commit()
    return tmp_path / "codes"


def write_trainable_codes(tmp_path: Path, labelled: bool = True) -> Path:
    """A codes directory a prior can train on in seconds: 2x2 grids, K 8, two classes (or labels -1), whose
    stage-1 checkpoint is a real tiny VQVAE (the training sample grids decode with it); the last code of a
    map repeats its first, so there is something to learn."""
    from common.codes import CodesMeta, sha256_file
    from common.codes_writer import CodesWriter
    from stage1_vqvae.vqvae import VQVAE

    stage1 = tmp_path / "stage1.ckpt"
    vqvae = VQVAE(1, 8, 8, 1, 4, 4, 4, codebook_size=8)
    torch.save({"state_dict": vqvae.state_dict(), "hyper_parameters": dict(vqvae.hparams)}, stage1)
    meta = CodesMeta(codebook_size=8, grid_shape=(2, 2), num_classes=2, class_names=["a", "b"], image_size=8,
                     channels=1, stage1_ckpt=str(stage1), stage1_sha256=sha256_file(stage1))  # fmt: skip
    rng = np.random.default_rng(0)
    with CodesWriter(tmp_path / "codes", meta) as writer:
        for split, n in (("train", 32), ("val", 16), ("test", 16)):
            codes = rng.integers(0, 8, (n, 2, 2))
            codes[:, 1, 1] = codes[:, 0, 0]
            writer.add_split(split, n).write(0, codes, rng.integers(0, 2, n) if labelled else np.full(n, -1))
        writer.commit()
    return tmp_path / "codes"


def crashed_and_resumed_equals_straight(fit, tmp_path: Path, steps: int = 12, crash_at: int = 4) -> None:
    """`fit(root, *extra)` (a training command's fit, ending at `steps`) run straight, then crashed at step
    `crash_at` (tests.ddp_probe.FailAt) and resumed with --ckpt_path last: both end at `steps` with the same
    weights bit for bit."""
    fit(tmp_path / "straight")
    with pytest.raises(RuntimeError, match=f"injected failure at step {crash_at}"):
        fit(tmp_path / "resumed", "--trainer.callbacks+=tests.ddp_probe.FailAt", f"--trainer.callbacks.step={crash_at}")
    fit(tmp_path / "resumed", "--ckpt_path", "last")
    assert_same_last_checkpoint(tmp_path, steps)


def assert_same_last_checkpoint(tmp_path: Path, steps: int) -> None:
    """The runs under tmp_path/straight and tmp_path/resumed both ended at `steps` with the same weights (the
    same names, every tensor equal bit for bit) in their last.ckpt."""
    a, b = (torch.load(tmp_path / name / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
            for name in ("straight", "resumed"))  # fmt: skip
    assert a["global_step"] == b["global_step"] == steps
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for name, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][name]), name


# The autoregressive priors' test sizes; a kind not listed here (a new prior: one file and its line in
# stage2_prior.build.PRIORS) is tested at its own "tiny" size by every test that goes over PRIORS.
PRIOR_TEST_SIZES = {"transformer": dict(n_layer=2, n_head=2, n_embd=32), "pixelcnn": dict(n_layer=3, channels=16)}


def small_prior(kind: str, codebook_size: int, grid_shape: tuple[int, int], num_classes: int, **sizes):
    """A freshly seeded prior of `kind` (a key of PRIORS) at its test size, `sizes` overriding it."""
    from stage2_prior.build import PRIORS

    torch.manual_seed(0)
    cls = PRIORS[kind]
    return cls(codebook_size, tuple(grid_shape), num_classes, **{**PRIOR_TEST_SIZES.get(kind, cls.sizes["tiny"]),
                                                                 **sizes})  # fmt: skip
