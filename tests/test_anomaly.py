"""Tests for stage2_prior/anomaly.py: a tiny stage 1 + prior trained on dark images with one bright square
rank random-noise images above held-out squares; the generic code length and AUROC; the CSV/grid CLI."""

import csv
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from conftest import user_error
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from common.codes import sha256_file
from common.images import from_uint8, to_uint8
from stage1_vqvae.vqvae import VQVAE
from stage2_prior.prior import Prior
from tools.anomaly import COLUMNS, auroc, heat_map_grid, main, mean_nll_bits, score_images
from tools.anomaly_scores import ORIENTATION_WEIGHT, generic_code_bits, reorientations
from tools.transform_net import AnomalyNet, TransformNet, reference_features

SIZE, K = 16, 16


def squares(n: int, seed: int) -> torch.Tensor:
    """(n, 1, 16, 16) in [-1, 1]: black with one bright square."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, 1, SIZE, SIZE), np.uint8)
    for i in range(n):
        s = int(rng.integers(3, 7))
        r, c = rng.integers(0, SIZE - s, 2)
        x[i, 0, r : r + s, c : c + s] = rng.integers(180, 256)
    return from_uint8(torch.from_numpy(x))


def noise(n: int, seed: int) -> torch.Tensor:
    return from_uint8(
        torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 1, SIZE, SIZE), dtype=np.uint8))
    )


def fit(model: pl.LightningModule, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, limit_val_batches=0).fit(model, loader)  # fmt: skip


def train_both(train: torch.Tensor) -> tuple[Prior, VQVAE]:
    """A tiny stage 1 and an unconditional tiny prior over its codes, 60 steps each, seeded."""
    pl.seed_everything(0)
    vqvae = VQVAE(1, SIZE, 16, 1, 8, 4, 8, codebook_size=K, warmup_steps=5)
    fit(vqvae, train, torch.zeros(len(train)), steps=60)
    codes = vqvae.eval().encode_to_codes(train)
    prior = Prior(kind="transformer", size="tiny", codebook_size=K, grid_shape=vqvae.grid_shape, num_classes=0,
                  codes_meta={"image_size": SIZE, "channels": 1}, warmup_steps=5)  # fmt: skip
    fit(prior, codes, torch.zeros(len(codes), dtype=torch.long), steps=60)
    return prior.eval(), vqvae


@pytest.fixture(scope="module")
def trained() -> tuple[Prior, VQVAE]:
    return train_both(squares(512, seed=0))


def test_noise_ranks_above_in_distribution(trained) -> None:
    prior, vqvae = trained
    images = torch.cat([squares(48, seed=1), noise(16, seed=2)])
    scores, surprise = score_images(prior, vqvae, images, batch_size=20)
    is_ood = np.r_[np.zeros(48), np.ones(16)].astype(bool)
    assert set(scores) == set(COLUMNS[1:]) and all(v.shape == (64,) for v in scores.values())
    assert surprise.shape == (64, *vqvae.grid_shape) and (surprise >= 0).all()
    np.testing.assert_allclose(scores["combined_score"], scores["nll_bits_per_dim"] - scores["complexity_bits_per_dim"])
    np.testing.assert_allclose(scores["max_surprise_bits"], surprise.reshape(64, -1).max(1))
    np.testing.assert_allclose(scores["nll_bits_per_dim"], surprise.reshape(64, -1).sum(1) / SIZE**2, rtol=1e-6)
    assert np.isnan(scores["likelihood_ratio"]).all() and np.isnan(scores["typicality"]).all()  # not asked for
    for key in ("combined_score", "recon_mse", "max_surprise_bits"):
        assert auroc(scores[key], is_ood) > 0.9, key


def test_likelihood_ratio_and_typicality(trained) -> None:
    """Against itself as the background the ratio is 0; typicality is |NLL - the training mean| per dim."""
    prior, vqvae = trained
    images = torch.cat([squares(8, seed=5), noise(4, seed=6)])
    mean_bits = mean_nll_bits(prior, vqvae.encode_to_codes(squares(64, seed=0)).numpy())
    scores, _ = score_images(prior, vqvae, images, background=prior, train_nll_bits=mean_bits)
    np.testing.assert_allclose(scores["likelihood_ratio"], 0.0, atol=1e-6)
    expected = np.abs(scores["nll_bits_per_dim"] * SIZE**2 - mean_bits) / SIZE**2
    np.testing.assert_allclose(scores["typicality"], expected, rtol=1e-5)
    assert scores["typicality"][8:].min() > scores["typicality"][:8].max()  # noise is far from typical


def test_heat_map_grid_marks_the_surprising_code() -> None:
    images = torch.full((2, 1, SIZE, SIZE), -1.0)
    surprise = np.zeros((2, 4, 4))
    surprise[1, 2, 3] = 5.0
    tiles = heat_map_grid(images, surprise)  # image, overlay, image, overlay
    assert tiles.shape == (4, 3, SIZE, SIZE)
    cell = SIZE // 4
    hot = tiles[3, 0, 2 * cell : 3 * cell, 3 * cell :]
    assert (hot == 1.0).all() and (tiles[3, 0, :cell, :cell] < 0).all() and (tiles[1, 0] < 0).all()


def test_perturbed_codes_for_a_background_prior(tmp_path: Path) -> None:
    """--data.perturb replaces about that fraction of the training codes by random ones, never at validation."""
    from types import SimpleNamespace

    from conftest import write_codes_dir

    from stage2_prior.data import CodesDataModule

    dm = CodesDataModule(str(write_codes_dir(tmp_path)), check_stage1=False, perturb=0.3)
    codes = torch.zeros(64, 7, 7, dtype=torch.long)
    dm.trainer = SimpleNamespace(training=True)
    torch.manual_seed(0)
    changed = (dm.on_after_batch_transfer((codes, torch.zeros(64)), 0)[0] != 0).float().mean()
    assert 0.25 < changed < 0.32  # 0.3 replaced, a few by the code they had
    dm.trainer = SimpleNamespace(training=False)
    assert torch.equal(dm.on_after_batch_transfer((codes, torch.zeros(64)), 0)[0], codes)
    with pytest.raises(ValueError, match="perturb must be in"):
        CodesDataModule(str(tmp_path / "codes"), check_stage1=False, perturb=1.0)


def test_generic_code_bits() -> None:
    k = 512
    constant, distinct = np.zeros((1, 7, 7), np.int64), np.arange(49).reshape(1, 7, 7)
    # constant: log2 K for the first code, then a seen code costs log2((t + 1) / t)
    want = np.log2(k) + sum(np.log2((t + 1) / t) for t in range(1, 49))
    np.testing.assert_allclose(generic_code_bits(constant, k), [want])
    # all distinct: each new code pays the escape d / (n + d) = 1/2 and log2(K - d)
    want = np.log2(k) + sum(1 + np.log2(k - t) for t in range(1, 49))
    np.testing.assert_allclose(generic_code_bits(distinct, k), [want])
    both = generic_code_bits(np.concatenate([constant, distinct]), k)
    assert both[0] < 0.05 * both[1]


def test_auroc_matches_pairwise_definition() -> None:
    rng = np.random.default_rng(0)
    scores, labels = rng.integers(0, 5, 60).astype(float), rng.random(60) < 0.3  # many ties
    pos, neg = scores[labels], scores[~labels]
    pairwise = ((pos[:, None] > neg[None]) + 0.5 * (pos[:, None] == neg[None])).mean()
    assert auroc(scores, labels) == pytest.approx(pairwise)
    assert auroc([1, 2, 3, 4], [0, 0, 1, 1]) == 1.0 and auroc([4, 3, 2, 1], [0, 0, 1, 1]) == 0.0
    with pytest.raises(ValueError, match="both classes"):
        auroc([1, 2], [1, 1])


def save_checkpoints(trained, tmp_path: Path) -> None:
    """tmp_path/s1.ckpt and tmp_path/p.ckpt, as the training commands save them."""
    prior, vqvae = trained
    save = {"pytorch-lightning_version": pl.__version__}
    torch.save(
        {"state_dict": vqvae.state_dict(), "hyper_parameters": dict(vqvae.hparams), **save}, tmp_path / "s1.ckpt"
    )
    prior.hparams.codes_meta = dict(codebook_size=K, grid_shape=list(vqvae.grid_shape), num_classes=0, class_names=[],
                                    image_size=SIZE, channels=1, stage1_ckpt=str(tmp_path / "s1.ckpt"),
                                    stage1_sha256=sha256_file(tmp_path / "s1.ckpt"))  # fmt: skip
    torch.save({"state_dict": prior.state_dict(), "hyper_parameters": dict(prior.hparams), **save}, tmp_path / "p.ckpt")


def test_cli_writes_csv_and_grid(trained, tmp_path: Path, capsys) -> None:
    save_checkpoints(trained, tmp_path)
    images = tmp_path / "images"
    images.mkdir()
    for i, x in enumerate(to_uint8(torch.cat([squares(6, seed=3), noise(2, seed=4)]))):
        Image.fromarray(x[0].numpy()).save(images / f"{i}.png")
    out, grid = tmp_path / "scores.csv", tmp_path / "top.png"
    args = [str(images), "--prior", str(tmp_path / "p.ckpt"), "--out", str(out), "--grid", str(grid), "--top", "3"]
    main(args)
    assert "scored 8 images" in capsys.readouterr().out
    with open(out) as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == COLUMNS and len(rows) == 9
    optional = [COLUMNS.index(k) for k in ("likelihood_ratio", "typicality", "transform_knn")]
    assert all(np.isfinite(float(v)) for row in rows[1:] for i, v in enumerate(row) if i and i not in optional)
    assert all(row[i] == "" for row in rows[1:] for i in optional)
    with Image.open(grid) as im:
        assert im.size[0] > 6 * 2 * SIZE  # 3 images, each beside its heat map, at scale 2
    with pytest.raises(SystemExit) as e:
        main(args)  # exists: refused without --overwrite
    assert e.value.code == 2 and "--overwrite" in capsys.readouterr().err
    main([*args, "--overwrite", "--background", str(tmp_path / "p.ckpt"), "--method", "likelihood_ratio"])
    with open(out) as f:
        rows = list(csv.reader(f))
    assert all(abs(float(row[COLUMNS.index("likelihood_ratio")])) < 1e-6 for row in rows[1:])  # itself as background
    err = user_error(main, [*args, "--overwrite", "--rank_by", "typicality"], capsys)  # the old name still works
    assert "--method typicality needs --codes" in err
    net = TransformNet(1, width=4)
    AnomalyNet([net], [reference_features(net, to_uint8(squares(16, seed=5)))], 5, SIZE).save(tmp_path / "net.pt")
    main([*args, "--overwrite", "--anomaly_net", str(tmp_path / "net.pt")])
    assert "most anomalous by transform_knn" in capsys.readouterr().out  # the default with an anomaly net
    with open(out) as f:
        rows = list(csv.reader(f))
    assert all(0 <= float(row[COLUMNS.index("transform_knn")]) <= 2 for row in rows[1:])


def test_cli_replaces_the_csv_and_grid_together_or_neither(trained, tmp_path: Path, capsys, monkeypatch) -> None:
    """Ctrl-C while the grid was drawn left the new CSV beside the old grid (exit 130): both, or neither."""
    import tools.anomaly

    save_checkpoints(trained, tmp_path)
    images = tmp_path / "images"
    images.mkdir()
    for i, x in enumerate(to_uint8(squares(4, seed=3))):
        Image.fromarray(x[0].numpy()).save(images / f"{i}.png")
    out, grid = tmp_path / "scores.csv", tmp_path / "top.png"
    args = [str(images), "--prior", str(tmp_path / "p.ckpt"), "--out", str(out), "--grid", str(grid), "--overwrite"]
    main(args)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    (images / "0.png").unlink()  # another set of images: another CSV

    def pressed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tools.anomaly, "heat_map_grid", pressed)
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 130
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before  # no temporary file either


def test_cli_scores_the_images_of_sub_folders(trained, tmp_path: Path, capsys) -> None:
    """A folder of class sub-folders is scored image by image (it was "directory holds no images"), each row
    named by its path, the same basename in two folders included; hidden files and folders are skipped."""
    save_checkpoints(trained, tmp_path)
    images = to_uint8(torch.cat([squares(2, seed=3), noise(2, seed=4)]))
    layout = ["images/a/0.png", "images/a/1.png", "images/b/0.png", "images/b/c/0.png",
              "images/.ipynb_checkpoints/0-checkpoint.png", "images/a/.thumbs/0.png", "images/b/.0.png"]  # fmt: skip
    for i, rel in enumerate(layout):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i % 4, 0].numpy()).save(tmp_path / rel)
    out = tmp_path / "scores.csv"
    main([str(tmp_path / "images"), "--prior", str(tmp_path / "p.ckpt"), "--out", str(out), "--method", "recon_mse"])
    said = capsys.readouterr().out
    assert "scored 4 images" in said and "most anomalous by recon_mse: b/" in said  # noise: b/0.png, b/c/0.png
    with open(out) as f:
        rows = list(csv.reader(f))
    assert [Path(r[0]).relative_to(tmp_path).as_posix() for r in rows[1:]] == layout[:4]
    one_by_one = tmp_path / "one.csv"
    main([*(str(tmp_path / r) for r in layout[:4]), "--prior", str(tmp_path / "p.ckpt"), "--out", str(one_by_one)])
    with open(one_by_one) as f:
        assert [r[1:] for r in csv.reader(f)] == [r[1:] for r in rows]  # the same images, the same scores


def test_orientation_score_is_the_ratio_to_the_likeliest_turned_copy(trained) -> None:
    prior, vqvae = trained
    images = torch.cat([squares(6, seed=7), noise(2, seed=8), torch.full((2, 1, SIZE, SIZE), 0.3)])
    scores, _ = score_images(prior, vqvae, images)
    turned = [score_images(prior, vqvae, t)[0]["nll_bits_per_dim"] for t in reorientations(images)]
    np.testing.assert_allclose(scores["orientation_bits_per_dim"], scores["nll_bits_per_dim"] - np.min(turned, 0),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    np.testing.assert_allclose(scores["orientation_combined"],
                               scores["orientation_bits_per_dim"] + ORIENTATION_WEIGHT * scores["combined_score"])
    np.testing.assert_allclose(scores["orientation_bits_per_dim"][8:], 0.0, atol=1e-6)  # a blank looks alike any way up


def test_reorientations_turn_and_flip_but_never_mirror() -> None:
    x = torch.arange(12.0).view(1, 1, 3, 4)
    turns = reorientations(x)
    assert [t.shape for t in turns] == [x.shape, x.shape]  # not square: no quarter turns
    assert torch.equal(turns[0][0, 0, 0], x[0, 0, 2]) and torch.equal(turns[1][0, 0, 0], x[0, 0, 2].flip(0))
    sq = torch.arange(9.0).view(1, 1, 3, 3)
    turns = reorientations(sq)
    assert len(turns) == 4 and not any(torch.equal(t, sq.flip(-1)) for t in turns)
    assert torch.equal(turns[2][0, 0], torch.tensor([[2.0, 5, 8], [1, 4, 7], [0, 3, 6]]))  # 90 degrees


def bars(n: int, seed: int) -> torch.Tensor:
    """(n, 1, 16, 16): black with a bright bar across the top rows (an image with an up and a down)."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, 1, SIZE, SIZE), np.uint8)
    for i in range(n):
        r, h = rng.integers(0, 2), rng.integers(3, 5)
        x[i, 0, r : r + h, rng.integers(0, 3) : SIZE - rng.integers(0, 3)] = rng.integers(180, 256)
    return from_uint8(torch.from_numpy(x))


def test_upside_down_images_score_above_upright_ones() -> None:
    """Trained on bars at the top, the prior finds a bar at the bottom (the same images upside down) odd."""
    prior, vqvae = train_both(bars(512, seed=0))
    upright = bars(32, seed=1)
    scores, _ = score_images(prior, vqvae, torch.cat([upright, upright.flip(-2)]))
    is_ood = np.r_[np.zeros(32), np.ones(32)].astype(bool)
    assert auroc(scores["orientation_bits_per_dim"], is_ood) > 0.95
    assert (scores["orientation_bits_per_dim"][:32] < 0).mean() > 0.9  # upright: likelier than any turn


def test_a_folder_is_scored_and_compressed_a_chunk_at_a_time(shapes_folder, tmp_path, monkeypatch):
    """score_anomalies and compress read a folder a chunk at a time (common.images.image_chunks): they read it
    whole as floats (30,000 files at 256 px: 23 GB before any work). Chunks of 3 images here give the CSV, the
    grid and the .vqz that reading the folder whole gives, byte for byte (chunks of whole batches: 3 images a batch
    and a stage-1 pass here)."""
    import common.images
    from tools.compress import main_compress

    folder = tmp_path / "images"
    folder.mkdir()
    for f in sorted(shapes_folder.rglob("*.png"))[:7]:
        (folder / f"{f.parent.name}_{f.name}").write_bytes(f.read_bytes())
    torch.manual_seed(0)
    stage1 = VQVAE(1, 16, 16, 1, 8, 4, 8, codebook_size=16).eval()
    meta = dict(codebook_size=16, grid_shape=[4, 4], num_classes=0, class_names=[], image_size=16, channels=1,
                stage1_ckpt=str(tmp_path / "stage1.ckpt"))  # fmt: skip
    torch.save({"state_dict": stage1.state_dict(), "hyper_parameters": dict(stage1.hparams)}, tmp_path / "stage1.ckpt")
    meta["stage1_sha256"] = sha256_file(tmp_path / "stage1.ckpt")
    prior = Prior(kind="transformer", size="tiny", codebook_size=16, grid_shape=(4, 4), num_classes=0, codes_meta=meta)
    torch.save({"state_dict": prior.state_dict(), "hyper_parameters": dict(prior.hparams)}, tmp_path / "prior.ckpt")

    def run(tag: str) -> list[bytes]:
        outs = [tmp_path / f"{tag}.csv", tmp_path / f"{tag}.png", tmp_path / f"{tag}.vqz"]
        main([str(folder), "--prior", str(tmp_path / "prior.ckpt"), "--out", str(outs[0]), "--grid", str(outs[1]),
              "--device", "cpu", "--batch_size", "3"])  # fmt: skip
        main_compress([str(folder), "--prior", str(tmp_path / "prior.ckpt"), "--out", str(outs[2])])
        return [p.read_bytes() for p in outs]

    import stage1_vqvae.model

    monkeypatch.setitem(stage1_vqvae.model.PIXELS_PER_PASS, "cpu", 3 * 16 * 16)  # compress encodes 3 images a pass
    whole = run("whole")
    monkeypatch.setattr(common.images, "CHUNK_BYTES", 3 * 4 * 16 * 16)  # 3 images a chunk: 3 + 3 + 1
    calls, load = [], common.images.load_images

    def counted(files, *args):
        calls.append(len(files))
        return load(files, *args)

    monkeypatch.setattr(common.images, "load_images", counted)
    assert run("chunked") == whole
    assert calls == [3, 3, 1, 3, 3, 1]  # score_anomalies' chunks, then compress's
