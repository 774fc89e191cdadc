"""common.malloc: freed tensor memory stays in the process (no page faults when a step's tensors come back)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common import malloc

ROOT = Path(__file__).resolve().parents[1]

# Training steps of the Fashion-MNIST prior at the demo's batch; report minor page faults per step.
PROBE = """
import json, resource, sys, torch
import torch.nn.functional as F
from common.malloc import keep_freed_memory
from stage2_prior.transformer import Transformer
kept = keep_freed_memory() if sys.argv[1] == "on" else False
torch.manual_seed(0)
net = Transformer(512, (7, 7), 10)
codes, labels = torch.randint(0, 512, (128, 7, 7)), torch.randint(0, 10, (128,))
def step():
    F.cross_entropy(net(codes, labels), codes).backward()
    net.zero_grad()
for _ in range(3):  # the heap grows to its peak first
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
    step()
print(json.dumps({"kept": kept, "faults": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 8}))
"""


def _probe(mode: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "VQGEN_KEEP"))}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=ROOT, env=clean, capture_output=True, text=True,
                         check=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_not_faulted_back_in():
    off, on = _probe("off"), _probe("on")
    assert on["kept"] and not off["kept"]
    # A step's ~75 MB of activations is ~19,000 pages: glibc's defaults fault thousands back in every step.
    assert off["faults"] > 2_000, off
    # Kept: none in most steps (an occasional step still grows the heap by ~9,000 pages).
    assert on["faults"] < off["faults"] / 4, (on, off)


@pytest.mark.parametrize("env", [{"VQGEN_KEEP_FREED_MEMORY": "0"}, {"MALLOC_TRIM_THRESHOLD_": "1000000"},
                                 {"LD_PRELOAD": "libjemalloc.so.2"}])  # fmt: skip
def test_left_alone_when_the_user_chose(env, monkeypatch):
    monkeypatch.setattr(malloc, "_done", False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert malloc.keep_freed_memory() is False
