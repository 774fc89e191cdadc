"""Throughput of `extract_codes` on the real Fashion-MNIST (train + val + test = 70,000 images).

    python benchmarks/extract_throughput.py                      # default stage-1 config, random init
    python benchmarks/extract_throughput.py --ckpt best.ckpt     # a trained checkpoint
    python benchmarks/extract_throughput.py --batch_size 256 512 1024 --repeats 3 --json out.json
    python benchmarks/extract_throughput.py --pixels_per_pass 0 262144 --repeats 3   # one pass a batch vs passes

Runs `stage1_vqvae.extract.extract_codes` (the function behind the console script: Lightning predict loop,
CodesWriter) into a temporary directory. The figure is end to end: Trainer setup, hashing the checkpoint,
encoding and writing, with the images already in memory (reading the IDX files is not timed). Random
weights encode as fast as trained ones (same operations), but their codes mean nothing.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import yaml
from _common import ROOT, machine, write_result  # also puts the repo root on sys.path

from common.readers import SPLITS
from common.splits import data_options
from stage1_vqvae.extract import SKIPPED_DATA_ARGS, extract_codes, make_datamodule
from stage1_vqvae.model import load_stage1
from stage1_vqvae.vqvae import VQVAE

CONFIG = ROOT / "configs" / "stage1" / "fashion_mnist.yaml"


def random_checkpoint(folder: Path) -> Path:
    """A checkpoint of the default Fashion-MNIST stage-1 model with random weights."""
    config = yaml.safe_load(CONFIG.read_text())
    torch.manual_seed(0)
    model = VQVAE(in_channels=1, image_size=28, **config["model"])
    path = folder / "random_stage1.ckpt"
    data = {k: v for k, v in config["data"].items() if k != "batch_size"}
    torch.save(
        {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
         "datamodule_hyper_parameters": data, "pytorch-lightning_version": "2.6.0"},
        path,
    )  # fmt: skip
    return path


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="stage-1 checkpoint (default: the default config with random weights)")
    p.add_argument("--root", help="folder holding the Fashion-MNIST IDX files (default: found automatically)")
    p.add_argument("--batch_size", type=int, nargs="+", default=[512], help="one row each, runs interleaved")
    p.add_argument("--pixels_per_pass", type=int, nargs="+", default=[None],
                   help="the model's pixels per encoding pass (0 = the whole batch; default: the model's own)")
    p.add_argument("--accelerator", default="cpu", help="cpu (the figure we track), cuda, auto")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=1, help="report the best of this many runs")
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "extract_throughput.json"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(args.ckpt) if args.ckpt else random_checkpoint(Path(tmp))
        model, saved = load_stage1(ckpt)
        data_args = data_options(saved, skip=SKIPPED_DATA_ARGS)
        data_args.setdefault("dataset", "fashion_mnist")
        if args.root:
            data_args["root"] = args.root
        datamodule = make_datamodule(model, **data_args)
        n = sum(len(datamodule.split_arrays(s)[1]) for s in SPLITS)  # read the files before timing
        times: dict[tuple, list[float]] = {(b, px): [] for b in args.batch_size for px in args.pixels_per_pass}
        for _ in range(args.repeats):  # interleaved: shared cores slow all settings alike
            for b, px in times:
                model.pixels_per_pass = None if px is None else px or 1 << 62
                t0 = time.perf_counter()
                extract_codes(model, datamodule, Path(tmp) / "codes", ckpt, SPLITS, b, overwrite=True,
                              accelerator=args.accelerator)  # fmt: skip
                times[b, px].append(time.perf_counter() - t0)
    rows = [
        {"batch_size": b, "pixels_per_pass": "default" if px is None else px or "whole batch",
         "seconds": round(min(t), 3), "images_per_s": round(n / min(t), 1), "all_seconds": [round(x, 3) for x in t]}
        for (b, px), t in times.items()
    ]  # fmt: skip
    result = {
        "images": n,
        "images_per_s": rows[0]["images_per_s"],  # the first --batch_size (default: extract_codes' default)
        "rows": rows,
        "weights": str(ckpt) if args.ckpt else "random init (throughput only)",
        "model": {"parameters": sum(p.numel() for p in model.parameters()), "grid_shape": model.grid_shape,
                  "codebook_size": model.codebook_size},  # (a plain VQModel: no hparams since load_stage1)
        "accelerator": args.accelerator,
        **machine("cuda" if args.accelerator in ("cuda", "gpu") else "cpu"),
    }
    print(f"\nextract_codes throughput, Fashion-MNIST train+val+test, weights: {result['weights']}")
    print(f"{'images':>8} {'seconds':>8} {'images/s':>9} {'threads':>7} {'batch':>6} {'pixels/pass':>12}")
    for r in rows:
        print(f"{n:>8} {r['seconds']:>8.2f} {r['images_per_s']:>9.0f} {result['threads']:>7} {r['batch_size']:>6} "
              f"{r['pixels_per_pass']:>12}")
    print(f"written to {write_result(args.json, result)}")
    return result


if __name__ == "__main__":
    main()
