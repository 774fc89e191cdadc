"""Tests for stage1_vqvae/extract.py (`extract_codes`) on a tiny stage-1 checkpoint trained for 2 steps."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import user_error
from PIL import Image

from common.codes import load_split, read_meta, sha256_file
from common.datamodule import ImageDataModule
from common.images import from_uint8
from stage1_vqvae.extract import main, shard_bounds
from stage1_vqvae.vqvae import VQVAE

REPO = Path(__file__).resolve().parents[1]
DATA = dict(dataset="image_folder", image_size=16, batch_size=8, val_size=4, test_size=4)


@pytest.fixture(scope="module")
def stage1(tmp_path_factory) -> tuple[Path, Path]:
    """(checkpoint, image folder): 2 classes x 12 gray 16x16 PNGs, a tiny VQVAE fit for 2 steps with the data."""
    tmp = tmp_path_factory.mktemp("stage1")
    rng = np.random.default_rng(0)
    for c, name in enumerate("ab"):
        (tmp / "images" / name).mkdir(parents=True)
        for i in range(12):
            image = rng.integers(0, 128, (16, 16)) + 100 * c * (np.arange(16) > i)  # some structure
            Image.fromarray(image.astype(np.uint8)).save(tmp / "images" / name / f"{i}.png")
    dm = ImageDataModule(root=str(tmp / "images"), **DATA)
    pl.seed_everything(0)
    model = VQVAE(dm.channels, dm.image_size, 16, 1, 8, 4, 8, codebook_size=16, warmup_steps=1)
    trainer = pl.Trainer(
        max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp,
    )  # fmt: skip
    trainer.fit(model, dm)
    trainer.save_checkpoint(tmp / "stage1.ckpt")
    return tmp / "stage1.ckpt", tmp / "images"


def expected_codes(ckpt: Path, root: Path, split: str, **data) -> tuple[np.ndarray, np.ndarray]:
    model = VQVAE.load_from_checkpoint(ckpt, map_location="cpu")
    images, labels = ImageDataModule(root=str(root), **{**DATA, **data}).split_arrays(split)
    return model.encode_to_codes(from_uint8(images)).numpy(), labels.numpy()


def test_codes_equal_encode_to_codes_with_defaults_from_ckpt(stage1, tmp_path: Path, capsys) -> None:
    ckpt, root = stage1
    # No --data options. CPU even where there is a GPU: the expected codes are computed on the CPU.
    main(["--ckpt", str(ckpt), "--out", str(tmp_path / "codes"), "--batch_size", "3", "--accelerator", "cpu"])
    meta = read_meta(tmp_path / "codes")
    assert meta.counts == {"train": 16, "val": 4, "test": 4}
    assert (meta.codebook_size, meta.grid_shape, meta.image_size, meta.channels) == (16, (4, 4), 16, 1)
    assert (meta.num_classes, meta.class_names, meta.dataset) == (2, ["a", "b"], "image_folder")
    assert meta.stage1_ckpt == str(ckpt.resolve()) and meta.stage1_sha256 == sha256_file(ckpt)
    for split in ("train", "val", "test"):
        codes, labels = load_split(tmp_path / "codes", split)
        want_codes, want_labels = expected_codes(ckpt, root, split)
        np.testing.assert_array_equal(codes, want_codes)
        np.testing.assert_array_equal(labels, want_labels)
    assert len(np.unique(load_split(tmp_path / "codes", "train")[0])) > 1  # not a degenerate model
    out = capsys.readouterr().out
    assert "train: 16 images" in out and "images/s" in out and "written to" in out


def test_data_options_and_splits_override(stage1, tmp_path: Path) -> None:
    ckpt, root = stage1
    main(
        [
            "--ckpt",
            str(ckpt),
            "--out",
            str(tmp_path),
            "--splits",
            "test,val",
            "--data.limit",
            "3",
            "--accelerator",
            "cpu",
        ]
    )
    assert read_meta(tmp_path).counts == {"test": 3, "val": 3}
    np.testing.assert_array_equal(load_split(tmp_path, "test")[0], expected_codes(ckpt, root, "test", limit=3)[0])


def test_extraction_through_a_cache_gives_the_same_codes(stage1, tmp_path: Path, monkeypatch) -> None:
    """--data.cache_dir: the first extraction decodes the folder into the cache, the second only maps it;
    both give the codes of the plain read."""
    from common import image_cache

    ckpt, root = stage1
    args = ["--ckpt", str(ckpt), "--data.cache_dir", str(tmp_path / "cache"), "--accelerator", "cpu"]
    main([*args, "--out", str(tmp_path / "first")])
    assert len(list((tmp_path / "cache").glob("images_16px_gray_24img_*.npy"))) == 1
    monkeypatch.setattr(image_cache, "read_images", lambda *a, **k: pytest.fail("decoded although cached"))
    main([*args, "--out", str(tmp_path / "second")])
    for split in ("train", "val", "test"):
        want = expected_codes(ckpt, root, split)[0]
        for out in ("first", "second"):
            np.testing.assert_array_equal(load_split(tmp_path / out, split)[0], want)


def test_a_relative_root_is_found_from_another_directory(stage1, tmp_path: Path, monkeypatch, capsys) -> None:
    """A stage 1 trained with --data.root typed relative to where it ran: extract_codes run from elsewhere reads
    the folder where training found it (the checkpoint keeps both); --data.root given there still wins."""
    ckpt, root = stage1
    monkeypatch.chdir(root.parent)
    dm = ImageDataModule(root="images", **DATA)
    assert (dm.hparams["root"], dm.hparams["resolved_root"]) == ("images", str(root.resolve()))
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    saved["datamodule_hyper_parameters"] = dict(dm.hparams)  # as if trained from root.parent with this root
    torch.save(saved, tmp_path / "relative.ckpt")
    monkeypatch.chdir(tmp_path)  # holds no images/
    main(["--ckpt", "relative.ckpt", "--out", "codes", "--splits", "test", "--accelerator", "cpu"])
    np.testing.assert_array_equal(load_split(tmp_path / "codes", "test")[0], expected_codes(ckpt, root, "test")[0])
    err = user_error(main, ["--ckpt", "relative.ckpt", "--out", "other", "--data.root", "images"], capsys)
    assert f"image folder images (relative to the current directory {tmp_path}) does not exist" in err, err
    (tmp_path / "images").mkdir()  # a folder of that name here is the one meant: no fallback, its own error
    err = user_error(main, ["--ckpt", "relative.ckpt", "--out", "other"], capsys)
    assert "images" in err and str(root) not in err, err


def test_a_relative_cache_dir_is_found_from_another_directory(stage1, tmp_path: Path, monkeypatch) -> None:
    """A relative --data.cache_dir saved in the checkpoint: extract_codes run from another directory maps the
    cache made where training ran instead of decoding the folder again into a new cache there."""
    from common import image_cache

    ckpt, root = stage1
    monkeypatch.chdir(root.parent)
    dm = ImageDataModule(root="images", cache_dir=f"cache_{tmp_path.name}", **DATA)
    assert dm.hparams["resolved_cache_dir"] == str(root.parent / f"cache_{tmp_path.name}")
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    saved["datamodule_hyper_parameters"] = dict(dm.hparams)
    torch.save(saved, tmp_path / "relative.ckpt")
    main(["--ckpt", str(tmp_path / "relative.ckpt"), "--out", str(tmp_path / "first"), "--accelerator", "cpu"])
    assert len(list((root.parent / f"cache_{tmp_path.name}").glob("*.npy"))) == 1  # made where "training" ran
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    monkeypatch.setattr(image_cache, "read_images", lambda *a, **k: pytest.fail("decoded although cached"))
    main(["--ckpt", "../relative.ckpt", "--out", "codes", "--accelerator", "cpu"])
    assert list((tmp_path / "elsewhere").iterdir()) == [tmp_path / "elsewhere" / "codes"]  # no second cache
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(load_split(tmp_path / "elsewhere" / "codes", split)[0],
                                      load_split(tmp_path / "first", split)[0])  # fmt: skip


def test_a_changed_folder_is_named_when_its_splits_are_drawn_anew(stage1, tmp_path: Path, capsys) -> None:
    """The splits are a seeded permutation of the folder's file list, so one file added redraws them all and
    the test split then holds images stage 1 trained on: training keeps the list's key in the checkpoint and
    extract_codes warns (one line) when the folder it reads has another list; the same folder says nothing."""
    import shutil

    ckpt, root = stage1
    key = torch.load(ckpt, map_location="cpu", weights_only=True)["datamodule_hyper_parameters"]["folder_key"]
    assert key.startswith("24:"), key
    capsys.readouterr()
    main(["--ckpt", str(ckpt), "--out", str(tmp_path / "same"), "--splits", "test", "--accelerator", "cpu"])
    assert "warning" not in capsys.readouterr().err
    shutil.copytree(root, tmp_path / "images")
    shutil.copy(root / "a" / "0.png", tmp_path / "images" / "a" / "new.png")
    main(["--ckpt", str(ckpt), "--out", str(tmp_path / "changed"), "--splits", "test", "--accelerator", "cpu",
          "--data.root", str(tmp_path / "images")])  # fmt: skip
    err = capsys.readouterr().err
    assert f"warning: image folder {tmp_path / 'images'} is not the one the checkpoint's splits were drawn from (24 " \
           "files then, 25 now, or other files)" in err, err  # fmt: skip


def test_existing_codes_need_overwrite(stage1, tmp_path: Path, capsys) -> None:
    ckpt, _ = stage1
    args = ["--ckpt", str(ckpt), "--out", str(tmp_path), "--splits", "val"]
    main(args)
    assert "already holds extracted codes; pass --overwrite" in user_error(main, args, capsys)
    main([*args[:-1], "test", "--overwrite"])
    assert read_meta(tmp_path).counts == {"test": 4}


def test_clear_errors(stage1, tmp_path: Path, capsys) -> None:
    ckpt, _ = stage1
    out = str(tmp_path / "codes")
    (tmp_path / "garbage.ckpt").write_bytes(b"garbage")
    torch.save({"state_dict": {}, "hyper_parameters": {"lr": 1.0}}, tmp_path / "other.ckpt")
    cases = [
        (["--ckpt", str(tmp_path / "missing.ckpt")], "--ckpt .*missing.ckpt: no such file"),
        (["--ckpt", str(tmp_path / "garbage.ckpt")], "not a PyTorch checkpoint"),
        (["--ckpt", str(tmp_path / "other.ckpt")], "is not a stage-1 \\(VQ-VAE\\) checkpoint"),
        (["--ckpt", str(ckpt), "--splits", "trian"], "unknown split.*'trian'"),
        (["--ckpt", str(ckpt), "--data.root", str(tmp_path / "nowhere")], "image folder .* does not exist"),
        (["--ckpt", str(ckpt), "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp_spawn"],
         "use --strategy ddp"),
    ]  # fmt: skip
    for args, message in cases:
        assert re.search(message, user_error(main, [*args, "--out", out], capsys)), message
    assert not (tmp_path / "codes").exists()


def test_a_disk_too_small_for_the_codes_fails_before_the_encoding(stage1, tmp_path: Path, monkeypatch, capsys):
    """The outputs' sizes are known once the data is read: their space is reserved then, so a full disk is the
    one line at once, not after every image was encoded; nothing is left in the new --out."""
    import errno

    from stage1_vqvae.extract import CodesPredictor

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    encoded, encode = [], CodesPredictor._encode
    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    monkeypatch.setattr(CodesPredictor, "_encode", lambda self, x: encoded.append(len(x)) or encode(self, x))
    out = tmp_path / "new" / "codes"
    err = user_error(main, ["--ckpt", str(stage1[0]), "--out", str(out), "--accelerator", "cpu"], capsys)
    assert err.startswith(f"extract_codes: error: --out {out}: no space left on device: the new codes need "), err
    assert encoded == [] and list(tmp_path.iterdir()) == []


def test_shard_bounds_cover_every_row_once() -> None:
    for n in range(0, 9):
        for world in range(1, 5):
            b = shard_bounds(n, world)
            assert b[0] == 0 and b[-1] == n and all(x <= y for x, y in zip(b, b[1:]))


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(stage1, tmp_path: Path) -> None:
    ckpt, _ = stage1
    # val_size 1: rank 0's val shard is empty; batch 3 does not divide the shards.
    args = ["--ckpt", str(ckpt), "--batch_size", "3", "--data.val_size", "1", "--accelerator", "cpu"]
    main([*args, "--out", str(tmp_path / "one")])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    # The two processes read the folder through a cache (--data.cache_dir): rank 0 decodes it before it starts
    # rank 1, which maps the file.
    ddp = [sys.executable, "-m", "stage1_vqvae.extract", *args, "--out", str(tmp_path / "two"),
           "--data.cache_dir", str(tmp_path / "cache")]  # fmt: skip
    proc = subprocess.run(
        [*ddp, "--devices", "2", "--strategy", "ddp"], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 processes" in proc.stdout
    assert proc.stdout.count("cache: decoding") == 1 and len(list((tmp_path / "cache").iterdir())) == 1
    assert (
        read_meta(tmp_path / "two").counts == read_meta(tmp_path / "one").counts == {"train": 19, "val": 1, "test": 4}
    )
    for split in ("train", "val", "test"):
        for a, b in zip(load_split(tmp_path / "one", split), load_split(tmp_path / "two", split)):
            np.testing.assert_array_equal(a, b)
