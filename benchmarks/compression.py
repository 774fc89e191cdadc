"""Compression benchmark: `compress` on the test split of the data stage 1 was trained on (read from its
checkpoint, as `evaluate` does) against the ideal code length, uniform coding of the codes, PNG / WebP
lossless, and JPEG / WebP at matched PSNR; compress/decompress speed.

    python benchmarks/compression.py --prior runs/stage2_transformer/latest/checkpoints/best.ckpt --limit 1000
    python benchmarks/compression.py --limit 0 --json benchmarks/results/compression_emoji.json \
        --prior runs/emoji/stage2_transformer/latest/checkpoints/best.ckpt      # the whole emoji test split

Bits per pixel (bpp) everywhere, per pixel position (a colour pixel's three channels count once). Ours is
one .vqz file for the whole set (header amortized); the baselines are given both per image (one file each,
as a user would store them, headers included) and as one mosaic image of the whole set (headers amortized,
like ours). JPEG and WebP use the lowest quality whose PSNR over the set (from the mean squared error of all
pixels) reaches ours; our PSNR is that of stage 1's reconstruction, since the codes are stored losslessly.
Speeds are end to end (image tensors -> bytes -> image tensors), with the entropy coder on one thread as
`compress` runs it. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import io
import math
import time

import numpy as np
import torch
from _common import machine, report, stage1_splits  # also puts the repo root on sys.path
from PIL import Image

from common.images import from_uint8, to_uint8
from tools.codec import uniform_bits
from tools.compress import compress_codes, decode_images, decompress_codes, encode_images
from tools.container import unpack
from tools.load import load_models
from tools.vqz import LABEL_CHOICES


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def pil_round_trip(image: np.ndarray, fmt: str, **opts) -> tuple[int, np.ndarray]:
    """(bytes, decoded) of one (H, W, C) uint8 image through Pillow's `fmt` encoder."""
    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format=fmt, **opts)
    decoded = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("L" if image.shape[-1] == 1 else "RGB"))
    return len(buf.getvalue()), decoded.reshape(image.shape)


def mosaic(images: np.ndarray) -> np.ndarray:
    """(N, H, W, C) -> one (rows*H, cols*W, C) image, black where the last row is short."""
    n, h, w, c = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    padded = np.concatenate([images, np.zeros((rows * cols - n, h, w, c), images.dtype)])
    return padded.reshape(rows, cols, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)


def untile(big: np.ndarray, n: int, h: int, w: int) -> np.ndarray:
    rows, cols, c = big.shape[0] // h, big.shape[1] // w, big.shape[2]
    return big.reshape(rows, h, cols, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * cols, h, w, c)[:n]


def coded(images: np.ndarray, fmt: str, per_image: bool, **opts) -> tuple[float, float]:
    """(bpp, PSNR) of the set through `fmt`, one file per image or one mosaic."""
    n, h, w, _ = images.shape
    if per_image:
        results = [pil_round_trip(x, fmt, **opts) for x in images]
        nbytes, decoded = sum(r[0] for r in results), np.stack([r[1] for r in results])
    else:
        nbytes, big = pil_round_trip(mosaic(images), fmt, **opts)
        decoded = untile(big, n, h, w)
    return 8 * nbytes / (n * h * w), psnr(images, decoded)


def matched_quality(images: np.ndarray, fmt: str, per_image: bool, target: float) -> dict:
    """The lowest quality in 1..100 whose PSNR >= target (binary search; PSNR grows with quality)."""
    lo, hi, best = 1, 100, None
    while lo <= hi:
        q = (lo + hi) // 2
        bpp, p = coded(images, fmt, per_image, quality=q)
        if p >= target:
            best, hi = {"quality": q, "bpp": round(bpp, 4), "psnr": round(p, 2)}, q - 1
        else:
            lo = q + 1
    if best is None:
        bpp, p = coded(images, fmt, per_image, quality=100)
        best = {"quality": 100, "bpp": round(bpp, 4), "psnr": round(p, 2), "note": "never reaches our PSNR"}
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prior", default="runs/stage2_transformer/latest/checkpoints/best.ckpt")
    ap.add_argument("--vqvae", default=None, help="default: the stage-1 checkpoint the prior names")
    ap.add_argument("--dataset", default=None, help="default: the data stage 1 was trained on (its checkpoint's)")
    ap.add_argument("--root", default=None, help="default: stage 1's --data.root (give it if the data moved)")
    ap.add_argument("--limit", type=int, default=1000, help="first N test images (0: all)")
    ap.add_argument("--batch_size", type=int, default=256, help="images per coded batch")
    ap.add_argument("--labels", default="best", choices=LABEL_CHOICES, help="as `compress --labels`")
    ap.add_argument("--json", default="benchmarks/results/compression.json")
    a = ap.parse_args()
    m = load_models(a.prior, a.vqvae, "cpu")
    m.prior.float()
    m.vqvae.float()
    dm, dataset, _ = stage1_splits(m, a.dataset, a.root)  # its test split
    originals = dm.split_arrays("test")[0][: a.limit or None]  # uint8 (N, C, H, W)
    n, pixels = len(originals), len(originals) * m.image_size**2

    t0 = time.perf_counter()
    codes = encode_images(m.vqvae, from_uint8(originals))
    data, ideal = compress_codes(m, codes, a.batch_size, a.labels)
    compress_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    decoded_codes = decompress_codes(m, data)
    recon = to_uint8(decode_images(m.vqvae, decoded_codes))
    decompress_s = time.perf_counter() - t0

    payload = 8 * sum(len(s) for s in unpack(data).streams)
    ours_psnr = psnr(originals.numpy(), recon.numpy())
    images = originals.permute(0, 2, 3, 1).numpy()  # (N, H, W, C) for Pillow
    result = {
        "dataset": dataset, "prior": a.prior, "prior_kind": type(m.prior).__name__, "images": n,
        "image_size": m.image_size,
        "channels": m.channels, "grid_shape": list(m.vqvae.grid_shape), "codebook_size": m.vqvae.codebook_size,
        "batch_size": a.batch_size, "labels": a.labels, "codes_exact": bool(np.array_equal(decoded_codes, codes)),
        "ours_file_bytes": len(data), "ours_bpp": round(8 * len(data) / pixels, 5),
        "ours_payload_bpp": round(payload / pixels, 5), "ideal_bpp": round(ideal / pixels, 5),
        "payload_overhead_pct": round(100 * (payload - ideal) / ideal, 3),
        "file_overhead_pct": round(100 * (8 * len(data) - ideal) / ideal, 3),
        "uniform_log2K_bpp": round(uniform_bits(n, m.vqvae.grid_shape, m.vqvae.codebook_size) / pixels, 5),
        "ours_psnr": round(ours_psnr, 2),
        "compress_images_per_s": round(n / compress_s, 1), "decompress_images_per_s": round(n / decompress_s, 1),
    }  # fmt: skip
    for per_image, tag in [(True, "per_image"), (False, "mosaic")]:
        result[f"png_{tag}_bpp"] = round(coded(images, "PNG", per_image, optimize=True)[0], 4)
        result[f"webp_lossless_{tag}_bpp"] = round(coded(images, "WEBP", per_image, lossless=True)[0], 4)
        for fmt in ("JPEG", "WEBP"):
            result[f"{fmt.lower()}_{tag}_at_our_psnr"] = matched_quality(images, fmt, per_image, ours_psnr)
    report({**result, **machine("cpu"), "coding_threads": 1}, a.json)


if __name__ == "__main__":
    with torch.no_grad():  # not set_grad_enabled(False): run in-process (tests/test_benchmarks.py), that stayed off
        main()
