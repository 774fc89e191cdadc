"""`--cpu_bf16` (common/precision.py): bf16-mixed only on a CPU with native bf16 and only in place of a 32-bit
precision; attention kept in fp32 under CPU autocast; validation and test figures in fp32 whatever the
training precision."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import crashed_and_resumed_equals_straight, user_error, write_trainable_codes

from common import precision
from stage2_prior.train import main as train_stage2
from stage2_prior.transformer import Transformer
from tools.evaluate import main as evaluate_main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FLAGS = "fpu vme de pse tsc msr avx2 avx512f avx512bw avx512vl"


def cpuinfo(tmp_path: Path, flags: str) -> Path:
    path = tmp_path / "cpuinfo"
    core = "processor\t: {}\nmodel name\t: Test CPU\nflags\t\t: {}\n"
    path.write_text(core.format(0, flags) + "\n" + core.format(1, flags))
    return path


@pytest.mark.parametrize("flags, native", [(FLAGS, False), (FLAGS + " avx512_bf16", True),
                                           (FLAGS + " amx_tile amx_bf16", True), ("avx512_bf16x", False)])  # fmt: skip
def test_native_bf16_is_read_from_the_cpu_flags(tmp_path, flags, native):
    assert precision.cpu_has_native_bf16(cpuinfo(tmp_path, flags)) is native


def test_no_cpuinfo_means_no_native_bf16(tmp_path):
    assert precision.cpu_has_native_bf16(tmp_path / "missing") is False


@pytest.mark.parametrize("cpu_bf16, trainer, native, want", [
    (True, {"accelerator": "cpu", "precision": "32-true"}, True, "bf16-mixed"),
    (True, {"accelerator": "cpu", "precision": 32}, True, "bf16-mixed"),
    (True, {"accelerator": "cpu", "precision": None}, True, "bf16-mixed"),  # Lightning's default: 32-true
    (True, {"accelerator": "cpu"}, True, "bf16-mixed"),
    (True, {"accelerator": "cpu", "precision": "32-true"}, False, None),  # emulated bf16 is slower: keep fp32
    (False, {"accelerator": "cpu", "precision": "32-true"}, True, None),  # not asked for
    (True, {"accelerator": "cpu", "precision": "16-mixed"}, True, None),  # a precision the user chose stays
    (True, {"accelerator": "gpu", "precision": "32-true"}, True, None),  # only CPU training
])  # fmt: skip
def test_cpu_bf16_replaces_only_fp32_on_a_native_bf16_cpu(tmp_path, cpu_bf16, trainer, native, want):
    info = cpuinfo(tmp_path, FLAGS + (" avx512_bf16" if native else ""))
    assert precision.resolve_cpu_bf16(cpu_bf16, trainer, info) == want


def test_auto_accelerator_is_the_cpu_only_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert not precision.trains_on_cpu("auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert precision.trains_on_cpu("auto") and precision.trains_on_cpu("cpu") and not precision.trains_on_cpu("cuda")


def test_attention_runs_in_fp32_under_cpu_bf16_autocast(monkeypatch):
    """The fused attention's bf16 backward is slow on CPUs: under CPU autocast it gets fp32 inputs, while the
    linear layers run in bf16; the logits stay close to fp32's and every parameter gets a gradient."""
    torch.manual_seed(0)
    net = Transformer(16, (3, 3), 2, n_layer=2, n_head=2, n_embd=32)
    codes, labels = torch.randint(0, 16, (4, 3, 3)), torch.tensor([0, 1, 0, 1])
    seen: list[torch.dtype] = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        seen.append(q.dtype)
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    exact = net(codes, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = net(codes, labels)
        assert net.blocks[0].attn.qkv(torch.randn(2, 32)).dtype == torch.bfloat16  # the matmuls are bf16
    assert seen == [torch.float32] * 4  # two layers, without and with autocast
    assert (mixed.float() - exact).abs().max() < 0.1 * exact.abs().max()
    F.cross_entropy(mixed.float(), codes).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters() if p.requires_grad)


def test_a_cpu_bf16_run_trains_in_bf16_and_reports_fp32_figures(tmp_path, monkeypatch, capsys):
    """On a CPU said to have native bf16: the run says so, trains in bf16-mixed (its config.yaml records it)
    and its test bits per code equal `evaluate prior`'s fp32 figure for the same checkpoint."""
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda *a: True)
    codes = write_trainable_codes(tmp_path)
    root = tmp_path / "runs"
    train_stage2(["fit", "--config", str(CONFIGS / "stage2/tiny.yaml"), "--data.codes_dir", str(codes),
                  "--data.batch_size", "8", "--trainer.max_steps", "8", "--trainer.val_check_interval", "4",
                  "--trainer.default_root_dir", str(root), "--cpu_bf16", "true"])  # fmt: skip
    out, err = capsys.readouterr()
    assert "training in bf16-mixed: this CPU has native bf16 instructions" in err
    config = yaml.safe_load((root / "latest" / "config.yaml").read_text())
    assert config["trainer"]["precision"] == "bf16-mixed" and config["cpu_bf16"] is True
    tested = float(next(line for line in out.splitlines() if line.startswith("test:")).split("test/bits_per_code=")[1]
                   .split()[0])  # fmt: skip
    evaluate_main(["prior", "--ckpt", str(root / "latest" / "checkpoints" / "best.ckpt"), "--codes", str(codes)])
    evaluated = capsys.readouterr().out
    assert f"{tested:.4f}" in evaluated, (tested, evaluated)


def test_without_cpu_bf16_a_run_keeps_its_precision(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda *a: True)
    root, codes = tmp_path / "runs", write_trainable_codes(tmp_path)
    train_stage2(["fit", "--config", str(CONFIGS / "stage2/tiny.yaml"), "--data.codes_dir", str(codes),
                  "--data.batch_size", "8", "--trainer.max_steps", "2", "--trainer.default_root_dir", str(root)])
    assert "bf16" not in capsys.readouterr().err
    assert yaml.safe_load((root / "latest" / "config.yaml").read_text())["trainer"]["precision"] in (None, "32-true")


def test_a_cpu_bf16_run_resumed_mid_epoch_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    """bf16-mixed on the CPU is deterministic: 12 steps straight vs crashed at step 4 and resumed with
    --ckpt_path last (which chooses bf16 again) give the same weights bit for bit."""
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda *a: True)
    codes = write_trainable_codes(tmp_path)

    def fit(root: Path, *extra: str) -> None:
        train_stage2(["fit", "--config", str(CONFIGS / "stage2/tiny.yaml"), "--data.codes_dir", str(codes),
                      "--trainer.default_root_dir", str(root), "--data.batch_size", "8", "--trainer.max_steps", "12",
                      "--trainer.val_check_interval", "3", "--sample_every_n_epochs", "0", "--cpu_bf16", "true",
                      *extra])  # fmt: skip

    crashed_and_resumed_equals_straight(fit, tmp_path)
    assert yaml.safe_load((tmp_path / "resumed" / "version_0" / "config.yaml").read_text())["trainer"]["precision"] \
        == "bf16-mixed"


def test_a_bad_cpu_bf16_value_is_one_line_and_leaves_no_run(tmp_path, capsys):
    root = tmp_path / "runs"
    err = user_error(train_stage2, ["fit", "--config", str(CONFIGS / "stage2/tiny.yaml"), "--data.codes_dir",
                                    str(write_trainable_codes(tmp_path)), "--trainer.default_root_dir", str(root),
                                    "--cpu_bf16", "maybe"], capsys)  # fmt: skip
    assert "\"cpu_bf16\": Expected a <class 'bool'>. Got value: maybe" in err, err  # names the flag and value
    assert not root.exists()
