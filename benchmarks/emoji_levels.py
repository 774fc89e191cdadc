"""Two levels against one (the bottom grid alone) on emoji-64 at equal training time, through the real commands.

Variants: two levels (8x8 top + 16x16 bottom), the same with the bottom conditioned on the top (VQ-VAE-2's
`--model.condition_levels true`) and one level (the bottom grid alone, emoji.yaml's default).
For each variant: `train_stage1` (configs/stage1/emoji.yaml with the variant's levels) for the
same wall-clock budget, `extract_codes`, `train_stage2` (configs/stage2/emoji_transformer.yaml) for the same
budget, then `evaluate stage1` (test PSNR/SSIM/codes used), `evaluate prior` (test bits per dimension,
summed over the levels), `sample --n N --class_mix data` and `evaluate samples` (FID in the emoji feature net beside the
real-data floor). Both budgets are `--trainer.max_time` with the time-based cosine (common/optim.py), so
each variant ends its schedule at the same moment whatever its cost per step. Run one variant at a time on
a quiet machine; prints a table, writes JSON.

    python benchmarks/emoji_levels.py --stage1_time 00:00:05:00 --prior_time 00:00:05:00 --out /tmp/emoji_levels
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

from _common import machine, report  # also puts the repo root on sys.path

TWO_LEVELS = '[{"name": "bottom", "downsample": 4}, {"name": "top", "downsample": 8}]'
VARIANTS = {  # the extra arguments of each variant's train_stage1 (configs/stage1/emoji.yaml has one level)
    "two_levels": ["--model.levels", TWO_LEVELS],
    "one_level": ["--model.levels", '[{"name": "bottom", "downsample": 4}]'],
    "two_levels_conditioned": ["--model.levels", TWO_LEVELS, "--model.condition_levels", "true"],  # VQ-VAE-2's
}


def run(cmd: list[str]) -> float:
    """Run one command (its output to ours), fail loudly, return its wall time in seconds."""
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def variant(name: str, extra: list[str], a: argparse.Namespace) -> dict:
    py, out = sys.executable, Path(a.out) / name
    s1, s2 = out / "stage1/latest/checkpoints/last.ckpt", out / "stage2/latest/checkpoints/best.ckpt"
    emoji = ["--data.dataset", "emoji", "--data.val_size", "0", "--data.test_size", "0"]
    walls = {
        "stage1_s": run([py, "-m", "stage1_vqvae.train", "fit", "--config", "configs/stage1/emoji.yaml",
                         *extra, "--trainer.max_steps", "1000000",
                         "--trainer.max_time", a.stage1_time, "--trainer.default_root_dir", str(out / "stage1"),
                         "--log.backend", "csv"]),
        "extract_s": run([py, "-m", "stage1_vqvae.extract", "--ckpt", str(s1), "--out", str(out / "codes")]),
        "prior_s": run([py, "-m", "stage2_prior.train", "fit", "--config", "configs/stage2/emoji_transformer.yaml",
                        "--data.codes_dir", str(out / "codes"), "--trainer.max_steps", "1000000",
                        "--trainer.max_time", a.prior_time, "--trainer.default_root_dir", str(out / "stage2"),
                        "--log.backend", "csv"]),
    }  # fmt: skip
    run([py, "-m", "tools.evaluate", "stage1", "--ckpt", str(s1), "--features", a.features,
         "--json", str(out / "eval_stage1.json")])  # fmt: skip
    run([py, "-m", "tools.evaluate", "prior", "--ckpt", str(s2), "--codes", str(out / "codes"),
         "--json", str(out / "eval_prior.json")])  # fmt: skip
    walls["sample_s"] = run([py, "-m", "tools.sample", "--prior", str(s2), "--n", str(a.n), "--class_mix", "data",
                             "--out", str(out / "samples.npz")])  # fmt: skip (the data's classes: see README)
    run([py, "-m", "tools.evaluate", "samples", "--samples", str(out / "samples.npz"), *emoji, "--features",
         a.features, "--json", str(out / "eval_samples.json")])  # fmt: skip
    st1, pr, sm = (json.loads((out / f"eval_{k}.json").read_text()) for k in ("stage1", "prior", "samples"))
    levels_used = {lv["name"]: f"{lv['codes_used']}/{lv['codebook_size']}" for lv in st1.get("levels", [])}
    return {
        f"{name}_test_psnr_db": round(st1["psnr_db"], 2), f"{name}_test_ssim": round(st1["ssim"], 4),
        f"{name}_codes_used": levels_used or f"{st1['codes_used']}/{st1['codebook_size']}",
        f"{name}_codes_per_image": math.prod(json.loads((out / "codes/meta.json").read_text())["grid_shape"]),
        f"{name}_test_bits_per_dim": round(pr["bits_per_dim"], 5),
        f"{name}_test_bits_per_code": round(pr["bits_per_code"], 4),
        f"{name}_sample_fid": round(sm["fid"], 2), f"{name}_fid_floor": round(sm["fid_floor"], 2),
        **{f"{name}_{k}": round(v, 1) for k, v in walls.items()},
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stage1_time", default="00:00:05:00", help="each variant's stage-1 budget (DD:HH:MM:SS)")
    ap.add_argument("--prior_time", default="00:00:05:00", help="each variant's prior budget (DD:HH:MM:SS)")
    ap.add_argument("--n", type=int, default=1000, help="samples for the FID")
    ap.add_argument("--features", default="runs/feature_net/emoji.pt", help="the emoji feature net")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="which of: " + ", ".join(VARIANTS))
    ap.add_argument("--out", default="runs/emoji_levels", help="folder for both variants' runs (must be new)")
    ap.add_argument("--json", default="benchmarks/results/emoji_levels_cpu.json")
    a = ap.parse_args()
    if Path(a.out).exists():
        sys.exit(f"emoji_levels: error: --out {a.out} exists; name a new folder")
    result = {"stage1_time": a.stage1_time, "prior_time": a.prior_time, "samples": a.n}
    for name in a.variants.split(","):
        result.update(variant(name, VARIANTS[name], a))
    report({**result, **machine("cpu")}, a.json)


if __name__ == "__main__":
    main()
