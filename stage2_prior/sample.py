"""`sample`: draw code grids from a trained prior, decode them with stage 1, write an image grid.

    sample --prior prior.ckpt --n 64 --out samples.png                 # one row per class if conditional
    sample --prior prior.ckpt --per_class 8 --cfg_scale 2 --top_p 0.9
    sample --prior prior.ckpt --prime shirt.png --keep_rows 3 --n 6    # complete the lower part

Beside the PNG it writes ``<out>.npz`` with ``codes`` (n, H, W), ``images`` (n, C, H, W) uint8 and
``labels`` (n,), -1 for unconditional. The stage-1 checkpoint is the one the prior's codes metadata
names (checked by SHA-256) unless ``--vqvae`` is given.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from common.codes import CodesError, CodesMeta, check_compatible, check_stage1
from common.images import load_image, save_grid, to_uint8
from stage1_vqvae.vqvae import VQVAE
from stage2_prior.cuda_graphs import GraphedSampler
from stage2_prior.prior import KINDS, Prior


def parse_args(args: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sample", description=__doc__.split("\n\n")[0])
    p.add_argument("--prior", required=True, help="stage-2 prior checkpoint (.ckpt)")
    p.add_argument("--vqvae", help="stage-1 checkpoint (default: the one named in the prior's codes metadata)")
    p.add_argument("--n", type=int, default=64, help="number of samples (completions with --prime)")
    p.add_argument("--out", default="samples.png", help="output PNG grid; codes/images go to <out>.npz")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_k", type=int, default=None, help="keep the k most likely codes at each step")
    p.add_argument("--top_p", type=float, default=None, help="nucleus: keep the smallest set with mass >= p")
    p.add_argument("--classes", default=None, help="comma-separated class ids, e.g. 0,3,7")
    p.add_argument("--per_class", type=int, default=None, help="samples per class: one grid row per class")
    p.add_argument("--cfg_scale", type=float, default=1.0, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--seed", type=int, default=0, help="same seed and device => identical output")
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--scale", type=int, default=None, help="nearest-neighbour upscale (default: 2 below 64 px)")
    p.add_argument("--prime", default=None, help="an image whose visible codes are kept (completion)")
    p.add_argument("--keep_rows", type=int, default=None, help="with --prime: keep the top r rows of CODES")
    p.add_argument("--mask", default=None, help="with --prime: a mask image, white = keep (resized to the grid)")
    p.add_argument("--wandb", action="store_true", help="also log the grid to a W&B run (offline if not logged in)")
    return p.parse_args(args)


def load_prior(path: str, device: torch.device) -> Prior:
    if not Path(path).is_file():
        raise FileNotFoundError(f"--prior {path}: no such file")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    hp = ckpt.get("hyper_parameters", {})
    if hp.get("kind") not in KINDS:
        hint = " (it looks like a stage-1 VQ-VAE checkpoint: pass it as --vqvae)" if "codebook_size" in hp else ""
        raise ValueError(f"--prior {path} is not a stage-2 prior checkpoint{hint}")
    return Prior.load_from_checkpoint(path, map_location=device).eval()


def load_vqvae(prior: Prior, path: str | None, device: torch.device) -> VQVAE:
    meta = prior.hparams.codes_meta
    if path is None:
        if not meta:
            raise ValueError("the prior's checkpoint names no stage-1 checkpoint; pass --vqvae PATH")
        path = check_stage1(CodesMeta(**meta))  # raises if moved or changed since extraction
    vqvae = VQVAE.load_from_checkpoint(path, map_location=device).eval()
    check_compatible(CodesMeta(**meta) if meta else _meta_of(prior), vqvae.codebook_size, vqvae.grid_shape,
                     what=f"stage-1 checkpoint {path}")  # fmt: skip
    return vqvae


def _meta_of(prior: Prior) -> CodesMeta:
    return CodesMeta(codebook_size=prior.codebook_size, grid_shape=prior.grid_shape, num_classes=prior.num_classes,
                     class_names=[], image_size=0, channels=0, stage1_ckpt="", stage1_sha256="")  # fmt: skip


def choose_labels(prior: Prior, a: argparse.Namespace) -> tuple[torch.Tensor | None, int]:
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


def draw(prior: Prior, n: int, labels: torch.Tensor | None, opts: dict, device: torch.device) -> torch.Tensor:
    """n code grids; on CUDA without guidance, each step's forward is replayed from a CUDA graph."""
    if device.type != "cuda" or opts["cfg_scale"] != 1.0:
        return prior.sample(n, labels, **opts)
    if opts["temperature"] <= 0:
        raise ValueError(f"--temperature must be > 0, got {opts['temperature']}")
    if labels is None:
        labels = torch.full((n,), prior.net.null_label, device=device)
    sampler = GraphedSampler(prior.net, labels, opts["temperature"], opts["top_k"], opts["top_p"])
    try:
        return sampler.sample(opts["generator"])
    finally:
        if hasattr(prior.net, "reset_cache"):
            prior.net.reset_cache()


def run(a: argparse.Namespace) -> Path:
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          "cpu" if a.device == "auto" else a.device)  # fmt: skip
    prior = load_prior(a.prior, device)
    vqvae = load_vqvae(prior, a.vqvae, device)
    gen = torch.Generator(device=device).manual_seed(a.seed)
    opts = dict(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, cfg_scale=a.cfg_scale, generator=gen)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    scale = a.scale or (2 if vqvae.hparams.image_size < 64 else 1)
    if a.prime:
        if a.n <= 0:
            raise ValueError(f"--n must be >= 1, got {a.n}")
        keep = completion_keep(a, vqvae.grid_shape).to(device)  # check the options before reading the image
        image = load_image(a.prime, vqvae.hparams.image_size, vqvae.hparams.in_channels).to(device)
        prime = vqvae.encode_to_codes(image).expand(a.n, -1, -1)
        labels = None
        codes = prior.sample(a.n, None, prime=prime, keep=keep, **opts)
        masked = vqvae.decode_codes(prime[:1]).clone()
        cell = vqvae.hparams.image_size // vqvae.grid_shape[0]
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
    grid = save_grid(grid_images, out, nrow=per_row, scale=scale)
    npz = out.with_suffix(".npz")
    with tempfile.NamedTemporaryFile(dir=npz.parent, suffix=".npz", delete=False) as f:
        np.savez(f, codes=codes.cpu().numpy().astype(np.uint16), images=to_uint8(images).cpu().numpy(),
                 labels=(labels.numpy() if labels is not None else np.full(len(codes), -1)))  # fmt: skip
    os.replace(f.name, npz)
    if a.wandb:
        _log_wandb(grid, a)
    return out


def _log_wandb(grid: np.ndarray, a: argparse.Namespace) -> None:
    import wandb

    from common.logging import wandb_has_credentials

    if "WANDB_MODE" not in os.environ and not wandb_has_credentials():
        os.environ["WANDB_MODE"] = "offline"
    run = wandb.init(project="vqgen", job_type="sample", config=vars(a))
    run.log({"samples": wandb.Image(grid)})
    run.finish()


def main(args: list[str] | None = None) -> None:
    a = parse_args(args)
    try:
        out = run(a)
    except (ValueError, FileNotFoundError, CodesError) as e:
        print(f"sample: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote {out} and {out.with_suffix('.npz')}")


if __name__ == "__main__":
    main()
