"""Training step time in fp32 and under CPU bf16 autocast (what `--cpu_bf16` chooses), for every CPU config's
network, interleaved in one process so the ratios are fair on a shared machine.

    python benchmarks/cpu_bf16.py [--repeats 3] [--steps 10]

Each config's network at its batch size on random data of its shape (the speed does not depend on the
values): stage 1 (MSE + quantizer loss, channels_last as configured) and the priors (cross-entropy; the
masked prior's masked-token loss under its cosine schedule), forward + backward + AdamW, as Lightning's
bf16-mixed runs them (autocast around the forward and the loss, fp32 weights). Prints whether this CPU has
native bf16 (`common.precision.cpu_has_native_bf16`); without it bf16 is emulated and the ratios fall below 1.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _common import ROOT, load_config, machine, report  # also puts the repo root on sys.path

from common.precision import cpu_has_native_bf16
from stage1_vqvae.vqvae import VQVAE
from stage2_prior.build import build_network
from stage2_prior.maskgit import masked_token_loss, random_mask

STAGE1 = {"fashion_mnist": (1, 28), "emoji": (3, 64)}  # config -> (channels, image size)
PRIORS = {  # config -> (grid, classes)
    "fashion_mnist_transformer": ((7, 7), 10), "fashion_mnist_pixelcnn": ((7, 7), 10),
    "fashion_mnist_maskgit": ((7, 7), 10), "emoji_transformer": ((16, 16), 9), "emoji_maskgit": ((16, 16), 9),
}  # fmt: skip
STAGE1_ONLY = ("lr", "weight_decay", "warmup_steps", "cosine")  # the optimiser's, not the network's


def stage1_step(name: str) -> tuple[Callable[[bool], None], int]:
    cfg = load_config(str(ROOT / f"configs/stage1/{name}.yaml"), [])
    channels, size = STAGE1[name]
    model_args = {k: v for k, v in cfg["model"].items() if k not in STAGE1_ONLY}
    model = VQVAE(in_channels=channels, image_size=size, **model_args)
    cl = bool(model_args.get("channels_last"))
    if cl:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    batch = cfg["data"]["batch_size"]
    x = torch.rand(batch, channels, size, size) * 2 - 1
    x = x.contiguous(memory_format=torch.channels_last) if cl else x

    def step(bf16: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            recon, qs = model(x)  # one Quantized per level
            loss = F.mse_loss(recon.float(), x) + sum(q.loss for q in qs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, batch


def prior_step(name: str) -> tuple[Callable[[bool], None], int]:
    cfg = load_config(str(ROOT / f"configs/stage2/{name}.yaml"), [])
    grid, classes = PRIORS[name]
    m = cfg["model"]
    net = build_network(m["kind"], m.get("size", "small"), 512, grid, classes, {"dropout": m.get("dropout")})
    opt = torch.optim.AdamW(net.parameters(), 1e-3)
    batch = cfg["data"]["batch_size"]
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 512, (batch, *grid), generator=gen)
    labels = torch.randint(0, classes, (batch,), generator=gen)

    def step(bf16: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if m["kind"] == "maskgit":
                masked = random_mask(codes.shape, gen, codes.device)
                loss = masked_token_loss(net(codes, masked, labels), codes, masked)["nll"]
            else:
                loss = F.cross_entropy(net(codes, labels).float(), codes)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, batch


def best_seconds(step: Callable[[bool], None], bf16: bool, steps: int) -> float:
    step(bf16)  # warm-up: oneDNN picks its kernels for these shapes
    t0 = time.perf_counter()
    for _ in range(steps):
        step(bf16)
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="fp32/bf16 pairs per config; the best of each is kept")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    ap.add_argument("--json", default="benchmarks/results/cpu_bf16_cpu.json")
    a = ap.parse_args()
    result: dict = {**machine("cpu"), "native_bf16": cpu_has_native_bf16()}
    benches = [(f"stage1/{n}", stage1_step, n) for n in STAGE1] + [(f"stage2/{n}", prior_step, n) for n in PRIORS]
    for label, make, name in benches:
        torch.manual_seed(0)
        step, batch = make(name)
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(a.repeats):
            for bf16 in (False, True):  # interleaved: the machine's noise hits both alike
                times[bf16].append(best_seconds(step, bf16, a.steps))
        fp32, bf16 = min(times[False]), min(times[True])
        unit = "images" if label.startswith("stage1") else "maps"
        result[f"{label} fp32 {unit}/s"] = round(batch / fp32, 1)
        result[f"{label} bf16 {unit}/s"] = round(batch / bf16, 1)
        result[f"{label} bf16 speed-up"] = round(fp32 / bf16, 2)
        print(f"{label}: batch {batch}, fp32 {fp32 * 1e3:.1f} ms, bf16 {bf16 * 1e3:.1f} ms a step: "
              f"{fp32 / bf16:.2f}x", flush=True)  # fmt: skip
    report(result, a.json)


if __name__ == "__main__":
    main()
