"""Hierarchical latents (VQ-VAE-2 levels): the stage-1 network, codes format v2, extraction, and a
version-1 directory still being read. Tiny tensors; the end-to-end run over levels is in test_levels_pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image

from common.codes import CODES_FILE, CodesError, CodesMeta, load_split, read_meta, sha256_file, split_levels
from common.codes_writer import CodesWriter
from common.datamodule import ImageDataModule
from common.images import from_uint8
from stage1_vqvae.extract import main as extract_main
from stage1_vqvae.model import PIXELS_PER_PASS, VQModel, load_stage1
from stage1_vqvae.vqvae import VQVAE

TWO = [{"name": "bottom", "downsample": 2, "codebook_size": 16}, {"name": "top", "downsample": 4, "codebook_size": 8}]
NET = dict(width=16, res_blocks=1, res_width=8, code_dim=8)


def two_level(**kw) -> VQModel:
    torch.manual_seed(0)
    return VQModel(3, 16, **NET, levels=TWO, **kw)


def test_levels_shapes_order_and_round_trip() -> None:
    model = two_level().eval()
    assert [lv["name"] for lv in model.levels] == ["top", "bottom"]  # top (coarsest) first
    assert [lv["grid_shape"] for lv in model.levels] == [(4, 4), (8, 8)]
    assert model.grid_shape == (1, 16 + 64) and model.codebook_size == 16
    images = torch.rand(5, 3, 16, 16) * 2 - 1
    recon, qs = model(images)
    assert recon.shape == images.shape and [q.codes.shape for q in qs] == [(5, 4, 4), (5, 8, 8)]
    codes = model.encode_to_codes(images)
    assert codes.shape == (5, 1, 80)
    top, bottom = model.split_codes(codes)
    torch.testing.assert_close(top, qs[0].codes)
    torch.testing.assert_close(bottom, qs[1].codes)
    assert int(top.max()) < 8 and int(bottom.max()) < 16
    # decoding the codes gives the forward pass's reconstruction (eval: quantized == codebook[codes])
    torch.testing.assert_close(model.decode_codes(codes), recon.clamp(-1, 1), atol=1e-5, rtol=1e-5)
    bad = codes.clone()
    bad[:, 0, 0] = 8  # in range for the bottom's codebook, not for the top's
    with pytest.raises(ValueError, match="level top must lie in \\[0, 8\\)"):
        model.decode_codes(bad)


def test_large_batches_go_through_in_passes_with_the_same_result() -> None:
    """encode_to_codes / decode_codes split a batch into passes of at most PIXELS_PER_PASS pixels (a 256-px
    batch of 512 in one pass took 7 GB); any split gives the one pass's codes and images."""
    model = two_level().eval()
    assert model.images_per_pass() == PIXELS_PER_PASS["cpu"] // 16**2  # the CPU's budget, in images of 16 px
    images = torch.rand(7, 3, 16, 16) * 2 - 1
    model.pixels_per_pass = 1 << 40
    whole, recon = model.encode_to_codes(images), model.decode_codes(model.encode_to_codes(images))
    for per_pass in (3, 1):  # 3 + 3 + 1, then one image a pass
        model.pixels_per_pass = per_pass * 16**2
        assert model.images_per_pass() == per_pass
        assert torch.equal(model.encode_to_codes(images), whole)
        torch.testing.assert_close(model.decode_codes(whole), recon, atol=1e-5, rtol=1e-5)
    model.pixels_per_pass = 10  # under one image: still one image a pass
    assert model.images_per_pass() == 1
    bad = whole.clone()
    bad[-1, 0, 0] = 8  # the last pass's image: refused before anything is decoded
    with pytest.raises(ValueError, match="level top must lie"):
        model.decode_codes(bad)
    assert model.encode_to_codes(images[:0]).shape == (0, 1, 80)
    assert model.decode_codes(whole[:0]).shape == (0, 3, 16, 16)
    model.train()
    model.encode_to_codes(images)
    assert model.training  # the mode it found, restored after the passes


def test_every_level_changes_the_image_and_gets_gradients() -> None:
    model = two_level().eval()
    codes = model.encode_to_codes(torch.rand(2, 3, 16, 16) * 2 - 1)
    for level, start in (("top", 0), ("bottom", 16)):
        other = codes.clone()
        other[:, 0, start] = (other[:, 0, start] + 1) % 8
        assert not torch.equal(model.decode_codes(other), model.decode_codes(codes)), level
    model.train()
    recon, qs = model(torch.rand(2, 3, 16, 16) * 2 - 1)
    (recon.square().mean() + sum(q.loss for q in qs)).backward()
    for name in ("encoder", "level_encoders", "level_upsamplers", "decoder"):
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(name)]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads), name


def test_conditioned_levels_code_the_bottom_given_the_top(tmp_path: Path) -> None:
    """condition_levels (VQ-VAE-2): the bottom is quantized from its features joined with the upsampled
    quantized top, so its codes change when only the top's codebook does (never without the flag); the
    shared modules start from the same weights either way; gradients reach the conditioner and the top's
    encoder through it; a checkpoint rebuilds the flag from its hyperparameters; one level ignores it."""
    plain, conditioned = two_level().eval(), two_level(condition_levels=True).eval()
    shared = plain.state_dict()
    assert all(torch.equal(v, conditioned.state_dict()[k]) for k, v in shared.items())
    assert {k.split(".")[0] for k in conditioned.state_dict().keys() - shared.keys()} == {"level_conditioners"}
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    for model, depends in ((plain, False), (conditioned, True)):
        model.train()(images)  # the first training batch initialises the codebooks (k-means)
        model.eval()
        before = model.split_codes(model.encode_to_codes(images))
        with torch.no_grad():
            model.level_quantizers[0].embed.mul_(-1)  # the top's codebook only
        after = model.split_codes(model.encode_to_codes(images))
        assert not torch.equal(after[1], before[1]) == depends  # the bottom level's codes
        codes = model.encode_to_codes(images)
        torch.testing.assert_close(model.decode_codes(codes), model(images)[0].clamp(-1, 1), atol=1e-5, rtol=1e-5)
    conditioned.train()
    recon, qs = conditioned(images)
    (recon.square().mean() + sum(q.loss for q in qs)).backward()
    for name in ("level_conditioners", "level_encoders", "level_upsamplers"):
        grads = [p.grad for n, p in conditioned.named_parameters() if n.startswith(name)]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads), name
    torch.manual_seed(0)
    module = VQVAE(3, 16, **NET, levels=TWO, condition_levels=True)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, tmp_path / "c.ckpt")
    rebuilt, _ = load_stage1(tmp_path / "c.ckpt")
    assert rebuilt.condition_levels and rebuilt.state_dict().keys() == module.state_dict().keys()
    one = VQModel(1, 16, **NET, codebook_size=16, condition_levels=True)
    assert not one.condition_levels and {k.split(".")[0] for k in one.state_dict()} == {"encoder", "quantizer",
                                                                                         "decoder"}


def test_one_level_keeps_the_old_state_dict_and_shape() -> None:
    torch.manual_seed(0)
    old_style = VQModel(1, 16, **NET, codebook_size=16)
    one = VQModel(1, 16, **NET, levels=[{"name": "only", "downsample": 4, "codebook_size": 16}])
    assert old_style.state_dict().keys() == one.state_dict().keys()
    assert {k.split(".")[0] for k in old_style.state_dict()} == {"encoder", "quantizer", "decoder"}
    assert old_style.grid_shape == one.grid_shape == (4, 4)
    assert old_style.levels == [{"name": "codes", "grid_shape": (4, 4), "codebook_size": 16}]


@pytest.mark.parametrize(
    "levels, match",
    [
        ([{"downsample": 4}, {"downsample": 4}], "2, 4, 8 or 16 times the one below, got 4 then 4"),
        ([{"downsample": 4}, {"downsample": 6}], "downsample must be 2, 4, 8 or 16, got 6"),
        ([{"downsample": 0}, {"downsample": 4}], "downsample must be 2, 4, 8 or 16, got 0"),  # ZeroDivisionError
        ([{"name": "a", "downsample": 2}, {"name": "a", "downsample": 4}], "names must differ"),
        ([{"downsample": 4, "size": 3}], "must be a mapping with downsample"),
        ([{"name": "not ok", "downsample": 4}], "plain identifier"),
    ],
)
def test_bad_levels(levels, match) -> None:
    with pytest.raises(ValueError, match=match):
        VQModel(1, 16, **NET, levels=levels)


def test_fsq_per_level() -> None:
    levels = [{"name": "b", "downsample": 2, "fsq_levels": [5, 3]},
              {"name": "t", "downsample": 4, "fsq_levels": [3, 3]}]
    model = VQModel(3, 16, **NET, quantizer="fsq", levels=levels)
    assert [lv["codebook_size"] for lv in model.levels] == [9, 15]
    codes = model.encode_to_codes(torch.rand(2, 3, 16, 16) * 2 - 1)
    assert model.decode_codes(codes).shape == (2, 3, 16, 16)


def meta_for(tmp_path: Path, levels: list[dict]) -> CodesMeta:
    stage1 = tmp_path / "stand_in.ckpt"
    stage1.write_bytes(b"hash me")
    grid = (1, sum(lv["grid_shape"][0] * lv["grid_shape"][1] for lv in levels)) if len(levels) > 1 else None
    return CodesMeta(codebook_size=max(lv["codebook_size"] for lv in levels),
                     grid_shape=grid or levels[0]["grid_shape"], num_classes=2, class_names=["a", "b"],
                     image_size=16, channels=3, stage1_ckpt=str(stage1), stage1_sha256=sha256_file(stage1),
                     levels=levels)  # fmt: skip


def test_codes_v2_one_array_per_level_and_overwrite_from_one_level(tmp_path: Path) -> None:
    levels = [{"name": "top", "grid_shape": (2, 2), "codebook_size": 8},
              {"name": "bottom", "grid_shape": (4, 4), "codebook_size": 16}]  # fmt: skip
    out = tmp_path / "codes"
    one = meta_for(tmp_path, levels[1:])
    with CodesWriter(out, one) as w:
        w.add_split("train", 3).write(0, np.zeros((3, 4, 4), int))
        w.commit()
    assert (out / "train" / CODES_FILE).is_file()
    rng = np.random.default_rng(0)
    flat = np.concatenate([rng.integers(0, 8, (6, 4)), rng.integers(0, 16, (6, 16))], 1)[:, None]  # (6, 1, 20)
    with CodesWriter(out, meta_for(tmp_path, levels), overwrite=True) as w:
        w.add_split("train", 6).write(0, flat, np.arange(6) % 2)
        w.add_split("test", 0)
        w.commit()
    files = sorted(p.name for p in (out / "train").iterdir())
    assert files == ["codes_bottom.npy", "codes_top.npy", "labels.npy"]  # the old codes.npy is gone, no temp left
    top = np.load(out / "train" / "codes_top.npy")
    assert top.dtype == np.uint16 and top.shape == (6, 2, 2)
    np.testing.assert_array_equal(top, flat[:, 0, :4].reshape(6, 2, 2))
    meta = read_meta(out)
    assert meta.format_version == 2 and [lv["name"] for lv in meta.levels] == ["top", "bottom"]
    codes, labels = load_split(out, "train")
    np.testing.assert_array_equal(codes, flat)
    assert load_split(out, "test")[0].shape == (0, 1, 20)
    for got, want in zip(split_levels(codes, meta.levels), (top, np.load(out / "train" / "codes_bottom.npy"))):
        np.testing.assert_array_equal(got, want)
    np.save(out / "train" / "codes_top.npy", np.full((6, 2, 2), 8, np.uint16))  # 8 is out of the top's range
    with pytest.raises(CodesError, match="codes_top.npy: code 8 out of range for codebook_size 8"):
        load_split(out, "train")


def test_version_1_directory_is_still_read(tmp_path: Path) -> None:
    out = tmp_path / "codes"
    with CodesWriter(out, meta_for(tmp_path, [{"name": "codes", "grid_shape": (3, 3), "codebook_size": 4}])) as w:
        w.add_split("val", 2).write(0, np.ones((2, 3, 3), int), np.array([0, 1]))
        w.commit()
    raw = json.loads((out / "meta.json").read_text())
    raw.pop("levels")
    raw["format_version"] = 1  # exactly what the first release wrote
    (out / "meta.json").write_text(json.dumps(raw))
    meta = read_meta(out)
    assert meta.levels == [{"name": "codes", "grid_shape": (3, 3), "codebook_size": 4}]
    assert load_split(out, "val")[0].shape == (2, 3, 3)


@pytest.fixture(scope="module")
def two_level_ckpt(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("levels")
    rng = np.random.default_rng(0)
    for c, name in enumerate("ab"):
        (tmp / "images" / name).mkdir(parents=True)
        for i in range(10):
            image = rng.integers(0, 128, (16, 16, 3)) + 100 * c * (np.arange(16)[:, None, None] > i)
            Image.fromarray(image.astype(np.uint8)).save(tmp / "images" / name / f"{i}.png")
    dm = ImageDataModule(dataset="image_folder", root=str(tmp / "images"), image_size=16, batch_size=4,
                         val_size=4, test_size=4)  # fmt: skip
    pl.seed_everything(0)
    model = VQVAE(dm.channels, dm.image_size, **NET, levels=TWO, warmup_steps=1)
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
                         val_check_interval=3, default_root_dir=tmp)  # fmt: skip
    trainer.fit(model, dm)
    logged = trainer.callback_metrics
    assert {"val/usage/top", "val/usage/bottom", "val/dead_codes/top", "val/usage"} <= set(logged)
    trainer.save_checkpoint(tmp / "stage1.ckpt")
    return tmp / "stage1.ckpt", tmp / "images"


def test_extract_writes_every_level(two_level_ckpt, tmp_path: Path) -> None:
    ckpt, root = two_level_ckpt
    extract_main(["--ckpt", str(ckpt), "--out", str(tmp_path / "codes"), "--accelerator", "cpu"])
    meta = read_meta(tmp_path / "codes")
    assert [(lv["name"], lv["grid_shape"], lv["codebook_size"]) for lv in meta.levels] == \
        [("top", (4, 4), 8), ("bottom", (8, 8), 16)]  # fmt: skip
    model, _ = load_stage1(ckpt)
    images, _ = ImageDataModule(dataset="image_folder", root=str(root), image_size=16, batch_size=4, val_size=4,
                                test_size=4).split_arrays("train")  # fmt: skip
    codes, _ = load_split(tmp_path / "codes", "train")
    np.testing.assert_array_equal(codes, model.encode_to_codes(from_uint8(images)).numpy())
    assert (tmp_path / "codes" / "train" / "codes_top.npy").is_file()


def test_heat_map_spreads_each_levels_bits_over_its_cells() -> None:
    from tools.anomaly_scores import heat_map_grid

    levels = [{"name": "top", "grid_shape": (2, 2), "codebook_size": 4},
              {"name": "bottom", "grid_shape": (4, 4), "codebook_size": 4}]  # fmt: skip
    surprise = np.zeros((1, 1, 20), np.float32)
    surprise[0, 0, 0] = 8.0  # the top-left top code: a 4x4-pixel cell of the 8x8 image
    surprise[0, 0, 4 + 15] = 1.0  # the bottom-right bottom code: a 2x2 cell
    tiles = heat_map_grid(torch.zeros(1, 1, 8, 8), surprise, levels)
    red = tiles[1, 0]  # the heat map's red channel, in [-1, 1]
    assert red[:4, :4].min() == 1.0  # 8 bits over 16 pixels = 0.5 bits/pixel: the largest, full red
    assert (red[6:, 6:] == 0.0).all()  # 1 bit over 4 pixels: half that density, 0.5 -> 0.0 in [-1, 1]
    assert red[4:6, :].max() < 0  # nothing there: only the darkened grey


@pytest.mark.parametrize("kind", ["vq", "vq_lookup_dim", "fsq", "two_levels_conditioned"])
def test_features_decode_with_gradients_and_snap_back_to_their_codes(kind):
    """The latent-editing path of a notebook (an extensibility audit: only private methods decoded with gradients):
    codes_to_features -> decode_features gives decode_codes' images (before its clamp) with gradients reaching
    the features; features_to_codes takes them back to the same codes, and in train mode updates no codebook."""
    torch.manual_seed(0)
    model = {"vq": lambda: VQModel(1, 16, **NET, codebook_size=16),
             "vq_lookup_dim": lambda: VQModel(1, 16, **NET, codebook_size=16, lookup_dim=4, l2_normalize=True),
             "fsq": lambda: VQModel(1, 16, **NET, quantizer="fsq", fsq_levels=[4, 3]),
             "two_levels_conditioned": lambda: two_level(condition_levels=True)}[kind]().eval()  # fmt: skip
    codes = model.join_codes([torch.randint(0, lv["codebook_size"], (3, *lv["grid_shape"])) for lv in model.levels])
    features = [f.detach().requires_grad_() for f in model.codes_to_features(codes)]  # leaves, as an optimiser's
    images = model.decode_features(features)
    assert torch.equal(images.detach().clamp(-1, 1), model.decode_codes(codes))
    images.square().mean().backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in features)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert torch.equal(model.features_to_codes([f.detach() + 1e-4 for f in features]), codes)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_fsq_has_no_codes_awaiting_restart():
    """FSQ has no restarts: its level's dead-code count is None, not 0 (which read as checked), and evaluate's
    table leaves the row out."""
    from tools.evaluate import stage1_rows

    fsq, vq = VQModel(1, 16, **NET, quantizer="fsq", fsq_levels=[4, 3]), VQModel(1, 16, **NET, codebook_size=16)
    assert fsq.dead_codes() == [None] and isinstance(vq.dead_codes()[0], int)
    level = {"name": "only", "grid_shape": [4, 4], "codes_used": 12, "codebook_size": 12, "codebook_usage": 1.0,
             "perplexity": 11.0}  # fmt: skip
    result = {"mse": 0.01, "psnr_db": 26.0, "psnr_mean_per_image_db": 27.0, "ssim": 0.9, "fid_recon": None}
    rows = [name for name, _ in stage1_rows({**result, "levels": [{**level, "dead_codes": None}]}, "features")]
    assert "codes awaiting restart" not in rows and "codebook usage" in rows
    rows = [name for name, _ in stage1_rows({**result, "levels": [{**level, "dead_codes": 0}]}, "features")]
    assert "codes awaiting restart" in rows
