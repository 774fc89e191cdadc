"""Stage 1's reconstruction figures against independent computations: SSIM over the valid windows (Wang et al.
2004, skimage; torchmetrics averages its reflect-padded border too, 0.055 higher on Fashion-MNIST), the mean
of per-image PSNRs, and torchmetrics' PSNR as the PSNR of the pooled MSE."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.signal import correlate2d
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from stage1_vqvae.metrics import SSIM, ImagePSNR, ssim_per_image


def reference_ssim(a: np.ndarray, b: np.ndarray, data_range: float) -> float:
    """Wang et al.'s SSIM of two grey images (H, W): an 11-px Gaussian window (sigma 1.5) at every position where
    it lies wholly inside the image, averaged."""
    g = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5**2))
    w = np.outer(g, g) / g.sum() ** 2

    def f(z):
        return correlate2d(z, w, mode="valid")

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = f(a), f(b)
    var_a, var_b, cov = f(a * a) - mu_a**2, f(b * b) - mu_b**2, f(a * b) - mu_a * mu_b
    return float((((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))).mean())


def pairs(n: int, size: int, channels: int = 1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [-1, 1] with a flat border (as Fashion-MNIST's background) and their noisy copies."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.full((n, channels, size, size), -1.0)
    x[..., 6:-6, 6:-6] = torch.rand(n, channels, size - 12, size - 12, generator=gen) * 2 - 1
    noisy = x.clone()
    noisy[..., 6:-6, 6:-6] += 0.3 * torch.randn(n, channels, size - 12, size - 12, generator=gen)
    return noisy.clamp(-1, 1), x  # the border reconstructed exactly, as a VQ-VAE does the background


def test_ssim_is_the_valid_window_definition():
    preds, target = pairs(6, 28)
    want = [reference_ssim(p[0].double().numpy(), t[0].double().numpy(), 2.0) for p, t in zip(preds, target)]
    assert ssim_per_image(preds, target, 2.0).tolist() == pytest.approx(want, abs=1e-5)
    metric = SSIM(data_range=2.0)
    metric.update(preds[:4], target[:4])
    metric.update(preds[4:], target[4:])  # batches of any size: the mean over images
    assert float(metric.compute()) == pytest.approx(np.mean(want), abs=1e-5)
    padded = StructuralSimilarityIndexMeasure(data_range=2.0)(preds, target)  # what it reported before
    assert float(padded) > np.mean(want) + 0.01  # the flat border, scored about 1, raised it


def test_ssim_of_colour_images_averages_the_channels_and_small_images_get_a_smaller_window():
    preds, target = pairs(2, 24, channels=3)
    want = [np.mean([reference_ssim(p[c].double().numpy(), t[c].double().numpy(), 2.0) for c in range(3)])
            for p, t in zip(preds, target)]  # fmt: skip
    assert ssim_per_image(preds, target, 2.0).tolist() == pytest.approx(want, abs=1e-5)
    for side in (1, 4, 5, 8):  # no 11-px window fits: the largest odd one that does (5 px and less crashed)
        small = torch.rand(2, 1, side, side) * 2 - 1
        assert ssim_per_image(small, small, 2.0).tolist() == pytest.approx([1.0, 1.0])
        assert (ssim_per_image(-small, small, 2.0) < 1).all()


def test_psnr_pooled_and_per_image():
    target = torch.zeros(2, 1, 4, 4)
    preds = target.clone()
    preds[0] += 0.1  # MSE 0.01 -> 10 log10(4 / 0.01) = 26.02 dB
    preds[1] += 0.2  # MSE 0.04 -> 20.00 dB
    per_image = ImagePSNR(data_range=2.0)
    per_image.update(preds, target)
    assert float(per_image.compute()) == pytest.approx((26.0206 + 20.0) / 2, abs=1e-3)
    pooled = PeakSignalNoiseRatio(data_range=2.0)(preds, target)  # of the mean MSE 0.025: 22.04 dB
    assert float(pooled) == pytest.approx(10 * np.log10(4 / 0.025), abs=1e-3)
    exact = ImagePSNR(data_range=2.0)
    exact.update(target, target)
    assert float(exact.compute()) == 100.0  # not inf
