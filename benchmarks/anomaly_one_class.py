"""One-class anomaly detection on Fashion-MNIST, the protocol the field reports (GeoTrans, ARNet, Deep SAD...):
for each class, train stage 1, an unconditional prior and a background prior (on perturbed codes) on the
6,000 training images of that class only, score the whole test split (1,000 normal, 9,000 anomalous) and
report the AUROC of every score of :mod:`tools.anomaly`, per class and as the mean over the classes. The
anomaly net of ``transform_knn`` (:mod:`tools.transform_net`, what ``train_anomaly_net --classes C`` trains:
``--members`` seeded nets, each also reported alone as ``transform_knn_net<i>``, and the nets scored on the
untransformed view alone as ``transform_knn_identity``) is trained on the same 6,000 images.

    python benchmarks/anomaly_one_class.py                                   # all 10 classes, CPU budget
    python benchmarks/anomaly_one_class.py --classes 0,5 --stage1_steps 3000 --prior_steps 2000
    python benchmarks/anomaly_one_class.py --stage1_steps 20 --prior_steps 20 --limit 500 --classes 0  # smoke
    python benchmarks/anomaly_one_class.py --anomaly_net_only --json OUT.json  # transform_knn alone (~30 min)

Settings come from the stage-1 and stage-2 configs (``--set stage1.model.width=32``, ``--set
prior.model.size=tiny``); training has no validation or logging. ``--accelerator gpu`` runs it on a GPU.
Prints one line per class and a table, writes JSON.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pytorch_lightning as pl
import torch
from _common import load_stage_configs, machine, peak_ram_mb, report  # also puts the repo root on sys.path
from anomaly_auroc import fit

from common.datamodule import ImageDataModule
from common.images import from_uint8
from common.loaders import UInt8ImageDataset
from common.readers import FASHION_MNIST_CLASSES
from stage1_vqvae.vqvae import VQVAE
from stage2_prior.prior import Prior
from tools.anomaly import SCORES, auroc, mean_nll_bits, score_images
from tools.transform_net import MEMBERS, AnomalyNet


class Codes(torch.utils.data.Dataset):
    """Code maps for an unconditional prior; `perturb` replaces that fraction of codes by random ones."""

    def __init__(self, codes: torch.Tensor, codebook_size: int, perturb: float = 0.0) -> None:
        self.codes, self.k, self.perturb = codes, codebook_size, perturb

    def __len__(self) -> int:
        return len(self.codes)

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        codes = self.codes[torch.as_tensor(indices)]
        if self.perturb:
            noise = torch.randint(0, self.k, codes.shape)
            codes = torch.where(torch.rand(codes.shape) < self.perturb, noise, codes)
        return codes, torch.zeros(len(codes), dtype=torch.long)


def prior_for(codes: torch.Tensor, vqvae: VQVAE, cfg2: dict, steps: int, perturb: float, device: str) -> Prior:
    model = {k: v for k, v in cfg2.get("model", {}).items() if k != "label_dropout"}
    prior = Prior(vqvae.codebook_size, vqvae.grid_shape, 0, codes_meta={"image_size": 28, "channels": 1}, **model)
    fit(prior, Codes(codes, vqvae.codebook_size, perturb), cfg2.get("data", {}).get("batch_size", 128), steps,
        accelerator=device)  # fmt: skip
    return prior.eval()


def one_class_run(cls: int, data: ImageDataModule, cfg1: dict, cfg2: dict, a: argparse.Namespace) -> dict:
    train_x, train_y = data.split_arrays("train")
    test_x, test_y = data.split_arrays("test")
    normal = train_x[train_y == cls]  # (6000, 1, 28, 28) uint8
    test = from_uint8(test_x[: a.limit])
    anomalous = (test_y[: a.limit] != cls).numpy()
    device = a.accelerator if a.accelerator != "gpu" else "cuda"
    t0 = time.perf_counter()
    # the nets seed themselves (seed, seed + 1, ...), so --anomaly_net_only gives the figures of a full run
    anomaly_net, _ = AnomalyNet.train(normal, a.members, a.transform_steps, seed=a.seed, device=device)
    net_s = time.perf_counter() - t0
    row = {"class": cls, "name": FASHION_MNIST_CLASSES[cls], "train_images": len(normal),
           "test_normal": int((~anomalous).sum()), "test_anomalous": int(anomalous.sum()),
           "anomaly_net_train_seconds": round(net_s, 1)}  # fmt: skip
    t0 = time.perf_counter()
    each = anomaly_net.view_scores(test)  # (nets, views, N)
    for i, net_scores in enumerate(each.mean(1)):  # each net alone
        row[f"auroc_transform_knn_net{i}"] = round(auroc(net_scores, anomalous), 4)
    # the score before views were added: the untransformed images only
    row["auroc_transform_knn_identity"] = round(auroc(each[:, anomaly_net.views.index(0)].mean(0), anomalous), 4)
    knn = each.mean((0, 1))  # = anomaly_net.score(test), from the distances already computed
    keys = ["transform_knn"]
    if a.anomaly_net_only:
        scores = {"transform_knn": knn}
    else:
        pl.seed_everything(a.seed, verbose=False)
        t1 = time.perf_counter()
        vqvae = VQVAE(in_channels=1, image_size=28, **cfg1.get("model", {}))
        fit(vqvae, UInt8ImageDataset(normal, torch.zeros(len(normal), dtype=torch.long)),
            cfg1.get("data", {}).get("batch_size", 32), a.stage1_steps, accelerator=a.accelerator)  # fmt: skip
        vqvae.eval()
        with torch.no_grad():
            codes = torch.cat([vqvae.encode_to_codes(from_uint8(x).to(vqvae.device)).cpu() for x in normal.split(1024)])
        prior = prior_for(codes, vqvae, cfg2, a.prior_steps, 0.0, a.accelerator)
        background = prior_for(codes, vqvae, cfg2, a.background_steps or a.prior_steps, a.perturb, a.accelerator)
        row["train_seconds"] = round(time.perf_counter() - t1, 1)
        t0 = time.perf_counter()
        typical = mean_nll_bits(prior, codes.numpy())
        scores, _ = score_images(prior, vqvae, test, 500, background, typical)  # transform_knn: NaN here
        scores["transform_knn"] = knn
        keys = list(SCORES)
    row["score_seconds"] = round(time.perf_counter() - t0, 1)
    for key in keys:
        row[f"auroc_{key}"] = round(auroc(scores[key], anomalous), 4)
    print(f"class {cls} ({row['name']}, anomaly net {net_s:.0f} s): "
          + "  ".join(f"{k}={v:.3f}" for k, v in row.items() if k.startswith("auroc_")), flush=True)  # fmt: skip
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--classes", default=",".join(map(str, range(10))))
    ap.add_argument("--stage1_steps", type=int, default=1000)
    ap.add_argument("--prior_steps", type=int, default=500)
    ap.add_argument("--background_steps", type=int, default=None, help="default: --prior_steps")
    ap.add_argument("--transform_steps", type=int, default=1000, help="training steps of each anomaly net")
    ap.add_argument("--members", type=int, default=MEMBERS, help="anomaly nets transform_knn averages")
    ap.add_argument("--anomaly_net_only", action="store_true",
                    help="train and score only the anomaly net (transform_knn), not stage 1 and the priors")
    ap.add_argument("--perturb", type=float, default=0.2, help="fraction of codes randomised for the background")
    ap.add_argument("--limit", type=int, default=None, help="first N test images (smoke runs)")
    ap.add_argument("--stage1_config", default="configs/stage1/fashion_mnist.yaml")
    ap.add_argument("--prior_config", default="configs/stage2/fashion_mnist_transformer.yaml")
    ap.add_argument("--set", action="append", default=[], help="stage1.model.width=32 or prior.model.size=tiny")
    ap.add_argument("--accelerator", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="benchmarks/results/anomaly_one_class_cpu.json")
    a = ap.parse_args()
    cfg1, cfg2 = load_stage_configs(a.stage1_config, a.prior_config, a.set)
    data = ImageDataModule(dataset="fashion_mnist", val_size=0)  # the whole official train split: 6,000 a class
    t0 = time.perf_counter()
    rows = [one_class_run(int(c), data, cfg1, cfg2, a) for c in a.classes.split(",")]
    result = {"protocol": "one-class Fashion-MNIST (train on one class, test split: that class normal)",
              "classes": [r["class"] for r in rows], "stage1_steps": a.stage1_steps, "prior_steps": a.prior_steps,
              "background_steps": a.background_steps or a.prior_steps, "transform_steps": a.transform_steps,
              "members": a.members, "anomaly_net_only": a.anomaly_net_only, "perturb": a.perturb,
              "overrides": a.set, "total_minutes": round((time.perf_counter() - t0) / 60, 1)}  # fmt: skip
    for key in [k[6:] for k in rows[0] if k.startswith("auroc_")]:
        values = [r[f"auroc_{key}"] for r in rows]
        result[f"mean_auroc_{key}"] = round(float(np.mean(values)), 4)
        result[f"min_auroc_{key}"] = round(float(np.min(values)), 4)
    result.update({**machine("cpu" if a.accelerator == "cpu" else "cuda"), "peak_ram_mb": peak_ram_mb(),
                   "per_class": rows})  # fmt: skip
    report(result, a.json)


if __name__ == "__main__":
    main()
