"""A disk that fills while an output is written: the memory-mapped ones (the codes arrays, the image cache) get
their blocks before they are filled, so a full disk is one line naming the flag and the sizes, with exit 2,
instead of a SIGBUS (no message, temp files left); the nets of train_feature_net / train_anomaly_net end the
same way instead of torch's "[enforce fail at inline_container.cc] unexpected pos" traceback. The full disk is
simulated (os.posix_fallocate or the file's writes raising ENOSPC); nothing is mounted."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import user_error, write_shapes

from common import image_cache
from common.cli import run_command
from common.codes import CodesError, CodesMeta, load_split, sha256_file
from common.codes_writer import CodesWriter
from common.image_cache import cached_images
from common.readers import DatasetError
from tools import net_files
from tools.net_files import save_net_file
from tools.train_anomaly_net import main as train_anomaly_net
from tools.train_feature_net import main as train_feature_net


def can_reserve(folder: Path) -> bool:
    """Whether `folder`'s file system gives a file its blocks on posix_fallocate (not all do: the code then
    writes sparse files, as before)."""
    probe = folder / "probe"
    with open(probe, "wb") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, 1 << 16)
        except (AttributeError, OSError):
            return False
    return probe.stat().st_blocks * 512 >= 1 << 16


def fallocate_fails(monkeypatch, code: int = errno.ENOSPC) -> list[int]:
    """posix_fallocate raises OSError(`code`), as it does on a full disk (ENOSPC) or a file system that cannot
    reserve (EOPNOTSUPP); returns the sizes asked for."""
    asked = []

    def fail(fd: int, offset: int, length: int) -> None:
        asked.append(length)
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "posix_fallocate", fail, raising=False)
    return asked


def hidden(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob(".*"))


@pytest.fixture
def meta(tmp_path: Path) -> CodesMeta:
    ckpt = tmp_path / "stage1.ckpt"
    ckpt.write_bytes(b"x" * 5000)
    return CodesMeta(codebook_size=16, grid_shape=(8, 8), num_classes=2, class_names=["a", "b"], image_size=32,
                     channels=1, stage1_ckpt=str(ckpt), stage1_sha256=sha256_file(ckpt))  # fmt: skip


def write(out: Path, meta: CodesMeta, n: int, overwrite: bool = False, seed: int = 0) -> np.ndarray:
    codes = np.random.default_rng(seed).integers(0, 16, (n, 8, 8))
    with CodesWriter(out, meta, overwrite=overwrite) as w:
        w.add_split("train", n).write(0, codes, np.arange(n) % 2)
        w.copy_stage1(meta.stage1_ckpt)
        w.commit()
    return codes


def test_codes_arrays_get_their_blocks_before_they_are_filled(tmp_path: Path, meta) -> None:
    """A sparse array filled through a memory map is what a full disk turns into SIGBUS."""
    if not can_reserve(tmp_path):
        pytest.skip("this file system does not reserve blocks")
    with CodesWriter(tmp_path / "codes", meta) as w:
        split = w.add_split("train", 5000)  # 5000 x 8 x 8 uint16: 625 KiB
        for path in split.temp.values():
            assert path.stat().st_blocks * 512 >= path.stat().st_size > 0, f"{path.name} is sparse"
        split.write(0, np.zeros((5000, 8, 8), int), np.zeros(5000, int))
        w.commit()


def test_full_disk_for_the_codes_is_one_error_naming_out_and_sizes(tmp_path: Path, meta, monkeypatch) -> None:
    out = tmp_path / "codes"
    earlier = write(out, meta, 10)
    asked = fallocate_fails(monkeypatch)
    with pytest.raises(CodesError) as info, CodesWriter(out, meta, overwrite=True) as w:
        w.add_split("train", 5000)
    assert asked, "no space was reserved"
    message = str(info.value)
    # 5000 x 8 x 8 uint16 codes + 5000 int64 labels + two .npy headers = 664.3 KiB
    assert message.startswith(f"--out {out}: no space left on device: the new codes need 664.3 KiB there (and "
                              "4.9 KiB more for the copy of the stage-1 checkpoint) but ")  # fmt: skip
    assert message.endswith(" is free (the codes there now stay until the new ones are complete); free some space "
                            "or choose another --out")  # fmt: skip
    assert hidden(out) == []  # the temp files are gone
    assert (load_split(out, "train")[0] == earlier).all()  # the earlier codes are intact


def test_full_disk_through_extract_codes_is_one_line_and_exit_2(tmp_path: Path, meta, monkeypatch, capsys) -> None:
    """What run_command makes of it: the message above, as the one line of the command."""
    fallocate_fails(monkeypatch)

    def body(args):
        write(tmp_path / "codes", meta, 10)

    line = user_error(lambda args: run_command("extract_codes", body, args), [], capsys)
    assert line.startswith(f"extract_codes: error: --out {tmp_path / 'codes'}: no space left on device: ")
    assert not (tmp_path / "codes").exists()  # a new --out: no temp file, nor the empty folders it made


def test_where_space_cannot_be_reserved_the_codes_are_written_as_before(tmp_path: Path, meta, monkeypatch) -> None:
    asked = fallocate_fails(monkeypatch, errno.EOPNOTSUPP)
    codes = write(tmp_path / "codes", meta, 10)
    assert asked and (load_split(tmp_path / "codes", "train")[0] == codes).all()


def test_a_full_disk_at_the_stage1_copy_is_the_same_line(tmp_path: Path, meta, monkeypatch) -> None:
    """A plain write (the stage-1 copy, after the arrays) that hits a full disk names --out too; the need counts
    the arrays (2 rows, 528 bytes) and the copy (5000 bytes)."""

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("common.codes_writer.shutil.copyfile", full)
    with pytest.raises(CodesError, match=r"no space left on device: the new codes need 5\.4 KiB there but .* is "
                                         r"free; free some space or choose another --out"):  # fmt: skip
        write(tmp_path / "codes", meta, 2)
    assert hidden(tmp_path / "codes") == []


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return write_shapes(tmp_path / "shapes", n=8)


def decode_into_cache(folder: Path, cache: Path, image_size: int = 16):
    files = sorted(folder.rglob("*.png"))
    return cached_images(cache, folder, files, image_size, 1)


def test_the_image_cache_gets_its_blocks_before_the_decode(folder: Path, tmp_path: Path, monkeypatch) -> None:
    if not can_reserve(tmp_path):
        pytest.skip("this file system does not reserve blocks")
    sparse = []

    def check(*args, **kwargs):
        for path in (tmp_path / "cache").glob(".*.tmp"):
            sparse.append(path.stat().st_blocks * 512 < path.stat().st_size)
        return read_images(*args, **kwargs)

    read_images = image_cache.read_images
    monkeypatch.setattr(image_cache, "read_images", check)
    decode_into_cache(folder, tmp_path / "cache", image_size=128)  # 128 KiB: many blocks
    assert sparse == [False]


def test_a_disk_filled_after_the_cache_check_is_one_error_and_no_file(folder: Path, tmp_path: Path,
                                                                      monkeypatch) -> None:  # fmt: skip
    """Another writer took the space between the free-space check and the decode."""
    fallocate_fails(monkeypatch)
    monkeypatch.setattr(image_cache, "read_images", lambda *a, **k: pytest.fail("decoded into a sparse file"))
    with pytest.raises(DatasetError) as info:
        decode_into_cache(folder, tmp_path / "cache")
    assert str(info.value).startswith(f"--data.cache_dir {tmp_path / 'cache'}: no space left on device: the decoded "
                                      "images need 2.1 KiB there but only ")  # fmt: skip
    assert "free some space or pass another --data.cache_dir (or --data.cache_dir null" in str(info.value)
    assert list((tmp_path / "cache").iterdir()) == []


def test_the_cache_refusal_counts_the_space_it_leaves_free(folder: Path, tmp_path: Path, monkeypatch) -> None:
    """The refusal "need 2.1 KiB there but 60.0 MiB is free" read as a contradiction: it names the reserve."""
    monkeypatch.setattr(image_cache.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1, 1, 60 << 20))
    with pytest.raises(DatasetError, match=r"need 2\.1 KiB there but 60\.0 MiB is free; .*\(the cache also leaves "
                                           r"64\.0 MiB free for other writers: 64\.0 MiB in all\)"):  # fmt: skip
        decode_into_cache(folder, tmp_path / "cache")


class FullFile:
    """The temp file torch.save writes into, on a disk that fills after `room` bytes."""

    def __init__(self, f, room: int) -> None:
        self.f, self.room = f, room

    def write(self, data) -> int:
        self.room -= len(memoryview(data).cast("B"))
        if self.room < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)


def disk_fills_after(monkeypatch, room: int) -> None:
    real = net_files.atomic_file

    @contextlib.contextmanager
    def atomic_file(path, *args, **kwargs):
        with real(path, *args, **kwargs) as f:  # the real temp file, removed on failure
            yield FullFile(f, room)

    monkeypatch.setattr(net_files, "atomic_file", atomic_file)


def test_a_net_that_does_not_fit_is_one_error_and_keeps_the_earlier_file(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "net.pt"
    out.write_bytes(b"the earlier net")
    disk_fills_after(monkeypatch, 1000)
    with pytest.raises(net_files.UserError) as info:
        save_net_file(out, "vqgen-test", 1, {}, torch.nn.Linear(100, 100))
    assert str(info.value).startswith(f"--out {out}: no space left on device (the file needs about 39.5 KiB, ")
    assert str(info.value).endswith("free there); free some space or choose another --out")
    assert list(tmp_path.iterdir()) == [out] and out.read_bytes() == b"the earlier net"


@pytest.mark.parametrize("command", [train_feature_net, train_anomaly_net], ids=["feature_net", "anomaly_net"])
def test_training_commands_end_a_full_disk_in_one_line(command, shapes_folder, tmp_path: Path, monkeypatch,
                                                        capsys) -> None:  # fmt: skip
    disk_fills_after(monkeypatch, 1000)
    members = ["--members", "1"] if command is train_anomaly_net else []
    args = ["--data.dataset", "image_folder", "--data.root", str(shapes_folder), "--data.image_size", "16",
            "--data.batch_size", "8", "--steps", "1", *members, "--log_every", "0", "--device", "cpu",
            "--out", str(tmp_path / "net.pt")]  # fmt: skip
    line = user_error(command, args, capsys)
    assert f"error: --out {tmp_path / 'net.pt'}: no space left on device (the file needs about " in line
    assert line.endswith(" free there); free some space or choose another --out")
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_while_writing_names_the_file(tmp_path):
    """A write's OSError names no file ("compress: error: [Errno 28] No space left on device"): the output's
    name and what to do are added; it stays a full disk (errno) to callers that look, and no temp file is left."""
    import errno

    from common.io import OutputError, atomic_file

    path = tmp_path / "x.vqz"
    with pytest.raises(OutputError) as info, atomic_file(path) as f:
        f.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert str(info.value) == f"cannot write {path} (No space left on device); free some space there, or write it " \
        "elsewhere"  # fmt: skip
    assert info.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []
