"""Helpers the benchmark scripts share: config loading with overrides, machine facts, table + JSON output."""

from __future__ import annotations

import json
import platform
import resource
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python benchmarks/x.py` without installing
    sys.path.insert(0, str(ROOT))

from common.malloc import keep_freed_memory  # noqa: E402  (needs the path above)

keep_freed_memory()  # every command does (common.cli.run_command, common.runs.train_main), so benchmarks do too


def load_config(path: str, sets: list[str]) -> dict:
    """Read a YAML config and apply `a.b.c=value` overrides (values parsed as YAML)."""
    cfg = yaml.safe_load(Path(path).read_text())
    for item in sets:
        key, value = item.split("=", 1)
        *parents, last = key.split(".")
        node = cfg
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = yaml.safe_load(value)
    return cfg


def load_stage_configs(stage1_config: str, prior_config: str, sets: list[str]) -> tuple[dict, dict]:
    """Both stages' configs with `stage1.a.b=v` / `prior.a.b=v` overrides applied to the right one."""
    split: dict[str, list[str]] = {"stage1": [], "prior": []}
    for item in sets:
        which, _, rest = item.partition(".")
        if which not in split:
            raise SystemExit(f"--set {item!r}: must start with stage1. or prior.")
        split[which].append(rest)
    return load_config(stage1_config, split["stage1"]), load_config(prior_config, split["prior"])


def machine(device: torch.device | str = "cpu") -> dict:
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    return {"device": name, "machine": platform.machine(), "torch": torch.__version__,
            "threads": torch.get_num_threads()}  # fmt: skip


def peak_ram_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def report(result: dict, json_path: str | None) -> None:
    """Print `key  value` rows and write the JSON file (see write_result)."""
    width = max(map(len, result))
    for k, v in result.items():
        print(f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}", flush=True)
    if json_path:
        write_result(json_path, result)


def write_result(json_path: str | Path, result: dict) -> Path:
    """Write `result` as JSON to `json_path`, or, if that file exists, beside it with the time in its name:
    a re-run never replaces the figures the README quotes (a quick check with --limit once did); move the
    new file over by hand to replace them. Returns the path written."""
    path = Path(json_path)
    if path.exists():
        path = path.with_name(f"{path.stem}_{time.strftime('%Y%m%dT%H%M%S')}{path.suffix}")
        print(f"{json_path} exists (its figures may be quoted in the README): writing {path} instead", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return path


def stage1_splits(models, dataset: str | None = None, root: str | None = None):
    """(ImageSplits of the data stage 1 was trained on, as `evaluate` reads it: the data options its checkpoint
    holds (`tools.load.Models.stage1_data`), so an image folder's val/test split is the training run's;
    --dataset/--root override them; its dataset name; its root)."""
    given = {k: v for k, v in (("dataset", dataset), ("root", root)) if v is not None}
    splits = models.stage1_splits(cache_dir=None, **given)
    return splits, splits.options.dataset, splits.options.root
