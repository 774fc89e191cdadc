"""Every throughput and latency figure in one run on one GPU, eager beside the optimised path.

    python benchmarks/gpu_all.py                         # one GPU; stops starting variants after --budget_s (420)
    python benchmarks/gpu_all.py --device cpu --quick    # seconds: checks the script itself

The models are the default Fashion-MNIST configs (configs/stage1/fashion_mnist.yaml,
configs/stage2/fashion_mnist_{transformer,pixelcnn}.yaml) with random weights, fed random data of the
right shapes (speed does not depend on either; no data files are read). Training loops are plain
(forward, loss, backward, AdamW step, no Trainer), so they measure the model, not the framework.
Sections: stage-1 training (images/s), code extraction (images/s, codes compared with eager fp32),
prior training (code maps/s), sampling latency at n = 64 and n = 1,000 including decoding (the
optimised path replays one CUDA graph per decode step and is reported only if its codes equal the
eager ones for the same seed). Each variant is timed after warm-up (torch.compile's compile time is
reported apart); "x eager" is its speed over the eager fp32 figure of the same section, measured in this
run. fp32 means torch's defaults (cuDNN TF32 on, matmul TF32 off), except extraction, which turns cuDNN
TF32 off as extract_codes does. A failing variant is reported and the rest still runs; compile variants
run last, only while the time budget allows. Needs torch, pytorch_lightning, torchmetrics, numpy and
yaml only (no wandb, no jsonargparse). Prints a table and writes JSON (--json).
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import time
import traceback
from collections.abc import Callable

import torch
import torch.nn.functional as F
import yaml
from _common import ROOT, machine, peak_ram_mb, write_result  # also puts the repo root on sys.path

from common.images import from_uint8
from stage1_vqvae.vqvae import VQVAE
from stage2_prior.cuda_graphs import GraphedSampler
from stage2_prior.prior import Prior
from stage2_prior.sampling import sample_codes

NOTE = "random weights, random data of the default configs' shapes (speed only)"


# ------------------------------------------------------------------------------------------ helpers
def config(name: str) -> dict:
    return yaml.safe_load((ROOT / "configs" / name).read_text())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def time_limit(seconds: float):
    """TimeoutError after `seconds` (SIGALRM: main thread, Unix): a compile that hangs cannot eat the budget."""

    def alarm(signum, frame):
        raise TimeoutError(f"gave up after {seconds:.0f}s (time budget)")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, max(1.0, seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def timed_steps(step: Callable[[], None], device: torch.device, warmup: int, iters: int) -> tuple[float, float]:
    """(seconds of the first warm-up call (compilation happens there), seconds per step afterwards)."""
    sync(device)
    t0 = time.perf_counter()
    step()
    sync(device)
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    sync(device)
    return first, (time.perf_counter() - t0) / iters


def autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


# ------------------------------------------------------------------------------------------ sections
def stage1_train(device: torch.device, variant: str, a: argparse.Namespace) -> dict:
    cfg = config("stage1/fashion_mnist.yaml")
    batch = 8 if a.quick else cfg["data"]["batch_size"]
    torch.manual_seed(0)
    model = VQVAE(in_channels=1, image_size=28, **cfg["model"]).to(device)
    bf16, fast = variant != "eager fp32", variant != "eager fp32"
    if fast:
        model.to(memory_format=torch.channels_last)
    if "compile" in variant:
        model.encoder, model.decoder = torch.compile(model.encoder), torch.compile(model.decoder)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    pool = [from_uint8(torch.randint(0, 256, (batch, 1, 28, 28), dtype=torch.uint8, device=device)) for _ in range(4)]
    pool = [x.contiguous(memory_format=torch.channels_last) if fast else x for x in pool]
    it = iter(range(10**9))

    def step() -> None:
        x = pool[next(it) % len(pool)]
        with autocast(device, bf16):
            recon, q = model(x)
            loss = F.mse_loss(recon.float(), x) + q.loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    first, per_step = timed_steps(step, device, a.warmup, a.iters)
    return {"value": batch / per_step, "unit": "images/s", "first_step_s": first, "batch": batch}


def extract(device: torch.device, variant: str, a: argparse.Namespace, reference: dict) -> dict:
    torch.manual_seed(0)
    cfg = config("stage1/fashion_mnist.yaml")
    model = VQVAE(in_channels=1, image_size=28, **cfg["model"]).to(device).eval()
    n, batch = (64, 32) if a.quick else (70_000, 1000)  # equal batches: one compiled shape
    images = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, device=device)
    fast = variant != "eager fp32"
    if fast:
        model.to(memory_format=torch.channels_last)
    if "compile" in variant:
        model.encoder = torch.compile(model.encoder)
    old_tf32, torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.allow_tf32, False  # as extract_codes

    def run() -> torch.Tensor:
        out = []
        with torch.inference_mode(), autocast(device, "bf16" in variant):
            for s in range(0, n, batch):
                x = from_uint8(images[s : s + batch])
                x = x.contiguous(memory_format=torch.channels_last) if fast else x
                out.append(model.encode_to_codes(x).to(torch.int32).cpu())
        return torch.cat(out)

    try:
        first, seconds = timed_steps(run, device, 1, 1 if a.quick else 2)
        codes = run()
    finally:
        torch.backends.cudnn.allow_tf32 = old_tf32
    if variant == "eager fp32":
        reference["codes"] = codes
    same = float((codes == reference["codes"]).float().mean()) if "codes" in reference else float("nan")
    return {"value": n / seconds, "unit": "images/s", "first_step_s": first, "codes_equal_eager": round(same, 5)}


def prior_train(device: torch.device, kind: str, variant: str, a: argparse.Namespace) -> dict:
    cfg = config(f"stage2/fashion_mnist_{kind}.yaml")
    batch = 8 if a.quick else cfg["data"]["batch_size"]
    torch.manual_seed(0)
    prior = Prior(codebook_size=512, grid_shape=(7, 7), num_classes=10, codes_meta={"image_size": 28, "channels": 1},
                  **cfg["model"]).to(device)  # fmt: skip
    net = torch.compile(prior.net) if "compile" in variant else prior.net
    opt = torch.optim.AdamW(prior.parameters(), lr=1e-4)
    pool = [(torch.randint(0, 512, (batch, 7, 7), device=device), torch.randint(0, 10, (batch,), device=device))
            for _ in range(4)]  # fmt: skip
    it = iter(range(10**9))

    def step() -> None:
        codes, labels = pool[next(it) % len(pool)]
        with autocast(device, "bf16" in variant):
            loss = F.cross_entropy(net(codes, labels).float(), codes)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    first, per_step = timed_steps(step, device, a.warmup, a.iters)
    return {"value": batch / per_step, "unit": "code maps/s", "first_step_s": first, "batch": batch}


def sampling(device: torch.device, kind: str, n: int, variant: str, a: argparse.Namespace, reference: dict) -> dict:
    torch.manual_seed(0)
    s1 = config("stage1/fashion_mnist.yaml")["model"]
    vqvae = VQVAE(in_channels=1, image_size=28, **s1).to(device).eval()
    prior = Prior(codebook_size=vqvae.codebook_size, grid_shape=vqvae.grid_shape, num_classes=10,
                  codes_meta={"image_size": 28, "channels": 1},
                  **config(f"stage2/fashion_mnist_{kind}.yaml")["model"]).to(device).eval()  # fmt: skip
    labels = torch.arange(n, device=device) % 10
    gen = torch.Generator(device=device)
    setup_s = 0.0
    if variant == "eager":

        def draw() -> torch.Tensor:
            return sample_codes(prior.net, n, labels, generator=gen.manual_seed(0))
    else:
        t0 = time.perf_counter()
        sampler = GraphedSampler(prior.net, labels, n)
        setup_s = time.perf_counter() - t0

        def draw() -> torch.Tensor:
            return sampler.sample(gen.manual_seed(0))

    result: dict = {}

    def run() -> None:
        codes = draw()
        result["codes"] = codes
        vqvae.decode_codes(codes)

    first, seconds = timed_steps(run, device, 1, 1 if a.quick else a.sample_repeats)
    codes = result["codes"].cpu()
    if variant == "eager":
        reference[(kind, n)] = codes
    same = (kind, n) in reference and bool(torch.equal(codes, reference[(kind, n)]))
    if variant != "eager" and not same:
        raise RuntimeError("graph-replayed codes differ from eager codes for the same seed; eager figure only")
    row = {"value": seconds * 1000, "unit": "ms (incl. decode)", "first_step_s": first, "setup_s": setup_s,
           "codes_equal_eager": same}  # fmt: skip
    if device.type != "cuda" and variant != "eager":
        row["note"] = "no CUDA: graph steps run without graphs (codes checked)"
    return row


# ------------------------------------------------------------------------------------------ driver
def jobs(device: torch.device, a: argparse.Namespace) -> list[tuple[str, str, Callable[[], dict]]]:
    """(section, variant, run) in table order; the first variant of each section is its eager baseline."""
    ref_extract: dict = {}
    ref_sample: dict = {}
    out = []
    for v in ("eager fp32", "bf16 + channels_last", "bf16 + channels_last + compile"):
        out.append(("stage-1 training", v, lambda v=v: stage1_train(device, v, a)))
    for v in ("eager fp32", "channels_last fp32", "channels_last bf16", "channels_last fp32 + compile"):
        out.append(("extraction", v, lambda v=v: extract(device, v, a, ref_extract)))
    for kind in ("transformer", "pixelcnn"):
        for v in ("eager fp32", "bf16", "bf16 + compile"):
            out.append((f"{kind} training", v, lambda k=kind, v=v: prior_train(device, k, v, a)))
    for kind in ("transformer", "pixelcnn"):
        for n in (2, 4) if a.quick else (64, 1000):
            for v in ("eager", "CUDA graphs"):
                out.append(
                    (f"{kind} sampling n={n}", v, lambda k=kind, n=n, v=v: sampling(device, k, n, v, a, ref_sample))
                )
    return out


def run_one(device: torch.device, variant: str, run: Callable[[], dict], left: float, a: argparse.Namespace) -> dict:
    row: dict = {}
    if "compile" in variant and not (a.compile == "on" or (a.compile == "auto" and device.type == "cuda")):
        return {"skipped": "torch.compile off (--compile; default: on for CUDA only)"}
    if left < (90 if "compile" in variant else 10):
        return {"skipped": f"time budget ({a.budget_s:.0f}s) spent"}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with time_limit(left - 5):
            row.update(run())
    except Exception as e:  # report and go on: one broken variant must not hide the others
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        if a.quick:
            traceback.print_exc()
    if device.type == "cuda":
        row["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20)
        torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny batches, iterations and n (checks the script only)")
    ap.add_argument("--budget_s", type=float, default=420.0, help="stop starting variants after this many seconds")
    ap.add_argument("--compile", choices=("auto", "on", "off"), default="auto", help="auto: on for CUDA only")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 20, --quick 1)")
    ap.add_argument("--iters", type=int, default=None, help="timed steps (default 200, --quick 2)")
    ap.add_argument("--sample_repeats", type=int, default=3, help="timed sampling runs (their mean)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; --quick: 1)")
    ap.add_argument("--json", default=None, help="default: benchmarks/results/gpu_all[_quick].json")
    a = ap.parse_args(argv)
    if a.threads or a.quick:
        torch.set_num_threads(a.threads or 1)
    a.json = a.json or str(ROOT / "benchmarks" / "results" / f"gpu_all{'_quick' if a.quick else ''}.json")
    a.warmup = a.warmup or (1 if a.quick else 20)
    a.iters = a.iters or (2 if a.quick else 200)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_all: no CUDA device here; check the script with --device cpu --quick")
    t_start = time.perf_counter()
    planned = jobs(device, a)
    order = sorted(range(len(planned)), key=lambda i: "compile" in planned[i][1])  # compile variants last
    rows: list[dict] = [{} for _ in planned]
    for i in order:
        section, variant, run = planned[i]
        left = a.budget_s - (time.perf_counter() - t_start)
        rows[i] = {"section": section, "variant": variant, **run_one(device, variant, run, left, a)}
        r = rows[i]
        print(f"[{time.perf_counter() - t_start:6.1f}s] {section} / {variant}: "
              f"{r.get('value', r.get('error', r.get('skipped')))}", flush=True)  # fmt: skip
    add_ratios(rows)
    result = {**machine(device), "note": NOTE, "quick": a.quick, "wall_s": round(time.perf_counter() - t_start, 1),
              "peak_ram_mb": peak_ram_mb(), "rows": rows}  # fmt: skip
    print_table(result)
    print(f"written to {write_result(a.json, result)}")
    return result


def add_ratios(rows: list[dict]) -> None:
    """x eager: speed relative to the section's first (eager) variant; latencies are inverted."""
    for row in rows:
        base = next((r for r in rows if r["section"] == row["section"] and "value" in r), None)
        if base is None or "value" not in row:
            continue
        lower_is_better = row["unit"].startswith("ms")
        row["x_eager"] = round(base["value"] / row["value"] if lower_is_better else row["value"] / base["value"], 2)


def print_table(result: dict) -> None:
    print(f"\n{result['device']} | torch {result['torch']} | {result['note']} | wall {result['wall_s']}s | "
          f"peak RAM {result['peak_ram_mb']} MB")  # fmt: skip
    header = ("section", "variant", "value", "unit", "x eager", "compile/setup s", "peak GPU MiB", "note")
    table = [header]
    for r in result["rows"]:
        value = f"{r['value']:,.1f}" if "value" in r else "-"
        setup = r.get("setup_s") or (r.get("first_step_s") if "compile" in r["variant"] else None)
        note = r.get("error") or r.get("skipped") or r.get("note") or ""
        if "codes_equal_eager" in r and r["variant"] not in ("eager", "eager fp32"):
            note = note or f"codes equal eager: {r['codes_equal_eager']}"
        table.append((r["section"], r["variant"], value, r.get("unit", ""), f"{r['x_eager']:.2f}" if "x_eager" in r
                      else "", f"{setup:.1f}" if setup else "", str(r.get("peak_gpu_mib", "")), note[:70]))  # fmt: skip
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for i, row in enumerate(table):
        print("  ".join(c.rjust(w) if 2 <= j <= 6 else c.ljust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))


if __name__ == "__main__":
    main()
