"""`score_anomalies`: score how unlike the training data images look to the two trained stages.

    score_anomalies images/ odd.png --prior prior.ckpt --out scores.csv
    score_anomalies images/ --prior prior.ckpt --out scores.csv --grid top.png --top 16

CSV columns, one row per image; for every score, higher means more anomalous:

* ``nll_bits_per_dim``: -log2 p(codes) of the image's stage-1 codes under the prior (null label), divided
  by the image's dimensions (pixels x channels).
* ``recon_mse``: mean squared error of stage 1's reconstruction decode(encode(x)), pixels in [0, 1].
* ``complexity_bits_per_dim``: the code length of the same codes under a generic, untrained compressor,
  per dimension (see below).
* ``combined_score``: ``nll_bits_per_dim - complexity_bits_per_dim``.

Why a complexity correction. A likelihood model gives simple inputs high likelihood whatever they show:
a mostly blank image from an unseen class can be *more* likely than a typical training image, so raw NLL
ranks it as normal. Serrà et al. (ICLR 2020, "Input complexity and out-of-distribution detection with
likelihood-based generative models") subtract the input's complexity, measured as its code length L(x)
under a generic lossless compressor: S(x) = NLL(x) - L(x) is a log-likelihood ratio between the trained
model and a universal one, large when the trained model has no advantage over knowing nothing.

The two code lengths must describe the same object. Our likelihood is that of the *codes* (7x7 symbols
for a 28x28 image, a fraction of a bit per pixel), so a pixel compressor (PNG, several bits per pixel) would
swamp it and S would be just -PNG size. L is therefore measured on the codes too, with a generic adaptive
model that knows nothing of images: order-0 frequency counts with PPM "method C" escapes (a symbol seen c
times so far out of n, with d distinct symbols seen, costs -log2(c / (n + d)); a new symbol costs
-log2(d / (n + d) / (K - d)); the first costs log2 K). Repetitive, simple code grids get a small L, varied
ones a large L. What the codes cannot express (fine detail, noise) shows up in ``recon_mse`` instead.
"""

from __future__ import annotations

import csv
import io
import math

import numpy as np
import torch
import torch.nn.functional as F

from common.cli import UserError, add_device, add_overwrite, at_least, make_parser, resolve_device, run_command
from common.images import GRID_FORMATS, image_files, load_images, save_grid
from common.io import check_output, write_atomic
from stage1_vqvae.model import VQModel
from stage2_prior.decoding import CodePrior
from tools.load import load_models

COLUMNS = ("path", "nll_bits_per_dim", "recon_mse", "complexity_bits_per_dim", "combined_score")
SCORES = COLUMNS[1:]


def generic_code_bits(codes: np.ndarray, codebook_size: int) -> np.ndarray:
    """codes (N, H, W) -> (N,) bits to code each grid in raster order with an adaptive order-0 model
    with PPM method-C escapes (see the module docstring). No training, no knowledge of images."""
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


@torch.no_grad()
def score_images(prior: CodePrior, vqvae: VQModel, images: torch.Tensor,
                 batch_size: int = 256) -> dict[str, np.ndarray]:  # fmt: skip
    """images (N, C, S, S) in [-1, 1] -> {score name: (N,) array}; see the module docstring."""
    prior.eval()
    dims = images[0].numel()
    out: dict[str, list[np.ndarray]] = {k: [] for k in SCORES}
    device = next(prior.parameters()).device
    for x in images.split(batch_size):
        x = x.to(vqvae.device)
        codes = vqvae.encode_to_codes(x)  # (B, h, w)
        recon = vqvae.decode_codes(codes)
        mse = ((recon.float() - x.float()) / 2).pow(2).flatten(1).mean(1)  # pixels in [0, 1]
        codes = codes.to(device)
        logits = prior(codes, None).float()  # (B, K, h, w)
        nll_bits = F.cross_entropy(logits, codes, reduction="none").flatten(1).sum(1) / math.log(2)
        nll = nll_bits.cpu().numpy() / dims
        complexity = generic_code_bits(codes.cpu().numpy(), prior.codebook_size) / dims
        for key, value in zip(SCORES, (nll, mse.cpu().numpy(), complexity, nll - complexity)):
            out[key].append(np.asarray(value, dtype=np.float64))
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in out.items()}


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of `scores` for detecting `positive` (ties count one half)."""
    scores, positive = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUROC needs both classes, got {n_pos} positives and {n_neg} negatives")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    mean_rank = np.cumsum(counts) - (counts - 1) / 2  # 1-based average rank of each distinct value
    ranks = mean_rank[inverse]
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def csv_text(paths: list[str], scores: dict[str, np.ndarray]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for i, path in enumerate(paths):
        writer.writerow([path, *(f"{scores[k][i]:.6g}" for k in SCORES)])
    return buf.getvalue()


def build_parser():
    p = make_parser("score_anomalies", __doc__)
    p.add_argument("images", nargs="+", type=str, help="image files and/or directories of images")
    p.add_argument("--prior", type=str, required=True, help="stage-2 prior checkpoint (.ckpt)")
    p.add_argument("--vqvae", type=str, help="stage-1 checkpoint (default: the one the prior's codes came from)")
    p.add_argument("--out", type=str, required=True, help="CSV file to write")
    p.add_argument("--grid", type=str, default=None, help="also write a PNG grid of the most anomalous images")
    p.add_argument("--top", type=int, default=16, help="images in --grid")
    p.add_argument("--rank_by", type=str, default="combined_score", choices=SCORES, help="score that orders --grid")
    p.add_argument("--batch_size", type=int, default=256)
    add_device(p)
    add_overwrite(p)
    return p


def _run(args: list[str] | None) -> str:
    a = build_parser().parse_args(args)
    at_least(1, top=a.top, batch_size=a.batch_size)
    out = check_output(a.out, a.overwrite)
    grid = check_output(a.grid, a.overwrite, "--grid") if a.grid else None
    if grid is not None and grid.suffix.lower() not in GRID_FORMATS:
        raise UserError(f"--grid {grid}: name an image file ({', '.join(GRID_FORMATS)})")
    if grid is not None and grid.resolve() == out.resolve():
        raise ValueError(f"--grid {grid} and --out {out} are the same file; give two names")
    files = image_files(a.images)
    m = load_models(a.prior, a.vqvae, resolve_device(a.device))
    images = load_images(files, m.image_size, m.channels)
    scores = score_images(m.prior, m.vqvae, images, a.batch_size)
    write_atomic(out, csv_text([str(f) for f in files], scores).encode())
    order = np.argsort(-scores[a.rank_by], kind="stable")
    if grid:
        top = torch.from_numpy(order[: a.top].copy())
        save_grid(images[top], grid, scale=2 if m.image_size < 64 else 1)
    head = ", ".join(f"{files[i].name} ({scores[a.rank_by][i]:.4g})" for i in order[:3])
    return f"scored {len(files)} images -> {out}{f' and {grid}' if grid else ''}; most anomalous by {a.rank_by}: {head}"


def main(args: list[str] | None = None) -> None:
    run_command("score_anomalies", _run, args)


if __name__ == "__main__":
    main()
