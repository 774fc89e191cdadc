"""An output checked without --overwrite is never replaced at the end either: a file that appears under its
name while the command runs (another command given the same --out) survives, and this one stops with one line
(common.io's link-based commit; the codes writer's commit takes turns under an flock)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from common.cli import run_command
from common.codes import CodesError, CodesMeta, load_split, sha256_file
from common.codes_writer import CodesWriter
from common.io import OutputClash, atomic_file, check_output, check_output_dir, staging_dir, write_atomic
from tests.conftest import user_error
from tools.sample_outputs import write_outputs


def leftovers(folder: Path) -> list[str]:
    """Temporary files or folders of ours still there."""
    return sorted(p.name for p in folder.rglob(".*.tmp"))


def test_a_file_that_appears_meanwhile_is_not_replaced(tmp_path: Path) -> None:
    out = check_output(tmp_path / "same.png", overwrite=False)
    with pytest.raises(OutputClash, match=r"--out .*same.png appeared while this ran .*nothing was replaced"):
        with atomic_file(out) as f:
            f.write(b"ours")
            out.write_bytes(b"the other process's")  # it finished first
    assert out.read_bytes() == b"the other process's" and not leftovers(tmp_path)


def test_with_overwrite_it_is_replaced_as_before(tmp_path: Path) -> None:
    out = check_output(tmp_path / "same.png", overwrite=False)
    out = check_output(out, overwrite=True)  # a later command in this process, given --overwrite
    with atomic_file(out) as f:
        f.write(b"ours")
        out.write_bytes(b"the other process's")
    assert out.read_bytes() == b"ours"
    write_atomic(out, b"again")  # not checked at all (a log, a cache): replaced as always
    assert out.read_bytes() == b"again"


def test_a_clash_is_one_line_and_exit_2(tmp_path: Path, capsys) -> None:
    out = tmp_path / "x.csv"

    def command(args):
        check_output(out, overwrite=False)
        out.write_bytes(b"the other process's")  # while this one works
        write_atomic(out, b"ours")
        return "wrote it"

    err = user_error(lambda a: run_command("cmd", command, a), [], capsys)
    assert "--out" in err and str(out) in err and "nothing was replaced" in err
    assert out.read_bytes() == b"the other process's" and not leftovers(tmp_path)


@pytest.mark.parametrize("appears", ["the same names", "one of the names", "an empty folder"])
def test_a_folder_is_merged_into_only_where_nothing_is_replaced(tmp_path: Path, appears: str) -> None:
    """decompress --out DIR, sample --images DIR: a folder that appears meanwhile with one of our names stops
    the merge and none of ours stays; an empty one (or one with other names) is simply filled."""
    dest = check_output_dir(tmp_path / "images", ["a.png", "b.png", "sub/c.png"], overwrite=False)
    theirs = {"the same names": ["a.png", "b.png", "sub/c.png"], "one of the names": ["sub/c.png"],
              "an empty folder": []}[appears]  # fmt: skip

    def write():
        with staging_dir(dest) as tmp:
            (tmp / "sub").mkdir()
            for name in ("a.png", "b.png", "sub/c.png"):
                (tmp / name).write_bytes(b"ours")
            dest.mkdir()
            for name in theirs:
                (dest / name).parent.mkdir(exist_ok=True)
                (dest / name).write_bytes(b"theirs")

    if not theirs:
        write()
        assert {p.read_bytes() for p in dest.rglob("*.png")} == {b"ours"} and len(list(dest.rglob("*.png"))) == 3
    else:
        with pytest.raises(OutputClash, match=r"--out .*images: .*\.png appeared while this ran"):
            write()
        assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*.png")) == theirs
        assert {p.read_bytes() for p in dest.rglob("*.png")} == {b"theirs"}
    assert not leftovers(tmp_path)


def test_sample_outputs_are_all_or_none(tmp_path: Path) -> None:
    """A grid that appears while `sample` draws: its .npz (linked in first) is taken back, the grid survives."""
    grid_path = check_output(tmp_path / "same.png", overwrite=False)
    npz_path = check_output(tmp_path / "same.npz", overwrite=False)
    grid_path.write_bytes(b"the other process's grid")
    n = 2
    with pytest.raises(OutputClash, match="same.png appeared while this ran"):
        write_outputs(grid_path, np.zeros((10, 10, 1), np.uint8), npz_path, torch.zeros(n, 2, 2, dtype=torch.long),
                      torch.zeros(n, 1, 4, 4), None, tmp_path / "stage1.ckpt", None)  # fmt: skip
    assert grid_path.read_bytes() == b"the other process's grid"
    assert not npz_path.exists() and not leftovers(tmp_path)


def make_meta(ckpt: Path) -> CodesMeta:
    return CodesMeta(codebook_size=16, grid_shape=(3, 4), num_classes=0, class_names=[], image_size=16, channels=1,
                     stage1_ckpt=str(ckpt), stage1_sha256=sha256_file(ckpt))  # fmt: skip


def test_two_extractions_into_one_new_dir(tmp_path: Path) -> None:
    """Both start before either has written: the second to commit stops, and the first one's codes and stage-1
    copy stay as they were."""
    out, a, b = tmp_path / "codes", tmp_path / "a.ckpt", tmp_path / "b.ckpt"
    a.write_bytes(b"stage 1 A")
    b.write_bytes(b"stage 1 B")
    codes = {ckpt: np.random.default_rng(i).integers(0, 16, (4, 3, 4)) for i, ckpt in enumerate((a, b))}
    writers = {ckpt: CodesWriter(out, make_meta(ckpt)) for ckpt in (a, b)}  # both pass the check at the start
    for ckpt, w in writers.items():
        w.add_split("train", 4).write(0, codes[ckpt])
        w.copy_stage1(ckpt)
    writers[a].commit()
    with pytest.raises(CodesError, match=r"--out .*codes: codes were written there while this ran.*nothing was "):
        with writers[b]:
            writers[b].commit()
    assert np.array_equal(load_split(out, "train")[0], codes[a])
    assert (out / "stage1.ckpt").read_bytes() == b"stage 1 A" and not list(out.glob("stage1-*"))
    assert not leftovers(tmp_path)
