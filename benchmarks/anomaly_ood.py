"""Out-of-distribution detection: a model trained on all of Fashion-MNIST scores the Fashion-MNIST test split
(in distribution) against sets made offline, and the AUROC of every score of :mod:`tools.anomaly` is
reported per set.

    python benchmarks/anomaly_ood.py --prior runs/stage2_transformer/latest/checkpoints/best.ckpt \\
        --background runs/stage2_background/latest/checkpoints/last.ckpt --codes codes/fashion_mnist \\
        --anomaly_net runs/anomaly_net/fashion_mnist.pt

Sets (as many images as --limit, default 2,000 each): uniform noise; Gaussian noise (mean 128, sd 64);
constant images (one random grey level each); the test images inverted (255 - x), flipped upside down and
rotated by 90 degrees; emoji in grayscale at 28 px (when `make data-emoji` has run). Raw likelihoods of
pixel-level models fail on such sets (noise and constants are "simple"); the complexity correction, the
likelihood ratio against a background prior and typicality are the known fixes. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from _common import machine, report  # also puts the repo root on sys.path

from common.images import from_uint8
from common.splits import ImageSplits
from tools.anomaly import SCORES, auroc, references, score_images
from tools.load import load_models
from tools.transform_net import AnomalyNet


def ood_sets(test: torch.Tensor, n: int, seed: int, emoji_root: str | None) -> dict[str, torch.Tensor]:
    """uint8 (n, 1, 28, 28) images per set, from the in-distribution test images `test` and random draws."""
    g = torch.Generator().manual_seed(seed)
    x = test[:n]
    sets = {
        "uniform_noise": torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8),
        "gaussian_noise": (torch.randn((n, 1, 28, 28), generator=g) * 64 + 128).clamp(0, 255).round().to(torch.uint8),
        "constant": torch.randint(0, 256, (n, 1, 1, 1), generator=g, dtype=torch.uint8).expand(n, 1, 28, 28).clone(),
        "inverted": 255 - x,
        "flipped_upside_down": x.flip(-2),
        "rotated_90": x.rot90(1, (-2, -1)),
    }  # fmt: skip
    root = Path(emoji_root or "data/emoji")
    if (root / "emoji.json").is_file():
        emoji = ImageSplits("emoji", root=str(root), image_size=32, channels=1, val_size=0, test_size=0)
        glyphs = torch.cat([emoji.split_arrays(s)[0] for s in ("train", "val", "test")])
        pick = torch.randperm(len(glyphs), generator=g)[:n]
        small = torch.nn.functional.interpolate(glyphs[pick].float(), size=(28, 28), mode="area")  # 32 -> 28 px
        sets["emoji_gray_28px"] = small.round().to(torch.uint8)
    return sets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prior", required=True, help="a prior trained on Fashion-MNIST codes")
    ap.add_argument("--vqvae", default=None, help="default: the stage-1 checkpoint the prior names")
    ap.add_argument("--background", default=None, help="a prior trained on perturbed codes (--data.perturb)")
    ap.add_argument("--codes", default=None, help="the prior's codes directory (typicality)")
    ap.add_argument("--anomaly_net", default=None, help="train_anomaly_net's file for Fashion-MNIST: transform_knn")
    ap.add_argument("--limit", type=int, default=2000, help="images per set (and of the test split)")
    ap.add_argument("--emoji_root", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="benchmarks/results/anomaly_ood_cpu.json")
    a = ap.parse_args()
    t0 = time.perf_counter()
    m = load_models(a.prior, a.vqvae, "cpu")
    background, typical = references(m, a.background, a.codes)
    net = AnomalyNet.load(a.anomaly_net) if a.anomaly_net else None
    test = ImageSplits("fashion_mnist").split_arrays("test")[0][: a.limit]
    inlier, _ = score_images(m.prior, m.vqvae, from_uint8(test), 500, background, typical, net)
    result = {"prior": a.prior, "background": a.background, "codes": a.codes, "anomaly_net": a.anomaly_net,
              "images_per_set": len(test)}  # fmt: skip
    for name, images in ood_sets(test, len(test), a.seed, a.emoji_root).items():
        scores, _ = score_images(m.prior, m.vqvae, from_uint8(images), 500, background, typical, net)
        is_ood = np.r_[np.zeros(len(test)), np.ones(len(images))].astype(bool)
        for key in SCORES:
            if not np.isnan(inlier[key]).any():
                result[f"{name} {key}"] = round(auroc(np.r_[inlier[key], scores[key]], is_ood), 4)
        print(name + ": " + "  ".join(f"{k}={result[f'{name} {k}']:.3f}" for k in SCORES
                                      if f"{name} {k}" in result), flush=True)  # fmt: skip
    result.update({**machine("cpu"), "seconds": round(time.perf_counter() - t0, 1)})
    report(result, a.json)


if __name__ == "__main__":
    main()
