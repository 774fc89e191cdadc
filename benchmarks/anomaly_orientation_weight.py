"""Choose the weight of `orientation_combined` (orientation + w * combined_score) on validation data only.

    python benchmarks/anomaly_orientation_weight.py --prior runs/stage2_transformer/latest/checkpoints/best.ckpt

In-distribution images: the Fashion-MNIST validation split (never the test split the benchmarks report);
out-of-distribution sets: those of benchmarks/anomaly_ood.py made from those validation images with another
seed. For each weight, the AUROC on every set; the chosen weight is the one with the best worst-set AUROC.
"""

from __future__ import annotations

import argparse

import numpy as np
from _common import report  # also puts the repo root on sys.path
from anomaly_ood import ood_sets

from common.images import from_uint8
from common.splits import ImageSplits
from tools.anomaly import auroc, score_images
from tools.load import load_models


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prior", required=True)
    ap.add_argument("--limit", type=int, default=2000)
    ap.add_argument("--weights", type=float, nargs="+", default=[0.125, 0.25, 0.5, 1.0, 2.0])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", default="benchmarks/results/anomaly_orientation_weight_val.json")
    a = ap.parse_args()
    m = load_models(a.prior, None, "cpu")
    val = ImageSplits("fashion_mnist").split_arrays("val")[0][: a.limit]
    inlier, _ = score_images(m.prior, m.vqvae, from_uint8(val), 500)
    sets = {name: score_images(m.prior, m.vqvae, from_uint8(x), 500)[0]
            for name, x in ood_sets(val, len(val), a.seed, None).items()}  # fmt: skip
    result: dict = {"prior": a.prior, "inliers": f"validation split, first {len(val)}"}
    for w in a.weights:
        rows = {}
        for name, s in sets.items():
            y = np.r_[np.zeros(len(val)), np.ones(len(s["nll_bits_per_dim"]))].astype(bool)
            score = [t["orientation_bits_per_dim"] + w * t["combined_score"] for t in (inlier, s)]
            rows[name] = round(auroc(np.concatenate(score), y), 4)
        result[f"w={w}"] = rows
        result[f"w={w} worst"] = min(rows.values())
    result["chosen_weight"] = max(a.weights, key=lambda w: result[f"w={w} worst"])
    report(result, a.json)


if __name__ == "__main__":
    main()
