"""Images/s and peak memory of `encode_to_codes` / `decode_codes` by pixels per network pass.

    python benchmarks/coding_passes.py                       # 28, 64, 128 and 256 px; 512 images each
    python benchmarks/coding_passes.py --sizes 256 --images 128 --budgets 0 1048576 --repeats 3

The stage-1 model splits a batch into passes of at most `PIXELS_PER_PASS` pixels (stage1_vqvae/model.py);
every command that encodes or decodes (extract_codes, evaluate, compress, sample, score_anomalies) goes
through it. This measures what that budget buys: for each image size (its config's network, random weights:
the work does not depend on them) and each budget (0 = the whole batch in one pass, as before), a fresh
process encodes then decodes --images images three times and reports images/s for each (the best of the
last two calls: the first of each shape sets up oneDNN's kernels, which a long extraction pays once) and the
process's peak RSS.
Budgets alternate within each repeat, so a shared machine's drift hits all alike; the best repeat counts.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from _common import ROOT, machine, report

CONFIGS = {28: ("fashion_mnist.yaml", 1), 64: ("image_folder.yaml", 3), 128: ("image_folder_128.yaml", 3),
           256: ("image_folder_128.yaml", 3)}  # fmt: skip

CHILD = """
import json, resource, sys, time, torch, yaml
sys.path.insert(0, sys.argv[1])
from common.checkpoint import constructor_args
from common.malloc import keep_freed_memory
from stage1_vqvae.model import VQModel
keep_freed_memory()
config, channels, size, n, budget = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
args = constructor_args(VQModel, yaml.safe_load(open(config))["model"])  # the network's arguments, not training's
torch.manual_seed(0)
model = VQModel(channels, size, **args).eval().to(memory_format=torch.channels_last)
model.pixels_per_pass = budget or 1 << 62
images = (torch.rand(n, channels, size, size) * 2 - 1).contiguous(memory_format=torch.channels_last)
enc = dec = float("inf")
for _ in range(3):  # the first call of each shape sets up oneDNN's kernels: the best of the later two counts
    t0 = time.perf_counter(); codes = model.encode_to_codes(images); t1 = time.perf_counter()
    model.decode_codes(codes); t2 = time.perf_counter()
    if _:
        enc, dec = min(enc, t1 - t0), min(dec, t2 - t1)
print(json.dumps({"encode": n / enc, "decode": n / dec, "images_per_pass": model.images_per_pass(),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run(size: int, images: int, budget: int) -> dict:
    config, channels = CONFIGS[size]
    out = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), str(ROOT / "configs" / "stage1" / config),
                          str(channels), str(size), str(images), str(budget)],
                         capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[28, 64, 128, 256], choices=sorted(CONFIGS))
    p.add_argument("--images", type=int, default=512, help="images encoded and decoded (extract_codes' batch)")
    p.add_argument("--budgets", type=int, nargs="+", default=[0, 1 << 22, 1 << 20, 1 << 18],
                   help="pixels per pass; 0 = the whole batch in one pass")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    result: dict = {"command": "python benchmarks/coding_passes.py " + " ".join(sys.argv[1:]), **machine(),
                    "images": a.images}  # fmt: skip
    for size in a.sizes:
        best: dict[int, dict] = {}
        for _ in range(a.repeats):
            for budget in a.budgets:
                r = run(size, a.images, budget)
                old = best.get(budget)
                best[budget] = r if old is None else {
                    "encode": max(old["encode"], r["encode"]), "decode": max(old["decode"], r["decode"]),
                    "images_per_pass": r["images_per_pass"], "peak_rss_mb": min(old["peak_rss_mb"], r["peak_rss_mb"])}
        for budget, r in best.items():
            name = f"{size}px_{'one_pass' if budget == 0 else f'{budget}px'}"
            result[f"{name}_images_per_pass"] = min(r["images_per_pass"], a.images)
            result[f"{name}_encode_images_per_s"] = round(r["encode"], 1)
            result[f"{name}_decode_images_per_s"] = round(r["decode"], 1)
            result[f"{name}_peak_rss_mb"] = round(r["peak_rss_mb"])
    report(result, a.json)


if __name__ == "__main__":
    main()
