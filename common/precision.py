"""bf16 training on CPUs that have native bf16 instructions (`--cpu_bf16`).

On a CPU with AVX512-BF16 (or AMX) oneDNN's bf16 matmuls run ~3.4x faster than fp32 ones (2-core AMD EPYC
host, 2026-11-29: 339 vs 98 GFLOP/s), so the demo's prior trains 1.7x faster under bf16 autocast with the
same test bits per code; on a CPU without them bf16 is emulated and far slower than fp32. So the demos'
configs say ``cpu_bf16: true``: train in ``bf16-mixed`` where this CPU has the instructions, else as
``--trainer.precision`` says. Validation and test metrics are computed in fp32 either way (`fp32_metrics`),
so figures do not depend on the training precision. Imports torch only.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

CPUINFO = Path("/proc/cpuinfo")
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 (Linux names); other CPUs: not measured, kept fp32
FP32_PRECISIONS = (None, 32, "32", "32-true")  # None: Lightning's default, 32-true


def cpu_has_native_bf16(cpuinfo: Path = CPUINFO) -> bool:
    """Whether this x86 CPU has bf16 instructions that oneDNN uses (AVX512-BF16 or AMX-BF16), read from the
    first ``flags`` line of /proc/cpuinfo; False where that file is missing (macOS, Windows, ARM)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return any(flag in line.split() for flag in NATIVE_BF16_FLAGS)
    except OSError:
        pass
    return False


def trains_on_cpu(accelerator: object) -> bool:
    """Whether `--trainer.accelerator` resolves to the CPU: "cpu", or "auto" on a machine with neither CUDA nor
    MPS (Lightning's own order)."""
    name = accelerator if isinstance(accelerator, str) else type(accelerator).__name__.lower()
    if name == "cpu" or name.startswith("cpuaccelerator"):
        return True
    if name != "auto":
        return False
    mps = getattr(torch.backends, "mps", None)
    return not torch.cuda.is_available() and not (mps is not None and mps.is_available())


def resolve_cpu_bf16(cpu_bf16: bool, trainer_cfg: dict, cpuinfo: Path = CPUINFO) -> str | None:
    """The precision `--cpu_bf16` chooses ("bf16-mixed"), or None to keep `--trainer.precision`: only a 32-bit
    precision is replaced, only on the CPU, and only where the CPU has native bf16."""
    if not cpu_bf16 or trainer_cfg.get("precision") not in FP32_PRECISIONS:
        return None
    if not trains_on_cpu(trainer_cfg.get("accelerator", "auto")) or not cpu_has_native_bf16(cpuinfo):
        return None
    return "bf16-mixed"


def announce(precision: str) -> None:
    print(f"training in {precision}: this CPU has native bf16 instructions (--cpu_bf16 false trains in fp32)",
          file=sys.stderr, flush=True)  # fmt: skip


@contextlib.contextmanager
def fp32_metrics(device: torch.device) -> Iterator[None]:
    """Validation and test in fp32 whatever the training precision (weights are fp32 under bf16-mixed)."""
    with torch.autocast(device.type, enabled=False):
        yield
