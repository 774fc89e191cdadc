"""`evaluate stage1|prior|samples` and `train_feature_net` on tiny artifacts made here: a VQ-VAE fit for a few
steps on the 16x16 shapes folder, its codes, a tiny prior, 16 samples, a feature net; and the errors for
artifacts that do not belong together."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import user_error
from PIL import Image

from common.datamodule import ImageDataModule
from common.images import from_uint8
from common.splits import ImageSplits
from stage1_vqvae import extract
from stage1_vqvae.model import PIXELS_PER_PASS
from stage1_vqvae.vqvae import VQVAE
from stage2_prior import decoding
from stage2_prior.data import CodesDataModule
from stage2_prior.prior import Prior
from tools import sample, train_feature_net
from tools.evaluate import main
from tools.features import accuracy, load_feature_net
from tools.sample_files import load_samples

DATA = dict(dataset="image_folder", image_size=16, batch_size=8, val_size=8, test_size=8)


def fit(model: pl.LightningModule, dm: pl.LightningDataModule, steps: int, path: Path) -> Path:
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, default_root_dir=path.parent,
    )  # fmt: skip
    trainer.fit(model, dm)
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def artifacts(shapes_folder, tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("evaluate")
    pl.seed_everything(0)
    dm = ImageDataModule(root=str(shapes_folder), **DATA)
    vqvae = VQVAE(dm.channels, dm.image_size, 16, 1, 8, 4, 8, codebook_size=16, warmup_steps=1)
    stage1 = fit(vqvae, dm, 6, tmp / "stage1.ckpt")
    extract.main(["--ckpt", str(stage1), "--out", str(tmp / "codes"), "--accelerator", "cpu"])
    codes = CodesDataModule(str(tmp / "codes"), batch_size=8)
    prior = Prior(codes.codebook_size, codes.grid_shape, codes.num_classes, "transformer", "tiny", codes.meta_dict,
                  warmup_steps=1)  # fmt: skip
    prior_ckpt = fit(prior, codes, 4, tmp / "prior.ckpt")
    sample.main(["--prior", str(prior_ckpt), "--n", "16", "--out", str(tmp / "samples.png"), "--device", "cpu"])
    feature_net = tmp / "features.pt"
    train_feature_net.main(["--data.dataset", "image_folder", "--data.root", str(shapes_folder), "--data.image_size",
                            "16", "--data.val_size", "8", "--data.test_size", "8", "--data.batch_size", "16",
                            "--steps", "20", "--out", str(feature_net), "--device", "cpu"])  # fmt: skip
    return dict(stage1=stage1, codes=tmp / "codes", prior=prior_ckpt, samples=tmp / "samples.npz",
                features=feature_net, tmp=tmp)  # fmt: skip


def test_train_feature_net_saves_its_accuracy_and_refuses_to_overwrite(artifacts, shapes_folder, capsys):
    record = torch.load(artifacts["features"], weights_only=True)
    assert 0.0 <= record["test_accuracy"] <= 1.0 and record["dataset"] == "image_folder"
    assert (record["image_size"], record["channels"], record["steps"]) == (16, 1, 20)
    err = user_error(train_feature_net.main, ["--data.dataset", "image_folder", "--data.root", str(shapes_folder),
                                              "--out", str(artifacts["features"])], capsys)  # fmt: skip
    assert "already exists; pass --overwrite" in err


def test_evaluate_stage1(artifacts, shapes_folder, capsys):
    out = artifacts["tmp"] / "stage1.json"
    # No --data options: they come from the checkpoint.
    main(["stage1", "--ckpt", str(artifacts["stage1"]), "--features", str(artifacts["features"]),
          "--device", "cpu", "--json", str(out)])  # fmt: skip
    printed = capsys.readouterr().out
    assert f"reconstruction FID (image-folder '{shapes_folder.name}' classifier features)" in printed
    assert "Inception" not in printed and "codes awaiting restart" in printed
    assert "PSNR (dB, of the pooled MSE)" in printed and "PSNR (dB, mean over images)" in printed
    assert "SSIM (valid 11-px windows)" in printed
    r = json.loads(out.read_text())
    assert r["images"] == 8 and r["split"] == "test" and r["codebook_size"] == 16
    assert r["mse"] > 0 and np.isfinite(r["psnr_db"]) and -1 <= r["ssim"] <= 1 and r["fid_recon"] >= 0
    assert 0 < r["codebook_usage"] <= 1 and 1 <= r["perplexity"] <= 16 and 0 <= r["dead_codes"] <= 16
    assert r["psnr_db"] == pytest.approx(10 * np.log10(4 / r["mse"]), rel=1e-4)  # data range 2
    assert r["psnr_mean_per_image_db"] >= r["psnr_db"] - 1e-4  # a mean of logs: never below the log of the mean
    assert "classifier features (test acc" in r["features"]


def test_evaluate_stage1_in_passes_gives_the_same_figures(artifacts, tmp_path, monkeypatch):
    """The metrics see the batch in the model's passes (SSIM took 15.6 GB for 300 test images at 256 px in
    one update): 3 images a pass here, and the figures do not change."""
    args = ("stage1", "--ckpt", str(artifacts["stage1"]), "--features", str(artifacts["features"]))
    whole = evaluate(*args, out=tmp_path / "whole.json")
    monkeypatch.setitem(PIXELS_PER_PASS, "cpu", 3 * 16 * 16)  # passes of 3, 3, 2 of the 8 test images
    parts = evaluate(*args, out=tmp_path / "parts.json")
    for key in ("mse", "psnr_db", "ssim", "fid_recon", "codebook_usage", "perplexity"):
        assert parts[key] == pytest.approx(whole[key], rel=1e-5), key


def evaluate(*args: str, out: Path) -> dict:
    main([*args, "--device", "cpu", "--json", str(out)])
    return json.loads(out.read_text())


def test_evaluate_prior(artifacts, tmp_path, capsys):
    r = evaluate(
        "prior", "--ckpt", str(artifacts["prior"]), "--codes", str(artifacts["codes"]), out=tmp_path / "r.json"
    )
    assert r["code_maps"] == 8 and 0 <= r["accuracy"] <= 1
    assert 0 < r["bits_per_code"] < 2 * np.log2(16)
    assert r["bits_per_dim"] == pytest.approx(r["bits_per_code"] * 4 * 4 / (16 * 16 * 1))
    assert "NLL of the codes (bits per pixel dim, given the class)" in capsys.readouterr().out
    assert r["given_class"] == "all"
    # --prior, as every other model command names the prior (an extensibility audit's note), is --ckpt here
    same = evaluate("prior", "--prior", str(artifacts["prior"]), "--codes", str(artifacts["codes"]),
                    out=tmp_path / "same.json")  # fmt: skip
    assert same["bits_per_code"] == r["bits_per_code"] and same["ckpt"] == str(artifacts["prior"])


def test_evaluate_samples_prints_the_floor(artifacts, shapes_folder, tmp_path, capsys):
    r = evaluate("samples", "--samples", str(artifacts["samples"]), "--ckpt", str(artifacts["stage1"]),
                 "--features", str(artifacts["features"]), "--kid_subsets", "5", out=tmp_path / "s.json")  # fmt: skip
    printed = capsys.readouterr().out
    assert "real-data floor" in printed and f"FID (image-folder '{shapes_folder.name}' classifier" in printed
    assert r["samples"] == 16 and r["floor_train_images"] == 16 and r["test_images"] == 8
    assert r["fid"] >= 0 and r["fid_floor"] >= 0 and r["kid_subset_size"] == 8
    # class agreement: the feature net's own top-1 on the samples against the classes they were drawn for
    net, _ = load_feature_net(artifacts["features"])
    with np.load(artifacts["samples"], allow_pickle=False) as npz:
        images, labels = torch.from_numpy(npz["images"]), torch.from_numpy(npz["labels"])
    assert "class agreement (the classifier names the class drawn)" in printed
    assert r["class_agreement"] == pytest.approx(accuracy(net, images, labels))
    test_images, test_labels = ImageSplits(root=str(shapes_folder), **DATA).split_arrays("test")
    assert r["class_agreement_floor"] == pytest.approx(accuracy(net, test_images, test_labels))
    said = net(from_uint8(images)).argmax(1)
    for c in (0, 1):
        assert r["class_agreement_per_class"][c] == pytest.approx(float((said[labels == c] == c).float().mean()))
    # samples labelled with what the classifier says agree fully; a folder of images has no labels to agree with
    with np.load(artifacts["samples"], allow_pickle=False) as npz:
        np.savez(tmp_path / "said.npz", **{**{k: npz[k] for k in npz.files}, "labels": said.numpy()})
    agreed = evaluate("samples", "--samples", str(tmp_path / "said.npz"), "--ckpt", str(artifacts["stage1"]),
                      "--features", str(artifacts["features"]), "--kid_subsets", "5", out=tmp_path / "t.json")
    assert agreed["class_agreement"] == 1.0 and agreed["fid"] == r["fid"]


def test_samples_as_png_files_score_as_their_npz(artifacts, shapes_folder, tmp_path, capsys):
    """`sample --images DIR` writes each sample as a PNG (never over existing files without --overwrite), and
    `evaluate samples` scores a folder of images (any generator's) exactly as the .npz of the same images."""
    args = ["--prior", str(artifacts["prior"]), "--n", "16", "--out", str(tmp_path / "s.npz"), "--device", "cpu"]
    sample.main([*args, "--images", str(tmp_path / "pngs")])
    names = sorted(p.name for p in (tmp_path / "pngs").iterdir())
    assert names == [f"{i:06d}.png" for i in range(16)]
    with np.load(tmp_path / "s.npz", allow_pickle=False) as npz:
        images = npz["images"]
        np.testing.assert_array_equal(images, np.load(artifacts["samples"], allow_pickle=False)["images"])  # seed 0
    for i in (0, 15):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "pngs" / names[i])), images[i, 0])
    (tmp_path / "pngs" / names[3]).write_bytes(b"keep me")  # --per_class 2 of 2 classes: 000000-000003.png
    again = ["--prior", str(artifacts["prior"]), "--out", str(tmp_path / "t.npz"), "--device", "cpu", "--per_class",
             "2", "--images", str(tmp_path / "pngs")]  # fmt: skip
    err = user_error(sample.main, again, capsys)
    assert "pngs/000000.png already exists (and 3 more); pass --overwrite to replace, or choose another --images" in err
    assert (tmp_path / "pngs" / names[3]).read_bytes() == b"keep me" and not (tmp_path / "t.npz").exists()
    (tmp_path / "pngs" / names[3]).unlink()
    Image.fromarray(images[3, 0]).save(tmp_path / "pngs" / names[3])
    data = ["--ckpt", str(artifacts["stage1"]), "--features", str(artifacts["features"]), "--kid_subsets", "5"]
    from_npz = evaluate("samples", "--samples", str(tmp_path / "s.npz"), *data, out=tmp_path / "a.json")
    from_dir = evaluate("samples", "--samples", str(tmp_path / "pngs"), *data, out=tmp_path / "b.json")
    assert torch.equal(load_samples(tmp_path / "pngs", channels=1), torch.from_numpy(images))  # the same pixels
    assert from_dir["samples"] == 16 and from_dir["fid"] == pytest.approx(from_npz["fid"], rel=1e-6)
    assert from_dir["kid"] == pytest.approx(from_npz["kid"], rel=1e-6, abs=1e-9)
    assert from_npz["class_agreement"] is not None and from_dir["class_agreement"] is None  # files carry no class


def test_evaluate_samples_takes_the_data_options_of_the_stage1_the_npz_names(artifacts, tmp_path, capsys):
    """`sample` records its stage 1 in the .npz: without --ckpt, evaluate uses that checkpoint's data options
    (the 16x16 shapes folder here, not the fashion_mnist default), with the same figures as --ckpt gives."""
    with np.load(artifacts["samples"], allow_pickle=False) as npz:
        assert Path(str(npz["stage1_ckpt"])) == artifacts["stage1"].resolve()
    common = ("--features", str(artifacts["features"]), "--kid_subsets", "5")
    named = evaluate("samples", "--samples", str(artifacts["samples"]), *common, out=tmp_path / "a.json")
    given = evaluate("samples", "--samples", str(artifacts["samples"]), "--ckpt", str(artifacts["stage1"]), *common,
                     out=tmp_path / "b.json")  # fmt: skip
    assert named["dataset"] == "image_folder" and named["fid"] == given["fid"] and named["test_images"] == 8
    # Without the record (an older .npz, or the checkpoint moved away) nothing names the data: refused with what
    # to pass (before: Fashion-MNIST, the parser's default, was assumed).
    with np.load(artifacts["samples"], allow_pickle=False) as npz:
        np.savez(tmp_path / "old.npz", **{k: npz[k] for k in npz.files if k != "stage1_ckpt"})
    err = user_error(main, ["samples", "--samples", str(tmp_path / "old.npz"), *common, "--device", "cpu"], capsys)
    assert "old.npz names no stage 1 and so no data set to compare with: pass --data.dataset" in err, err
    # A record naming a file that is gone: a note, then the defaults.
    with np.load(artifacts["samples"], allow_pickle=False) as npz:
        np.savez(tmp_path / "gone.npz", **{**{k: npz[k] for k in npz.files}, "stage1_ckpt": str(tmp_path / "no.ckpt")})
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["samples", "--samples", str(tmp_path / "gone.npz"), *common, "--device", "cpu"])
    note, error = capsys.readouterr().err.strip().splitlines()
    assert f"names the stage 1 {tmp_path / 'no.ckpt'}, which is gone" in note
    assert "gone.npz names no stage 1 and so no data set to compare with" in error, error
    # The project copied elsewhere (the absolute path gone): the stage 1 relative to the .npz is found.
    (tmp_path / "copy" / "runs").mkdir(parents=True)
    shutil.copy(artifacts["stage1"], tmp_path / "copy" / "runs" / "stage1.ckpt")
    with np.load(artifacts["samples"], allow_pickle=False) as npz:
        assert Path(str(npz["stage1_ckpt_relative"])) == Path("stage1.ckpt")  # sample wrote both, side by side
        np.savez(tmp_path / "copy" / "s.npz", **{**{k: npz[k] for k in npz.files},
                 "stage1_ckpt": str(tmp_path / "elsewhere.ckpt"), "stage1_ckpt_relative": "runs/stage1.ckpt"})
    moved = evaluate("samples", "--samples", str(tmp_path / "copy" / "s.npz"), *common, out=tmp_path / "c.json")
    assert moved["dataset"] == "image_folder" and moved["fid"] == given["fid"]
    # A record naming a file that is not a stage-1 checkpoint: the error says where the name came from.
    (tmp_path / "not.ckpt").write_text("not a checkpoint")
    with np.load(artifacts["samples"], allow_pickle=False) as npz:
        np.savez(tmp_path / "odd.npz", **{**{k: npz[k] for k in npz.files}, "stage1_ckpt": str(tmp_path / "not.ckpt")})
    err = user_error(main, ["samples", "--samples", str(tmp_path / "odd.npz"), *common, "--device", "cpu"], capsys)
    assert f"the stage1_ckpt of --samples {tmp_path / 'odd.npz'}" in err and "not.ckpt" in err


# ------------------------------------------------------------------------------------------ errors
def _with_meta(artifacts, name: str, **changes) -> Path:
    codes = artifacts["tmp"] / name
    shutil.copytree(artifacts["codes"], codes)
    meta = json.loads((codes / "meta.json").read_text())
    meta.pop("levels")  # one level: derived again from the changed codebook_size / grid_shape
    (codes / "meta.json").write_text(json.dumps({**meta, **changes}))
    return codes


def test_evaluate_prior_in_passes_gives_the_same_figures(artifacts, tmp_path, monkeypatch):
    """Long sequences are scored a few maps a forward (TOKENS_PER_PASS): the figures do not change."""
    args = ("prior", "--ckpt", str(artifacts["prior"]), "--codes", str(artifacts["codes"]), "--batch_size", "5")
    whole = evaluate(*args, out=tmp_path / "whole.json")
    monkeypatch.setattr(decoding, "TOKENS_PER_PASS", 2 * 16)  # two 4x4 maps a forward: passes of 2, 2, 1 per batch
    parts = evaluate(*args, out=tmp_path / "parts.json")
    assert parts["accuracy"] == whole["accuracy"]
    assert parts["bits_per_code"] == pytest.approx(whole["bits_per_code"], rel=1e-6)


def test_prior_and_codes_that_do_not_belong_together(artifacts, capsys):
    other = _with_meta(artifacts, "codes_k64", codebook_size=64)
    base = ["prior", "--ckpt", str(artifacts["prior"]), "--device", "cpu", "--codes"]
    err = user_error(main, [*base, str(other)], capsys)
    assert re.search(r"codebook_size 64 \(the prior's: 16\).*pass the codes directory .* was trained on", err), err
    other = _with_meta(artifacts, "codes_other_stage1", stage1_sha256="0" * 64)
    assert "stage1_sha256 000000000000..." in user_error(main, [*base, str(other)], capsys)
    err = user_error(main, ["prior", "--ckpt", str(artifacts["stage1"]), "--codes", str(artifacts["codes"])], capsys)
    assert "is not a stage-2 prior checkpoint (it is a stage-1 VQ-VAE checkpoint" in err


def test_unlabelled_codes_use_the_null_class(artifacts, tmp_path, capsys):
    """labels -1 mean "unlabelled" in the codes format: the prior scores them with its null class."""
    codes = tmp_path / "codes"
    shutil.copytree(artifacts["codes"], codes)
    labels = np.load(codes / "test" / "labels.npy")
    np.save(codes / "test" / "labels.npy", np.full_like(labels, -1))
    capsys.readouterr()
    r = evaluate("prior", "--ckpt", str(artifacts["prior"]), "--codes", str(codes), out=tmp_path / "r.json")
    assert np.isfinite(r["bits_per_code"]) and r["code_maps"] == len(labels)
    # no class was given, so the table does not say one was (it did); half labelled says so
    assert r["given_class"] == "none" and "given the class" not in capsys.readouterr().out
    np.save(codes / "test" / "labels.npy", np.where(np.arange(len(labels)) % 2, labels, -1))
    r = evaluate("prior", "--ckpt", str(artifacts["prior"]), "--codes", str(codes), out=tmp_path / "r2.json")
    assert r["given_class"] == "some" and "(bits per code, given the class where labelled)" in capsys.readouterr().out


def test_samples_that_do_not_fit_the_data_or_the_features(artifacts, tmp_path, capsys):
    small = tmp_path / "small.npz"
    np.savez(small, images=np.zeros((4, 1, 8, 8), np.uint8))
    base = ["samples", "--features", str(artifacts["features"]), "--device", "cpu"]
    np.savez(tmp_path / "codes_only.npz", codes=np.zeros((4, 4, 4), np.uint16))
    for args, message in [
        (["--samples", str(small), "--data.dataset", "fashion_mnist"],
         "holds 8x8 images with 1 channel.*fashion_mnist cannot provide"),
        (["--samples", str(small), "--ckpt", str(artifacts["stage1"])],
         "the samples are 8x8 with 1 channel.*expect 16x16"),
        (["--samples", str(tmp_path / "codes_only.npz"), "--data.dataset", "fashion_mnist"], "has no 'images' array"),
        (["--samples", str(tmp_path / "missing.npz")], "no such file"),
    ]:  # fmt: skip
        assert re.search(message, user_error(main, [*base, *args], capsys)), message


def test_missing_features_say_what_to_run(artifacts, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no runs/feature_net/ here
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)
    # stage1: every figure but the reconstruction FID, and what to run for it
    r = evaluate("stage1", "--ckpt", str(artifacts["stage1"]), out=tmp_path / "s1.json")
    printed = capsys.readouterr().out
    assert "PSNR (dB, of the pooled MSE)" in printed and "reconstruction FID (" not in printed  # no row
    assert "no reconstruction FID: " in printed and "train_feature_net --data.dataset image_folder" in printed
    assert r["fid_recon"] is None and r["features"] is None and np.isfinite(r["psnr_db"])
    # samples: FID is the point, so no features is an error; a feature-net file named but missing is one too
    err = user_error(main, ["samples", "--samples", str(artifacts["samples"]), "--device", "cpu"], capsys)
    assert "no features for FID/KID" in err and "train_feature_net --data.dataset image_folder" in err
    err = user_error(main, ["stage1", "--ckpt", str(artifacts["stage1"]), "--features", "nope.pt"], capsys)
    assert "nope.pt" in err


def test_samples_mixed_unlike_the_test_split_get_a_note(artifacts, shapes_folder, tmp_path, capsys):
    """The .npz's labels against the test split's: their total variation is in the result, and above 0.1 a note
    says the FID counts the mix too and how to draw the data's (`sample --class_mix data`)."""
    test_labels = ImageSplits(root=str(shapes_folder), **DATA).split_arrays("test")[1].numpy()
    q = np.bincount(test_labels, minlength=2) / len(test_labels)
    with np.load(artifacts["samples"], allow_pickle=False) as npz:
        arrays = dict(npz)
    common = ["--ckpt", str(artifacts["stage1"]), "--features", str(artifacts["features"]), "--kid_subsets", "5"]
    as_test = np.repeat([0, 1], np.bincount(test_labels, minlength=2) * 2)  # 16 samples, the test split's mix
    for name, labels in [("as_test", as_test), ("in_turn", arrays["labels"]), ("discs_only", np.zeros(16, int))]:
        np.savez(tmp_path / f"{name}.npz", **{**arrays, "labels": labels})
        r = evaluate("samples", "--samples", str(tmp_path / f"{name}.npz"), *common, out=tmp_path / f"{name}.json")
        p = np.bincount(labels, minlength=2) / len(labels)
        assert r["class_mix_distance"] == pytest.approx(np.abs(p - q).sum() / 2)
        noted = "`sample --n N --class_mix data`" in capsys.readouterr().out
        assert noted == (r["class_mix_distance"] > 0.1), (name, r["class_mix_distance"])
        assert name != "as_test" or (r["class_mix_distance"] == 0 and not noted)
    assert r["class_mix_distance"] == pytest.approx(q[1])  # discs only: the test split's share of squares
    np.savez(tmp_path / "unconditional.npz", **{**arrays, "labels": np.full(16, -1)})
    r = evaluate("samples", "--samples", str(tmp_path / "unconditional.npz"), *common, out=tmp_path / "u.json")
    assert r["class_mix_distance"] is None
