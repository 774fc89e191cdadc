"""The four commands end to end on a tiny generated dataset, then the `sample` options and errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import crashed_and_resumed_equals_straight, user_error
from PIL import Image

from common.cli import UserError, parse_classes
from common.codes import load_split
from stage1_vqvae.extract import main as extract_main
from stage1_vqvae.train import main as train_stage1
from stage2_prior.pixelcnn import GatedPixelCNN
from stage2_prior.train import main as train_stage2
from stage2_prior.transformer import Transformer
from tools import drawing
from tools.load import load_models
from tools.sample import main as sample_main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def pipeline(shapes_folder, tmp_path_factory) -> dict[str, Path]:
    """train_stage1 -> extract_codes -> train_stage2 on the 16x16 shapes (two classes)."""
    root = tmp_path_factory.mktemp("pipeline")
    train_stage1([
        "fit", "--config", str(CONFIGS / "stage1/tiny.yaml"), "--trainer.default_root_dir", str(root / "s1"),
        "--data.dataset", "image_folder", "--data.root", str(shapes_folder), "--data.image_size", "16",
        "--data.val_size", "8", "--data.test_size", "8", "--data.batch_size", "16",
    ])  # fmt: skip
    stage1 = root / "s1/latest/checkpoints/last.ckpt"
    extract_main(["--ckpt", str(stage1), "--out", str(root / "codes")])
    train_stage2([
        "fit", "--config", str(CONFIGS / "stage2/tiny.yaml"), "--data.codes_dir", str(root / "codes"),
        "--trainer.default_root_dir", str(root / "s2"), "--data.batch_size", "8",
    ])  # fmt: skip
    return {"root": root, "stage1": stage1, "prior": root / "s2/latest/checkpoints/best.ckpt"}


def test_four_commands_make_an_image_grid(pipeline):
    out = pipeline["root"] / "grid.png"
    sample_main(["--prior", str(pipeline["prior"]), "--n", "6", "--out", str(out), "--scale", "1"])
    npz = np.load(out.with_suffix(".npz"))
    assert npz["codes"].shape == (6, 4, 4) and npz["codes"].dtype == np.uint16
    assert npz["images"].shape == (6, 1, 16, 16) and npz["images"].dtype == np.uint8
    assert sorted(npz["labels"].tolist()) == [0, 0, 0, 1, 1, 1]  # conditional prior: classes in turn
    grid = np.asarray(Image.open(out))
    # one row per class, 3 per row, 16 px tiles with 2 px padding around and between them
    assert grid.shape[:2] == (2 + 2 * 18, 2 + 3 * 18)
    assert (pipeline["root"] / "s2/latest/samples.png").exists()


def test_same_seed_same_samples_and_per_class_rows(pipeline, tmp_path, capsys):
    args = ["--prior", str(pipeline["prior"]), "--per_class", "2", "--top_k", "5", "--seed", "3"]
    sample_main([*args, "--classes", "1", "--out", str(tmp_path / "a.png")])
    assert capsys.readouterr().out.strip().endswith("rows, top to bottom: 1 squares")  # the grid has no captions
    sample_main([*args, "--classes", "Squares", "--out", str(tmp_path / "b.png")])  # class 1 by its folder's name
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    assert np.array_equal(a["codes"], b["codes"]) and a["labels"].tolist() == [1, 1]


def test_classes_by_id_or_name():
    names = ["T-shirt/top", "Trouser", "Smileys & Emotion"]
    assert parse_classes("2,0", names) == [2, 0]  # the order given: one grid row per class, in that order
    assert parse_classes(" trouser , SMILEYS & EMOTION,1", names) == [1, 2]  # any case; a repeat is dropped
    for bad, message in [("3", "unknown class id 3; there are 3 classes (0..2)"), (",", "no class given"),
                         ("Shirt", "no class named 'Shirt'; give ids or names, comma-separated (0 T-shirt/top, "
                                   "1 Trouser, 2 Smileys & Emotion)"), ("-1", "no class named '-1'")]:  # fmt: skip
        with pytest.raises(UserError, match=re.escape(message)):
            parse_classes(bad, names)


def test_completion_keeps_the_visible_codes(pipeline, shapes_folder, tmp_path):
    prime = next(shapes_folder.rglob("*.png"))
    out = tmp_path / "complete.png"
    sample_main(["--prior", str(pipeline["prior"]), "--prime", str(prime), "--keep_rows", "9", "--n", "3",
                 "--out", str(out)])  # fmt: skip
    codes = np.load(out.with_suffix(".npz"))["codes"]
    assert codes.shape == (3, 4, 4)
    # 9 of 16 pixel rows: the 2 code rows (4 px cells) wholly inside are kept, in every completion
    assert (codes[:, :2] == codes[0, :2]).all() and not (codes[:, 2:] == codes[0, 2:]).all()
    # towards a class (by name), guided: the autoregressive prior takes the classes with --prime too
    sample_main(["--prior", str(pipeline["prior"]), "--prime", str(prime), "--keep_rows", "9", "--n", "3",
                 "--classes", "squares", "--cfg_scale", "2", "--out", str(tmp_path / "towards.png")])  # fmt: skip
    got = np.load(tmp_path / "towards.npz")
    assert got["labels"].tolist() == [1, 1, 1] and (got["codes"][:, :2] == codes[0, :2]).all()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--n", "0"], "--n must be >= 1"),
        (["--classes", "0,7"], "unknown class id 7"),
        (["--classes", "circles"], "no class named 'circles'; give ids or names, comma-separated (0 discs, 1 squares)"),
        (["--top_p", "1.5"], "top_p"),
        (["--top_k", "0"], "top_k"),
        (["--prime", "x.png"], "exactly one of --keep_rows"),
    ],
)
def test_sample_errors_are_clear(pipeline, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit):
        sample_main(["--prior", str(pipeline["prior"]), "--out", str(tmp_path / "s.png"), *extra])
    assert message in capsys.readouterr().err


def test_a_batch_whose_caches_cannot_fit_is_refused_in_one_line(pipeline, tmp_path, capsys, monkeypatch):
    """Before anything is allocated: the caches of a batch against the memory left (a 256-px prior's batch of
    256 needs 5 GiB of K/V, twice that with guidance); the message names the --batch_size that fits."""
    per_grid = 1000  # bytes of caches a grid, whatever the prior: 6 grids need 6,000 (+10 %), 2 fit in 2,500
    for kind in (Transformer, GatedPixelCNN):
        monkeypatch.setattr(kind, "state_bytes", lambda self, n: per_grid * n)
    monkeypatch.setattr(drawing, "available_memory", lambda: 2500)
    args = ["--prior", str(pipeline["prior"]), "--n", "6", "--out", str(tmp_path / "s.png")]
    err = user_error(sample_main, args, capsys)
    assert "6 grids at once need" in err and "--batch_size 2 or less" in err
    err = user_error(sample_main, [*args, "--cfg_scale", "2"], capsys)
    assert "(each drawn twice for guidance)" in err and "--batch_size 1 or less" in err
    assert not list(tmp_path.iterdir())  # nothing written
    sample_main([*args, "--batch_size", "2"])  # what the message says works
    assert (tmp_path / "s.png").is_file()


def test_checkpoint_of_the_wrong_kind(pipeline, tmp_path, capsys):
    with pytest.raises(SystemExit):
        sample_main(["--prior", str(pipeline["stage1"]), "--out", str(tmp_path / "s.png")])
    assert "not a stage-2 prior checkpoint" in capsys.readouterr().err


def test_stage1_that_does_not_fit_the_prior(pipeline, shapes_folder, tmp_path, capsys):
    other = tmp_path / "other"
    train_stage1([
        "fit", "--config", str(CONFIGS / "stage1/tiny.yaml"), "--trainer.default_root_dir", str(other),
        "--trainer.max_steps", "2", "--data.dataset", "image_folder", "--data.root", str(shapes_folder),
        "--data.image_size", "16", "--data.val_size", "8", "--data.test_size", "8", "--data.batch_size", "16",
        "--model.codebook_size", "16",
    ])  # fmt: skip
    with pytest.raises(SystemExit):
        sample_main(["--prior", str(pipeline["prior"]), "--vqvae", str(other / "latest/checkpoints/last.ckpt"),
                     "--out", str(tmp_path / "s.png")])  # fmt: skip
    assert "codebook" in capsys.readouterr().err


def test_out_suffix_names_the_format_and_nothing_is_replaced(pipeline, tmp_path, capsys):
    base = ["--prior", str(pipeline["prior"]), "--n", "2"]
    sample_main([*base, "--out", str(tmp_path / "g.jpg")])
    assert (tmp_path / "g.jpg").read_bytes()[:2] == b"\xff\xd8"  # JPEG, as the suffix says
    files = {"codes", "images", "labels", "stage1_ckpt", "stage1_ckpt_relative"}
    assert set(np.load(tmp_path / "g.npz").files) == files
    sample_main([*base, "--out", str(tmp_path / "only.npz")])  # codes and images only, no grid
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.jpg", "g.npz", "only.npz"]
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    for out in ("g.jpg", "g.png", "only.npz"):  # g.png: its .npz (g.npz) exists
        err = user_error(sample_main, [*base, "--seed", "1", "--out", str(tmp_path / out)], capsys)
        assert "already exists; pass --overwrite" in err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    sample_main([*base, "--seed", "1", "--out", str(tmp_path / "only.npz"), "--overwrite"])
    assert (tmp_path / "only.npz").read_bytes() != before["only.npz"]


def test_outputs_are_replaced_together_or_not_at_all(pipeline, tmp_path, capsys, monkeypatch):
    """--overwrite writes the grid, the .npz and --images under temporary names and renames them together at the
    end: a failure while the .npz is written (before: after the grid had replaced the old one) leaves every
    earlier output as it was and no temporary file behind."""
    base = ["--prior", str(pipeline["prior"]), "--n", "2", "--out", str(tmp_path / "s.png"), "--images",
            str(tmp_path / "each")]  # fmt: skip
    sample_main(base)
    before = {str(p.relative_to(tmp_path)): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert sorted(before) == ["each/000000.png", "each/000001.png", "s.npz", "s.png"]

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", disk_full)
    err = user_error(sample_main, [*base, "--seed", "1", "--overwrite"], capsys)
    assert "No space left on device" in err, err
    assert {str(p.relative_to(tmp_path)): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert not [p for p in tmp_path.rglob(".*")]  # no temporary file or folder left


def test_a_moved_stage1_is_accepted_and_another_one_refused(pipeline, shapes_folder, tmp_path, capsys):
    moved = tmp_path / "moved.ckpt"
    moved.write_bytes(pipeline["stage1"].read_bytes())  # same bytes, other place: the prior's own stage 1
    sample_main(["--prior", str(pipeline["prior"]), "--vqvae", str(moved), "--n", "2",
                 "--out", str(tmp_path / "a.png")])  # fmt: skip
    other = tmp_path / "other"
    train_stage1([
        "fit", "--config", str(CONFIGS / "stage1/tiny.yaml"), "--trainer.default_root_dir", str(other),
        "--trainer.max_steps", "2", "--data.dataset", "image_folder", "--data.root", str(shapes_folder),
        "--data.image_size", "16", "--data.val_size", "8", "--data.test_size", "8", "--data.batch_size", "16",
    ])  # fmt: skip  (same sizes as the pipeline's stage 1, other weights)
    err = user_error(sample_main, ["--prior", str(pipeline["prior"]), "--vqvae",
                                   str(other / "latest/checkpoints/last.ckpt"), "--out", str(tmp_path / "b.png")],
                     capsys)  # fmt: skip
    assert "does not fit the prior: stage1_sha256" in err and "whose codes the prior was trained on" in err


def test_codes_keep_their_stage1_through_a_resume_or_a_moved_project(pipeline, tmp_path, capsys, monkeypatch):
    """extract_codes keeps a byte copy of the stage-1 checkpoint in the codes directory, so a resumed stage-1 run
    (which rewrites the last.ckpt the codes came from) or a moved project does not strand the codes, the prior
    and its samples: sample and train_stage2 fall back to the copy (the codes directory as typed, from the moved
    project's top); with the copy gone too, the one-line error says where it looked."""
    project = tmp_path / "project"
    (project / "s1").mkdir(parents=True)
    monkeypatch.chdir(project)
    (project / "s1/last.ckpt").write_bytes(pipeline["stage1"].read_bytes())
    extract_main(["--ckpt", "s1/last.ckpt", "--out", "codes"])
    assert (project / "codes/stage1.ckpt").read_bytes() == pipeline["stage1"].read_bytes()
    train_stage2(["fit", "--config", str(CONFIGS / "stage2/tiny.yaml"), "--data.codes_dir", "codes",
                  "--trainer.default_root_dir", "s2", "--trainer.max_steps", "2", "--data.batch_size", "8",
                  "--sample_every_n_epochs", "0"])  # fmt: skip
    prior = "s2/latest/checkpoints/last.ckpt"
    sample_main(["--prior", prior, "--n", "2", "--out", "before.npz"])
    saved = torch.load("s1/last.ckpt", map_location="cpu", weights_only=True)
    saved["global_step"] += 1  # as a resumed run rewrites last.ckpt: other bytes
    torch.save(saved, "s1/last.ckpt")
    sample_main(["--prior", prior, "--n", "2", "--out", "resumed.npz"])
    resumed = np.load("resumed.npz")
    assert str(resumed["stage1_ckpt"]) == str(project / "codes/stage1.ckpt")
    assert np.array_equal(resumed["images"], np.load("before.npz")["images"])
    project.rename(tmp_path / "moved")  # the whole project elsewhere: every absolute path it saved is gone
    monkeypatch.chdir(tmp_path / "moved")
    sample_main(["--prior", prior, "--n", "2", "--out", "moved.npz"])
    assert np.array_equal(np.load("moved.npz")["images"], resumed["images"])
    monkeypatch.chdir(tmp_path)  # and from outside it: the codes are found beside a folder above the prior
    sample_main(["--prior", f"moved/{prior}", "--n", "2", "--out", "outside.npz"])
    assert np.array_equal(np.load("outside.npz")["images"], resumed["images"])
    monkeypatch.chdir(tmp_path / "moved")
    train_stage2(["fit", "--config", str(CONFIGS / "stage2/tiny.yaml"), "--data.codes_dir", "codes",
                  "--trainer.default_root_dir", "s2", "--trainer.max_steps", "1", "--data.batch_size", "8",
                  "--sample_every_n_epochs", "0"])  # fmt: skip
    Path("codes/stage1.ckpt").unlink()
    err = user_error(sample_main, ["--prior", prior, "--n", "2", "--out", "gone.npz"], capsys)
    assert f"{project}/s1/last.ckpt was moved or deleted since extraction and its copy" in err, err
    assert "codes/stage1.ckpt is missing; pass --vqvae PATH" in err, err


def test_wandb_logs_the_grid_offline_beside_the_outputs(pipeline, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out" / "w.png"
    sample_main(["--prior", str(pipeline["prior"]), "--n", "2", "--out", str(out), "--wandb"])
    runs = list((out.parent / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].rglob("*.wandb"))
    assert not (tmp_path / "wandb").exists()  # nothing in the working directory


def test_prior_resumed_mid_epoch_equals_an_uninterrupted_run(pipeline, tmp_path):
    """train_stage2 (masked prior: random masks and label dropout draw from the global RNG) for 12 steps
    straight vs crashed at step 4 and resumed from its step-3 checkpoint, in the middle of an epoch of 6
    batches: the same weights bit for bit (the checkpoint holds the epoch's permutation and position)."""
    def fit(root: Path, *extra: str) -> None:
        train_stage2(["fit", "--config", str(CONFIGS / "stage2/tiny.yaml"), "--data.codes_dir",
                      str(pipeline["root"] / "codes"), "--trainer.default_root_dir", str(root), "--data.batch_size",
                      "8", "--model.kind", "maskgit", "--trainer.max_steps", "12", "--trainer.val_check_interval",
                      "3", "--sample_every_n_epochs", "0", *extra])  # fmt: skip

    crashed_and_resumed_equals_straight(fit, tmp_path)


def test_the_compression_benchmark_runs_on_trained_models(pipeline, tmp_path):
    """benchmarks/compression.py, whose figures the README quotes, through the codec on the test split: it
    once called encode_images with an argument the codec had dropped, and nothing ran it to notice."""
    out = tmp_path / "compression.json"
    subprocess.run([sys.executable, "benchmarks/compression.py", "--prior", str(pipeline["prior"]), "--limit", "0",
                    "--json", str(out)], cwd=CONFIGS.parent, check=True, capture_output=True)  # fmt: skip
    result = json.loads(out.read_text())
    # the data and split stage 1 was trained on, from its checkpoint: 8 test shapes (the folder's default split: 6)
    assert result["dataset"] == "image_folder" and result["images"] == 8 and result["codes_exact"]
    assert 0 < result["ideal_bpp"] <= result["ours_payload_bpp"] <= result["ours_bpp"]  # the file adds a header
    pixels = 8 * result["image_size"] ** 2
    extra_bits = (result["ours_payload_bpp"] - result["ideal_bpp"]) * pixels
    assert extra_bits <= 64  # the coder is -sum log2 p plus its final state (one batch here: one stream)
    assert result["webp_per_image_at_our_psnr"]["psnr"] >= result["ours_psnr"]  # matched, not under


def test_the_sampling_speed_benchmark_runs_on_a_trained_prior(pipeline, tmp_path, monkeypatch):
    """benchmarks/sample_speed.py, whose figures the README quotes: the trained prior and its stage 1, timed."""
    from test_benchmarks import figures, run_script

    out = tmp_path / "speed.json"
    run_script("sample_speed.py", ["--prior", str(pipeline["prior"]), "--batch_size", "500", "--repeats", "1",
                                   "--json", str(out)], monkeypatch)  # fmt: skip
    result = figures(out)
    assert result["weights"] == f"trained: {pipeline['prior']}"
    assert result["transformer_n64_seconds"] > 0 and result["transformer_n1000_seconds"] > 0
    assert result["transformer_cache_speedup"] == pytest.approx(
        result["transformer_n64_naive_seconds"] / result["transformer_n64_seconds"], rel=0.05)
    assert result["transformer_params"] == sum(p.numel() for p in load_models(pipeline["prior"]).prior.parameters())


def test_class_mix_data_draws_classes_in_the_training_proportions(pipeline, tmp_path, capsys):
    """The prior keeps its training split's class counts; `--class_mix data` draws labels in those proportions
    (seeded, sorted), refuses --classes, and a prior trained before the counts were kept gets one line."""
    ckpt = torch.load(pipeline["prior"], map_location="cpu", weights_only=True)
    meta = ckpt["hyper_parameters"]["codes_meta"]
    _, train_labels = load_split(pipeline["root"] / "codes", "train")
    assert meta["class_counts"] == np.bincount(train_labels, minlength=2).tolist()

    def draw(prior: Path, name: str, *extra: str) -> np.lib.npyio.NpzFile:
        sample_main(["--prior", str(prior), "--class_mix", "data", "--out", str(tmp_path / name), *extra])
        return np.load((tmp_path / name).with_suffix(".npz"))

    a, b = draw(pipeline["prior"], "a.npz", "--n", "40", "--seed", "3"), draw(pipeline["prior"], "b.npz", "--n", "40",
                                                                             "--seed", "3")  # fmt: skip
    assert np.array_equal(a["labels"], b["labels"]) and np.array_equal(a["codes"], b["codes"])
    assert a["labels"].tolist() == sorted(a["labels"].tolist()) and set(a["labels"].tolist()) == {0, 1}
    meta["class_counts"] = [0, 7]  # data of squares only: every label is a square
    torch.save(ckpt, tmp_path / "squares.ckpt")
    assert draw(tmp_path / "squares.ckpt", "s.png", "--n", "5")["labels"].tolist() == [1] * 5
    assert capsys.readouterr().out.strip().endswith("classes in the training codes' proportions: 5 squares")
    err = user_error(sample_main, ["--prior", str(pipeline["prior"]), "--class_mix", "data", "--classes", "1",
                                   "--out", str(tmp_path / "c.npz")], capsys)  # fmt: skip
    assert "drop --classes/--per_class" in err
    del meta["class_counts"]  # as priors trained before 2026-11-29 are
    torch.save(ckpt, tmp_path / "old.ckpt")
    err = user_error(sample_main, ["--prior", str(tmp_path / "old.ckpt"), "--class_mix", "data", "--out",
                                   str(tmp_path / "o.npz")], capsys)  # fmt: skip
    assert "does not record its training codes' class counts" in err and "--class_mix turn" in err
    assert not (tmp_path / "o.npz").exists()


def test_the_readmes_python_block_runs(pipeline, shapes_folder, tmp_path):
    """README *From Python*: its block, with the test's prior, an image of the shapes and their class names, runs
    as written: a reconstruction, a bit cost, 16 drawn images of the right shapes and types and 4 repairs that
    keep every unpainted pixel, without importing Lightning (checked in a fresh interpreter)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("## From Python", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    image = next((shapes_folder / "squares").iterdir())
    for old, new in [('"runs/stage2_transformer/latest/checkpoints/best.ckpt"', repr(str(pipeline["prior"]))),
                     ('"shirt.png"', repr(str(image))), ('"Shirt"', '"squares"')]:  # fmt: skip
        assert block.count(old) == 1, old
        block = block.replace(old, new)
    check = "\n".join([
        "import sys", "assert 'pytorch_lightning' not in sys.modules",
        "assert codes.shape == (1, 4, 4) and recon.shape == (1, 1, 16, 16) and recon.abs().max() <= 1",
        "assert pixels.shape == (16, 1, 16, 16) and pixels.dtype == torch.uint8 and 0 < bits < 16 * 16",
        "assert repairs.shape == (4, 1, 16, 16)",
        "assert (repairs[:, :, ~painted] == to_uint8(images)[0][:, ~painted]).all()",
        "assert not keep.all() and keep.any()",
        "assert edited.shape == codes.shape and edited.dtype == torch.long",
        "assert all(f.grad is not None for f in features)",
        "",
    ])  # fmt: skip
    (tmp_path / "block.py").write_text(block + check)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, str(tmp_path / "block.py")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]


def test_the_python_functions_check_and_convert_their_inputs(pipeline, shapes_folder):
    """From Python: encode_to_codes refuses what it would encode wrongly or fail on with a raw torch error
    (uint8, numpy, another shape, values outside [-1, 1], NaN) and never runs the decoder (it did, for every
    batch); decode_codes and code_bits take the uint16 codes load_split gives and list labels; code_bits refuses
    a masked prior; load_models takes device="auto"."""
    from stage2_prior.build import build_network
    from stage2_prior.decoding import code_bits

    models = load_models(pipeline["prior"], device="auto")
    vqvae, prior = models.vqvae, models.prior
    images = torch.rand(3, 1, 16, 16) * 2 - 1
    for bad, message in [((images * 127.5 + 127.5).to(torch.uint8), "must be a float tensor (B, 1, 16, 16)"),
                         (images.numpy(), "got ndarray"), (images[:, :, :8], "must have shape (B, 1, 16, 16)"),
                         (images * 127.5 + 127.5, "must lie in [-1, 1]"), (images.clone().fill_(float("nan")),
                                                                            "must lie in [-1, 1]")]:  # fmt: skip
        with pytest.raises(ValueError, match=re.escape(message)):
            vqvae.encode_to_codes(bad)
    calls = []
    hook = vqvae.decoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        codes = vqvae.encode_to_codes(images.double())  # float64 is taken in the model's dtype
    finally:
        hook.remove()
    assert not calls and torch.equal(codes, vqvae(images)[1][0].codes)  # one level: the codes forward gives
    stored = codes.numpy().astype(np.uint16)  # as load_split gives them
    assert torch.equal(vqvae.decode_codes(stored), vqvae.decode_codes(codes))
    with torch.no_grad():
        assert torch.equal(code_bits(prior, stored, [0, 1, 0]), code_bits(prior, codes, torch.tensor([0, 1, 0])))
    with pytest.raises(ValueError, match="codes must be integers, got torch.float32"):
        vqvae.decode_codes(codes.float())
    masked = build_network("maskgit", "tiny", prior.codebook_size, prior.grid_shape, prior.num_classes, {})
    with pytest.raises(ValueError, match="code_bits needs an autoregressive prior .* a MaskedPrior has no exact"):
        code_bits(masked, codes)


def test_a_long_draw_says_how_far_it_is(pipeline, tmp_path, monkeypatch, capsys):
    """A draw of several batches that runs long (256-px sequences took 33-214 s without a word: the scale audit)
    prints a line after each batch but the last; a quick one prints nothing (here the threshold is 0 s)."""
    import tools.draw_progress

    monkeypatch.setattr(tools.draw_progress, "PROGRESS_AFTER_S", 0.0)
    monkeypatch.setattr(tools.draw_progress, "PROGRESS_EVERY_S", 0.0)
    sample_main(["--prior", str(pipeline["prior"]), "--n", "6", "--batch_size", "2", "--out", str(tmp_path / "s.npz")])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sample: ")]
    lines = [line for line in lines if not line.startswith("sample: step")]  # inside a batch: the test below
    assert [line.split(" drawn")[0] for line in lines] == ["sample: 2 of 6", "sample: 4 of 6"], lines
    assert all(line.endswith(" s left") for line in lines)
    # at most a line every PROGRESS_EVERY_S: quick batches of a large --n printed one each
    monkeypatch.setattr(tools.draw_progress, "PROGRESS_EVERY_S", 3600.0)
    sample_main(["--prior", str(pipeline["prior"]), "--n", "6", "--batch_size", "2", "--out", str(tmp_path / "t.npz")])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sample: ")]
    assert [line.split(" drawn")[0] for line in lines] == ["sample: step 1 of 16 for grids 1-2 of 6"], lines


@pytest.mark.parametrize("prime", [False, True])
def test_a_long_batch_says_how_far_it_is_inside(pipeline, shapes_folder, tmp_path, monkeypatch, capsys, prime):
    """One batch of long grids (1,280 raster steps at 256 px: minutes on a CPU) prints lines between its steps
    too, at most one every PROGRESS_EVERY_S (here 0 s: after every step but the last), new draws and repairs
    alike; the codes are the same as a silent draw's."""
    import tools.draw_progress

    out = ["--prior", str(pipeline["prior"]), "--n", "2", "--seed", "3"]
    if prime:
        out += ["--prime", str(next(shapes_folder.rglob("*.png"))), "--keep_rows", "1"]
    sample_main(out + ["--out", str(tmp_path / "quiet.npz")])
    assert "sample: step" not in capsys.readouterr().err
    monkeypatch.setattr(tools.draw_progress, "PROGRESS_AFTER_S", 0.0)
    monkeypatch.setattr(tools.draw_progress, "PROGRESS_EVERY_S", 0.0)
    sample_main(out + ["--out", str(tmp_path / "told.npz")])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sample: ")]
    steps = int(np.prod(torch.load(pipeline["prior"], weights_only=True)["hyper_parameters"]["grid_shape"]))
    assert [line.split(" drawn")[0] for line in lines] == [f"sample: step {i} of {steps} for 2 grids"
                                                           for i in range(1, steps)], lines  # fmt: skip
    assert np.array_equal(np.load(tmp_path / "quiet.npz")["codes"], np.load(tmp_path / "told.npz")["codes"])
