"""Stage 1 with and without VQGAN's adversarial loss (`--model.adversarial_weight`), through the real commands.

For each variant: `train_stage1 fit` (configs/stage1/emoji.yaml at --image_size, the same seed and the same number
of steps; `--trainer.max_time null`, so the cosine follows the step alone and each run is deterministic whatever the
machine's load), then `evaluate stage1` on the validation and test splits: PSNR, SSIM, codes used and the
reconstruction FID in the emoji feature net of that size (runs/feature_net/emoji32.pt at 32 px). Steps, not time,
are equal: the discriminator makes a step dearer, and the wall times say by how much. Prints a table, writes JSON.

    python benchmarks/stage1_adversarial.py --steps 3000 --out /tmp/adv_runs/bench \\
        --json benchmarks/results/stage1_adversarial_emoji32_cpu.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from _common import ROOT, machine, report  # also puts the repo root on sys.path

START = ["--model.adversarial_start", "1000"]  # a third of the run: the reconstructions are coarse but no longer noise
VARIANTS = {  # the extra arguments of each variant's train_stage1
    "plain": [],
    "adversarial_w0.1": ["--model.adversarial_weight", "0.1", *START],
    "adversarial_w0.8": ["--model.adversarial_weight", "0.8", *START],  # taming's ImageNet disc_weight
}


def run(cmd: list[str]) -> float:
    """Run one command (its output to ours), fail loudly, return its wall time in seconds."""
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    return time.perf_counter() - t0


def variant(name: str, extra: list[str], a: argparse.Namespace) -> dict:
    py, out = sys.executable, Path(a.out) / name
    ckpt = out / "stage1/latest/checkpoints/last.ckpt"
    wall = run([py, "-m", "stage1_vqvae.train", "fit", "--config", "configs/stage1/emoji.yaml", "--data.image_size",
                str(a.image_size), "--trainer.max_steps", str(a.steps), "--trainer.max_time", "null",
                "--trainer.default_root_dir", str(out / "stage1"), "--log.backend", "csv", *extra])  # fmt: skip
    result = {f"{name}_args": " ".join(extra) or "(none)", f"{name}_train_s": round(wall, 1),
              f"{name}_images_per_s": round(a.steps * 32 / wall, 1)}  # fmt: skip  (emoji.yaml's batch of 32)
    for split in ("val", "test"):
        scores = out / f"eval_{split}.json"
        run([py, "-m", "tools.evaluate", "stage1", "--ckpt", str(ckpt), "--features", a.features, "--split", split,
             "--json", str(scores), "--overwrite"])  # fmt: skip
        s, key = json.loads(scores.read_text()), f"{name}_{split}"
        result |= {f"{key}_psnr_db": round(s["psnr_db"], 2), f"{key}_ssim": round(s["ssim"], 4),
                   f"{key}_rfid": round(s["fid_recon"], 2), f"{key}_codes_used": s["codes_used"]}  # fmt: skip
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--image_size", type=int, default=32)
    p.add_argument("--features", default="runs/feature_net/emoji32.pt", help="the emoji feature net of that size")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", required=True, help="a folder outside the repository for the runs")
    p.add_argument("--json")
    a = p.parse_args()
    result = {"benchmark": "stage1_adversarial", "date": time.strftime("%Y-%m-%d"), **machine(),
              "config": "configs/stage1/emoji.yaml", "image_size": a.image_size, "steps": a.steps}  # fmt: skip
    for name in a.variants.split(","):
        result |= variant(name, VARIANTS[name], a)
    report(result, a.json)


if __name__ == "__main__":
    main()
