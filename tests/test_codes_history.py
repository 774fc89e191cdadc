"""`extract_codes --overwrite` with another stage 1 keeps the earlier stage-1 copy of the codes directory
(stage1-<sha12>.ckpt): the priors trained on the earlier codes, and their .vqz files, still find the stage 1
they decode with after its run was resumed (last.ckpt rewritten), and no output may replace that copy."""

from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from common.codes import CodesError, CodesMeta, check_stage1, codes_files, read_meta, sha256_file
from common.codes_writer import CodesWriter
from common.io import check_not_an_input
from tools.load import stage1_path_of

K, GRID = 16, (3, 4)


def extract(out: Path, ckpt: Path, overwrite: bool = False, seed: int = 0) -> CodesMeta:
    """What extract_codes does with the writer: codes, then the byte copy of `ckpt`, then commit."""
    meta = CodesMeta(codebook_size=K, grid_shape=GRID, num_classes=0, class_names=[], image_size=16, channels=1,
                     stage1_ckpt=str(ckpt), stage1_sha256=sha256_file(ckpt))  # fmt: skip
    with CodesWriter(out, meta, overwrite=overwrite) as w:
        w.add_split("train", 4).write(0, np.random.default_rng(seed).integers(0, K, (4, *GRID)))
        w.copy_stage1(ckpt)
        return w.commit()


@pytest.fixture
def resumed(tmp_path: Path, capsys) -> tuple[Path, CodesMeta, CodesMeta, str]:
    """Codes extracted from last.ckpt (version A), the run resumed (last.ckpt rewritten: version B), the codes
    extracted again into the same directory with --overwrite. (codes dir, A's meta, B's meta, stdout of that)."""
    ckpt, out = tmp_path / "last.ckpt", tmp_path / "codes"
    ckpt.write_bytes(b"stage 1 after 20 steps")
    old = extract(out, ckpt)
    ckpt.write_bytes(b"stage 1 after 40 steps: the run was resumed")  # the only other copy is in `out` now
    capsys.readouterr()
    new = extract(out, ckpt, overwrite=True, seed=1)
    return out, old, new, capsys.readouterr().out


def test_overwrite_keeps_the_earlier_stage1_under_its_hash(resumed) -> None:
    out, old, new, printed = resumed
    kept = out / f"stage1-{old.stage1_sha256[:12]}.ckpt"
    assert sha256_file(kept) == old.stage1_sha256 and kept.read_bytes() == b"stage 1 after 20 steps"
    assert sha256_file(out / "stage1.ckpt") == new.stage1_sha256 == read_meta(out).stage1_sha256
    line = [s for s in printed.splitlines() if "kept" in s]
    assert len(line) == 1 and str(kept) in line[0] and "priors" in line[0], printed


def test_a_prior_of_the_earlier_codes_finds_its_stage1(resumed, tmp_path: Path) -> None:
    """What sample, compress, decompress and score_anomalies ask (tools.load): the stage 1 of an old prior."""
    out, old, new, _ = resumed
    kept = out / f"stage1-{old.stage1_sha256[:12]}.ckpt"
    assert check_stage1(old, codes_dirs=[out]) == str(kept)
    prior_meta = {**asdict(old), "codes_dir_resolved": str(out), "codes_dir": str(out)}
    assert stage1_path_of(prior_meta, tmp_path / "prior.ckpt") == kept
    assert check_stage1(new, codes_dirs=[out]) == new.stage1_ckpt  # the new codes: their checkpoint, unchanged


def test_the_kept_copy_is_a_file_of_the_codes_that_no_output_replaces(resumed) -> None:
    out, old, _, _ = resumed
    kept = out / f"stage1-{old.stage1_sha256[:12]}.ckpt"
    assert kept in codes_files(out)
    with pytest.raises(OSError, match="never writes over its own input"):
        check_not_an_input(kept, {"a file of --codes": codes_files(out)})


def test_extracting_again_keeps_each_stage1_once(resumed, capsys) -> None:
    """The same stage 1 again: nothing new to keep, nothing said; the first one back: it is stage1.ckpt again, and
    its kept copy, the same bytes, is removed (it stayed: two copies of one checkpoint, each as large as the model)."""
    out, old, new, _ = resumed
    ckpt = Path(new.stage1_ckpt)
    extract(out, ckpt, overwrite=True)
    assert "kept" not in capsys.readouterr().out
    ckpt.write_bytes(b"stage 1 after 20 steps")  # the earlier one, restored from a backup
    extract(out, ckpt, overwrite=True)
    assert sorted(p.name for p in out.glob("stage1*.ckpt")) == ["stage1-" + new.stage1_sha256[:12] + ".ckpt",
                                                                "stage1.ckpt"]  # fmt: skip
    assert f"removed {out / ('stage1-' + old.stage1_sha256[:12] + '.ckpt')}" in capsys.readouterr().out
    ckpt.write_bytes(b"moved away")
    assert check_stage1(old, codes_dirs=[out]) == str(out / "stage1.ckpt")  # the earlier codes' prior finds it
    assert check_stage1(new, codes_dirs=[out]).endswith(f"stage1-{new.stage1_sha256[:12]}.ckpt")


def test_a_stranded_prior_is_told_to_retrain_not_to_extract_again(resumed) -> None:
    """With every copy of its stage 1 gone, extracting again cannot help an old prior: the message says so."""
    out, old, _, _ = resumed
    (out / f"stage1-{old.stage1_sha256[:12]}.ckpt").unlink()  # by hand: only then is its stage 1 gone
    with pytest.raises(CodesError, match="changed since extraction") as info:
        check_stage1(old, codes_dirs=[out])
    assert "retrain the prior" in str(info.value) and "extract_codes" not in str(info.value)
