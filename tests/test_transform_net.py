"""Tests for tools/transform_net.py and train_anomaly_net: the 72 transformations, training that learns to tell
them apart, the k-NN score (zero on the references, high on another kind of image), the file round trip, and
the views (each scored against its own bank), and the command on a generated image folder."""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import user_error

from common.images import from_uint8
from tools.anomaly import auroc
from tools.train_anomaly_net import main as train_anomaly_net
from tools.transform_net import (
    NUM_TRANSFORMS,
    AnomalyNet,
    AnomalyNetError,
    TransformNet,
    fit_transform_net,
    image_features,
    knn_distance,
    reference_features,
    transform,
    transform_each,
)

SIZE = 16


def bars(n: int, seed: int) -> torch.Tensor:
    """(n, 1, 16, 16) uint8: black with a bright horizontal bar near the top."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, 1, SIZE, SIZE), np.uint8)
    for i in range(n):
        r, h, left = rng.integers(1, 4), rng.integers(2, 4), rng.integers(1, 4)
        x[i, 0, r : r + h, left : SIZE - rng.integers(1, 4)] = rng.integers(180, 256)
    return torch.from_numpy(x)


def rings(n: int, seed: int) -> torch.Tensor:
    """(n, 1, 16, 16) uint8: a bright ring, the same every way up (another kind of image)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    out = []
    for _ in range(n):
        cy, cx, r = rng.uniform(6, 10), rng.uniform(6, 10), rng.uniform(3, 5)
        ring = np.abs(np.hypot(yy - cy, xx - cx) - r) < 1.0
        out.append(np.where(ring, rng.integers(180, 256), 0).astype(np.uint8)[None])
    return torch.from_numpy(np.stack(out))


def test_the_72_transformations_are_distinct_and_0_is_the_identity() -> None:
    x = torch.randn(2, 1, 8, 8)
    outs = [transform(x, t) for t in range(NUM_TRANSFORMS)]
    assert all(o.shape == x.shape for o in outs) and torch.equal(outs[0], x)
    flat = torch.stack([o.flatten() for o in outs])
    assert len(torch.unique(flat, dim=0)) == NUM_TRANSFORMS
    # index 12: shifted left by a quarter of the side (2 px), the uncovered right edge repeats the last column
    left = transform(x, 12)
    assert torch.equal(left[..., :6], x[..., 2:]) and torch.equal(left[..., 6:], x[..., 7:8].expand(-1, -1, -1, 2))
    assert torch.equal(transform(x, 36), x.flip(-1)) and torch.equal(transform(x, 1), x.rot90(1, (-2, -1)))
    idx = torch.tensor([5, 0, 71, 5])
    each = transform_each(torch.cat([x, x]), idx)
    assert all(torch.equal(each[i], transform(torch.cat([x, x])[i : i + 1], int(t))[0]) for i, t in enumerate(idx))


@pytest.fixture(scope="module")
def trained() -> tuple[TransformNet, torch.Tensor, list[float]]:
    torch.manual_seed(0)
    normal = bars(256, seed=0)
    net = TransformNet(1, width=8)
    losses = fit_transform_net(net, normal, steps=150, batch_size=64, lr=3e-3)
    return net, normal, losses


def test_training_learns_which_transformation_was_applied(trained) -> None:
    net, normal, losses = trained
    assert np.mean(losses[-20:]) < np.mean(losses[:20]) - 1.0  # from about ln 72 = 4.3
    held_out = from_uint8(bars(64, seed=1))
    target = torch.arange(64) % NUM_TRANSFORMS
    with torch.no_grad():
        accuracy = (net.eval()(transform_each(held_out, target)).argmax(1) == target).float().mean()
    assert accuracy > 0.2  # chance: 1/72


def test_knn_score_is_zero_on_the_references_and_high_on_another_kind(trained) -> None:
    net, normal, _ = trained
    bank = reference_features(net, normal)
    assert bank.shape == (256, 32) and torch.allclose(bank.norm(dim=1), torch.ones(256), atol=1e-5)
    np.testing.assert_allclose(knn_distance(bank, bank, k=1), 0.0, atol=1e-5)
    feats = image_features(net, torch.cat([bars(64, seed=2), rings(64, seed=3)]))
    scores = knn_distance(feats, bank, k=5)
    assert scores.shape == (128,) and (scores >= 0).all() and (scores <= 2).all()
    assert auroc(scores, np.r_[np.zeros(64), np.ones(64)].astype(bool)) > 0.9
    assert len(reference_features(net, normal, max_images=100)) == 100


def test_a_view_is_the_transformed_image_against_a_bank_of_transformed_references(trained) -> None:
    net, normal, _ = trained
    images = from_uint8(torch.cat([bars(8, seed=2), rings(8, seed=3)]))
    torch.testing.assert_close(image_features(net, images, view=36), image_features(net, images.flip(-1)))
    mirrored_bank = reference_features(net, normal, view=36)
    torch.testing.assert_close(mirrored_bank, image_features(net, normal.flip(-1)))
    model = AnomalyNet([net], [torch.stack([reference_features(net, normal), mirrored_bank])], 5, SIZE, views=(0, 36))
    by_view = model.view_scores(images)  # (nets, views, N)
    assert by_view.shape == (1, 2, 16) and not np.allclose(by_view[0, 0], by_view[0, 1])
    np.testing.assert_allclose(by_view[0, 1], knn_distance(image_features(net, images.flip(-1)), mirrored_bank))
    np.testing.assert_allclose(model.score(images), by_view[0].mean(0), atol=1e-7)
    with pytest.raises(ValueError, match="one bank per view"):
        AnomalyNet([net], [mirrored_bank], 5, SIZE, views=(0, 36))


def test_file_round_trip_gives_the_same_scores(trained, tmp_path: Path) -> None:
    net, normal, _ = trained
    views = (0, 36)
    bank = torch.stack([reference_features(net, normal, view=t) for t in views])  # (2, M, D)
    other = TransformNet(1, width=8)  # a second member: the score is the mean of the two nets' k-NN distances
    other_bank = torch.stack([reference_features(other, normal, view=t) for t in views])
    AnomalyNet([net, other], [bank, other_bank], 3, SIZE, views=views).save(tmp_path / "a.pt", dataset="bars")
    model = AnomalyNet.load(tmp_path / "a.pt")
    assert model.k == 3 and model.shape == (1, SIZE, SIZE) and model.info["dataset"] == "bars"
    assert len(model.nets) == 2 and "members" not in model.info and model.views == views
    images = from_uint8(rings(8, seed=4))
    torch.testing.assert_close(image_features(model.nets[0], images), image_features(net, images))
    by_view = [[knn_distance(image_features(n, images, view=t), b[v], 3) for v, t in enumerate(views)]
               for n, b in ((net, bank), (other, other_bank))]  # fmt: skip
    each = [np.mean(d, 0) for d in by_view]
    assert not np.allclose(each[0], each[1])
    np.testing.assert_allclose(model.score(images), (each[0] + each[1]) / 2, atol=1e-6)
    model.check(1, SIZE)
    with pytest.raises(ValueError, match=r"was trained on 16x16 images with 1 channel\(s\), the models score 28x28"):
        model.check(1, 28)
    record = torch.load(tmp_path / "a.pt", weights_only=True)
    torch.save({**record, "version": 99}, tmp_path / "v99.pt")
    with pytest.raises(ValueError, match="format version 99, this code reads 1, 2 or 3; re-run train_anomaly_net"):
        AnomalyNet.load(tmp_path / "v99.pt")
    # older files hold an (M, D) bank of the untransformed images and score that view alone, as they did:
    # version 2 (several nets), version 1 (one net, its weights and bank at the top level)
    old = {k: v for k, v in record.items() if k not in ("members", "views")}
    members = [{"state_dict": m["state_dict"], "bank": m["bank"][0]} for m in record["members"]]
    torch.save({**old, "version": 2, "members": members}, tmp_path / "v2.pt")
    v2 = AnomalyNet.load(tmp_path / "v2.pt")
    assert v2.views == (0,)
    np.testing.assert_allclose(v2.score(images), (by_view[0][0] + by_view[1][0]) / 2, atol=1e-6)
    torch.save({**old, "version": 1, **members[0]}, tmp_path / "v1.pt")
    np.testing.assert_allclose(AnomalyNet.load(tmp_path / "v1.pt").score(images), by_view[0][0], atol=1e-6)
    # a version-3 header over one bank per net instead of one per view: refused in one line, no traceback
    torch.save({**old, "version": 3, "views": [0, 36], "members": members}, tmp_path / "bad.pt")
    with pytest.raises(AnomalyNetError, match=r"bad.pt is damaged \(ValueError: an anomaly net needs one bank per"):
        AnomalyNet.load(tmp_path / "bad.pt")


def test_ensemble_training_is_seeded_per_net_whatever_ran_before() -> None:
    normal = bars(64, seed=0)
    a, losses = AnomalyNet.train(normal, members=2, steps=3, width=4, batch_size=16, seed=7)
    torch.randn(100)  # the global generator moves on
    b, _ = AnomalyNet.train(normal, members=1, steps=3, width=4, batch_size=16, seed=7)
    assert len(a.nets) == len(a.banks) == len(losses) == 2 and all(len(x) == 3 for x in losses)
    assert torch.equal(a.banks[0], b.banks[0])  # net 0 of both: seed 7
    assert not torch.equal(a.banks[0], a.banks[1])  # net 1: seed 8
    assert a.shape == (1, SIZE, SIZE)


def test_command_trains_on_the_named_classes_and_refuses_to_overwrite(shapes_folder, tmp_path: Path, capsys) -> None:
    out = tmp_path / "net.pt"
    args = ["--data.dataset", "image_folder", "--data.root", str(shapes_folder), "--data.image_size", "16",
            "--data.batch_size", "16",
            "--classes", "0", "--steps", "3", "--width", "4", "--out", str(out)]  # fmt: skip
    train_anomaly_net(args)
    assert "saved to" in capsys.readouterr().out
    model = AnomalyNet.load(out)
    assert model.info["classes"] == [0] and model.shape == (1, SIZE, SIZE) and len(model.nets) == 2
    assert model.views == (0, 36) and model.banks[0].shape[0] == 2
    assert 0 < model.banks[0].shape[1] < 64  # class 0's training images only (the folder holds 64 in two classes)
    before = out.read_bytes()
    assert "already exists" in user_error(train_anomaly_net, args, capsys)
    assert out.read_bytes() == before
