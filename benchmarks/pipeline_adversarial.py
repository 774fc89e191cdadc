"""Does stage 1's adversarial loss improve the pipeline's SAMPLES, not only its reconstructions? Real commands.

Takes the stage-1 checkpoints benchmarks/stage1_adversarial.py leaves (plain and W 0.1, 3,000 emoji-32 steps each,
seed 0) and, for each: `extract_codes`, `train_stage2` (configs/stage2/emoji_transformer.yaml, the 32-px demo's
batch of 64 maps, --steps steps with `--trainer.max_time null`, so both priors follow the same step-based cosine
whatever the machine's load), `evaluate prior` (test bits per code of best.ckpt), then for each sampling seed and
guidance scale `sample --n N --class_mix data` (temperature 1) and `evaluate samples` (FID, KID, precision/recall,
classifier score beside the real-data floor, in runs/feature_net/emoji32.pt). A step whose output exists is
skipped (its wall time is read back from walls_<variant>.json), so an interrupted run resumes, and --jobs 2 runs
both variants at once (one thread each: set OMP_NUM_THREADS=1). Prints a table, writes JSON.

    OMP_NUM_THREADS=1 python benchmarks/pipeline_adversarial.py --stage1 /tmp/adv_runs/bench --out /tmp/advfid \\
        --steps 1500 --jobs 2 --json benchmarks/results/pipeline_adversarial_emoji32_cpu.json

A second stage-1 training seed: `train_stage1 fit` as stage1_adversarial.py runs it plus `--seed_everything 1` and
`--trainer.default_root_dir DIR/<variant>/stage1`, then this script with `--stage1 DIR --out DIR`; the results file
quoted in the README holds both seeds' outputs merged under s1seed0_ / s1seed1_ prefixes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _common import ROOT, machine, report  # also puts the repo root on sys.path

VARIANTS = ("plain", "adversarial_w0.1")  # benchmarks/stage1_adversarial.py's run names
SCORES = ("fid", "fid_floor", "kid", "kid_floor", "precision", "recall", "precision_floor", "recall_floor",
          "class_score", "class_score_floor", "class_agreement", "class_agreement_floor")  # fmt: skip


def step(walls: dict, key: str, done: Path, cmd: list[str], log: Path, wall_file: Path) -> None:
    """Run one command (its output to `log`) unless `done` exists; record its wall time under `key`."""
    if done.exists() and key in walls:
        return
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    with open(log, "a") as f:
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    walls[key] = round(time.perf_counter() - t0, 1)
    wall_file.write_text(json.dumps(walls, indent=2) + "\n")


def variant(name: str, a: argparse.Namespace) -> dict:
    py, out = sys.executable, Path(a.out)
    codes, prior_dir = out / f"codes_{name}", out / f"prior_{name}"
    prior = prior_dir / "latest/checkpoints/best.ckpt"
    wall_file = out / f"walls_{name}.json"
    walls = json.loads(wall_file.read_text()) if wall_file.exists() else {}
    log = out / f"{name}.log"
    step(walls, "extract_s", codes / "meta.json",
         [py, "-m", "stage1_vqvae.extract", "--ckpt", f"{a.stage1}/{name}/stage1/latest/checkpoints/last.ckpt",
          "--out", str(codes)], log, wall_file)  # fmt: skip
    step(walls, "prior_s", prior,
         [py, "-m", "stage2_prior.train", "fit", "--config", "configs/stage2/emoji_transformer.yaml",
          "--data.codes_dir", str(codes), "--data.batch_size", "64", "--trainer.max_steps", str(a.steps),
          "--trainer.max_time", "null", "--trainer.default_root_dir", str(prior_dir), "--log.backend", "csv"],
         log, wall_file)  # fmt: skip
    step(walls, "eval_prior_s", out / f"{name}_prior.json",
         [py, "-m", "tools.evaluate", "prior", "--ckpt", str(prior), "--codes", str(codes),
          "--json", str(out / f"{name}_prior.json")], log, wall_file)  # fmt: skip
    pr = json.loads((out / f"{name}_prior.json").read_text())
    result = {f"{name}_test_bits_per_code": round(pr["bits_per_code"], 4)}
    for cfg in a.cfg_scales.split(","):
        for seed in a.seeds.split(","):
            tag = f"cfg{cfg}_seed{seed}"
            npz, scores = out / f"{name}_{tag}.npz", out / f"{name}_{tag}_eval.json"
            step(walls, f"sample_{tag}_s", npz,
                 [py, "-m", "tools.sample", "--prior", str(prior), "--n", str(a.n), "--class_mix", "data",
                  "--temperature", "1", "--cfg_scale", cfg, "--seed", seed, "--out", str(npz)],
                 log, wall_file)  # fmt: skip
            step(walls, f"eval_{tag}_s", scores,
                 [py, "-m", "tools.evaluate", "samples", "--samples", str(npz), "--features", a.features,
                  "--json", str(scores)], log, wall_file)  # fmt: skip
            s = json.loads(scores.read_text())
            result |= {f"{name}_{tag}_{k}": round(s[k], 4 if k.startswith("kid") else 3) for k in SCORES
                       if s.get(k) is not None}  # fmt: skip
    return result | {f"{name}_{k}": v for k, v in walls.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage1", default="/tmp/adv_runs/bench", help="stage1_adversarial.py's --out")
    p.add_argument("--steps", type=int, default=1500, help="each prior's training steps")
    p.add_argument("--n", type=int, default=1000, help="samples per FID")
    p.add_argument("--seeds", default="0,1", help="sampling seeds")
    p.add_argument("--cfg_scales", default="1,3", help="guidance scales (1 = none; 3 = the 32-px demo's, linear)")
    p.add_argument("--features", default="runs/feature_net/emoji32.pt")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--jobs", type=int, default=1, help="variants run at once")
    p.add_argument("--out", required=True, help="a folder outside the repository for the runs")
    p.add_argument("--json")
    a = p.parse_args()
    Path(a.out).mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "pipeline_adversarial", "date": time.strftime("%Y-%m-%d"), **machine(),
              "stage1": "benchmarks/stage1_adversarial.py's plain and adversarial_w0.1 runs (3,000 steps, 32 px)",
              "prior_config": "configs/stage2/emoji_transformer.yaml", "prior_batch": 64, "prior_steps": a.steps,
              "samples": a.n, "temperature": 1.0, "class_mix": "data"}  # fmt: skip
    names = a.variants.split(",")
    with ThreadPoolExecutor(a.jobs) as pool:
        for r in pool.map(lambda n: variant(n, a), names):
            result |= r
    report(result, a.json)


if __name__ == "__main__":
    main()
