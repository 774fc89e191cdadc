"""FID/KID (common/fid.py) on synthetic features, and the feature net (common/features.py) on tiny data."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from common.images import from_uint8
from tools.features import (
    FeatureNet,
    FeaturesError,
    accuracy,
    default_path,
    feature_net_features,
    fit_feature_net,
    load_feature_net,
    load_features,
    save_feature_net,
)
from tools.fid import classifier_score, feature_stats, fid, frechet_distance, kid, precision_recall


def gaussian(n: int, d: int = 16, seed: int = 0, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = np.random.default_rng(99).normal(size=(d, d)) / np.sqrt(d)  # the same correlated distribution
    return rng.normal(size=(n, d)) @ mix + shift


def test_fid_of_a_set_with_itself_is_zero():
    x = gaussian(400)
    scale = np.trace(np.cov(x, rowvar=False))
    assert fid(x, x) < 1e-6 * scale
    assert fid(x, x.copy()[::-1]) < 1e-6 * scale  # order does not matter


def test_fid_grows_with_the_shift():
    x = gaussian(600, seed=0)
    values = [fid(x, gaussian(600, seed=1, shift=s)) for s in (0.0, 0.1, 0.3, 1.0, 3.0)]
    assert all(a < b for a, b in zip(values, values[1:])), values
    # For a pure mean shift the mean term dominates: |shift|^2 * d.
    assert values[-1] == pytest.approx(9.0 * 16, rel=0.1)


def test_fid_matches_the_scipy_sqrtm_formula():
    a, b = gaussian(300, seed=2), gaussian(300, seed=3, shift=0.5) * 1.3
    (mu_a, s_a), (mu_b, s_b) = feature_stats(a), feature_stats(b)
    covmean = scipy.linalg.sqrtm(s_a @ s_b).real
    reference = ((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(covmean)
    assert frechet_distance(mu_a, s_a, mu_b, s_b) == pytest.approx(reference, rel=1e-6)


def test_kid_is_about_zero_for_the_same_distribution_and_grows_with_the_shift():
    x = gaussian(400, seed=0)
    same, _ = kid(x, gaussian(400, seed=1), subsets=10, subset_size=150)
    shifted = [kid(x, gaussian(400, seed=1, shift=s), subsets=10, subset_size=150)[0] for s in (0.3, 1.0)]
    assert abs(same) < 0.01 < shifted[0] < shifted[1]


def test_precision_and_recall_tell_mode_dropping_from_blur():
    """k-NN precision/recall against a brute-force reference: the same set scores 1 and 1; samples from one of
    the real data's two clusters (dropped modes) keep precision and lose half the recall; samples far from the
    data score 0 and 0."""
    rng = np.random.default_rng(0)
    real = np.concatenate([rng.normal(0, 1, (300, 4)), rng.normal(20, 1, (300, 4))])
    assert precision_recall(real, real) == (1.0, 1.0)
    one_mode = rng.normal(0, 1, (600, 4))
    precision, recall = precision_recall(real, one_mode)
    assert precision > 0.9 and 0.4 < recall < 0.6
    assert precision_recall(real, rng.normal(100, 1, (600, 4))) == (0.0, 0.0)

    def brute(a, b, k=3):  # every distance at once, sorted
        radii = np.sort(np.linalg.norm(a[:, None] - a[None], axis=2), axis=1)[:, k]
        return float((np.linalg.norm(b[:, None] - a[None], axis=2) <= radii[None]).any(1).mean())

    small_real, small_fake = rng.normal(0, 1, (80, 3)), rng.normal(0.5, 1.3, (60, 3))
    got = precision_recall(small_real, small_fake)
    assert got == pytest.approx((brute(small_real, small_fake), brute(small_fake, small_real)))


def test_classifier_score_runs_from_one_to_the_number_of_classes():
    classes = np.arange(1000) % 5
    sure = np.eye(5)[classes]  # each image sure of its class, the 5 classes equally often
    assert classifier_score(sure)[0] == pytest.approx(5.0, rel=0.03)
    by_class = sure[np.argsort(classes, kind="stable")]  # as samples come: a split of one class would score 1
    assert classifier_score(by_class)[0] == pytest.approx(5.0, rel=0.03)
    assert classifier_score(np.full((100, 5), 0.2))[0] == pytest.approx(1.0)  # no image says anything
    assert classifier_score(np.eye(5)[np.zeros(100, int)])[0] == pytest.approx(1.0)  # all one class


def test_mismatched_features_are_rejected():
    with pytest.raises(ValueError, match="feature sizes differ"):
        fid(gaussian(10, d=4), gaussian(10, d=5))
    with pytest.raises(ValueError, match=r"\(N >= 2, D\)"):
        kid(np.zeros(5), np.zeros(5))


# ------------------------------------------------------------------------------------------ feature net
def tiny_dataset(n: int = 96, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (n, 1, 12, 12): class 0 a bright left half, class 1 a bright top half, plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    images = torch.randint(0, 80, (n, 1, 12, 12), generator=g)
    images[labels == 0, :, :, :6] += 150
    images[labels == 1, :, :6, :] += 150
    return images.clamp(0, 255).to(torch.uint8), labels


def test_feature_net_trains_on_tiny_data(tmp_path):
    torch.manual_seed(0)
    images, labels = tiny_dataset()
    net = FeatureNet(channels=1, num_classes=2, width=8, feature_dim=16)
    losses = fit_feature_net(net, images, labels, steps=30, batch_size=16, lr=1e-2)
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses
    test_images, test_labels = tiny_dataset(seed=1)
    acc = accuracy(net, test_images, test_labels)
    assert acc > 0.9
    path = save_feature_net(net, tmp_path / "fn.pt", dataset="mnist", data={}, image_size=12, channels=1,
                            class_names=["left", "top"], test_accuracy=acc, steps=30)  # fmt: skip
    loaded, info = load_feature_net(path)
    assert info["test_accuracy"] == acc and info["arch"]["feature_dim"] == 16
    x = from_uint8(test_images[:4])
    with torch.no_grad():  # memory formats differ (channels_last after training): equal up to rounding
        torch.testing.assert_close(loaded.features(x), net.eval().features(x), rtol=1e-4, atol=1e-4)
    features = feature_net_features(path, torch.device("cpu"))
    assert features.label == "MNIST classifier features" and "test acc" in features.description
    feats = features(test_images)
    assert feats.shape == (96, 16) and feats.dtype == np.float64
    with pytest.raises(FeaturesError, match="are 16x16 with 1 channel"):
        features(torch.zeros(2, 1, 16, 16, dtype=torch.uint8), "the samples")


def test_feature_file_errors(tmp_path, monkeypatch):
    with pytest.raises(FeaturesError, match="does not exist; train one with `train_feature_net"):
        load_feature_net(tmp_path / "missing.pt")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(FeaturesError, match="not a feature-net file"):
        load_feature_net(tmp_path / "other.pt")
    # the right header over weights of another net: one line naming the file, not a traceback
    net = FeatureNet(channels=1, num_classes=2, width=8, feature_dim=16)
    save_feature_net(net, tmp_path / "fn.pt", dataset="mnist", data={}, image_size=12, channels=1)
    record = torch.load(tmp_path / "fn.pt", weights_only=True)
    torch.save({**record, "arch": {**record["arch"], "width": 4}}, tmp_path / "damaged.pt")
    with pytest.raises(FeaturesError, match=r"damaged.pt is damaged \(RuntimeError: .*; re-run train_feature_net"):
        load_feature_net(tmp_path / "damaged.pt")
    # No runs/feature_net/<dataset>.pt and no torch-fidelity: the error says what to run.
    has_fidelity = importlib.util.find_spec("torch_fidelity") is not None
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # import fails even where it is installed
    with pytest.raises(FeaturesError, match="train_feature_net --data.dataset fashion_mnist"):
        load_features("auto", "fashion_mnist")
    if not has_fidelity:  # with it installed, Inception would try to download its weights
        with pytest.raises(FeaturesError, match="Inception-v3 features are unavailable.*torch-fidelity"):
            load_features("inception", "fashion_mnist")


def test_auto_features_of_an_image_folder_are_that_folders(tmp_path, monkeypatch):
    """Each image folder is its own data set: `auto` finds the net trained on the folder by its name and
    refuses one trained on another folder of the same name (its FID would measure the wrong data)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)
    photos, other_photos, faces = tmp_path / "photos", tmp_path / "old" / "photos", tmp_path / "my faces"
    assert default_path("image_folder", str(photos)) == Path("runs/feature_net/image_folder_photos.pt")
    assert default_path("image_folder", str(faces)).name == "image_folder_my_faces.pt"
    assert default_path("fashion_mnist", "/somewhere") == Path("runs/feature_net/fashion_mnist.pt")
    # a net reads one size: another size than the data's default gets its own file (a 32-px run of a folder
    # found the 64-px net and stopped with an error instead of going on without FID)
    assert default_path("image_folder", str(photos), 64).name == "image_folder_photos.pt"
    assert default_path("image_folder", str(photos), 32).name == "image_folder_photos_32px.pt"
    assert default_path("emoji", None, 32).name == "emoji_32px.pt" and default_path("fashion_mnist", None, 28).name \
        == "fashion_mnist.pt"  # fmt: skip
    net = FeatureNet(channels=3, num_classes=2, width=8, feature_dim=16)
    save_feature_net(net, default_path("image_folder", str(photos)), dataset="image_folder",
                     data={"root": str(photos)}, image_size=8, channels=3)  # fmt: skip
    found = load_features("auto", "image_folder", root=str(photos / "."))
    assert found.image_shape == (3, 8, 8) and "image-folder 'photos'" in found.label
    with pytest.raises(FeaturesError, match=r"image_folder_photos.pt was trained on the image folder .*photos, "
                                            r"not on --data.root .*old/photos: train one on this folder"):
        load_features("auto", "image_folder", root=str(other_photos))
    with pytest.raises(FeaturesError, match=r"image_folder_my_faces.pt does not exist.*--data.root .*my faces"):
        load_features("auto", "image_folder", root=str(faces))
