"""Start-up: process wall time of each model command, beside `python -c "import torch"` in the same run.

    python benchmarks/startup.py                          # default Fashion-MNIST configs, random weights
    python benchmarks/startup.py --baseline /tmp/old      # also time `sample` of another checkout

A user who samples, compresses or scores one image should wait for the model, not for imports. Every
figure is the wall time of a fresh process (the median of --repeats runs, interleaved), so what Python
imports counts as much as the work: `sample --n 64`, `compress` / `decompress` of one image,
`score_anomalies` of one image and `evaluate prior` on 1,000 test code maps, with checkpoints of the
default configs (random weights: the same shapes and cost as trained ones). `import pytorch_lightning` is
timed too, as the cost the model commands avoid.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import yaml
from _common import ROOT, machine, report  # also puts the repo root on sys.path
from PIL import Image

from common.codes import CodesMeta, sha256_file
from common.codes_writer import CodesWriter
from stage1_vqvae.vqvae import VQVAE
from stage2_prior.prior import Prior


def checkpoints(tmp: Path) -> dict[str, str]:
    """Default-config stage 1 and Transformer prior (random weights), a codes dir, one image, one .vqz."""
    torch.manual_seed(0)
    s1 = yaml.safe_load((ROOT / "configs/stage1/fashion_mnist.yaml").read_text())["model"]
    s2 = yaml.safe_load((ROOT / "configs/stage2/fashion_mnist_transformer.yaml").read_text())["model"]
    vqvae = VQVAE(in_channels=1, image_size=28, **s1)
    stage1 = tmp / "stage1.ckpt"
    version = {"pytorch-lightning_version": pl.__version__}  # what load_from_checkpoint wants (the baseline)
    torch.save({"state_dict": vqvae.state_dict(), "hyper_parameters": dict(vqvae.hparams), **version}, stage1)
    meta = CodesMeta(codebook_size=vqvae.codebook_size, grid_shape=vqvae.grid_shape, num_classes=10,
                     class_names=[str(i) for i in range(10)], image_size=28, channels=1,
                     stage1_ckpt=str(stage1), stage1_sha256=sha256_file(stage1))  # fmt: skip
    rng = np.random.default_rng(0)
    with CodesWriter(tmp / "codes", meta) as writer:
        writer.add_split("test", 1000).write(0, rng.integers(0, meta.codebook_size, (1000, 7, 7)), np.arange(1000) % 10)
        writer.commit()
    prior = Prior(meta.codebook_size, meta.grid_shape, 10, codes_meta=asdict(meta), **s2)
    torch.save({"state_dict": prior.state_dict(), "hyper_parameters": dict(prior.hparams), **version},
               tmp / "prior.ckpt")  # fmt: skip
    Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(tmp / "one.png")
    return {"stage1": str(stage1), "prior": str(tmp / "prior.ckpt"), "codes": str(tmp / "codes"),
            "image": str(tmp / "one.png"), "tmp": str(tmp)}  # fmt: skip


def commands(f: dict[str, str], baseline: str | None) -> dict[str, tuple[list[str], str]]:
    """name -> (python arguments, PYTHONPATH). Each writes into a fresh name under tmp (--overwrite)."""
    py = [sys.executable]
    run = "import sys; from {m} import {fn}; {fn}(sys.argv[1:])"
    out = f["tmp"]
    cmds = {
        "import torch": (py + ["-c", "import torch"], str(ROOT)),
        "import pytorch_lightning": (py + ["-c", "import pytorch_lightning"], str(ROOT)),
        "sample --n 64": (py + ["-c", run.format(m="tools.sample", fn="main"), "--prior", f["prior"], "--n", "64",
                                "--out", f"{out}/s.png", "--overwrite", "--device", "cpu"], str(ROOT)),
        "compress 1 image": (py + ["-c", run.format(m="tools.compress", fn="main_compress"), f["image"], "--prior",
                                   f["prior"], "--out", f"{out}/one.vqz", "--overwrite"], str(ROOT)),
        "decompress 1 image": (py + ["-c", run.format(m="tools.compress", fn="main_decompress"), f"{out}/one.vqz",
                                     "--prior", f["prior"], "--out", f"{out}/dec", "--overwrite"], str(ROOT)),
        "score_anomalies 1 image": (py + ["-c", run.format(m="tools.anomaly", fn="main"), f["image"], "--prior",
                                          f["prior"], "--out", f"{out}/a.csv", "--overwrite", "--device", "cpu"],
                                    str(ROOT)),
        "evaluate prior (1,000 maps)": (py + ["-c", run.format(m="tools.evaluate", fn="main"), "prior", "--ckpt",
                                              f["prior"], "--codes", f["codes"], "--device", "cpu"], str(ROOT)),
    }  # fmt: skip
    if baseline:
        module = "stage2_prior.sample" if (Path(baseline) / "stage2_prior" / "sample.py").exists() else "tools.sample"
        argv = ["--prior", f["prior"], "--n", "64", "--out", f"{out}/b.png", "--device", "cpu"]
        cmds["sample --n 64 (baseline)"] = (py + ["-c", run.format(m=module, fn="main"), *argv], baseline)
    return cmds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--baseline", default=None, help="another checkout whose `sample` is timed in the same run")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "startup_cpu.json"))
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        files = checkpoints(Path(tmp))
        cmds = commands(files, a.baseline)
        times: dict[str, list[float]] = {name: [] for name in cmds}
        for _ in range(a.repeats):  # interleaved: a busy moment slows every command alike
            for name, (argv, path) in cmds.items():
                for stale in Path(tmp).glob("b.*"):
                    stale.unlink()  # the baseline has no --overwrite
                env = {**os.environ, "PYTHONPATH": path}
                t0 = time.perf_counter()
                proc = subprocess.run(argv, env=env, cwd=tmp, capture_output=True, text=True)
                times[name].append(time.perf_counter() - t0)
                if proc.returncode != 0:
                    raise SystemExit(f"{name} failed:\n{proc.stderr[-2000:]}")
    result = {**machine(torch.device("cpu")), "repeats": a.repeats, "weights": "random (default configs)"}
    for name, ts in times.items():
        result[f"{name} median_s"] = round(statistics.median(ts), 3)
        result[f"{name} min_s"] = round(min(ts), 3)
    base = result["import torch median_s"]
    for name in times:
        result[f"{name} over_import_torch_s"] = round(result[f"{name} median_s"] - base, 3)
    report(result, a.json)


if __name__ == "__main__":
    main()
