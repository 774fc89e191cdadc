"""The benchmark scripts whose figures the README quotes: each one imports and parses its arguments, and the
cheap ones run end to end on tiny settings and write figures that make sense. (compression.py,
maskgit_quality.py and maskgit_repair.py run on trained models in test_pipeline.py and test_maskgit.py.)"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(p.name for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_"))


def run_script(name: str, args: list[str], monkeypatch) -> None:
    """Run benchmarks/NAME as `python benchmarks/NAME ARGS` would, in this process."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the scripts import their helpers from `_common`
    monkeypatch.setattr(sys, "argv", [str(BENCHMARKS / name), *args])
    grad = torch.is_grad_enabled()
    try:
        runpy.run_path(str(BENCHMARKS / name), run_name="__main__")
    finally:  # a script must leave the process as it found it: later tests train in it
        assert torch.is_grad_enabled() == grad, f"{name} left autograd {'off' if grad else 'on'}"


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_benchmark_imports_and_explains_its_options(name, monkeypatch, capsys):
    with pytest.raises(SystemExit) as info:
        run_script(name, ["--help"], monkeypatch)
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ") and "-h, --help" in out, out


def figures(path: Path) -> dict:
    result = json.loads(path.read_text())
    assert result["torch"] and result["device"], result  # the machine is recorded beside the figures
    return result


def test_maskgit_speed_times_both_samplers(tmp_path, monkeypatch):
    out = tmp_path / "speed.json"
    run_script("maskgit_speed.py", ["--size", "tiny", "--n", "3", "--batch_size", "2", "--repeats", "1", "--grids",
                                    "fashion_mnist_7x7", "--json", str(out)], monkeypatch)  # fmt: skip
    result = figures(out)
    ar, masked = result["fashion_mnist_7x7_n3_autoregressive_s"], result["fashion_mnist_7x7_n3_masked_s"]
    assert ar > 0 and masked > 0
    assert result["fashion_mnist_7x7_n3_speedup_masked_over_ar"] == pytest.approx(ar / masked, rel=0.02, abs=0.01)
    assert (result["fashion_mnist_7x7_passes_per_grid_autoregressive"],
            result["fashion_mnist_7x7_passes_per_grid_masked"]) == (49, 8)  # fmt: skip


def test_coding_passes_measures_each_budget_in_its_own_process(tmp_path, monkeypatch):
    out = tmp_path / "passes.json"
    run_script("coding_passes.py", ["--sizes", "28", "--images", "4", "--budgets", "0", "1568", "--repeats", "1",
                                    "--json", str(out)], monkeypatch)  # fmt: skip
    result = figures(out)
    # 1,568 pixels per pass: two 28x28 images; 0: the whole batch at once
    assert (result["28px_one_pass_images_per_pass"], result["28px_1568px_images_per_pass"]) == (4, 2)
    for name in ("one_pass", "1568px"):
        assert result[f"28px_{name}_encode_images_per_s"] > 0 and result[f"28px_{name}_decode_images_per_s"] > 0
        assert result[f"28px_{name}_peak_rss_mb"] > 100  # torch alone takes more
