"""Stage-2 benchmark: train a prior on extracted Fashion-MNIST codes within a time budget, then score it.

    python benchmarks/stage2_fashion_mnist.py --codes codes/fashion_mnist
    python benchmarks/stage2_fashion_mnist.py --codes codes/fashion_mnist \
        --config configs/stage2/fashion_mnist_pixelcnn.yaml

Trains with the config's model/data/trainer settings (no validation during the timed run, no logger) and
reports test NLL in bits per code and bits per image dimension, top-1 accuracy, training code maps/s,
parameters and peak RAM. Prints a table and writes JSON (--json).
"""

from __future__ import annotations

import argparse
import math
import time

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from _common import load_config, machine, peak_ram_mb, report  # also puts the repo root on sys.path

from stage2_prior.data import CodesDataModule
from stage2_prior.prior import Prior


@torch.no_grad()
def evaluate(prior: Prior, dm: CodesDataModule, device: torch.device) -> dict:
    prior.eval().to(device)
    nll, correct, n = 0.0, 0, 0
    for codes, labels in dm.test_dataloader():
        codes, labels = codes.to(device), labels.to(device)
        logits = prior(codes, labels if prior.num_classes else None)
        nll += float(F.cross_entropy(logits.float(), codes, reduction="sum"))
        correct += int((logits.argmax(1) == codes).sum())
        n += codes.numel()
    bits_per_code = nll / n / math.log(2)
    h, w = prior.grid_shape
    dims = dm.meta.image_size**2 * dm.meta.channels
    return {"test_bits_per_code": bits_per_code, "test_bits_per_dim": bits_per_code * h * w / dims,
            "test_accuracy": correct / n}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--codes", default="codes/fashion_mnist", help="extract_codes output directory")
    ap.add_argument("--config", default="configs/stage2/fashion_mnist_transformer.yaml")
    ap.add_argument("--set", action="append", default=[], help="override, e.g. model.size=base")
    ap.add_argument("--max_minutes", type=float, default=10.0, help="hard cap on training wall time")
    ap.add_argument("--accelerator", default="cpu")
    ap.add_argument("--json", default=None, help="default: benchmarks/results/stage2_<kind>.json")
    a = ap.parse_args()
    cfg = load_config(a.config, a.set)
    pl.seed_everything(cfg.get("seed_everything", 0), verbose=False)
    dm = CodesDataModule(**{**cfg.get("data", {}), "codes_dir": a.codes, "check_stage1": False})
    model_cfg = {k: v for k, v in cfg.get("model", {}).items()}
    prior = Prior(codebook_size=dm.codebook_size, grid_shape=dm.grid_shape, num_classes=dm.num_classes,
                  codes_meta=dm.meta_dict, **model_cfg)  # fmt: skip
    tcfg = cfg.get("trainer", {})
    trainer = pl.Trainer(
        accelerator=a.accelerator, devices=1, precision=tcfg.get("precision", "32-true"),
        max_steps=tcfg.get("max_steps", 3000), max_time={"minutes": a.max_minutes}, limit_val_batches=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    dm.setup()
    t0 = time.perf_counter()
    trainer.fit(prior, datamodule=dm)
    train_s = time.perf_counter() - t0
    maps = trainer.global_step * dm.hparams.batch_size
    device = torch.device("cuda" if a.accelerator in ("gpu", "cuda") else "cpu")
    result = {
        "config": a.config, "overrides": a.set, **machine(device), "kind": prior.hparams.kind,
        "size": prior.hparams.size, "params": sum(p.numel() for p in prior.parameters()),
        "train_seconds": round(train_s, 1), "steps": trainer.global_step,
        "epochs": round(maps / len(dm.split("train")), 2), "train_code_maps_per_s": round(maps / train_s, 1),
        **evaluate(prior, dm, device), "peak_ram_mb": peak_ram_mb(),
    }  # fmt: skip
    report(result, a.json or f"benchmarks/results/stage2_{prior.hparams.kind}.json")


if __name__ == "__main__":
    main()
