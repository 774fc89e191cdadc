"""Image repair: the masked-token prior vs the autoregressive prior on the same holes of the same test images.

    python benchmarks/maskgit_repair.py --ar runs/stage2_transformer/latest/checkpoints/best.ckpt \\
        --masked runs/stage2_maskgit/latest/checkpoints/best.ckpt --n 1000

Holes are given in pixels and mapped to codes as `sample --prime --mask` maps them (a code is redrawn if any
pixel of its cell is in the hole, on every stage-1 level; the others are kept exactly): a centre square (side
0.4 of the image), the lower half, and a random 50 % of the codes (per image). Both priors repair the same
holes, unconditionally (the null class, as `sample --prime` does), with the same seed; the masked one in 8
steps. Per hole and prior: PSNR of the repaired region (the redrawn codes' pixels) to the original image;
seam PSNR, on the band of pixels within one code cell of the region's edge, on both sides (the decoder mixes
neighbouring codes, so kept pixels near the hole change too); FID of the repaired images against the test
split with the project's feature net. The same figures for stage 1's reconstruction (the original codes,
nothing redrawn) are the ceiling.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from _common import machine, report, stage1_splits  # also puts the repo root on sys.path

from common.images import from_uint8, to_uint8
from stage2_prior.masked_sampling import DEFAULT_CHOICE_TEMPERATURE, sample_masked
from stage2_prior.sampling import sample_codes
from tools.drawing import keep_from_painted, redrawn_pixels
from tools.features import load_features
from tools.fid import fid
from tools.load import load_models

HOLES = ("centre_square", "lower_half", "random_half_of_codes")


def kept_codes(kind: str, n: int, vqvae, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep (n, *grid_shape) bool, region (n, S, S) bool: the redrawn codes' pixels) for one kind of hole,
    mapped onto every stage-1 level as `sample --mask` maps a painted hole."""
    size, grid = vqvae.image_size, tuple(vqvae.grid_shape)
    if kind == "random_half_of_codes":  # on the codes themselves (all levels, flattened)
        T = grid[0] * grid[1]
        ranks = torch.rand(n, T, generator=torch.Generator().manual_seed(seed)).argsort(1).argsort(1)
        keep = (ranks >= T // 2).reshape(n, *grid)
        return keep, torch.stack([redrawn_pixels(vqvae, k) for k in keep])
    hole = torch.zeros(size, size, dtype=torch.bool)
    if kind == "centre_square":
        side, start = int(0.4 * size), (size - int(0.4 * size)) // 2
        hole[start : start + side, start : start + side] = True
    elif kind == "lower_half":
        hole[size // 2 :] = True
    else:
        raise ValueError(kind)
    keep = keep_from_painted(vqvae, hole)
    return keep.expand(n, *grid), redrawn_pixels(vqvae, keep).expand(n, size, size)


def psnr(a: torch.Tensor, b: torch.Tensor, where: torch.Tensor) -> float:
    """PSNR (dB) over the pixels `where` (n, S, S) of images a, b (n, C, S, S) in [-1, 1] (range 2)."""
    w = where[:, None].expand_as(a)
    mse = float(((a - b)[w] ** 2).mean())
    return 10 * np.log10(4.0 / mse)


def seam_band(region: torch.Tensor, width: int) -> torch.Tensor:
    """Pixels within `width` of the region's edge, inside or outside: dilation minus erosion."""
    x = region[:, None].float()
    k = 2 * width + 1
    dilated = F.max_pool2d(x, k, stride=1, padding=width) > 0
    eroded = -F.max_pool2d(-x, k, stride=1, padding=width) > 0
    return (dilated & ~eroded)[:, 0]


def repaired(sampler, prior, codes: torch.Tensor, keep: torch.Tensor, batch_size: int, **kw) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    out = [sampler(prior, len(c), None, prime=c, keep=k, generator=gen, **kw)
           for c, k in zip(codes.split(batch_size), keep.split(batch_size))]  # fmt: skip
    return torch.cat(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ar", default="runs/stage2_transformer/latest/checkpoints/best.ckpt")
    ap.add_argument("--masked", default="runs/stage2_maskgit/latest/checkpoints/best.ckpt")
    ap.add_argument("--dataset", default=None, help="default: the data stage 1 was trained on (its checkpoint's)")
    ap.add_argument("--root", default=None, help="default: stage 1's --data.root (give it if the data moved)")
    ap.add_argument("--features", default="auto")
    ap.add_argument("--n", type=int, default=1000, help="test images (the first n)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--choice_temperature", type=float, default=DEFAULT_CHOICE_TEMPERATURE)
    ap.add_argument("--holes", nargs="+", default=list(HOLES), choices=list(HOLES))
    ap.add_argument("--batch_size", type=int, default=500)
    ap.add_argument("--json", default="benchmarks/results/maskgit_repair_cpu.json")
    a = ap.parse_args()
    ar, masked = load_models(a.ar, None, "cpu"), load_models(a.masked, None, "cpu")
    if ar.stage1_sha256 != masked.stage1_sha256:
        raise SystemExit("the two priors were trained on codes of different stage-1 checkpoints")
    vqvae, size, grid = ar.vqvae, ar.image_size, tuple(ar.vqvae.grid_shape)
    data, dataset, root = stage1_splits(ar, a.dataset, a.root)
    test = data.split_arrays("test")[0]  # uint8 (N, C, S, S)
    originals = from_uint8(test[: a.n])
    features = load_features(a.features, dataset, root=root)
    f_test = features(test, "the test images")
    with torch.inference_mode():
        codes = torch.cat([vqvae.encode_to_codes(x) for x in originals.split(a.batch_size)])
        recon = torch.cat([vqvae.decode_codes(c) for c in codes.split(a.batch_size)])
        result: dict = {**machine(), "ar": a.ar, "masked": a.masked, "images": len(originals), "grid": list(grid),
                        "masked_steps": a.steps, "masked_choice_temperature": a.choice_temperature,
                        "features": features.description,
                        "fid_reconstruction": round(fid(features(to_uint8(recon)), f_test), 3)}  # fmt: skip
        cell = min(size // level["grid_shape"][0] for level in vqvae.levels)  # the finest level's cells
        for kind in a.holes:
            keep, region = kept_codes(kind, len(codes), vqvae)
            redraw = ~keep
            band = seam_band(region, cell)
            result[f"{kind}_codes_redrawn"] = round(float(redraw.float().mean()), 3)
            result[f"{kind}_reconstruction_psnr_hole_db"] = round(psnr(recon, originals, region), 2)
            result[f"{kind}_reconstruction_psnr_seam_db"] = round(psnr(recon, originals, band), 2)
            masked_kw = {"steps": a.steps, "choice_temperature": a.choice_temperature}
            for name, sampler, prior, kw in [("ar", sample_codes, ar.prior, {}),
                                             ("masked", sample_masked, masked.prior, masked_kw)]:  # fmt: skip
                t = time.perf_counter()
                new = repaired(sampler, prior, codes, ~redraw, a.batch_size, **kw)
                seconds = time.perf_counter() - t
                assert torch.equal(new[~redraw], codes[~redraw]), "kept codes changed"
                images = torch.cat([vqvae.decode_codes(c) for c in new.split(a.batch_size)])
                result[f"{kind}_{name}_psnr_hole_db"] = round(psnr(images, originals, region), 2)
                result[f"{kind}_{name}_psnr_seam_db"] = round(psnr(images, originals, band), 2)
                result[f"{kind}_{name}_fid"] = round(fid(features(to_uint8(images)), f_test), 3)
                result[f"{kind}_{name}_seconds"] = round(seconds, 2)
                print(f"{kind} {name}: " + ", ".join(f"{k.split(name + '_')[1]} {v}" for k, v in result.items()
                                                     if k.startswith(f"{kind}_{name}_")), flush=True)  # fmt: skip
    report(result, a.json)


if __name__ == "__main__":
    main()
