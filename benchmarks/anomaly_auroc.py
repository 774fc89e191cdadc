"""One-class anomaly benchmark on Fashion-MNIST: for each held-out class, train stage 1 and an unconditional
prior on the training images of the *other* nine classes, score the test set with
:func:`tools.anomaly.score_images` and report the AUROC of detecting the held-out class with each
score (prior NLL, reconstruction error, the complexity-corrected combined score, and complexity alone), and
``transform_knn`` with an anomaly net (:mod:`tools.transform_net`) trained on the same nine classes.

    python benchmarks/anomaly_auroc.py                                    # classes 0,5,9, ~6 min per class
    python benchmarks/anomaly_auroc.py --classes 1,7 --stage1_steps 2000 --prior_steps 3000
    python benchmarks/anomaly_auroc.py --stage1_steps 30 --prior_steps 30 --limit 500   # smoke run

Model settings come from the stage-1 and stage-2 configs (``--set stage1.model.width=32`` overrides);
training runs without validation or logging. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pytorch_lightning as pl
import torch
from _common import load_stage_configs, machine, peak_ram_mb, report  # also puts the repo root on sys.path
from torch.utils.data import DataLoader

from common.datamodule import ImageDataModule
from common.images import from_uint8
from common.loaders import UInt8ImageDataset
from common.readers import FASHION_MNIST_CLASSES
from stage1_vqvae.vqvae import VQVAE
from stage2_prior.prior import Prior
from tools.anomaly import OPTIONAL, auroc, score_images
from tools.anomaly import SCORES as ALL_SCORES
from tools.transform_net import MEMBERS, AnomalyNet

# no background prior or typicality statistics here; the anomaly net is trained below
SCORES = [k for k in ALL_SCORES if k not in OPTIONAL or k == "transform_knn"]
KEYS = [*SCORES, "transform_knn_identity"]  # and transform_knn on the untransformed view alone


def fit(model: pl.LightningModule, dataset, batch_size: int, steps: int, accelerator: str = "cpu") -> float:
    """Train for `steps` steps (no validation, no logger); returns seconds."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, collate_fn=lambda b: b)
    trainer = pl.Trainer(
        accelerator=accelerator, devices=1, max_steps=steps, max_epochs=-1, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    t0 = time.perf_counter()
    trainer.fit(model, loader)
    return time.perf_counter() - t0


class CodesDataset(torch.utils.data.Dataset):
    def __init__(self, codes: torch.Tensor) -> None:
        self.codes = codes

    def __len__(self) -> int:
        return len(self.codes)

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        codes = self.codes[torch.as_tensor(indices)]
        return codes, torch.zeros(len(codes), dtype=torch.long)


def held_out_run(cls: int, data: ImageDataModule, cfg1: dict, cfg2: dict, a: argparse.Namespace) -> dict:
    train_x, train_y = data.split_arrays("train")
    test_x, test_y = data.split_arrays("test")
    keep = train_y != cls
    pl.seed_everything(a.seed, verbose=False)
    vqvae = VQVAE(in_channels=1, image_size=28, **cfg1.get("model", {}))
    bs1 = cfg1.get("data", {}).get("batch_size", 128)
    stage1_s = fit(vqvae, UInt8ImageDataset(train_x[keep], train_y[keep]), bs1, a.stage1_steps)
    vqvae.eval()
    with torch.no_grad():
        codes = torch.cat([vqvae.encode_to_codes(from_uint8(x)) for x in train_x[keep].split(1024)])
    prior = Prior(codebook_size=vqvae.codebook_size, grid_shape=vqvae.grid_shape, num_classes=0,
                  codes_meta={"image_size": 28, "channels": 1}, **cfg2.get("model", {}))  # fmt: skip
    bs2 = cfg2.get("data", {}).get("batch_size", 128)
    prior_s = fit(prior, CodesDataset(codes), bs2, a.prior_steps)
    t0 = time.perf_counter()
    anomaly_net, _ = AnomalyNet.train(train_x[keep], a.members, a.transform_steps, seed=a.seed)
    net_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    test = from_uint8(test_x[: a.limit])
    scores, _ = score_images(prior.eval(), vqvae, test)  # transform_knn: NaN here
    each = anomaly_net.view_scores(test)  # (nets, views, N): scored once for both figures below
    scores["transform_knn"] = each.mean((0, 1))  # = anomaly_net.score(test)
    # transform_knn on the untransformed view alone (what it was before the mirror view), for comparison
    scores["transform_knn_identity"] = each[:, anomaly_net.views.index(0)].mean(0)
    score_s = time.perf_counter() - t0
    is_ood = (test_y[: a.limit] == cls).numpy()
    row = {"class": cls, "name": FASHION_MNIST_CLASSES[cls], "test_images": int(len(is_ood)),
           "held_out_images": int(is_ood.sum()), "stage1_seconds": round(stage1_s, 1),
           "prior_seconds": round(prior_s, 1), "anomaly_net_seconds": round(net_s, 1),
           "score_seconds": round(score_s, 1)}  # fmt: skip
    for key in KEYS:
        row[f"auroc_{key}"] = round(auroc(scores[key], is_ood), 4)
        row[f"mean_{key}_in"] = float(np.mean(scores[key][~is_ood]))
        row[f"mean_{key}_out"] = float(np.mean(scores[key][is_ood]))
    print(f"class {cls} ({row['name']}): " + "  ".join(f"{k}={row[f'auroc_{k}']:.3f}" for k in KEYS), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--classes", default="0,5,9", help="held-out classes, comma-separated")
    ap.add_argument("--stage1_steps", type=int, default=1000)
    ap.add_argument("--prior_steps", type=int, default=500)
    ap.add_argument("--transform_steps", type=int, default=1000, help="training steps of each anomaly net")
    ap.add_argument("--members", type=int, default=MEMBERS, help="anomaly nets transform_knn averages")
    ap.add_argument("--limit", type=int, default=10000, help="score the first N test images")
    ap.add_argument("--stage1_config", default="configs/stage1/fashion_mnist.yaml")
    ap.add_argument("--prior_config", default="configs/stage2/fashion_mnist_transformer.yaml")
    ap.add_argument("--set", action="append", default=[], help="override, e.g. stage1.model.width=32 or "
                    "prior.model.size=tiny")  # fmt: skip
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="benchmarks/results/anomaly_auroc.json")
    a = ap.parse_args()
    cfg1, cfg2 = load_stage_configs(a.stage1_config, a.prior_config, a.set)
    cfg2.get("model", {}).pop("label_dropout", None)  # unconditional: the held-out class has no label
    data = ImageDataModule(dataset="fashion_mnist")
    classes = [int(c) for c in a.classes.split(",")]
    rows = [held_out_run(c, data, cfg1, cfg2, a) for c in classes]
    result = {"classes": classes, "stage1_steps": a.stage1_steps, "prior_steps": a.prior_steps,
              "transform_steps": a.transform_steps, "members": a.members,
              "stage1_config": a.stage1_config, "prior_config": a.prior_config, "overrides": a.set}  # fmt: skip
    for key in KEYS:
        result[f"mean_auroc_{key}"] = round(float(np.mean([r[f"auroc_{key}"] for r in rows])), 4)
    result.update({**machine("cpu"), "peak_ram_mb": peak_ram_mb(), "per_class": rows})
    report(result, a.json)


if __name__ == "__main__":
    main()
