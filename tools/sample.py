"""`sample`: draw code grids from a trained prior, decode them with stage 1, write an image grid.

    sample --prior prior.ckpt --n 64 --out samples.png                 # one row per class if conditional
    sample --prior prior.ckpt --per_class 8 --cfg_scale 2 --top_p 0.9
    sample --prior prior.ckpt --prime shirt.png --keep_rows 3 --n 6    # complete the lower part

``--out`` names the grid's format by its suffix (.png, .jpg, .webp); beside it goes ``<out>.npz`` with
``codes`` (n, H, W), ``images`` (n, C, H, W) uint8 and ``labels`` (n,), -1 for unconditional.
``--out x.npz`` writes only the .npz. Existing files are never replaced without ``--overwrite``. The
stage-1 checkpoint is the one the prior's codes metadata names (checked by SHA-256) unless ``--vqvae``
is given.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from common.cli import (
    UserError,
    add_device,
    add_overwrite,
    at_least,
    make_parser,
    resolve_device,
    run_command,
    wandb_offline_unless_logged_in,
)  # fmt: skip
from common.images import GRID_FORMATS, load_image, make_grid, save_grid, to_uint8
from common.io import atomic_file, check_output
from stage2_prior.cuda_graphs import GraphedSampler
from stage2_prior.decoding import CodePrior
from stage2_prior.sampling import sample_codes
from tools.load import load_models


def build_parser():
    p = make_parser("sample", __doc__)
    p.add_argument("--prior", type=str, required=True, help="stage-2 prior checkpoint (.ckpt)")
    p.add_argument("--vqvae", type=str, help="stage-1 checkpoint (default: the one the prior's codes came from)")
    p.add_argument("--n", type=int, default=64, help="number of samples (completions with --prime)")
    p.add_argument("--out", type=str, default="samples.png", help="grid (.png/.jpg/.webp; + <out>.npz) or .npz")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_k", type=int, default=None, help="keep the k most likely codes at each step")
    p.add_argument("--top_p", type=float, default=None, help="nucleus: keep the smallest set with mass >= p")
    p.add_argument("--classes", type=str, default=None, help="comma-separated class ids, e.g. 0,3,7")
    p.add_argument("--per_class", type=int, default=None, help="samples per class: one grid row per class")
    p.add_argument("--cfg_scale", type=float, default=1.0, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--seed", type=int, default=0, help="same seed and device => identical output")
    p.add_argument("--batch_size", type=int, default=256)
    add_device(p)
    p.add_argument("--scale", type=int, default=None, help="nearest-neighbour upscale (default: 2 below 64 px)")
    p.add_argument("--prime", type=str, default=None, help="an image whose visible codes are kept (completion)")
    p.add_argument("--keep_rows", type=int, default=None, help="with --prime: keep the top r rows of CODES")
    p.add_argument("--mask", type=str, default=None, help="with --prime: a mask image, white = keep")
    p.add_argument("--wandb", action="store_true", help="also log the grid to a W&B run (offline if not logged in)")
    add_overwrite(p)
    return p


def outputs(a: argparse.Namespace) -> tuple[Path | None, Path]:
    """(grid path or None, npz path), both checked before any work."""
    out = Path(a.out)
    if out.is_dir():
        check_output(out, a.overwrite)  # says it is a directory
    suffix = out.suffix.lower()
    if suffix != ".npz" and suffix not in GRID_FORMATS:
        raise UserError(f"--out {out}: use a .png, .jpg, .webp (grid + .npz) or .npz (codes and images) name")
    grid = None if suffix == ".npz" else check_output(out, a.overwrite)
    return grid, check_output(out.with_suffix(".npz"), a.overwrite)


def choose_labels(prior: CodePrior, a: argparse.Namespace) -> tuple[torch.Tensor | None, int]:
    """Labels (n,) and the grid's row length: one row per class for a conditional prior."""
    k = prior.num_classes
    if k == 0:
        if a.classes or a.per_class:
            raise ValueError("--classes/--per_class given, but this prior is unconditional")
        return None, max(1, int(np.ceil(np.sqrt(a.n))))
    classes = list(range(k))
    if a.classes:
        try:
            classes = [int(c) for c in a.classes.split(",")]
        except ValueError:
            raise ValueError(f"--classes must be comma-separated integers, got {a.classes!r}") from None
        bad = [c for c in classes if not 0 <= c < k]
        if bad:
            raise ValueError(f"--classes: unknown class id {bad[0]}; this prior has {k} classes (0..{k - 1})")
    if a.per_class is not None:
        if a.per_class <= 0:
            raise ValueError(f"--per_class must be >= 1, got {a.per_class}")
        return torch.tensor(classes).repeat_interleave(a.per_class), a.per_class
    if a.n <= 0:
        raise ValueError(f"--n must be >= 1, got {a.n}")
    labels = torch.tensor(classes).repeat(-(-a.n // len(classes)))[: a.n].sort().values
    return labels, int(torch.bincount(labels).max())


def rows_by_label(images: torch.Tensor, labels: torch.Tensor | None, per_row: int) -> torch.Tensor:
    """Lay images out one row per label, padding short rows with blank (-1) tiles."""
    if labels is None:
        return images
    rows = []
    for c in labels.unique(sorted=True):
        row = images[labels == c]
        blank = torch.full((per_row - len(row), *images.shape[1:]), -1.0)
        rows.append(torch.cat([row, blank]))
    return torch.cat(rows)


def completion_keep(a: argparse.Namespace, grid_shape: tuple[int, int]) -> torch.Tensor:
    """(H, W) bool: which codes of the primed image are kept."""
    h, w = grid_shape
    if (a.keep_rows is None) == (a.mask is None):
        raise ValueError("--prime needs exactly one of --keep_rows R or --mask MASK.png")
    if a.keep_rows is not None:
        if not 0 <= a.keep_rows <= h:
            raise ValueError(f"--keep_rows must be in [0, {h}] (rows of the {h}x{w} code grid), got {a.keep_rows}")
        keep = torch.zeros(h, w, dtype=torch.bool)
        keep[: a.keep_rows] = True
        return keep
    mask = load_image(a.mask, max(h, w) * 8, channels=1)  # (1, 1, S, S) in [-1, 1]
    mask = torch.nn.functional.adaptive_avg_pool2d(mask, (h, w))[0, 0]
    return mask > 0  # a grid cell is kept when most of its pixels are white


def draw(prior: CodePrior, n: int, labels: torch.Tensor | None, opts: dict, device: torch.device) -> torch.Tensor:
    """n code grids; on CUDA without guidance, each step's logits are replayed from a CUDA graph."""
    if device.type != "cuda" or opts["cfg_scale"] != 1.0:
        return sample_codes(prior, n, labels, **opts)
    with GraphedSampler(prior, labels, n, opts["temperature"], opts["top_k"], opts["top_p"]) as sampler:
        return sampler.sample(opts["generator"])


def _run(args: list[str] | None) -> str:
    a = build_parser().parse_args(args)
    at_least(1, n=a.n, batch_size=a.batch_size, scale=a.scale, per_class=a.per_class)
    if a.temperature <= 0:
        raise UserError(f"--temperature must be > 0, got {a.temperature}")
    grid_path, npz_path = outputs(a)
    device = resolve_device(a.device)
    m = load_models(a.prior, a.vqvae, device)
    prior, vqvae = m.prior, m.vqvae
    if a.top_k is not None and not 1 <= a.top_k <= prior.codebook_size:
        raise UserError(f"--top_k must be in [1, {prior.codebook_size}] (the codebook size), got {a.top_k}")
    if a.top_p is not None and not 0 < a.top_p <= 1:
        raise UserError(f"--top_p must be in (0, 1], got {a.top_p}")
    gen = torch.Generator(device=device).manual_seed(a.seed)
    opts = dict(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, cfg_scale=a.cfg_scale, generator=gen)
    scale = a.scale or (2 if m.image_size < 64 else 1)
    if a.prime:
        keep = completion_keep(a, vqvae.grid_shape).to(device)  # check the options before reading the image
        image = load_image(a.prime, m.image_size, m.channels).to(device)
        prime = vqvae.encode_to_codes(image).expand(a.n, -1, -1)
        labels = None
        codes = sample_codes(prior, a.n, None, prime=prime, keep=keep, **opts)
        masked = vqvae.decode_codes(prime[:1]).clone()
        cell = m.image_size // vqvae.grid_shape[0]
        pixel_keep = keep.repeat_interleave(cell, 0).repeat_interleave(cell, 1)
        pixel_keep = torch.nn.functional.pad(pixel_keep, (0, masked.shape[-1] - pixel_keep.shape[-1],
                                                          0, masked.shape[-2] - pixel_keep.shape[-2]))  # fmt: skip
        masked[:, :, ~pixel_keep] = 0.0  # grey where codes are resampled
        images = vqvae.decode_codes(codes)
        grid_images, per_row = torch.cat([image, masked, images]).cpu(), a.n + 2
    else:
        labels, per_row = choose_labels(prior, a)
        n = len(labels) if labels is not None else a.n
        chunks = []
        for start in range(0, n, a.batch_size):
            lab = labels[start : start + a.batch_size].to(device) if labels is not None else None
            chunks.append(draw(prior, min(a.batch_size, n - start), lab, opts, device))
        codes = torch.cat(chunks)
        images = torch.cat([vqvae.decode_codes(c) for c in codes.split(a.batch_size)])
        grid_images = rows_by_label(images.cpu(), labels, per_row)
    grid = save_grid(grid_images, grid_path, nrow=per_row, scale=scale) if grid_path else None
    with atomic_file(npz_path) as f:
        np.savez(f, codes=codes.cpu().numpy().astype(np.uint16), images=to_uint8(images).cpu().numpy(),
                 labels=(labels.numpy() if labels is not None else np.full(len(codes), -1)))  # fmt: skip
    if a.wandb:
        _log_wandb(grid if grid is not None else make_grid(grid_images, nrow=per_row, scale=scale), a, npz_path.parent)
    return f"wrote {' and '.join(str(p) for p in (grid_path, npz_path) if p)}"


def _log_wandb(grid: np.ndarray, a: argparse.Namespace, folder: Path) -> None:
    """Log the grid to a W&B run whose files go beside the outputs (offline unless logged in)."""
    import wandb  # only for --wandb: it costs seconds to import

    wandb_offline_unless_logged_in()
    run = wandb.init(project="vqgen", job_type="sample", config=vars(a), dir=str(folder))
    run.log({"samples": wandb.Image(grid)})
    run.finish()


def main(args: list[str] | None = None) -> None:
    run_command("sample", _run, args)


if __name__ == "__main__":
    main()
