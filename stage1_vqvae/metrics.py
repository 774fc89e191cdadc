"""Reconstruction figures that training, `evaluate stage1` and the benchmarks share, each with one definition.

- PSNR: torchmetrics' PeakSignalNoiseRatio over the whole split, i.e. of the MSE pooled over every pixel of every
  image (the figure every target of this project was set and measured in). `ImagePSNR` is the other common
  convention, the mean of each image's own PSNR (CompressAI, LlamaGen's evaluation), which weighs the images
  that are easy to reconstruct more: 25.40 against 24.22 dB for the demo's stage 1 on the test split.
- SSIM: Wang et al. 2004's, a Gaussian window of 11 px, sigma 1.5, averaged over the positions where the whole
  window lies inside the image (their code, skimage, pytorch-msssim). torchmetrics since its PR #2721 (2024)
  averages its map over every pixel, the reflect-padded border included: on Fashion-MNIST's 28x28 images 460 of
  the 784 positions, mostly background that scores about 1, so it read 0.9054 where the definition gives 0.8514,
  and the figure depended on the installed version. `SSIM` crops that map to the valid windows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torchmetrics import Metric
from torchmetrics.functional.image import structural_similarity_index_measure

SSIM_WINDOW = 11  # Wang et al.'s Gaussian window and sigma, torchmetrics' defaults
SSIM_SIGMA = 1.5


def ssim_per_image(preds: torch.Tensor, target: torch.Tensor, data_range: float) -> torch.Tensor:
    """(B,) SSIM of each image (B, C, H, W) over its valid windows. An image smaller than the window gets the
    largest odd window that fits, its sigma scaled alike (torchmetrics' padding fails below 6 px)."""
    side = min(preds.shape[-2:])
    window = SSIM_WINDOW if side >= SSIM_WINDOW else max(1, side - (side + 1) % 2)
    _, full = structural_similarity_index_measure(preds, target, gaussian_kernel=True,
                                                  sigma=SSIM_SIGMA * window / SSIM_WINDOW, kernel_size=window,
                                                  data_range=data_range, reduction="none", return_full_image=True)
    pad = (window - 1) // 2  # the map (B, C, H, W) has a value at every pixel; the outer `pad` use mirrored ones
    if pad:
        full = full[..., pad:-pad, pad:-pad]
    return full.flatten(1).mean(1)


MAX_DB = 100.0  # a perfect reconstruction's PSNR in a mean over images (not infinity)


def psnr_per_image(preds: torch.Tensor, target: torch.Tensor, data_range: float) -> torch.Tensor:
    """(B,) PSNR in dB of each image (B, C, H, W); a perfect reconstruction counts as MAX_DB, not infinity."""
    mse = (preds.double() - target.double()).pow(2).flatten(1).mean(1)  # (B,)
    return (10 * torch.log10(data_range**2 / mse)).clamp(max=MAX_DB)


class MeanOverImages(Metric):
    """The mean over the images seen of a figure each image has (`per_image(preds, target, data_range)`, (B,)),
    summed across DDP ranks."""

    full_state_update = False

    def __init__(self, data_range: float, per_image: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]):
        super().__init__()
        self.data_range, self.per_image = data_range, per_image
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        self.total += self.per_image(preds.float(), target.float(), self.data_range).double().sum()
        self.count += len(preds)

    def compute(self) -> torch.Tensor:
        return (self.total / self.count.clamp(min=1)).float()


class SSIM(MeanOverImages):
    """Mean SSIM of the images seen (valid windows; see the module's docstring)."""

    def __init__(self, data_range: float) -> None:
        super().__init__(data_range, ssim_per_image)


class ImagePSNR(MeanOverImages):
    """Mean over images of each image's PSNR in dB (a perfect reconstruction counts as 100 dB, not infinity)."""

    def __init__(self, data_range: float) -> None:
        super().__init__(data_range, psnr_per_image)
