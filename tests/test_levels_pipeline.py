"""Every command across two levels (VQ-VAE-2): train_stage1 -> extract_codes -> train_stage2 -> sample,
completion mapped onto each level, evaluate, compress/decompress (exact) and score_anomalies, on the tiny
generated shapes (16 px: bottom 8x8 codes, top 4x4)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import user_error
from PIL import Image

from common.codes import load_split, read_meta, split_levels
from common.images import load_image, to_uint8
from stage1_vqvae.extract import main as extract_main
from stage1_vqvae.model import load_stage1
from stage1_vqvae.train import main as train_stage1
from stage2_prior.train import main as train_stage2
from tools.anomaly import main as anomaly_main
from tools.compress import main_compress, main_decompress
from tools.evaluate import main as evaluate_main
from tools.sample import main as sample_main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
LEVELS = "[{name: bottom, downsample: 2}, {name: top, downsample: 4}]"
DATA = ["--data.dataset", "image_folder", "--data.image_size", "16", "--data.val_size", "8", "--data.test_size", "8"]


@pytest.fixture(scope="module")
def run(shapes_folder, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("levels_pipeline")
    train_stage1(["fit", "--config", str(CONFIGS / "stage1/tiny.yaml"), "--trainer.default_root_dir",
                  str(root / "s1"), "--model.levels", LEVELS, "--data.root", str(shapes_folder), *DATA,
                  "--data.batch_size", "16"])  # fmt: skip
    stage1 = root / "s1/latest/checkpoints/last.ckpt"
    extract_main(["--ckpt", str(stage1), "--out", str(root / "codes")])
    train_stage2(["fit", "--config", str(CONFIGS / "stage2/tiny.yaml"), "--data.codes_dir", str(root / "codes"),
                  "--trainer.default_root_dir", str(root / "s2"), "--data.batch_size", "8"])  # fmt: skip
    return {"root": root, "stage1": stage1, "codes": root / "codes", "prior": root / "s2/latest/checkpoints/best.ckpt",
            "images": shapes_folder}  # fmt: skip


def test_codes_and_prior_cover_both_levels(run) -> None:
    meta = read_meta(run["codes"])
    assert [(lv["name"], lv["grid_shape"]) for lv in meta.levels] == [("top", (4, 4)), ("bottom", (8, 8))]
    assert meta.grid_shape == (1, 80)
    codes, _ = load_split(run["codes"], "train")
    assert codes.shape[1:] == (1, 80)


def test_sample_decodes_every_level(run, tmp_path: Path) -> None:
    out = tmp_path / "grid.png"
    sample_main(["--prior", str(run["prior"]), "--n", "4", "--out", str(out)])
    npz = np.load(out.with_suffix(".npz"))
    assert npz["codes"].shape == (4, 1, 80) and npz["images"].shape == (4, 1, 16, 16)
    vqvae, _ = load_stage1(run["stage1"])
    redecoded = vqvae.decode_codes(torch.from_numpy(npz["codes"].astype(np.int64)))
    np.testing.assert_array_equal(((redecoded + 1) * 127.5).round().clamp(0, 255).byte().numpy(), npz["images"])


def test_completion_keep_rows_in_pixels_maps_onto_each_level(run, tmp_path: Path) -> None:
    prime = next(run["images"].rglob("*.png"))
    out = tmp_path / "c.npz"
    sample_main(["--prior", str(run["prior"]), "--prime", str(prime), "--keep_rows", "8", "--n", "3",
                 "--out", str(out)])  # fmt: skip
    codes = np.load(out)["codes"]
    levels = read_meta(run["codes"]).levels
    top, bottom = split_levels(codes, levels)
    assert (top[:, :2] == top[0, :2]).all()  # 8 px = 2 top rows (4 px cells)
    assert (bottom[:, :4] == bottom[0, :4]).all()  # = 4 bottom rows (2 px cells)
    vqvae, _ = load_stage1(run["stage1"])
    image = load_image(prime, 16, 1)
    want_top, want_bottom = vqvae.split_codes(vqvae.encode_to_codes(image))
    np.testing.assert_array_equal(top[0, :2], want_top[0, :2].numpy())
    np.testing.assert_array_equal(bottom[0, :4], want_bottom[0, :4].numpy())


def test_evaluate_prior_sums_bits_over_levels(run, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    evaluate_main(["prior", "--ckpt", str(run["prior"]), "--codes", str(run["codes"]), "--json", str(out)])
    r = json.loads(out.read_text())
    assert r["bits_per_dim"] == pytest.approx(r["bits_per_code"] * 80 / 256, rel=1e-5)


def test_compress_round_trip_is_exact(run, tmp_path: Path) -> None:
    images = tmp_path / "in"
    images.mkdir()
    for i, p in enumerate(sorted(run["images"].rglob("*.png"))[:3]):
        (images / f"{i}.png").write_bytes(p.read_bytes())
    main_compress([str(images), "--prior", str(run["prior"]), "--out", str(tmp_path / "x.vqz")])
    main_decompress([str(tmp_path / "x.vqz"), "--prior", str(run["prior"]), "--out", str(tmp_path / "out")])
    vqvae, _ = load_stage1(run["stage1"])
    for i in range(3):
        image = load_image(images / f"{i}.png", 16, 1)
        want = to_uint8(vqvae.decode_codes(vqvae.encode_to_codes(image)))[0, 0].numpy()
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / f"{i}.png")), want)


def test_score_anomalies_heat_map_over_levels(run, tmp_path: Path) -> None:
    out, grid = tmp_path / "s.csv", tmp_path / "g.png"
    images = next(run["images"].iterdir())  # one class folder
    anomaly_main([str(images), "--prior", str(run["prior"]), "--out", str(out), "--grid", str(grid),
                  "--top", "2"])  # fmt: skip
    with open(out) as f:
        rows = list(csv.reader(f))
    assert len(rows) == 1 + 32 and Image.open(grid).size[0] > 2 * 16


def test_pixelcnn_over_levels_is_refused(run, tmp_path: Path, capsys) -> None:
    err = user_error(train_stage2, ["fit", "--config", str(CONFIGS / "stage2/tiny.yaml"), "--data.codes_dir",
                                    str(run["codes"]), "--model.kind", "pixelcnn",
                                    "--trainer.default_root_dir", str(tmp_path)], capsys)  # fmt: skip
    assert "pixelcnn models one 2-D grid" in err and "transformer" in err
