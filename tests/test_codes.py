"""Tests for common/codes.py, the codes format shared by both stages: round trip, atomicity, every rejection."""

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from common.codes import (
    FORMAT_VERSION,
    CodesError,
    CodesMeta,
    check_matches,
    check_stage1,
    load_split,
    read_meta,
    sha256_file,
)
from common.codes_writer import CodesWriter

K, GRID = 16, (3, 4)


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    path = tmp_path / "stage1.ckpt"
    path.write_bytes(b"not really a checkpoint, but it has a hash")
    return path


def make_meta(ckpt: Path, **overrides) -> CodesMeta:
    fields = dict(
        codebook_size=K, grid_shape=GRID, num_classes=3, class_names=["a", "b", "c"], image_size=16,
        channels=1, stage1_ckpt=str(ckpt), stage1_sha256=sha256_file(ckpt), dataset="test",
    )  # fmt: skip
    return CodesMeta(**{**fields, **overrides})


def random_codes(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, K, (n, *GRID))


def write_codes(out: Path, ckpt: Path, splits: dict[str, int], overwrite: bool = False) -> dict:
    """Write each split in two batches (numpy, then torch); returns {split: (codes, labels)}."""
    arrays = {}
    with CodesWriter(out, make_meta(ckpt), overwrite=overwrite) as writer:
        for i, (split, n) in enumerate(splits.items()):
            codes, labels = random_codes(n, seed=i), np.arange(n) % 3
            w = writer.add_split(split, n)
            half = n // 2
            w.write(0, codes[:half], labels[:half])
            w.write(half, torch.from_numpy(codes[half:]), torch.from_numpy(labels[half:]))
            arrays[split] = (codes, labels)
        writer.commit()
    return arrays


def test_round_trip(tmp_path: Path, ckpt: Path) -> None:
    arrays = write_codes(tmp_path / "codes", ckpt, {"train": 10, "val": 3, "test": 0})
    meta = read_meta(tmp_path / "codes")
    assert meta == make_meta(ckpt, counts={"train": 10, "val": 3, "test": 0})
    assert meta.format_version == FORMAT_VERSION and meta.grid_shape == GRID
    for split, (codes, labels) in arrays.items():
        got_codes, got_labels = load_split(tmp_path / "codes", split)
        assert got_codes.dtype == np.uint16 and got_codes.shape == (len(codes), *GRID)
        assert got_labels.dtype == np.int64
        np.testing.assert_array_equal(got_codes, codes)
        np.testing.assert_array_equal(got_labels, labels)
    assert isinstance(load_split(tmp_path / "codes", "train")[0], np.memmap)
    assert CodesMeta.from_json(meta.to_json()) == meta


def test_unlabelled_rows_are_minus_one(tmp_path: Path, ckpt: Path) -> None:
    with CodesWriter(tmp_path, make_meta(ckpt, num_classes=0, class_names=[])) as writer:
        writer.add_split("train", 4).write(0, random_codes(4))
        writer.commit()
    assert load_split(tmp_path, "train")[1].tolist() == [-1] * 4


def test_killed_write_leaves_no_meta(tmp_path: Path, ckpt: Path) -> None:
    out = tmp_path / "codes"
    writer = CodesWriter(out, make_meta(ckpt))
    writer.add_split("train", 4).write(0, random_codes(4))
    # The process dies here: no commit, no cleanup.
    assert not (out / "meta.json").exists() and not (out / "train" / "codes.npy").exists()
    with pytest.raises(CodesError, match="no meta.json.*extract_codes"):
        read_meta(out)
    with pytest.raises(CodesError, match="no meta.json"):
        load_split(out, "train")


def test_exception_before_commit_removes_temp_files_and_keeps_old_codes(tmp_path: Path, ckpt: Path) -> None:
    out = tmp_path / "codes"
    old = write_codes(out, ckpt, {"train": 6})
    with pytest.raises(RuntimeError), CodesWriter(out, make_meta(ckpt), overwrite=True) as writer:
        writer.add_split("train", 6).write(0, random_codes(6, seed=5))
        raise RuntimeError("killed")
    assert sorted(p.name for p in (out / "train").iterdir()) == ["codes.npy", "labels.npy"]
    np.testing.assert_array_equal(load_split(out, "train")[0], old["train"][0])


def test_existing_codes_need_overwrite(tmp_path: Path, ckpt: Path) -> None:
    out = tmp_path / "codes"
    write_codes(out, ckpt, {"train": 4, "test": 2})
    with pytest.raises(CodesError, match="--overwrite"):
        CodesWriter(out, make_meta(ckpt))
    new = write_codes(out, ckpt, {"train": 5}, overwrite=True)
    assert read_meta(out).counts == {"train": 5}
    np.testing.assert_array_equal(load_split(out, "train")[0], new["train"][0])
    assert not (out / "test" / "codes.npy").exists()  # stale split removed
    with pytest.raises(CodesError, match="no 'test' split"):
        load_split(out, "test")


def test_commit_refuses_unwritten_rows(tmp_path: Path, ckpt: Path) -> None:
    with CodesWriter(tmp_path, make_meta(ckpt)) as writer:
        writer.add_split("train", 4).write(0, random_codes(3))
        with pytest.raises(CodesError, match="1 of 4 rows were never written"):
            writer.commit()
    assert not (tmp_path / "meta.json").exists()


@pytest.mark.parametrize(
    "codes, match",
    [
        (np.full((2, *GRID), K), r"\[0, 16\)"),
        (np.full((2, *GRID), -1), r"\[0, 16\)"),
        (np.zeros((2, 4, 3), np.int64), "shape"),
        (np.zeros((2, *GRID), np.float32), "integers"),
        (np.zeros((5, *GRID), np.int64), "out of bounds"),
    ],
)
def test_write_rejects_bad_codes(tmp_path: Path, ckpt: Path, codes: np.ndarray, match: str) -> None:
    with CodesWriter(tmp_path, make_meta(ckpt)) as writer:
        w = writer.add_split("train", 4)
        with pytest.raises(CodesError, match=match):
            w.write(0, codes)


def test_codebook_must_fit_uint16(tmp_path: Path, ckpt: Path) -> None:
    CodesWriter(tmp_path / "ok", make_meta(ckpt, codebook_size=65536))
    with pytest.raises(CodesError, match="uint16"):
        CodesWriter(tmp_path / "bad", make_meta(ckpt, codebook_size=65537))


def test_read_meta_rejections(tmp_path: Path, ckpt: Path) -> None:
    with pytest.raises(CodesError, match="does not exist.*extract_codes"):
        read_meta(tmp_path / "missing")
    with pytest.raises(CodesError, match="no meta.json"):
        read_meta(tmp_path)
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(CodesError, match="not valid JSON.*extract_codes"):
        read_meta(tmp_path)
    future = json.loads(make_meta(ckpt).to_json()) | {"format_version": FORMAT_VERSION + 1}
    (tmp_path / "meta.json").write_text(json.dumps(future))
    with pytest.raises(CodesError, match=f"version {FORMAT_VERSION + 1}.*extract_codes --ckpt {ckpt}"):
        read_meta(tmp_path)
    partial = json.loads(make_meta(ckpt).to_json())
    del partial["grid_shape"]
    (tmp_path / "meta.json").write_text(json.dumps(partial))
    with pytest.raises(CodesError, match="missing grid_shape"):
        read_meta(tmp_path)


@pytest.mark.parametrize(
    "replace, match",
    [
        (lambda c: c.astype(np.int32), "dtype int32"),
        (lambda c: c[:, :, :2], r"grid \(3, 4\)"),
        (lambda c: c[:-1], "meta.json says 6 images"),
        (lambda c: np.full_like(c, K), "code 16 out of range"),
    ],
    ids=["dtype", "grid", "count", "range"],
)
def test_load_split_rejects_bad_arrays(tmp_path: Path, ckpt: Path, replace, match: str) -> None:
    codes, _ = write_codes(tmp_path, ckpt, {"train": 6})["train"]
    np.save(tmp_path / "train" / "codes.npy", replace(codes.astype(np.uint16)))
    with pytest.raises(CodesError, match=f"{match}.*extract_codes"):
        load_split(tmp_path, "train")


def test_load_split_rejects_bad_labels_and_missing_files(tmp_path: Path, ckpt: Path) -> None:
    write_codes(tmp_path, ckpt, {"train": 6})
    np.save(tmp_path / "train" / "labels.npy", np.zeros(5, np.int64))
    with pytest.raises(CodesError, match="labels.npy"):
        load_split(tmp_path, "train")
    np.save(tmp_path / "train" / "labels.npy", np.full(6, 3, np.int64))  # num_classes is 3
    with pytest.raises(CodesError, match="labels in"):
        load_split(tmp_path, "train")
    (tmp_path / "train" / "labels.npy").unlink()
    with pytest.raises(CodesError, match="missing"):
        load_split(tmp_path, "train")
    (tmp_path / "train" / "codes.npy").write_bytes(b"garbage")
    with pytest.raises(CodesError, match="not a readable"):
        load_split(tmp_path, "train")


def test_check_stage1(tmp_path: Path, ckpt: Path) -> None:
    meta = make_meta(ckpt)
    assert check_stage1(meta) == str(ckpt)
    copy = tmp_path / "copy.ckpt"
    copy.write_bytes(ckpt.read_bytes())
    assert check_stage1(meta, copy) == str(copy)
    with pytest.raises(CodesError, match="nowhere.ckpt does not exist"):
        check_stage1(meta, tmp_path / "nowhere.ckpt")
    ckpt.write_bytes(b"retrained")
    with pytest.raises(CodesError, match="changed since extraction"):
        check_stage1(meta)
    ckpt.unlink()
    with pytest.raises(CodesError, match="moved or deleted since extraction; pass --vqvae PATH"):
        check_stage1(meta)


def test_check_matches(ckpt: Path) -> None:
    meta = asdict(make_meta(ckpt))
    prior = {"codebook_size": K, "grid_shape": list(GRID), "num_classes": meta["num_classes"],
             "stage1_sha256": meta["stage1_sha256"]}  # fmt: skip
    check_matches(prior, meta, "codes", "fix")
    check_matches({**prior, "num_classes": 0}, meta, "codes", "fix")  # unconditional priors fit labelled codes
    check_matches({**prior, "stage1_sha256": None}, meta, "codes", "fix")  # unknown facts are not compared
    with pytest.raises(CodesError, match=r"codes does not fit the prior: codebook_size 16 \(the prior's: 32\); do X"):
        check_matches({**prior, "codebook_size": 32}, meta, "the codes", "do X")
    with pytest.raises(CodesError, match=r"grid_shape \(3, 4\) \(the prior's: \(4, 4\)\)"):
        check_matches({**prior, "grid_shape": (4, 4)}, meta, "codes", "fix")
    with pytest.raises(CodesError, match=r"num_classes .*; stage1_sha256 .*\(the prior's: 000000000000...\)"):
        check_matches({**prior, "num_classes": 7, "stage1_sha256": "0" * 64}, meta, "codes", "fix")


def test_the_stage1_copy_is_the_checkpoint_the_codes_came_from(tmp_path: Path, ckpt: Path) -> None:
    """The writer keeps a byte copy of the stage-1 checkpoint (0644, like the arrays); one that changed while the
    codes were extracted (a run still writing its last.ckpt) is refused and nothing is left behind."""
    out = tmp_path / "codes"
    with CodesWriter(out, make_meta(ckpt)) as w:
        w.add_split("test", 0)
        w.copy_stage1(ckpt)
        meta = w.commit()
    assert meta.stage1_copy == "stage1.ckpt" and read_meta(out).stage1_copy == "stage1.ckpt"
    copy = out / "stage1.ckpt"
    assert copy.read_bytes() == ckpt.read_bytes() and copy.stat().st_mode & 0o777 == 0o644
    meta = make_meta(ckpt)
    ckpt.write_bytes(b"rewritten by a run still training")
    with pytest.raises(CodesError, match="changed while its codes were extracted"):
        with CodesWriter(tmp_path / "other", meta) as w:
            w.add_split("test", 0)
            w.copy_stage1(ckpt)
    assert not [p for p in (tmp_path / "other").rglob("*") if p.is_file()]  # no copy, no temporary file


def test_writer_never_deletes_outside_its_own_splits(tmp_path: Path, ckpt: Path) -> None:
    """A crafted old meta.json naming "../victim" as a split must not make --overwrite delete outside --out."""
    out, victim = tmp_path / "codes", tmp_path / "victim"
    victim.mkdir()
    (victim / "codes.npy").write_bytes(b"precious")
    (victim / "labels.npy").write_bytes(b"precious")
    with CodesWriter(out, make_meta(ckpt)) as w:
        w.add_split("train", 2).write(0, np.zeros((2, *GRID), np.int64))
        w.commit()
    meta = json.loads((out / "meta.json").read_text())
    meta["counts"]["../victim"] = 2
    (out / "meta.json").write_text(json.dumps(meta))
    with CodesWriter(out, make_meta(ckpt), overwrite=True) as w:
        w.add_split("test", 1).write(0, np.zeros((1, *GRID), np.int64))
        w.commit()
    assert (victim / "codes.npy").read_bytes() == b"precious" and (victim / "labels.npy").read_bytes() == b"precious"
    assert not (out / "train" / "codes.npy").exists()  # our own stale split is removed
    with pytest.raises(CodesError, match="not a split name"):
        CodesWriter(out, make_meta(ckpt), overwrite=True).add_split("../victim", 1)


def test_sha256_file(ckpt: Path) -> None:
    assert sha256_file(ckpt, chunk_size=7) == hashlib.sha256(ckpt.read_bytes()).hexdigest()
