"""Priors over two levels at equal training time: one sequence (top, then bottom) vs two priors (VQ-VAE-2).

    python benchmarks/level_priors.py --codes codes/emoji --seconds 600

* joint: one Transformer over the whole sequence, top codes then bottom codes, one KV cache; trained for
  ``--seconds``.
* separate (VQ-VAE-2): a top prior over the top codes alone, and a bottom prior that predicts only the
  bottom codes, conditioned on all top codes (they are its prefix: the loss ignores the top positions);
  each trained for ``--seconds / 2``.

Both use the same network size, batch, learning rate and a cosine schedule over wall-clock time, on the
same machine, one after the other. Prints test bits per dimension (all levels summed, over the image's
pixels x channels, the figure ``evaluate prior`` reports) and each level's share; writes JSON.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _common import ROOT, machine, write_result  # also puts the repo root on sys.path

from common.codes import load_split, read_meta
from stage2_prior.build import build_network


def train_for(net, codes: torch.Tensor, labels: torch.Tensor, loss_from: int, seconds: float, args) -> int:
    """Train `net` on codes (N, 1, T) for `seconds` of wall time; the loss covers positions >= loss_from."""
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(args.seed)
    net.train()
    t0, step = time.perf_counter(), 0
    while (elapsed := time.perf_counter() - t0) < seconds:
        warm = min(1.0, (step + 1) / 100)
        for group in opt.param_groups:  # warm-up, then cosine over the time budget
            group["lr"] = args.lr * warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * elapsed / seconds)))
        idx = torch.randint(0, len(codes), (args.batch_size,), generator=gen)
        x, y = codes[idx], labels[idx].clone()
        y[torch.rand(len(y), generator=gen) < 0.1] = -1  # label dropout, as train_stage2 does
        logits = net(x, y)  # (B, K, 1, T)
        loss = F.cross_entropy(logits[..., loss_from:].float(), x[..., loss_from:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
    return step


@torch.no_grad()
def bits_per_position(net, codes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean test NLL in bits at every position, (T,)."""
    net.eval()
    total = torch.zeros(codes.shape[-1])
    for x, y in zip(codes.split(256), labels.split(256)):
        nll = F.cross_entropy(net(x, y).float(), x, reduction="none")  # (B, 1, T) nats
        total += nll.sum((0, 1)) / math.log(2)
    return total / len(codes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--codes", default="codes/emoji", help="a codes directory with two levels")
    ap.add_argument("--seconds", type=float, default=600.0, help="training time of each variant")
    ap.add_argument("--size", default="small")
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/level_priors_cpu.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = read_meta(args.codes)
    if len(meta.levels) != 2:
        raise SystemExit(f"--codes {args.codes}: needs two levels, it has {len(meta.levels)}")
    top_len = meta.levels[0]["grid_shape"][0] * meta.levels[0]["grid_shape"][1]
    (train, train_y), (test, test_y) = (load_split(args.codes, s) for s in ("train", "test"))
    train, test = (torch.from_numpy(np.asarray(c, np.int64)) for c in (train, test))  # (N, 1, T)
    train_y, test_y = torch.from_numpy(train_y), torch.from_numpy(test_y)
    dims = meta.image_size**2 * meta.channels
    k, classes, seq = meta.codebook_size, meta.num_classes, tuple(meta.grid_shape)

    def net_for(grid):
        torch.manual_seed(args.seed)
        return build_network("transformer", args.size, k, grid, classes, {})

    results = {"codes": args.codes, "levels": meta.levels, "seconds_each_variant": args.seconds,
               "size": args.size, "batch_size": args.batch_size, "machine": machine()}  # fmt: skip
    joint = net_for(seq)
    steps = train_for(joint, train, train_y, 0, args.seconds, args)
    bits = bits_per_position(joint, test, test_y)
    results["joint"] = {"steps": steps, "top_bits_per_dim": float(bits[:top_len].sum()) / dims,
                        "bottom_bits_per_dim": float(bits[top_len:].sum()) / dims}  # fmt: skip
    top, bottom = net_for((1, top_len)), net_for(seq)
    steps_top = train_for(top, train[..., :top_len], train_y, 0, args.seconds / 2, args)
    steps_bottom = train_for(bottom, train, train_y, top_len, args.seconds / 2, args)
    results["separate"] = {
        "steps_top": steps_top, "steps_bottom": steps_bottom,
        "top_bits_per_dim": float(bits_per_position(top, test[..., :top_len], test_y).sum()) / dims,
        "bottom_bits_per_dim": float(bits_per_position(bottom, test, test_y)[top_len:].sum()) / dims,
    }  # fmt: skip
    print(f"{'variant':<10} {'steps':>12} {'top':>8} {'bottom':>8} {'bits/dim':>9}")
    for name in ("joint", "separate"):
        r = results[name]
        r["bits_per_dim"] = r["top_bits_per_dim"] + r["bottom_bits_per_dim"]
        steps = str(r["steps"]) if name == "joint" else f"{r['steps_top']}+{r['steps_bottom']}"
        print(f"{name:<10} {steps:>12} {r['top_bits_per_dim']:8.4f} {r['bottom_bits_per_dim']:8.4f} "
              f"{r['bits_per_dim']:9.4f}")  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_result(args.out, results)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
