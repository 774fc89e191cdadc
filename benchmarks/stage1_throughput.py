"""Stage-1 training throughput on this machine: images/s of full training steps (forward, backward, AdamW).

    python benchmarks/stage1_throughput.py

Measures the default Fashion-MNIST model at its batch size (32) and at 128, and a model of the reference
pipeline's size (rosinality/vq-vae-2-pytorch's VQ-VAE has about 1.5M parameters), each in fp32,
channels_last, and bf16 autocast + channels_last, in the same run, so the ratios are fair.
Random images of Fashion-MNIST's shape (1x28x28): the speed does not depend on the pixels.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
import yaml
from _common import machine, peak_ram_mb, report  # also puts the repo root on sys.path

from stage1_vqvae.vqvae import VQVAE


def images_per_s(model_args: dict, batch_size: int, variant: str, seconds: float) -> float:
    torch.manual_seed(0)
    cl = variant != "fp32"
    model = VQVAE(in_channels=1, image_size=28, **{**model_args, "channels_last": cl})
    if cl:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    x = torch.rand(batch_size, 1, 28, 28) * 2 - 1
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant == "bf16+channels_last"):
            recon, qs = model(x)  # one Quantized per level
            loss = F.mse_loss(recon.float(), x) + sum(q.loss for q in qs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):  # warm-up (k-means init happens on the first step)
        step()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        n += 1
    return n * batch_size / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=8.0, help="timed seconds per measurement")
    ap.add_argument("--json", default="benchmarks/results/stage1_throughput.json")
    a = ap.parse_args()
    default = yaml.safe_load(open("configs/stage1/fashion_mnist.yaml"))["model"]
    default.pop("channels_last", None)
    reference_size = {**default, "width": 128, "res_blocks": 2, "res_width": 64}
    result: dict = {**machine("cpu")}
    runs = [("default", default, 32), ("default", default, 128), ("reference_size", reference_size, 128)]
    for name, args, bs in runs:
        result[f"{name}_params"] = sum(p.numel() for p in VQVAE(in_channels=1, image_size=28, **args).parameters())
        for variant in ("fp32", "channels_last", "bf16+channels_last"):
            result[f"{name}_bs{bs}_{variant}_images_per_s"] = round(images_per_s(args, bs, variant, a.seconds), 1)
    result["peak_ram_mb"] = peak_ram_mb()
    report(result, a.json)


if __name__ == "__main__":
    main()
