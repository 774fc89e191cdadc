"""What a `.vqz` or a codes directory records is the SHA-256 of the checkpoint bytes whose weights were used, even
when the file is rewritten meanwhile (a run still training); and `compress` warns that a run's last.ckpt or
best.ckpt will be rewritten. The races are made deterministic by rewriting the file inside a monkeypatched step
that runs after the weights are loaded and before the old code hashed the file."""

from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import user_error
from PIL import Image

import stage1_vqvae.extract as extract
import tools.load as load_module
from common.checkpoint import CheckpointError, open_checkpoint, read_checkpoint
from common.codes import read_meta, sha256_file
from stage1_vqvae.vqvae import VQVAE
from stage2_prior.prior import Prior
from tools.compress import main_compress, main_decompress
from tools.container import unpack

K, GRID, SIZE = 16, (4, 4), 16


def save_ckpt(model: pl.LightningModule, path: Path, **extra) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams), **extra}, path)
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    """Two tiny stage 1s (A, B) and two pixelcnn priors over A's codes (A, B), with 3 images to compress."""
    tmp = tmp_path_factory.mktemp("loaded_bytes")
    paths = {}
    for name, seed in [("stage1_a", 0), ("stage1_b", 1)]:
        torch.manual_seed(seed)
        paths[name] = save_ckpt(VQVAE(1, SIZE, 16, 1, 8, 4, 8, codebook_size=K).eval(), tmp / f"{name}.ckpt")
    meta = dict(codebook_size=K, grid_shape=list(GRID), num_classes=0, class_names=[], image_size=SIZE, channels=1,
                stage1_ckpt=str(paths["stage1_a"]), stage1_sha256=sha256_file(paths["stage1_a"]))  # fmt: skip
    for name, seed in [("prior_a", 0), ("prior_b", 1)]:
        torch.manual_seed(seed)
        prior = Prior(kind="pixelcnn", size="tiny", codebook_size=K, grid_shape=GRID, num_classes=0, codes_meta=meta)
        paths[name] = save_ckpt(prior, tmp / f"{name}.ckpt")
    rng = np.random.default_rng(0)
    (tmp / "images").mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)).save(tmp / "images" / f"{i}.png")
    paths["images"] = tmp / "images"
    return paths


def rewrite(live: Path, new: Path) -> None:
    """`live` gets `new`'s bytes, renamed into place as a run saves its checkpoint."""
    tmp = live.with_suffix(".tmp")
    tmp.write_bytes(new.read_bytes())
    tmp.replace(live)


@pytest.mark.parametrize("rewritten", ["prior", "stage1"])
def test_a_vqz_names_the_checkpoints_that_coded_it(ckpts, tmp_path: Path, monkeypatch, rewritten) -> None:
    """F3(b): the prior (or the --vqvae) file is rewritten just after its weights are loaded; the .vqz records the
    hashes of the bytes that were loaded, so it decodes with those. It used to hash the files again, the prior
    after coding: it recorded the new file's, no checkpoint decoded it, and `decompress` blamed the CPU."""
    live = tmp_path / "live.ckpt"
    live.write_bytes(ckpts[f"{rewritten}_a"].read_bytes())
    load = getattr(load_module, f"load_{rewritten}")

    def load_then_rewrite(*args, **kwargs):
        loaded = load(*args, **kwargs)
        rewrite(live, ckpts[f"{rewritten}_b"])
        return loaded

    monkeypatch.setattr(load_module, f"load_{rewritten}", load_then_rewrite)
    prior = live if rewritten == "prior" else ckpts["prior_a"]
    vqvae = live if rewritten == "stage1" else ckpts["stage1_a"]
    vqz_file = tmp_path / "x.vqz"
    main_compress([str(ckpts["images"]), "--prior", str(prior), "--vqvae", str(vqvae), "--out", str(vqz_file)])
    assert sha256_file(live) == sha256_file(ckpts[f"{rewritten}_b"])  # the rewrite did happen
    c = unpack(vqz_file.read_bytes())
    assert (c.prior_sha256, c.stage1_sha256) == (sha256_file(ckpts["prior_a"]), sha256_file(ckpts["stage1_a"]))
    monkeypatch.undo()
    main_decompress([str(vqz_file), "--prior", str(ckpts["prior_a"]), "--vqvae", str(ckpts["stage1_a"]),
                     "--out", str(tmp_path / "decoded")])  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "decoded").iterdir()) == ["0.png", "1.png", "2.png"]


def test_decompress_with_a_rewritten_prior_says_what_rewrote_it(ckpts, tmp_path: Path, capsys) -> None:
    vqz_file = tmp_path / "x.vqz"
    main_compress([str(ckpts["images"]), "--prior", str(ckpts["prior_a"]), "--out", str(vqz_file)])
    err = user_error(main_decompress, [str(vqz_file), "--prior", str(ckpts["prior_b"]), "--out",
                                       str(tmp_path / "out")], capsys)  # fmt: skip
    assert "different prior" in err and "pass the prior it was made with (--prior)" in err
    assert "a resumed or continued training run rewrites its last.ckpt/best.ckpt" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["last.ckpt", "best.ckpt"])
def test_compress_notes_a_training_runs_checkpoint(ckpts, tmp_path: Path, capsys, name: str) -> None:
    """F3(a): a run's last.ckpt/best.ckpt is rewritten by a resume or a later validation, after which its .vqz
    files decode with nothing: `compress` says so in one note (exit 0) and how to keep the prior."""
    run_prior = tmp_path / "runs" / "p" / "version_0" / "checkpoints" / name
    run_prior.parent.mkdir(parents=True)
    run_prior.write_bytes(ckpts["prior_a"].read_bytes())
    linked = tmp_path / "prior.ckpt"  # a link to it is the same file
    linked.symlink_to(run_prior)
    for prior in (run_prior, linked):
        capsys.readouterr()
        main_compress([str(ckpts["images"]), "--prior", str(prior), "--out", str(tmp_path / "x.vqz"), "--overwrite"])
        captured = capsys.readouterr()
        assert "3 images" in captured.out
        err = captured.err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("compress: note: ") and "Traceback" not in captured.err
        assert f"training run's {name}" in err[0] and "rewrites" in err[0]
        assert f"cp {prior} prior_for_vqz.ckpt" in err[0]
    main_compress([str(ckpts["images"]), "--prior", str(ckpts["prior_a"]), "--out", str(tmp_path / "y.vqz")])
    assert capsys.readouterr().err == ""  # any other prior: no note


def test_extract_records_the_weights_it_encoded_with(ckpts, shapes_folder: Path, tmp_path: Path, monkeypatch,
                                                     capsys) -> None:  # fmt: skip
    """F9: the stage-1 file is rewritten after `extract_codes` loaded its weights and before it hashed the file:
    refused (the codes would be A's under B's hash and copy), and nothing is written."""
    live = tmp_path / "live.ckpt"
    live.write_bytes(ckpts["stage1_a"].read_bytes())
    build_parser = extract.build_parser

    def rewritten_then_build(*args, **kwargs):  # called after the weights are loaded
        rewrite(live, ckpts["stage1_b"])
        return build_parser(*args, **kwargs)

    monkeypatch.setattr(extract, "build_parser", rewritten_then_build)
    args = ["--ckpt", str(live), "--out", str(tmp_path / "codes"), "--splits", "test", "--accelerator", "cpu",
            "--data.dataset", "image_folder", "--data.root", str(shapes_folder), "--data.val_size", "4",
            "--data.test_size", "4"]  # fmt: skip
    err = user_error(extract.main, args, capsys)
    assert f"stage-1 checkpoint {live.resolve()} changed while its codes were extracted" in err
    assert not (tmp_path / "codes" / "meta.json").exists()
    monkeypatch.undo()  # unchanged: extracted, under the hash of the file the weights came from
    extract.main(args)
    assert read_meta(tmp_path / "codes").stage1_sha256 == sha256_file(ckpts["stage1_b"]) == sha256_file(live)


def test_read_checkpoint_loads_the_file_it_opened(ckpts, tmp_path: Path) -> None:
    """A CheckpointFile is loaded and hashed through the file it opened, not the path (replaced since), and keeps
    the file's errors: a missing or corrupt file is one CheckpointError naming the flag."""
    path = tmp_path / "x.ckpt"
    path.write_bytes(ckpts["stage1_a"].read_bytes())
    source = open_checkpoint(path, "--vqvae", "stage1")
    rewrite(path, ckpts["stage1_b"])  # as every writer here does: a new file renamed into place
    loaded = read_checkpoint(source, "--vqvae", want="stage1")["state_dict"]
    want = torch.load(ckpts["stage1_a"], weights_only=True)["state_dict"]
    assert loaded.keys() == want.keys() and all(torch.equal(loaded[k], want[k]) for k in want)
    assert source.sha256 == sha256_file(ckpts["stage1_a"]) and str(source) == str(path)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"^--vqvae .*x\.ckpt is not a PyTorch checkpoint"):
        read_checkpoint(path, "--vqvae", want="stage1")
    with pytest.raises(CheckpointError, match=r"^--prior .*gone\.ckpt: no such file; pass a stage-2 prior checkpoint"):
        open_checkpoint(tmp_path / "gone.ckpt", "--prior", "prior")


def test_the_stage_1_the_codes_name_is_hashed_once_and_loaded_from_that_file(ckpts, tmp_path: Path,
                                                                             monkeypatch) -> None:  # fmt: skip
    """load_models found the codes' stage 1 by hashing its path, then opened and hashed it again to load it (the
    file read twice a command); now the file hashed is the file loaded: replaced right after the check, the
    weights are still those the check saw, and check_matches compares the same hash."""
    live = tmp_path / "stage1.ckpt"
    live.write_bytes(ckpts["stage1_a"].read_bytes())
    prior = torch.load(ckpts["prior_a"], weights_only=True)
    prior["hyper_parameters"]["codes_meta"]["stage1_ckpt"] = str(live)
    torch.save(prior, tmp_path / "prior.ckpt")
    original = load_module.stage1_path_of

    def then_replaced(*args, **kwargs):
        found = original(*args, **kwargs)
        rewrite(live, ckpts["stage1_b"])  # another run's stage 1 lands under the name just checked
        return found

    monkeypatch.setattr(load_module, "stage1_path_of", then_replaced)
    models = load_module.load_models(tmp_path / "prior.ckpt")
    want = torch.load(ckpts["stage1_a"], weights_only=True)["state_dict"]
    got = models.vqvae.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in got)
    assert models.stage1_sha256 == sha256_file(ckpts["stage1_a"])
