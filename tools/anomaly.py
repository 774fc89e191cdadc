"""`score_anomalies`: score how unlike the training data images look to the two trained stages.

    score_anomalies images/ odd.png --prior prior.ckpt --out scores.csv
    score_anomalies images/ --prior prior.ckpt --out scores.csv --grid top.png --top 16

A directory's images are found in its sub-folders too (hidden files and folders skipped, sorted). CSV
columns, one row per image, its ``path`` as found (``images/cats/1f595.png``); for every score, higher
means more anomalous:

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
* ``orientation_bits_per_dim``: ``nll_bits_per_dim`` minus the lowest NLL of the image turned upside down or
  rotated by 90, 180 or 270 degrees: a log-likelihood ratio between the image as it is and its likeliest
  turned copy. The prior itself is the reference, as a transformation classifier is in GeoTrans (Golan and
  El-Yaniv 2018): an upright training-like image is far likelier than any turn of it (very negative),
  what looks alike any way up (noise, blanks, symmetric shapes) scores near 0, and an image that is upside
  down or on its side scores positive. Costs four more encodings and prior passes per image.
* ``orientation_combined`` (the default without an anomaly net): ``orientation_bits_per_dim + 0.25 *
  combined_score`` (the weight chosen on validation images): the orientation test, with the
  complexity-corrected NLL to separate what looks alike any way up.
* ``transform_knn`` (with ``--anomaly_net NET.pt`` from ``train_anomaly_net``, trained on the normal images):
  the mean cosine distance of the image's features to those of its 5 nearest normal training images, in a
  net trained to tell 72 mirrorings, shifts and quarter turns of the normal images apart, averaged over two
  views (the image and its mirror image, each against the normal images seen the same way) and over the
  file's independently seeded nets (two by default; see :mod:`tools.transform_net`). It does not use the
  two stages at all. The best score measured, one-class and out of distribution (README), at two passes of
  a small CNN per image and net; the default ``--method`` when ``--anomaly_net`` is given.

``--grid`` shows the most anomalous images (by ``--method``: by default ``transform_knn`` when an anomaly
net is given, else ``orientation_combined``: the best measured, one-class and out of distribution) beside a
heat map of each code's surprise.

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

import contextlib
import csv
import io
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image

from common.cli import UserError, add_device, add_overwrite, at_least, make_parser, resolve_device, run_command
from common.codes import check_matches, codes_files, load_split, read_meta
from common.grids import GRID_FORMATS, make_grid
from common.images import image_chunks, image_files, load_images, named_image_files
from common.io import OutputClash, atomic_file, check_output
from stage2_prior.build import require_likelihood
from stage2_prior.decoding import CodePrior
from tools.anomaly_scores import (
    DEFAULT_SCORE,
    SCORES,
    default_score,
    heat_map_grid,
    mean_nll_bits,
    score_images,
)
from tools.load import Models, load_models, load_prior, prior_facts
from tools.transform_net import AnomalyNet

COLUMNS = ("path", *SCORES)
OPTIONAL = {"likelihood_ratio": "--background", "typicality": "--codes",
            "transform_knn": "--anomaly_net"}  # scores that need another input  # fmt: skip


def references(m: Models, background_path: str | None, codes_dir: str | None) -> tuple[CodePrior | None, float | None]:
    """(the background prior, the mean training NLL in bits) that likelihood_ratio and typicality need, each
    checked to belong to the prior in `m`; None where not asked for."""
    background = train_nll = None
    if background_path:
        background, hparams = load_prior(background_path, "--background")
        require_likelihood(background, background_path, "score_anomalies", "--background")
        background.to(m.device)
        # the prior's facts first, as for --codes: the message reads "<the background's> (the prior's: ...)" (it had
        # them the wrong way round); both are scored under the null class, so an unconditional one fits either way
        theirs = prior_facts(background, hparams.get("codes_meta"))
        theirs["num_classes"] = theirs["num_classes"] or None  # 0: unconditional, fits a conditional prior
        check_matches(prior_facts(m.prior, m.codes_meta), theirs, f"--background {background_path}",
                      "train it on the same codes (train_stage2 ... --data.perturb)")  # fmt: skip
    if codes_dir:
        check_matches(prior_facts(m.prior, m.codes_meta), asdict(read_meta(codes_dir)), f"--codes {codes_dir}",
                      "pass the codes directory the prior was trained on")  # fmt: skip
        train_nll = mean_nll_bits(m.prior, load_split(codes_dir, "train")[0][:5000])
    return background, train_nll


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
    p.add_argument("--method", "--rank_by", dest="method", type=str, default=None, metavar="SCORE",
                   help=f"the score that ranks the images (printed, orders --grid): {', '.join(SCORES)}; default: "
                   f"the best measured, transform_knn with --anomaly_net, else {DEFAULT_SCORE}")  # fmt: skip
    p.add_argument("--background", type=str, default=None,
                   help="a prior trained on perturbed codes (train_stage2 --data.perturb 0.2): likelihood_ratio")
    p.add_argument("--codes", type=str, default=None, help="the prior's codes directory: typicality")
    p.add_argument("--anomaly_net", type=str, default=None,
                   help="a net from train_anomaly_net (trained on the normal images): transform_knn")
    p.add_argument("--batch_size", type=int, default=256)
    add_device(p)
    add_overwrite(p)
    return p


def _run(args: list[str] | None) -> str:
    a = build_parser().parse_args(args)
    at_least(1, top=a.top, batch_size=a.batch_size)
    inputs = {"--prior": a.prior, "--vqvae": a.vqvae, "--background": a.background, "--anomaly_net": a.anomaly_net,
              f"a file of --codes {a.codes}": codes_files(a.codes) if a.codes else None,
              "an image to score": image_files(a.images)}  # fmt: skip
    out = check_output(a.out, a.overwrite, inputs=inputs)
    grid = check_output(a.grid, a.overwrite, "--grid", inputs=inputs) if a.grid is not None else None
    if grid is not None and grid.suffix.lower() not in GRID_FORMATS:
        raise UserError(f"--grid {grid}: name an image file ({', '.join(GRID_FORMATS)})")
    if grid is not None and grid.resolve() == out.resolve():
        raise ValueError(f"--grid {grid} and --out {out} are the same file; give two names")
    if a.method is not None and a.method not in SCORES:
        raise UserError(f"--method {a.method!r} is not a score; choose one of {', '.join(SCORES)}")
    if a.anomaly_net is not None and Path(a.anomaly_net).is_dir():  # was "does not exist; train one with ..."
        raise UserError(f"--anomaly_net {a.anomaly_net} is a directory; pass an anomaly-net file (.pt)")
    needs = OPTIONAL.get(a.method)
    if needs and getattr(a, needs[2:]) is None:
        raise UserError(f"--method {a.method} needs {needs}")
    named = named_image_files(a.images)
    files = [f for f, _ in named]
    m = load_models(a.prior, a.vqvae, resolve_device(a.device))
    require_likelihood(m.prior, a.prior, "score_anomalies")  # every score but recon_mse is a likelihood
    background, train_nll = references(m, a.background, a.codes)
    anomaly_net = AnomalyNet.load(a.anomaly_net, m.device, fits=(m.channels, m.image_size)) if a.anomaly_net else None
    method = a.method or default_score(anomaly_net)
    parts = [score_images(m.prior, m.vqvae, chunk, a.batch_size, background, train_nll, anomaly_net)
             for chunk in image_chunks(files, m.image_size, m.channels, a.batch_size)]  # a chunk in memory
    scores = {k: np.concatenate([p[0][k] for p in parts]) for k in parts[0][0]}
    surprise = np.concatenate([p[1] for p in parts])
    order = np.argsort(-scores[method], kind="stable")
    picture = None
    if grid:  # drawn before anything is written
        top = order[: a.top].copy()
        images = load_images([files[i] for i in top], m.image_size, m.channels)  # read again: the grid's few
        tiles = heat_map_grid(images, surprise[top], m.vqvae.levels)
        picture = make_grid(tiles, nrow=2 * min(8, len(top)), scale=2 if m.image_size < 64 else 1)
    write_together(out, csv_text([str(f) for f in files], scores).encode(), grid, picture)
    head = ", ".join(f"{named[i][1]} ({scores[method][i]:.4g})" for i in order[:3])  # cats/1.png, dogs/1.png
    return f"scored {len(files)} images -> {out}{f' and {grid}' if grid else ''}; most anomalous by {method}: {head}"


def write_together(out: Path, csv_bytes: bytes, grid: Path | None, picture: np.ndarray | None) -> None:
    """The CSV and the grid under temporary names, renamed into place together once both are written: the CSV
    was written first, so Ctrl-C or a full disk while the grid was drawn or written left a new CSV beside the old
    grid. Without --overwrite, one that another process wrote meanwhile is kept, and ours taken back."""
    placed: list[Path] = []
    try:
        with contextlib.ExitStack() as written:
            written.enter_context(atomic_file(out, placed=placed)).write(csv_bytes)
            if grid is not None and picture is not None:
                Image.fromarray(picture[..., 0] if picture.shape[2] == 1 else picture).save(
                    written.enter_context(atomic_file(grid, placed=placed)), format=GRID_FORMATS[grid.suffix.lower()])
    except OutputClash:
        for path in placed:  # linked in a moment ago under names that did not exist: ours to take back
            path.unlink(missing_ok=True)
        raise


def main(args: list[str] | None = None) -> None:
    run_command("score_anomalies", _run, args)


if __name__ == "__main__":
    main()
