"""The per-image anomaly scores of `score_anomalies` and the page (`serve`), and the heat map of each
code's surprise; what each score means and why is in :mod:`tools.anomaly`'s docstring.

    scores, surprise = score_images(prior, vqvae, images)   # {name: (N,)}, (N, h, w) bits per code
    tiles = heat_map_grid(images, surprise)                  # each image beside its heat map
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from common.codes import split_levels
from stage1_vqvae.model import VQModel
from stage2_prior.decoding import CodePrior, code_bits
from tools.transform_net import AnomalyNet

SCORES = ("nll_bits_per_dim", "recon_mse", "complexity_bits_per_dim", "combined_score", "max_surprise_bits",
          "likelihood_ratio", "typicality", "orientation_bits_per_dim", "orientation_combined",
          "transform_knn")  # fmt: skip
DEFAULT_SCORE = "orientation_combined"  # the best measured out of distribution (README, Results)


def default_score(anomaly_net: AnomalyNet | None) -> str:
    """The score that ranks images unless told otherwise: the best measured with what is given (README,
    Results): transform_knn when there is an anomaly net, else DEFAULT_SCORE."""
    return "transform_knn" if anomaly_net is not None else DEFAULT_SCORE
# orientation_combined = orientation + this * combined: chosen on validation images, never the test split
# (benchmarks/anomaly_orientation_weight.py: the best worst-set AUROC)
ORIENTATION_WEIGHT = 0.25


def reorientations(images: torch.Tensor) -> list[torch.Tensor]:
    """The image turned upside down and rotated by 90, 180 and 270 degrees (rotations by 90 only when square).
    Left-right mirroring is left out: mirrored objects are usually as ordinary as the originals."""
    turns = [images.flip(-2), images.rot90(2, (-2, -1))]
    if images.shape[-1] == images.shape[-2]:
        turns += [images.rot90(1, (-2, -1)), images.rot90(3, (-2, -1))]
    return turns


def generic_code_bits(codes: np.ndarray, codebook_size: int) -> np.ndarray:
    """codes (N, H, W) -> (N,) bits to code each grid in raster order with an adaptive order-0 model
    with PPM method-C escapes (see tools.anomaly's docstring). No training, no knowledge of images."""
    flat = np.asarray(codes, dtype=np.int64).reshape(len(codes), -1)
    n_img, T = flat.shape
    counts = np.zeros((n_img, codebook_size), dtype=np.int64)
    distinct = np.zeros(n_img, dtype=np.int64)
    rows = np.arange(n_img)
    bits = np.zeros(n_img)
    for t in range(T):  # t symbols seen so far
        c = flat[:, t]
        seen = counts[rows, c]
        new_p = np.where(distinct > 0, distinct / np.maximum(t + distinct, 1), 1.0) / np.maximum(
            codebook_size - distinct, 1
        )
        p = np.where(seen > 0, seen / np.maximum(t + distinct, 1), new_p)
        bits -= np.log2(p)
        distinct += seen == 0
        counts[rows, c] += 1
    return bits


def code_surprise(prior: CodePrior, codes: torch.Tensor) -> torch.Tensor:
    """codes (B, h, w) -> -log2 p(c_t | c_<t) (B, h, w) under the prior's null class."""
    return code_bits(prior, codes, None)


@torch.no_grad()
def mean_nll_bits(prior: CodePrior, codes: np.ndarray, batch_size: int = 256) -> float:
    """The mean NLL in bits per code map of `codes` (N, h, w): the typical-set centre for `typicality`."""
    device = next(prior.parameters()).device
    total = [code_surprise(prior, torch.from_numpy(np.asarray(c, np.int64)).to(device)).flatten(1).sum(1)
             for c in np.array_split(codes, max(1, -(-len(codes) // batch_size)))]  # fmt: skip
    return float(torch.cat(total).mean())


@torch.no_grad()
def score_images(prior: CodePrior, vqvae: VQModel, images: torch.Tensor, batch_size: int = 256,
                 background: CodePrior | None = None, train_nll_bits: float | None = None,
                 anomaly_net: AnomalyNet | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:  # fmt: skip
    """images (N, C, S, S) in [-1, 1] -> ({score name: (N,) array}, per-code surprise (N, h, w) in bits);
    scores that need an input not given are NaN. See tools.anomaly's docstring."""
    prior.eval()
    dims = images[0].numel()
    out: dict[str, list[np.ndarray]] = {k: [] for k in SCORES}
    maps = []
    device = next(prior.parameters()).device
    for x in images.split(batch_size):
        x = x.to(vqvae.device)
        codes = vqvae.encode_to_codes(x)  # (B, h, w)
        recon = vqvae.decode_codes(codes)
        mse = ((recon.float() - x.float()) / 2).pow(2).flatten(1).mean(1).cpu().numpy()  # pixels in [0, 1]
        codes = codes.to(device)
        surprise = code_surprise(prior, codes)  # (B, h, w) bits
        nll_bits = surprise.flatten(1).sum(1).cpu().numpy()
        nll = nll_bits / dims
        complexity = generic_code_bits(codes.cpu().numpy(), prior.codebook_size) / dims
        nan = np.full(len(codes), np.nan)
        if background is None:
            ratio = nan
        else:
            ratio = nll - code_surprise(background.eval(), codes).flatten(1).sum(1).cpu().numpy() / dims
        typical = nan if train_nll_bits is None else np.abs(nll_bits - train_nll_bits) / dims
        # How much likelier the prior finds some turned copy of the image than the image as it is: very
        # negative for an upright training-like image, near 0 for what looks the same any way up (noise, a
        # blank), positive for an image that is upside down or on its side.
        turned = torch.stack([code_surprise(prior, vqvae.encode_to_codes(t).to(device)).flatten(1).sum(1)
                              for t in reorientations(x)])  # (turns, B) bits  # fmt: skip
        orientation = nll - turned.amin(0).cpu().numpy() / dims
        combined = nll - complexity
        knn = nan if anomaly_net is None else anomaly_net.score(x)
        values = (nll, mse, complexity, combined, surprise.flatten(1).amax(1).cpu().numpy(), ratio, typical,
                  orientation, orientation + ORIENTATION_WEIGHT * combined, knn)  # fmt: skip
        for key, value in zip(SCORES, values):
            out[key].append(np.asarray(value, dtype=np.float64))
        maps.append(surprise.cpu().numpy())
    scores = {k: np.concatenate(v) if v else np.zeros(0) for k, v in out.items()}
    return scores, np.concatenate(maps) if maps else np.zeros((0, *prior.grid_shape))


def heat_map_grid(images: torch.Tensor, surprise: np.ndarray, levels: list[dict] | None = None) -> torch.Tensor:
    """Images (n, C, S, S) in [-1, 1] and their per-code surprise (n, *grid_shape) -> (2n, 3, S, S): each image
    followed by itself in grey with the surprise in red (scaled to the largest value shown). With several
    `levels` (the stage-1 model's), each level's bits are spread over its cells' pixels and summed."""
    n, _, size, _ = images.shape
    gray = images.float().mean(1, keepdim=True).expand(-1, 3, -1, -1)  # (n, 3, S, S)
    parts = split_levels(torch.from_numpy(surprise).float(), levels) if levels else [torch.from_numpy(surprise).float()]
    heat = sum(F.interpolate(p[:, None], size=(size, size), mode="nearest")[:, 0] * p[0].numel() / size**2
               for p in parts)  # (n, S, S): bits per pixel  # fmt: skip
    heat = heat / heat.max().clamp(min=1e-9)
    overlay = gray.clone() * 0.5 - 0.5  # darkened grey, so red shows
    overlay[:, 0] = torch.maximum(overlay[:, 0], heat * 2 - 1)
    rgb = images.float().expand(-1, 3, -1, -1)
    return torch.stack([rgb, overlay], 1).reshape(2 * n, 3, size, size)
