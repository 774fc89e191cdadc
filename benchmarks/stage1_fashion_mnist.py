"""Stage-1 quality benchmark: train the default Fashion-MNIST VQ-VAE within a time budget, then score it.

    python benchmarks/stage1_fashion_mnist.py                       # the default config, 4-minute cap
    python benchmarks/stage1_fashion_mnist.py --set model.width=96  # try a variant

Trains with the config's model/data/trainer settings (no validation during the timed run, no logger),
then reports on the Fashion-MNIST test set: PSNR, SSIM, codes used, perplexity, dead codes; plus
training wall time, epochs, images/s, parameters, peak RAM, and the lowest fraction of codes used in
any 100-step window after the first (k-means-initialised) step, which shows there was no collapse.
Prints a table and writes JSON (--json).
"""

from __future__ import annotations

import argparse
import time

import pytorch_lightning as pl
import torch
from _common import load_config, machine, peak_ram_mb, report  # also puts the repo root on sys.path
from torchmetrics.image import PeakSignalNoiseRatio

from common.datamodule import ImageDataModule
from stage1_vqvae.metrics import SSIM
from stage1_vqvae.vqvae import VQVAE, CodeUsage


class UsageWindow(pl.Callback):
    """Fraction of the codebook used in each window of N training steps (collapse detector)."""

    def __init__(self, codebook_size: int, every: int = 100) -> None:
        self.k, self.every, self.counts, self.windows = codebook_size, every, None, []

    def on_fit_start(self, trainer, pl_module) -> None:
        # Read the codes the training step already computed: no extra forward pass.
        pl_module.quantizer.register_forward_hook(lambda mod, inp, out: self._count(out.codes))

    def _count(self, codes: torch.Tensor) -> None:
        c = torch.bincount(codes.flatten(), minlength=self.k)
        self.counts = c if self.counts is None else self.counts + c

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (trainer.global_step % self.every) == 0:
            self.windows.append((trainer.global_step, float((self.counts > 0).float().mean())))
            self.counts = None


@torch.no_grad()
def evaluate(model: VQVAE, dm: ImageDataModule, device: torch.device) -> dict:
    model.eval().to(device)
    psnr = PeakSignalNoiseRatio(data_range=2.0).to(device)
    ssim = SSIM(data_range=2.0).to(device)  # over valid windows (stage1_vqvae.metrics)
    usage = CodeUsage(model.codebook_size).to(device)
    for images, _ in dm.dataloader("test", batch_size=500):
        images = images.to(device)
        codes = model.encode_to_codes(images)
        recon = model.decode_codes(codes)
        psnr.update(recon, images)
        ssim.update(recon, images)
        usage.update(codes)
    u = usage.compute()
    return {"test_psnr_db": float(psnr.compute()), "test_ssim": float(ssim.compute()),
            "test_codes_used": float(u["usage"]), "test_perplexity": float(u["perplexity"]),
            "dead_codes": sum(d or 0 for d in model.dead_codes())}  # fmt: skip  (None: FSQ, no restarts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/stage1/fashion_mnist.yaml")
    ap.add_argument("--set", action="append", default=[], help="override, e.g. model.width=96, trainer.max_steps=3000")
    ap.add_argument("--max_minutes", type=float, default=4.0, help="hard cap on training wall time")
    ap.add_argument("--accelerator", default="cpu")
    ap.add_argument("--root", default=None, help="Fashion-MNIST IDX folder (default: Debian's location)")
    ap.add_argument("--json", default="benchmarks/results/stage1_fashion_mnist.json")
    a = ap.parse_args()
    cfg = load_config(a.config, a.set)
    pl.seed_everything(cfg.get("seed_everything", 0), verbose=False)
    data = {**cfg.get("data", {}), "root": a.root or cfg.get("data", {}).get("root")}
    dm = ImageDataModule(**data)
    model = VQVAE(in_channels=dm.channels, image_size=dm.image_size, **cfg.get("model", {}))
    tcfg = cfg.get("trainer", {})
    usage_cb = UsageWindow(model.codebook_size)
    trainer = pl.Trainer(
        accelerator=a.accelerator, devices=1, precision=tcfg.get("precision", "32-true"),
        max_steps=tcfg.get("max_steps", 2000), max_time={"minutes": a.max_minutes},
        limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[usage_cb],
    )  # fmt: skip
    dm.setup()
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    train_s = time.perf_counter() - t0
    steps = trainer.global_step
    images = steps * dm.options.batch_size
    device = torch.device("cuda" if a.accelerator in ("gpu", "cuda") else "cpu")
    result = {
        "config": a.config, "overrides": a.set, **machine(device),
        "params": sum(p.numel() for p in model.parameters()), "train_seconds": round(train_s, 1),
        "steps": steps, "epochs": round(images / len(dm.split_arrays("train")[0]), 2),
        "train_images_per_s": round(images / train_s, 1),
        "min_window_codes_used": min((u for s, u in usage_cb.windows if s > 1), default=float("nan")),
        **evaluate(model, dm, device),
        "peak_ram_mb": peak_ram_mb(),
    }  # fmt: skip
    report(result, a.json)


if __name__ == "__main__":
    main()
