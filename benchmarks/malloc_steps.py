"""Training-step speed with and without common.malloc.keep_freed_memory, interleaved in one run.

    python benchmarks/malloc_steps.py                 # both demo models, 4 rounds of each setting
    python benchmarks/malloc_steps.py --rounds 6 --steps 40

Each measurement is a fresh process (the setting is per process) that trains one of `make demo`'s two
networks on random data at the demo's batch (stage 1: the default VQ-VAE at batch 32; the prior: the
`small` Transformer at batch 128, AdamW), warms up, then times --steps steps (stage 1, ~13x cheaper a step:
10x as many): wall time, the process's user and system CPU time and minor page faults per step. Settings
alternate (off, on, off, on, ...) so a shared machine's drift hits both alike; the ratio of the medians is
the figure. Writes JSON (--json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from _common import ROOT, machine, report

CHILD = """
import json, resource, sys, time, torch
import torch.nn.functional as F
from common.malloc import keep_freed_memory
model, steps, on = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "on"
kept = keep_freed_memory() if on else False
torch.manual_seed(0)
if model == "prior":
    from stage2_prior.transformer import Transformer
    net = Transformer(512, (7, 7), 10)
    x, y = torch.randint(0, 512, (128, 7, 7)), torch.randint(0, 10, (128,))
    loss_fn = lambda: F.cross_entropy(net(x, y), x)
else:
    from stage1_vqvae.model import VQModel
    net = VQModel(1, 28, width=64, res_blocks=1, res_width=32, downsample=4, code_dim=64).to(
        memory_format=torch.channels_last)
    x = torch.rand(32, 1, 28, 28).mul(2).sub(1).contiguous(memory_format=torch.channels_last)
    def loss_fn():
        recon, qs = net(x)
        return F.mse_loss(recon, x) + sum(q.loss for q in qs)
opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
def step():
    loss_fn().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
for _ in range(5):
    step()
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
for _ in range(steps):
    step()
wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
ms = lambda seconds: 1000 * seconds / steps
print(json.dumps({"kept": kept, "wall_ms": ms(wall), "user_ms": ms(r1.ru_utime - r0.ru_utime),
                  "sys_ms": ms(r1.ru_stime - r0.ru_stime), "faults": (r1.ru_minflt - r0.ru_minflt) / steps}))
"""


def measure(model: str, steps: int, on: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "VQGEN_KEEP"))}
    out = subprocess.run([sys.executable, "-c", CHILD, model, str(steps), "on" if on else "off"], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=30, help="prior steps per process; stage 1 runs 10x as many")
    ap.add_argument("--json", default="benchmarks/results/malloc_steps_cpu.json")
    a = ap.parse_args()
    result: dict = {**machine("cpu"), "rounds": a.rounds, "steps": a.steps}
    for model in ("stage1", "prior"):
        runs: dict[str, list[dict]] = {"off": [], "on": []}
        for _ in range(a.rounds):
            for setting in ("off", "on"):
                runs[setting].append(measure(model, a.steps * (10 if model == "stage1" else 1), setting == "on"))
        med = {s: {k: statistics.median(r[k] for r in runs[s]) for k in ("wall_ms", "user_ms", "sys_ms", "faults")}
               for s in runs}  # fmt: skip
        walls = {s: [round(r["wall_ms"], 1) for r in runs[s]] for s in runs}  # each process's figure, for the noise
        result[model] = {"speedup_wall": round(med["off"]["wall_ms"] / med["on"]["wall_ms"], 3), "median": med,
                         "wall_ms_each": walls}  # fmt: skip
        off, on = med["off"], med["on"]
        print(f"{model}: wall {off['wall_ms']:.1f} -> {on['wall_ms']:.1f} ms/step "
              f"({result[model]['speedup_wall']:.3f}x), sys {off['sys_ms']:.1f} -> {on['sys_ms']:.1f} ms, "
              f"faults {off['faults']:.0f} -> {on['faults']:.0f} per step", flush=True)  # fmt: skip
    report(result, a.json)


if __name__ == "__main__":
    main()
