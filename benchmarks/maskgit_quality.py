"""Sample quality of the masked-token prior vs the autoregressive Transformer: FID of 1,000 samples each.

    python benchmarks/maskgit_quality.py --ar runs/stage2_transformer/latest/checkpoints/best.ckpt \\
        --masked runs/stage2_maskgit/latest/checkpoints/best.ckpt

Both priors must come from the same codes (same stage 1) and configs that differ only in `kind` (same size,
batch, steps, optimiser: configs/stage2/fashion_mnist_{transformer,maskgit}.yaml). Equal training time is
checked here rather than assumed: both networks' training steps (forward, backward, AdamW on batches of
real codes) are timed in this process, interleaved, and their ratio reported.

Samples: n per prior and setting, classes in turn (as `sample --n`; --class_mix data: in the training
codes' proportions, which unbalanced data such as emoji need), --seed (0), for every --temperature
(token temperature, 1 by default) and --temperature_end (the last draw's, `sample --temperature_end`),
--cfg_scale (classifier-free guidance, 1 = off) and --cfg_schedule (constant, or linear: the scale grows
from 1 over the grid) given and, for the
masked prior (--steps passes), every --choice_temperature. FID with the project's feature net against the
test split and against the validation split, beside the real-data floor (n train images). Reported: the
defaults (no guidance, the sampler's default choice temperature) side by side, and each prior at its best
setting chosen on the validation FID (so the test split chooses nothing), with the ratio of their test FIDs.
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch
from _common import machine, report, stage1_splits  # also puts the repo root on sys.path

from common.codes import class_counts, load_split
from common.images import to_uint8
from stage2_prior.masked_sampling import DEFAULT_CHOICE_TEMPERATURE, sample_masked
from stage2_prior.maskgit import masked_token_loss, random_mask
from stage2_prior.sampling import CFG_SCHEDULES, sample_codes
from tools.drawing import labels_in_proportion
from tools.features import load_features
from tools.fid import fid
from tools.load import load_models
from tools.sample_scores import class_agreement


def training_maps_per_s(nets: dict, codes: torch.Tensor, labels: torch.Tensor, steps: int, rounds: int) -> dict:
    """Code maps per second of a training step (forward, loss, backward, AdamW) per network, interleaved.
    Trains copies: the networks given stay as they are."""
    nets = {k: copy.deepcopy(net) for k, net in nets.items()}
    size = min(128, len(codes))  # the configs' batch, or every code map of a small set
    opts = {k: torch.optim.AdamW(net.parameters(), lr=1e-4) for k, net in nets.items()}
    best = {k: float("inf") for k in nets}
    for r in range(rounds + 1):  # round 0: warm-up
        for k, net in nets.items():
            net.train()
            t = time.perf_counter()
            for i in range(steps):
                start = (i * size) % (len(codes) - size + 1)
                batch = slice(start, start + size)
                c, y = codes[batch], labels[batch]
                if k == "masked":
                    masked = random_mask(c.shape)
                    loss = masked_token_loss(net(c, masked, y), c, masked)["nll"]
                else:
                    loss = torch.nn.functional.cross_entropy(net(c, y), c)
                opts[k].zero_grad()
                loss.backward()
                opts[k].step()
            if r:
                best[k] = min(best[k], time.perf_counter() - t)
        for net in nets.values():
            net.eval()
    return {k: round(steps * size / v, 1) for k, v in best.items()}


def draw(sampler, prior, n: int, batch_size: int, seed: int, counts: list[int] | None = None,
         **kw) -> tuple[torch.Tensor, float, torch.Tensor]:  # fmt: skip
    """n grids, classes in turn, or in the proportions of `counts` (`sample --class_mix data`); the time; the
    classes drawn."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % prior.num_classes if prior.num_classes else None
    if counts is not None and labels is not None:
        labels = labels_in_proportion(counts, n, seed)
    t = time.perf_counter()
    out = [sampler(prior, len(y), y, generator=gen, **kw) for y in labels.split(batch_size)]
    return torch.cat(out), time.perf_counter() - t, labels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ar", default="runs/stage2_transformer/latest/checkpoints/best.ckpt")
    ap.add_argument("--masked", default="runs/stage2_maskgit/latest/checkpoints/best.ckpt")
    ap.add_argument("--dataset", default=None, help="default: the data stage 1 was trained on (its checkpoint's)")
    ap.add_argument("--root", default=None, help="default: stage 1's --data.root (give it if the data moved)")
    ap.add_argument("--codes", default="codes/fashion_mnist", help="the codes both priors were trained on")
    ap.add_argument("--features", default="auto")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--choice_temperature", type=float, nargs="+", default=[DEFAULT_CHOICE_TEMPERATURE])
    ap.add_argument("--cfg_scale", type=float, nargs="+", default=[1.0], help="guidance scales tried (1: off)")
    ap.add_argument("--temperature", type=float, nargs="+", default=[1.0],
                    help="token temperatures tried, for both priors alike (names gain _t<T> unless T = 1)")
    ap.add_argument("--temperature_end", nargs="+", default=["same"],
                    help="end temperatures tried with each --temperature (same: constant; names gain -<E>): "
                         "linear over the raster order, or the masked prior's steps")
    ap.add_argument("--cfg_schedule", nargs="+", default=["constant"], choices=CFG_SCHEDULES,
                    help="guidance schedules tried, for both priors alike (names gain _lin for linear)")
    ap.add_argument("--seed", type=int, default=0, help="seed of every draw (another seed: the FIDs' sampling noise)")
    ap.add_argument("--class_mix", choices=("turn", "data"), default="turn",
                    help="as `sample --class_mix`: classes in turn, or in the --codes train split's proportions")
    ap.add_argument("--batch_size", type=int, default=256)
    ap.add_argument("--train_steps", type=int, default=10, help="timed training steps per round and network")
    ap.add_argument("--json", default="benchmarks/results/maskgit_quality_cpu.json")
    a = ap.parse_args()
    ar, masked = load_models(a.ar, None, "cpu"), load_models(a.masked, None, "cpu")
    if ar.stage1_sha256 != masked.stage1_sha256:
        raise SystemExit("the two priors were trained on codes of different stage-1 checkpoints")
    train_codes, train_labels = load_split(a.codes, "train")
    codes = torch.from_numpy(np.asarray(train_codes[:5120], dtype=np.int64))
    labels = torch.from_numpy(np.asarray(train_labels[:5120], dtype=np.int64))
    result: dict = {**machine(), "ar": a.ar, "masked": a.masked, "n": a.n, "masked_steps": a.steps, "seed": a.seed,
                    "class_mix": a.class_mix}  # fmt: skip
    counts = class_counts(train_labels, ar.prior.num_classes) if a.class_mix == "data" else None
    speed = training_maps_per_s({"ar": ar.prior, "masked": masked.prior}, codes, labels, a.train_steps, 3)
    result.update({f"train_maps_per_s_{k}": v for k, v in speed.items()})
    result["train_step_time_ratio_masked_over_ar"] = round(speed["ar"] / speed["masked"], 3)

    data, dataset, root = stage1_splits(ar, a.dataset, a.root)
    features = load_features(a.features, dataset, root=root)
    result["features"] = features.description
    test_images, test_labels = data.split_arrays("test")
    f_test = features(test_images, "the test images")
    f_val = features(data.split_arrays("val")[0], "the validation images")
    train_images = data.split_arrays("train")[0]
    pick = np.random.default_rng(0).choice(len(train_images), min(a.n, len(train_images)), replace=False)
    pick = torch.from_numpy(np.sort(pick))
    f_floor = features(train_images[pick], "the train subset")
    result["fid_floor_test"] = round(fid(f_floor, f_test), 3)

    def score(name: str, codes: torch.Tensor, seconds: float, labels: torch.Tensor) -> None:
        with torch.inference_mode():
            images = torch.cat([ar.vqvae.decode_codes(c) for c in codes.split(a.batch_size)])
        f = features(to_uint8(images), "the samples")
        result[f"{name}_fid_test"], result[f"{name}_fid_val"] = round(fid(f, f_test), 3), round(fid(f, f_val), 3)
        agreement = class_agreement(features, f, labels.numpy(), f_test, test_labels.numpy())  # as evaluate samples
        if agreement["class_agreement"] is not None:
            result[f"{name}_class_agreement"] = round(agreement["class_agreement"], 4)
            result["class_agreement_floor_test"] = round(agreement["class_agreement_floor"], 4)
        result[f"{name}_sample_seconds"] = round(seconds, 2)
        print(f"{name}: FID test {result[f'{name}_fid_test']}, val {result[f'{name}_fid_val']}, "
              f"{seconds:.2f} s for {a.n}", flush=True)  # fmt: skip

    with torch.inference_mode():
        # cfg 1 is no guidance whatever the schedule: drawn once, named as constant; an end temperature equal
        # to the start is the constant temperature (None)
        ends = [None if e == "same" else float(e) for e in a.temperature_end]
        settings = {(t, None if e == t else e, c, "constant" if c == 1 else s)
                    for t in a.temperature for e in ends for c in a.cfg_scale for s in a.cfg_schedule}  # fmt: skip
        for temp, end, cfg, sched in sorted(settings, key=lambda x: (-x[0], x[1] or 0, x[2], x[3])):
            tag = ("" if temp == 1 and end is None else f"_t{temp:g}") + ("" if end is None else f"-{end:g}")
            tag += "_lin" if sched == "linear" else ""
            kw = dict(cfg_scale=cfg, temperature=temp, temperature_end=end, cfg_schedule=sched)
            score(f"ar_cfg{cfg:g}{tag}", *draw(sample_codes, ar.prior, a.n, a.batch_size, a.seed, counts, **kw))
            for ct in a.choice_temperature:
                kw_masked = dict(steps=a.steps, choice_temperature=ct, **kw)
                name = f"masked_cfg{cfg:g}_ct{ct:g}{tag}"
                score(name, *draw(sample_masked, masked.prior, a.n, a.batch_size, a.seed, counts, **kw_masked))
    # the defaults (no guidance, the sampler's choice temperature), then each prior at its best setting on val
    default = f"masked_cfg1_ct{DEFAULT_CHOICE_TEMPERATURE:g}"
    if "ar_cfg1_fid_test" in result and f"{default}_fid_test" in result:
        ratio = result[f"{default}_fid_test"] / result["ar_cfg1_fid_test"]
        result["defaults_fid_ratio_masked_over_ar"] = round(ratio, 3)
    for kind in ("ar", "masked"):
        names = [k[: -len("_fid_val")] for k in result if k.startswith(f"{kind}_") and k.endswith("_fid_val")]
        best = min(names, key=lambda k: result[f"{k}_fid_val"])
        result[f"best_on_val_{kind}"], result[f"best_on_val_{kind}_fid_test"] = best, result[f"{best}_fid_test"]
        if f"{best}_class_agreement" in result:
            result[f"best_on_val_{kind}_class_agreement"] = result[f"{best}_class_agreement"]
    result["best_on_val_fid_ratio_masked_over_ar"] = round(result["best_on_val_masked_fid_test"]
                                                           / result["best_on_val_ar_fid_test"], 3)  # fmt: skip
    report(result, a.json)


if __name__ == "__main__":
    main()
