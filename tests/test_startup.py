"""The model commands start fast: run in a fresh interpreter, `sample`, `compress`, `decompress`,
`score_anomalies` and `evaluate prior` do their work without ever importing Lightning, torchmetrics or
wandb (those cost seconds at start-up and are needed only for training)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_bad_inputs import world  # noqa: F401  (the fixture: tiny checkpoints, codes, images, a .vqz)

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("pytorch_lightning", "lightning_fabric", "lightning", "torchmetrics", "wandb")
RUNS = [
    ("tools.sample", "main", ["--prior", "{prior}", "--n", "4", "--out", "fast.png", "--device", "cpu"]),
    ("tools.compress", "main_compress", ["{images}", "--prior", "{prior}", "--out", "fast.vqz"]),
    ("tools.compress", "main_decompress", ["{images_vqz}", "--prior", "{prior}", "--out", "fast_decoded"]),
    ("tools.anomaly", "main", ["{images}", "--prior", "{prior}", "--out", "fast.csv", "--device", "cpu"]),
    ("tools.evaluate", "main", ["prior", "--ckpt", "{prior}", "--codes", "{codes}", "--device", "cpu"]),
]


@pytest.mark.parametrize("module,fn,args", RUNS, ids=[f"{m}.{f}" for m, f, _ in RUNS])
def test_model_commands_never_import_training_frameworks(world, module, fn, args):  # noqa: F811
    args = [a.format(**world) for a in args]
    code = (f"import sys\nfrom {module} import {fn}\n{fn}({args!r})\n"
            f"print('HEAVY', sorted(m for m in {HEAVY!r} if m in sys.modules))")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=world["root"], env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "HEAVY []" in proc.stdout, proc.stdout


def test_serve_builds_its_page_without_training_frameworks(world):  # noqa: F811
    """`serve` loads the models, warms up and builds its app (everything but serving) without them too."""
    args = ["--prior", world["prior"], "--port", "0", "--device", "cpu"]
    code = (f"import sys\nfrom tools.serve import build_server\nserver, sock, url = build_server({args!r})\n"
            f"sock.close()\nprint('URL', url)\n"
            f"print('HEAVY', sorted(m for m in {HEAVY!r} if m in sys.modules))")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=world["root"], env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "URL http://127.0.0.1:" in proc.stdout and "HEAVY []" in proc.stdout, proc.stdout
