"""Sampling speed, masked-token prior (8 parallel steps) vs the autoregressive Transformer, in one run.

    python benchmarks/maskgit_speed.py                       # 7x7 (Fashion-MNIST) and 16x16 (emoji-64) grids
    python benchmarks/maskgit_speed.py --device cuda --threads 0

Both priors have the default configs' size ("small": 4 layers, 4 heads, 128 wide), K = 512, class-conditional
(10 classes for Fashion-MNIST, 9 for emoji), random weights: the work does not depend on the weights (the
autoregressive sampler always takes T = H * W steps from its KV cache, the masked one always S full passes).
Times are for drawing the codes (decoding them with stage 1 costs the same for both), n = 64 and 1,000 in
batches of 256 as `sample` draws them, interleaved (AR, masked, AR, masked, ...) and the best of --repeats
kept, so both see the same machine load.
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import machine, report  # also puts the repo root on sys.path

from stage2_prior.cuda_graphs import GraphedSampler
from stage2_prior.masked_sampling import sample_masked
from stage2_prior.maskgit import MASKGIT_SIZES, MaskedPrior
from stage2_prior.sampling import sample_codes
from stage2_prior.transformer import TRANSFORMER_SIZES, Transformer

GRIDS = {"fashion_mnist_7x7": ((7, 7), 10), "emoji_16x16": ((16, 16), 9)}


def draw_all(sampler, prior, n: int, batch_size: int, device: torch.device, **kw) -> None:
    gen = torch.Generator(device=device).manual_seed(0)
    for start in range(0, n, batch_size):
        m = min(batch_size, n - start)
        labels = torch.arange(start, start + m, device=device) % prior.num_classes
        sampler(prior, m, labels, generator=gen, **kw)
    if device.type == "cuda":
        torch.cuda.synchronize()


def sample_graphed(prior, n: int, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """What `sample` does on CUDA without guidance: capture one graph per step for the batch, replay them
    (capture included in the time, as the command pays it)."""
    with GraphedSampler(prior, labels, n) as sampler:
        return sampler.sample(generator)


def bench_grid(grid: tuple[int, int], classes: int, device: torch.device, size: str, steps: int, ns: list[int],
               batch_size: int, repeats: int) -> dict:  # fmt: skip
    torch.manual_seed(0)
    ar = Transformer(512, grid, classes, **TRANSFORMER_SIZES[size]).to(device).eval()
    masked = MaskedPrior(512, grid, classes, **MASKGIT_SIZES[size]).to(device).eval()
    runs = {"autoregressive": lambda n: draw_all(sample_codes, ar, n, batch_size, device),
            "masked": lambda n: draw_all(sample_masked, masked, n, batch_size, device, steps=steps)}  # fmt: skip
    if device.type == "cuda":  # the autoregressive path `sample` takes on a GPU
        runs["autoregressive_cuda_graphs"] = lambda n: draw_all(sample_graphed, ar, n, batch_size, device)
    out = {"grid": f"{grid[0]}x{grid[1]}", "passes_per_grid_autoregressive": grid[0] * grid[1],
           "passes_per_grid_masked": steps, "params_autoregressive": sum(p.numel() for p in ar.parameters()),
           "params_masked": sum(p.numel() for p in masked.parameters())}  # fmt: skip
    with torch.inference_mode():
        for n in ns:
            best = {k: float("inf") for k in runs}
            for fn in runs.values():
                fn(min(n, batch_size))  # warm-up
            for _ in range(repeats):
                for k, fn in runs.items():
                    t = time.perf_counter()
                    fn(n)
                    best[k] = min(best[k], time.perf_counter() - t)
                    print(f"  {out['grid']} n={n} {k}: {time.perf_counter() - t:.3f} s", flush=True)
            for k in runs:
                out[f"n{n}_{k}_s"] = round(best[k], 4)
            out[f"n{n}_speedup_masked_over_ar"] = round(best["autoregressive"] / best["masked"], 2)
            if "autoregressive_cuda_graphs" in best:
                graphs = best["autoregressive_cuda_graphs"]
                out[f"n{n}_speedup_masked_over_ar_graphs"] = round(graphs / best["masked"], 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--size", default="small", choices=sorted(MASKGIT_SIZES))
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--n", type=int, nargs="+", default=[64, 1000])
    ap.add_argument("--batch_size", type=int, default=256, help="as `sample --batch_size` (its default)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--grids", nargs="+", default=list(GRIDS), choices=list(GRIDS))
    ap.add_argument("--json", default="benchmarks/results/maskgit_speed_cpu.json")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    result: dict = {**machine(device), "weights": "random (speed does not depend on them)", "size": a.size,
                    "batch_size": a.batch_size, "repeats": a.repeats, "timing": "codes only, best of repeats, "
                    "interleaved"}  # fmt: skip
    for name in a.grids:
        grid, classes = GRIDS[name]
        figures = bench_grid(grid, classes, device, a.size, a.steps, a.n, a.batch_size, a.repeats)
        result.update({f"{name}_{k}": v for k, v in figures.items()})
    report(result, a.json)


if __name__ == "__main__":
    main()
