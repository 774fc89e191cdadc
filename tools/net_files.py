"""The file of a small auxiliary net (the feature net of FID, the anomaly net of `transform_knn`): one plain
``torch.save`` dict, loadable with ``weights_only=True``, written atomically.

    save_net_file(path, "vqgen-feature-net", 1, arch, net, dataset=..., ...)
    record = load_net_file(path, "vqgen-feature-net", 1, "feature-net", "train_feature_net ...", FeaturesError)

The record holds ``format``, ``version``, ``arch`` (the constructor's arguments), ``state_dict`` and whatever
the caller adds (data options, image size, channels, reference features...).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.io import atomic_file


def save_net_file(path: str | Path, fmt: str, version: int, arch: dict, net: nn.Module, **info: Any) -> Path:
    """Write the record to `path` atomically (temp file + rename); tensors are saved from the CPU."""
    path = Path(path)
    record = {"format": fmt, "version": version, "arch": arch,
              "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()}, **info}  # fmt: skip
    with atomic_file(path) as f:
        torch.save(record, f)
    return path


def load_net_file(path: str | Path, fmt: str, version: int, kind: str, train: str, error: type[Exception],
                  what: str = "") -> dict[str, Any]:  # fmt: skip
    """The record of a `kind` file ("feature-net") of format `fmt` and `version`, or `error` with one line that
    names `what` (the flag, if any) and the file, and says how to make one (`train`: the command)."""
    path = Path(path)
    name = f"{what} {path}".strip()
    a_kind = f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"
    if not path.is_file():
        raise error(f"{name} does not exist; train one with `{train} --out {path}`")
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, or one holding arbitrary objects
        raise error(f"{name} is not {a_kind} file ({type(e).__name__}: {e})") from e
    if not isinstance(record, dict) or record.get("format") != fmt:
        raise error(f"{name} is not {a_kind} file written by {train.split()[0]}")
    if record.get("version") != version:
        raise error(f"{name}: {kind} format version {record.get('version')!r}, this code reads {version}; "
                    f"re-run {train}")  # fmt: skip
    return record
