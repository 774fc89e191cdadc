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
* ``max_surprise_bits``: the largest single-code surprise -log2 p(c_t | c_<t): one odd part of an otherwise
  ordinary image (a tear, a stain) stands out here while it is averaged away in the NLL.
* ``likelihood_ratio`` (with ``--background BG.ckpt``, a prior trained on perturbed codes: ``train_stage2 ...
  --data.perturb 0.2``): ``nll_bits_per_dim`` minus the background prior's, per dimension (Ren et al. 2019,
  "Likelihood ratios for out-of-distribution detection"): what both priors find likely (background
  statistics, simplicity) cancels, what only the real prior explains remains.
* ``typicality`` (with ``--codes DIR``, the codes the prior was trained on): |NLL - the mean NLL of its
  training code maps| per dimension (Nalisnick et al. 2019): unusually *likely* inputs are flagged too.

``--grid`` shows the most anomalous images (by ``--method``: by default ``combined_score``, the best in
both benchmarks) beside a heat map of each code's surprise.

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
from dataclasses import asdict

import numpy as np
import torch
import torch.nn.functional as F

from common.cli import UserError, add_device, add_overwrite, at_least, make_parser, resolve_device, run_command
from common.codes import check_matches, load_split, read_meta
from common.images import GRID_FORMATS, image_files, load_images, save_grid
from common.io import check_output, write_atomic
from stage1_vqvae.model import VQModel
from stage2_prior.decoding import CodePrior
from tools.load import Models, load_models, load_prior, prior_facts

COLUMNS = ("path", "nll_bits_per_dim", "recon_mse", "complexity_bits_per_dim", "combined_score",
           "max_surprise_bits", "likelihood_ratio", "typicality")  # fmt: skip
SCORES = COLUMNS[1:]
OPTIONAL = {"likelihood_ratio": "--background", "typicality": "--codes"}  # scores that need another input


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


def code_surprise(prior: CodePrior, codes: torch.Tensor) -> torch.Tensor:
    """codes (B, h, w) -> -log2 p(c_t | c_<t) (B, h, w) under the prior's null class."""
    logits = prior(codes, None).float()  # (B, K, h, w)
    return F.cross_entropy(logits, codes, reduction="none") / math.log(2)


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
                 ) -> tuple[dict[str, np.ndarray], np.ndarray]:  # fmt: skip
    """images (N, C, S, S) in [-1, 1] -> ({score name: (N,) array}, per-code surprise (N, h, w) in bits);
    scores that need an input not given are NaN. See the module docstring."""
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
        values = (nll, mse, complexity, nll - complexity, surprise.flatten(1).amax(1).cpu().numpy(), ratio, typical)
        for key, value in zip(SCORES, values):
            out[key].append(np.asarray(value, dtype=np.float64))
        maps.append(surprise.cpu().numpy())
    scores = {k: np.concatenate(v) if v else np.zeros(0) for k, v in out.items()}
    return scores, np.concatenate(maps) if maps else np.zeros((0, *prior.grid_shape))


def references(m: Models, background_path: str | None, codes_dir: str | None) -> tuple[CodePrior | None, float | None]:
    """(the background prior, the mean training NLL in bits) that likelihood_ratio and typicality need, each
    checked to belong to the prior in `m`; None where not asked for."""
    background = train_nll = None
    if background_path:
        background, hparams = load_prior(background_path, "--background")
        background.to(m.device)
        check_matches(prior_facts(background, hparams.get("codes_meta")), prior_facts(m.prior, m.codes_meta),
                      f"--background {background_path}", "train it on the same codes (train_stage2 ... --data.perturb)")
    if codes_dir:
        check_matches(prior_facts(m.prior, m.codes_meta), asdict(read_meta(codes_dir)), f"--codes {codes_dir}",
                      "pass the codes directory the prior was trained on")  # fmt: skip
        train_nll = mean_nll_bits(m.prior, load_split(codes_dir, "train")[0][:5000])
    return background, train_nll


def heat_map_grid(images: torch.Tensor, surprise: np.ndarray) -> torch.Tensor:
    """Images (n, C, S, S) in [-1, 1] and their per-code surprise (n, h, w) -> (2n, 3, S, S): each image
    followed by itself in grey with the surprise in red (scaled to the largest value shown)."""
    n, _, size, _ = images.shape
    gray = images.float().mean(1, keepdim=True).expand(-1, 3, -1, -1)  # (n, 3, S, S)
    heat = torch.from_numpy(surprise).float()[:, None]  # (n, 1, h, w)
    heat = F.interpolate(heat / heat.max().clamp(min=1e-9), size=(size, size), mode="nearest")[:, 0]
    overlay = gray.clone() * 0.5 - 0.5  # darkened grey, so red shows
    overlay[:, 0] = torch.maximum(overlay[:, 0], heat * 2 - 1)
    rgb = images.float().expand(-1, 3, -1, -1)
    return torch.stack([rgb, overlay], 1).reshape(2 * n, 3, size, size)


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
        writer.writerow([path, *("" if np.isnan(scores[k][i]) else f"{scores[k][i]:.6g}" for k in SCORES)])
    return buf.getvalue()


def build_parser():
    p = make_parser("score_anomalies", __doc__)
    p.add_argument("images", nargs="+", type=str, help="image files and/or directories of images")
    p.add_argument("--prior", type=str, required=True, help="stage-2 prior checkpoint (.ckpt)")
    p.add_argument("--vqvae", type=str, help="stage-1 checkpoint (default: the one the prior's codes came from)")
    p.add_argument("--out", type=str, required=True, help="CSV file to write")
    p.add_argument("--grid", type=str, default=None, help="also write a PNG grid of the most anomalous images")
    p.add_argument("--top", type=int, default=16, help="images in --grid")
    p.add_argument("--method", "--rank_by", dest="method", type=str, default="combined_score", choices=SCORES,
                   help="the score that ranks the images (printed, orders --grid); default: the best measured")
    p.add_argument("--background", type=str, default=None,
                   help="a prior trained on perturbed codes (train_stage2 --data.perturb 0.2): likelihood_ratio")
    p.add_argument("--codes", type=str, default=None, help="the prior's codes directory: typicality")
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
    needs = OPTIONAL.get(a.method)
    if needs and getattr(a, needs[2:]) is None:
        raise UserError(f"--method {a.method} needs {needs}")
    files = image_files(a.images)
    m = load_models(a.prior, a.vqvae, resolve_device(a.device))
    background, train_nll = references(m, a.background, a.codes)
    images = load_images(files, m.image_size, m.channels)
    scores, surprise = score_images(m.prior, m.vqvae, images, a.batch_size, background, train_nll)
    write_atomic(out, csv_text([str(f) for f in files], scores).encode())
    order = np.argsort(-scores[a.method], kind="stable")
    if grid:
        top = order[: a.top].copy()
        tiles = heat_map_grid(images[torch.from_numpy(top)], surprise[top])
        save_grid(tiles, grid, nrow=2 * min(8, len(top)), scale=2 if m.image_size < 64 else 1)
    head = ", ".join(f"{files[i].name} ({scores[a.method][i]:.4g})" for i in order[:3])
    return f"scored {len(files)} images -> {out}{f' and {grid}' if grid else ''}; most anomalous by {a.method}: {head}"


def main(args: list[str] | None = None) -> None:
    run_command("score_anomalies", _run, args)


if __name__ == "__main__":
    main()
