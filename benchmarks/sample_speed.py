"""Sampling latency: 64 and 1,000 Fashion-MNIST-sized samples (codes drawn, then decoded to images).

    python benchmarks/sample_speed.py --prior runs/stage2_transformer/latest/checkpoints/best.ckpt
    python benchmarks/sample_speed.py            # default-size priors with random weights (speed only)
    python benchmarks/sample_speed.py --device cuda

For each prior it times the fast path (Transformer: static KV cache, one token per step; PixelCNN: per-layer
row caches, one new position per step) and, at n = 64, the naive path (a full forward over the whole grid at
every step) in the same run, and reports their ratio. The latency includes decoding with stage 1.
"""

from __future__ import annotations

import argparse
import time

import torch
import yaml
from _common import machine, report  # also puts the repo root on sys.path

from stage1_vqvae.model import VQModel
from stage1_vqvae.vqvae import VQVAE
from stage2_prior.build import PRIORS
from stage2_prior.decoding import CodePrior
from stage2_prior.prior import Prior
from stage2_prior.sampling import sample_codes


def default_models(kind: str) -> tuple[CodePrior, VQVAE]:
    """Default-config models with random weights: the same shapes and cost as trained ones."""
    s1 = yaml.safe_load(open("configs/stage1/fashion_mnist.yaml"))["model"]
    s2 = yaml.safe_load(open(f"configs/stage2/fashion_mnist_{kind}.yaml"))["model"]
    vqvae = VQVAE(in_channels=1, image_size=28, **s1)
    prior = Prior(codebook_size=vqvae.codebook_size, grid_shape=vqvae.grid_shape, num_classes=10,
                  codes_meta={"image_size": 28, "channels": 1}, **s2)  # fmt: skip
    return prior.net.eval(), vqvae.eval()


def timed(fn, device: torch.device, repeats: int) -> float:
    """Best-of-`repeats` wall time of fn() (after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def bench(prior: CodePrior, vqvae: VQModel, device: torch.device, batch_size: int, repeats: int) -> dict:
    prior.to(device)
    vqvae.to(device)
    gen = torch.Generator(device=device)

    def draw(n: int, use_cache: bool = True) -> torch.Tensor:
        gen.manual_seed(0)
        out = []
        for start in range(0, n, batch_size):
            m = min(batch_size, n - start)
            labels = (torch.arange(m, device=device) % prior.num_classes) if prior.num_classes else None
            codes = sample_codes(prior, m, labels, generator=gen, use_cache=use_cache)
            out.append(vqvae.decode_codes(codes))
        return torch.cat(out)

    with torch.inference_mode():
        t64 = timed(lambda: draw(64), device, repeats)
        t64_naive = timed(lambda: draw(64, use_cache=False), device, 1)
        t1000 = timed(lambda: draw(1000), device, 1)
    figures = {
        "params": sum(p.numel() for p in prior.parameters()),
        "n64_seconds": round(t64, 4),
        "n64_samples_per_s": round(64 / t64, 1),
        "n64_naive_seconds": round(t64_naive, 4),
        "cache_speedup": round(t64_naive / t64, 2),
        "n1000_seconds": round(t1000, 3),
        "n1000_samples_per_s": round(1000 / t1000, 1),
    }
    kind = {cls: name for name, cls in PRIORS.items()}[type(prior)]
    return {f"{kind}_{k}": v for k, v in figures.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prior", action="append", default=[], help="trained prior checkpoint(s); default: random")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch_size", type=int, default=1000, help="samples drawn together")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default="benchmarks/results/sample_speed.json")
    a = ap.parse_args()
    device = torch.device(a.device)
    result: dict = {**machine(device)}
    if a.prior:
        from tools.load import load_models

        pairs = []
        for path in a.prior:
            m = load_models(path, None, "cpu")
            pairs.append((m.prior, m.vqvae))
        result["weights"] = "trained: " + ", ".join(a.prior)
    else:
        pairs = [default_models(kind) for kind in ("transformer", "pixelcnn")]
        result["weights"] = "random (default configs; speed does not depend on the weights)"
    for prior, vqvae in pairs:
        result.update(bench(prior, vqvae, device, a.batch_size, a.repeats))
    report(result, a.json)


if __name__ == "__main__":
    main()
