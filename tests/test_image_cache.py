"""Tests for common/image_cache.py (`--data.cache_dir`): the cached splits are the decoded ones, a second run
reads the file instead of decoding, any change to the folder or the splits makes a new file, failures leave
nothing behind, and a folder too large for memory (a cgroup limit counts) is read from disk. Tiny generated folders."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_shapes

from common import image_cache
from common import readers as im
from common.image_cache import cached_images
from common.readers import DatasetError
from common.splits import ImageSplits

SPLITS = ("train", "val", "test")


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return write_shapes(tmp_path / "shapes", n=24)


def splits(folder: Path, cache: Path | None, **options) -> ImageSplits:
    options = {"image_size": 16, "val_size": 4, "test_size": 4, **options}
    return ImageSplits("image_folder", root=str(folder), cache_dir=None if cache is None else str(cache), **options)


def arrays(s: ImageSplits) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {split: s.split_arrays(split) for split in SPLITS}


def no_decoding(monkeypatch) -> None:
    monkeypatch.setattr(image_cache, "read_images", lambda *a, **k: pytest.fail("decoded although cached"))


def test_cached_splits_are_the_decoded_ones_and_a_second_run_only_maps_the_file(folder, tmp_path, monkeypatch, capsys):
    plain = arrays(splits(folder, None))
    first = splits(folder, tmp_path / "cache")
    cached = arrays(first)
    assert "cache: decoding 24 images of" in capsys.readouterr().out
    (file,) = (tmp_path / "cache").iterdir()
    assert file.name.startswith("shapes_16px_gray_24img_") and file.suffix == ".npy"
    assert np.load(file).shape == (24, 1, 16, 16)
    with monkeypatch.context() as m:
        no_decoding(m)
        second = splits(folder, tmp_path / "cache")
        again = arrays(second)
    assert capsys.readouterr().out == ""  # nothing decoded, nothing said
    for split in SPLITS:
        for got in (cached[split], again[split]):
            assert torch.equal(got[0], plain[split][0]) and torch.equal(got[1], plain[split][1]), split
    assert f"memory-mapped from {file}" in second.describe()
    files = sorted(folder.rglob("*.png"))
    images, path, built = cached_images(tmp_path / "cache", folder, files, 16, 1)
    assert built and path != file  # the files in another order: another file
    again, path_again, built_again = cached_images(tmp_path / "cache", folder, files, 16, 1)
    assert isinstance(again, np.memmap) and path_again == path and not built_again and np.array_equal(again, images)
    writes = list(second.dataloader("train", batch_size=8))  # batches from the mapped file
    assert sum(len(y) for _, y in writes) == 16 and writes[0][0].dtype == torch.float32


def test_a_changed_file_or_other_splits_make_a_new_cache_and_leave_the_old_one(folder, tmp_path, capsys):
    cache = tmp_path / "cache"
    arrays(splits(folder, cache))
    (old,) = cache.iterdir()
    old_bytes = old.read_bytes()
    target = folder / "discs" / "001.png"
    shutil.copy(folder / "squares" / "000.png", target)  # new pixels under an old name
    os.utime(target, ns=(1, 1))
    capsys.readouterr()
    changed = arrays(splits(folder, cache))
    size = f"{old.stat().st_size / 1024:.1f} KiB"  # the old file named with its size, for the user to delete it
    assert f"(1 other cache file(s) of a folder named {folder.name} there, {size} in all, not read by this run: " \
           f"{old} ({size}); delete them if unused)" in capsys.readouterr().out  # fmt: skip
    assert old.read_bytes() == old_bytes and len(list(cache.iterdir())) == 2  # the old file kept as it was
    for split in SPLITS:
        assert torch.equal(changed[split][0], arrays(splits(folder, None))[split][0])
    arrays(splits(folder, cache, seed=1))
    arrays(splits(folder, cache, limit=2))
    assert len(list(cache.iterdir())) == 4
    (cache / f"{folder.name}_extra_16px_gray_4img_{'0' * 16}.npy").touch()  # another folder's name, not this one's
    capsys.readouterr()
    arrays(splits(folder, cache, image_size=8))  # another size: the caches at 16 px named too
    assert "(4 other cache file(s) of a folder named" in capsys.readouterr().out


def test_a_broken_image_or_a_full_disk_leaves_no_file(folder, tmp_path, monkeypatch):
    (folder / "discs" / "zz_broken.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="zz_broken.png: cannot read image"):
        arrays(splits(folder, tmp_path / "cache", channels=1))  # channels given: the header scan skipped
    assert list((tmp_path / "cache").iterdir()) == []  # the temporary file removed
    (folder / "discs" / "zz_broken.png").unlink()
    monkeypatch.setattr(image_cache.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1, 1, 1000))
    with pytest.raises(DatasetError, match=r"--data.cache_dir \S*cache: the decoded images need 6.1 KiB there but "
                                           r"1000 bytes are free; free some space or pass another --data.cache_dir"):
        arrays(splits(folder, tmp_path / "cache"))
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_folder_too_big_for_memory_is_read_from_the_cache(folder, tmp_path, monkeypatch):
    monkeypatch.setattr(im, "available_memory", lambda: 100)  # bytes: nothing fits
    with pytest.raises(DatasetError, match=r"in memory, but 0.0 GiB is available; pass --data.cache_dir DIR"):
        arrays(splits(folder, None))
    x, _ = splits(folder, tmp_path / "cache").split_arrays("train")
    assert x.shape == (16, 1, 16, 16)


@pytest.mark.parametrize("problem,message", [
    ("file", r"--data.cache_dir \S*a_file is a file; pass a directory"),
    ("dataset", r"--data.cache_dir is for --data.dataset image_folder; fashion_mnist is read whole"),
    ("truncated", r"\.npy: not a readable image cache .*delete it and run again"),
    ("wrong_shape", r"\.npy: holds uint8 \(3, 2\), not the uint8 \(24, 1, 16, 16\) its name promises"),
])  # fmt: skip
def test_bad_cache_inputs_name_the_argument_or_file(folder, tmp_path, problem, message, monkeypatch):
    cache = tmp_path / "cache"
    if problem == "file":
        (tmp_path / "a_file").write_text("x")
        cache = tmp_path / "a_file"
    elif problem == "dataset":
        with pytest.raises(DatasetError, match=message):
            ImageSplits("fashion_mnist", cache_dir=str(cache))
        return
    else:
        arrays(splits(folder, cache))
        (file,) = cache.iterdir()
        if problem == "truncated":
            file.write_bytes(file.read_bytes()[:100])
        else:
            np.save(file, np.zeros((3, 2), np.uint8))
        no_decoding(monkeypatch)
    with pytest.raises(DatasetError, match=message):
        arrays(splits(folder, cache))


def write_cgroup(folder: Path, files: dict[str, str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text + "\n")


def test_cgroup_limits_count_as_the_memory_a_process_can_take(tmp_path: Path) -> None:
    """A SLURM job or container: its cgroup's limit less its use (the inactive file cache not counted), the
    tightest over the process's cgroup and its parents, for cgroup v2 and v1; no limit or nothing to read is
    None (then /proc/meminfo's MemAvailable alone decides)."""
    from common.memory import cgroup_headroom

    proc = tmp_path / "cgroup"
    fs = tmp_path / "fs"
    proc.write_text("0::/job/step\n")
    write_cgroup(fs, {"cgroup.controllers": "cpu memory"})  # a v2 hierarchy's root
    write_cgroup(fs / "job" / "step", {"memory.max": "max", "memory.current": "100"})
    assert cgroup_headroom(proc, fs) is None  # no limit anywhere
    write_cgroup(fs / "job", {"memory.max": "1000", "memory.current": "700",
                              "memory.stat": "anon 1\ninactive_file 200"})  # fmt: skip
    assert cgroup_headroom(proc, fs) == 1000 - (700 - 200)  # the parent's limit, its file cache reclaimable
    write_cgroup(fs / "job" / "step", {"memory.max": "600", "memory.current": "550"})
    assert cgroup_headroom(proc, fs) == 50  # the tighter of the two
    (fs / "cgroup.controllers").unlink()
    assert cgroup_headroom(proc, fs) is None  # not a v2 hierarchy (a v1 host's tmpfs): its files are not read
    proc.write_text("4:memory:/elsewhere\n1:cpu:/x\n")  # v1, a namespace whose path is not under the mount
    write_cgroup(fs / "memory", {"memory.limit_in_bytes": "4096", "memory.usage_in_bytes": "5000",
                                 "memory.stat": "total_inactive_file 2000"})  # fmt: skip
    assert cgroup_headroom(proc, fs) == 4096 - 3000
    write_cgroup(fs / "memory", {"memory.limit_in_bytes": str(2**63 - 4096)})  # v1's "unlimited"
    assert cgroup_headroom(proc, fs) is None
    assert cgroup_headroom(tmp_path / "missing", fs) is None
