"""`--data.cache_dir` on a folder of photo-like JPEGs: time until the splits are ready, memory, loader speed,
and training a folder larger than the memory a job may use.

    python benchmarks/image_cache.py [--n 40000] [--image_size 128] [--limit_mb 1500] [--folder DIR]

Each figure comes from a fresh process (`python -c`), as a user's runs are: (1) the folder decoded into memory
(the default), (2) the first run with a cache (decode and write), (3) a later run (the file mapped; the page
cache warm, as on a machine that just ran). Per process: seconds until all three splits are ready, the
anonymous memory it holds (RssAnon: what the kernel cannot drop) and its peak RSS, and the train loader's
batches of 64 per second over the first --batches batches. Then, where this machine lets a root process make
a memory cgroup (v1 or v2), the same folder in a cgroup limited to --limit_mb (a SLURM job's or a container's
limit; MemAvailable still reports the host's free memory there): the read as it was before the memory check
counted cgroups (so it decodes until the kernel kills it), and `train_stage1 fit` (batch 16, --steps steps)
without and with a cache. The JPEGs (CelebA's 178x218, a smooth gradient plus noise) are generated
into --folder once and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import ROOT, machine, report
from PIL import Image

from common.memory import V2, memory_cgroups

PROBE = r"""
import json, os, sys, time
t0 = time.perf_counter()
sys.path.insert(0, {root!r})
if {old_check}:  # the memory check as it was before it counted cgroups: MemAvailable alone
    import common.memory, common.readers
    common.readers.available_memory = common.memory.meminfo_available
from common.splits import ImageSplits
imports = time.perf_counter() - t0
t0 = time.perf_counter()
s = ImageSplits("image_folder", root={folder!r}, image_size={size}, batch_size=64, cache_dir={cache!r})
n = sum(len(s.split_arrays(split)[1]) for split in ("train", "val", "test"))
ready = time.perf_counter() - t0
t = time.perf_counter()
loader = iter(s.dataloader("train", resumable=True))
for _ in range({batches}):
    next(loader)
per_s = {batches} / (time.perf_counter() - t)
status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
kib = lambda key: int(status[key].split()[0]) // 1024
print(json.dumps(dict(images=n, import_s=round(imports, 2), ready_s=round(ready, 2), batches_per_s=round(per_s, 1),
                      rss_anon_mb=kib("RssAnon"), rss_file_mb=kib("RssFile"), peak_rss_mb=kib("VmHWM"))))
"""


def make_folder(folder: Path, n: int) -> None:
    """n photo-like 178x218 JPEGs in 4 class folders (written once; an existing folder with n files is kept)."""
    if folder.is_dir() and len(list(folder.rglob("*.jpg"))) == n:
        return
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, 178)[None, :, None] * np.linspace(0.3, 1, 218)[:, None, None]
    noise = [rng.normal(0, 12, (218, 178, 3)) for _ in range(16)]  # drawn once: the folder is made in a minute
    for i in range(n):
        (folder / f"class{i % 4}").mkdir(parents=True, exist_ok=True)
        colour = ramp * rng.uniform(0.4, 1, 3) + np.roll(noise[i % 16], 37 * i, axis=1)
        image = Image.fromarray(colour.clip(0, 255).astype(np.uint8))
        image.save(folder / f"class{i % 4}" / f"{i:06d}.jpg", quality=90)


def memory_cgroup(limit: int) -> tuple[Path, str, str] | None:
    """A new child of this process's memory cgroup limited to `limit` bytes, as (folder, peak file, version);
    None where it cannot be made (no root, cgroup read-only, no memory controller there)."""
    for folder, _, files in memory_cgroups():
        peak, version = ("memory.peak", "v2") if files == V2 else ("memory.max_usage_in_bytes", "v1")
        child = folder / f"vqgen_bench_{os.getpid()}"
        try:
            child.mkdir()
            (child / files[0]).write_text(str(limit))
            if (child / "memory.memsw.limit_in_bytes").exists():  # no swapping instead of the limit
                (child / "memory.memsw.limit_in_bytes").write_text(str(limit))
            return child, peak, version
        except OSError:
            if child.is_dir():
                child.rmdir()
    return None


def run(args: list[str], cgroup: Path | None = None, timeout: float = 1800) -> tuple[int, float, str]:
    """(exit code, seconds, stdout + stderr) of one fresh process, inside `cgroup` when given."""
    enter = (lambda: (cgroup / "cgroup.procs").write_text(str(os.getpid()))) if cgroup else None
    t = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=ROOT, preexec_fn=enter)
    return done.returncode, round(time.perf_counter() - t, 1), done.stdout + done.stderr


def probe(a: argparse.Namespace, cache: str | None, cgroup: Path | None = None, old_check: bool = False) -> dict:
    code = PROBE.format(root=str(ROOT), folder=str(a.folder), size=a.image_size, cache=cache, batches=a.batches,
                        old_check=old_check)  # fmt: skip
    rc, seconds, out = run([sys.executable, "-c", code], cgroup)
    lines = out.strip().splitlines()
    if rc == 0:
        return {**json.loads(lines[-1]), "wall_s": seconds}
    return {"exit_code": rc, "wall_s": seconds, "said": lines[-1] if lines else "(nothing: killed)"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=40000, help="JPEGs in the folder")
    ap.add_argument("--image_size", type=int, default=128)
    ap.add_argument("--batches", type=int, default=200, help="train-loader batches of 64 timed per process")
    ap.add_argument("--limit_mb", type=int, default=1500, help="the memory cgroup's limit")
    ap.add_argument("--steps", type=int, default=20, help="train_stage1 steps inside the limited cgroup")
    ap.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()) / "vqgen_bench_jpegs")
    ap.add_argument("--json", default="benchmarks/results/image_cache_cpu.json")
    a = ap.parse_args()
    t = time.perf_counter()
    make_folder(a.folder, a.n)
    pixels = a.n * 3 * a.image_size**2
    result: dict = {**machine(), "n": a.n, "image_size": a.image_size, "decoded_mb": round(pixels / 2**20),
                    "folder_ready_s": round(time.perf_counter() - t, 1)}  # fmt: skip
    cache = tempfile.mkdtemp(prefix="vqgen_cache_")
    try:
        runs = (("in_memory", None), ("cache_first_run", cache), ("cache_later_run", cache), ("in_memory_again", None))
        for label, where in runs:  # in memory twice: the first and last figures show the machine's drift
            for k, v in probe(a, where).items():
                result[f"{label}_{k}"] = v
        limited = memory_cgroup(a.limit_mb << 20)
        if limited is None:
            result["limited"] = "no memory cgroup could be made here (needs root and a writable cgroup)"
        else:
            group, peak, version = limited
            result["limited_cgroup"] = f"{version}, {a.limit_mb} MiB"
            for k, v in probe(a, None, group, old_check=True).items():
                result[f"limited_before_cgroup_check_{k}"] = v
            out = Path(tempfile.mkdtemp(prefix="vqgen_fit_"))  # its own cache: the first run decodes inside the limit
            command = str(Path(sys.executable).parent / "train_stage1")  # the console script, as a user runs it
            fit = ["fit", "--config", "configs/stage1/image_folder.yaml", "--data.root", str(a.folder),
                   "--data.image_size", str(a.image_size), "--data.batch_size", "16", "--trainer.max_steps",
                   str(a.steps), "--trainer.limit_val_batches", "2", "--trainer.default_root_dir", str(out),
                   "--log.backend", "none"]  # fmt: skip
            rc, seconds, said = run([command, *fit], group)  # the default: refused at once, one line
            result.update(limited_default_fit_exit_code=rc, limited_default_fit_wall_s=seconds,
                          limited_default_fit_said=said.strip().splitlines()[-1])
            rc, seconds, said = run([command, *fit, "--data.cache_dir", str(out / "cache")], group)
            shutil.rmtree(out, ignore_errors=True)  # made above
            lines = said.strip().splitlines() or [""]
            result.update(limited_fit_exit_code=rc, limited_fit_wall_s=seconds, limited_fit_last_line=lines[-1],
                          limited_fit_data_line=next((line for line in lines if line.startswith("data:")), ""))
            result["limited_peak_mb"] = int((group / peak).read_text()) >> 20
            group.rmdir()
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    report(result, a.json)


if __name__ == "__main__":
    main()
