"""What the small auxiliary nets (the feature net of FID, the anomaly net of `transform_knn`) share: their
training loop and their file, one plain ``torch.save`` dict, loadable with ``weights_only=True``, written
atomically.

    add_training_options(parser, lr=3e-3, kind="feature_net", overwrite="an existing --out file")  # the CLI
    out, device, dm = start_training(cfg, default_path, smallest_image_size(FeatureNet()))
    losses = fit_classifier(net, next_batch, steps, batch_size, lr)   # next_batch() -> (images, targets)
    save_net_file(path, "vqgen-feature-net", 1, arch, net, dataset=..., ...)
    record = load_net_file(path, "vqgen-feature-net", 1, "feature-net", "train_feature_net ...", FeaturesError)

The record holds ``format``, ``version``, ``arch`` (the constructor's arguments), ``state_dict`` and whatever
the caller adds (data options, image size, channels, reference features...).
"""

from __future__ import annotations

import math
import re
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.cli import UserError, add_device, add_overwrite, at_least, check_seed, resolve_device
from common.image_cache import size_text
from common.io import OutputError, atomic_file, check_output, no_space
from common.optim import adamw_warmup_cosine


def add_training_options(parser, lr: float, kind: str, overwrite: str) -> None:
    """The options both training commands take: --steps, --lr (default `lr`), --width, --seed, --out (default
    runs/<kind>/<dataset>.pt), --overwrite (help: `overwrite`), --device, --log_every and the --data.* options."""
    from common.splits import ImageSplits  # the data options; only the training commands need them

    parser.add_argument("--steps", type=int, default=1000, help="training steps (of --data.batch_size images)")
    parser.add_argument("--lr", type=float, default=lr, help="peak AdamW learning rate")
    parser.add_argument("--width", type=int, default=32, help="channels of the first conv layers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=str, default=None, help=f"default: runs/{kind}/<dataset>.pt (an image folder: "
                        "image_folder_<folder name>.pt)")
    add_overwrite(parser, overwrite)
    add_device(parser)
    parser.add_argument("--log_every", type=int, default=100, help="print a progress line every N steps")
    parser.add_class_arguments(ImageSplits, "data")


# The size a data set is read at without --data.image_size: a net for another size gets its own default file.
DEFAULT_SIZES = {"fashion_mnist": 28, "mnist": 28, "cifar10": 32, "emoji": 64, "image_folder": 64}


def dataset_key(dataset: str, root: str | None, image_size: int | None = None) -> str:
    """`dataset`, or image_folder_<name of the folder> for an image folder (characters outside [A-Za-z0-9._-]
    become _), so folders of different names never share a default file (the feature net's `auto` also checks
    that its file was trained on the very folder); `_<size>px` after it for another size than the data's
    default (a net reads one size: a 32-px and a 64-px run of one folder each need their own)."""
    size = f"_{image_size}px" if image_size and image_size != DEFAULT_SIZES.get(dataset) else ""
    if dataset != "image_folder" or not root:
        return dataset + size
    name = re.sub(r"[^A-Za-z0-9._-]", "_", Path(root).resolve().name) or "root"
    return f"image_folder_{name}{size}"


def smallest_image_size(net: nn.Module) -> int:
    """The smallest side `net` takes: each max-pooling divides the side by its stride, rounding down, and one
    that leaves 0 pixels fails (two 2x poolings: 4 -> 2 -> 1 works, 3 -> 1 -> 0 does not)."""
    return math.prod(m.stride for m in net.modules() if isinstance(m, nn.MaxPool2d))


def start_training(cfg, default_path: Callable[[str, str | None, int | None], Path], min_image_size: int):
    """Check the shared options (and that the net takes --data.image_size: at least `min_image_size`) and the
    output (before any slow work), seed, read the data: (out, device, the ImageSplits)."""
    from common.splits import ImageSplits

    at_least(1, steps=cfg.steps, width=cfg.width)
    check_seed(cfg.seed)
    at_least(0, log_every=cfg.log_every)
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise UserError(f"--lr must be a finite number > 0, got {cfg.lr}")
    data = cfg.data.as_dict()
    default = default_path(data["dataset"], data.get("root"), data.get("image_size"))
    out = check_output(cfg.out if cfg.out is not None else default, cfg.overwrite)  # --out "" is refused
    device = resolve_device(cfg.device)
    dm = ImageSplits(**data)  # checks the data options; reads nothing yet
    if dm.image_size < min_image_size:
        raise UserError(f"--data.image_size must be >= {min_image_size} for this net (its max-poolings divide the "
                        f"side by {min_image_size}), got {dm.image_size}")  # fmt: skip
    torch.manual_seed(cfg.seed)
    return out, device, dm


def fit_classifier(net: nn.Module, next_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]], steps: int,
                   batch_size: int, lr: float, log_every: int = 0) -> list[float]:  # fmt: skip
    """Train `net` for `steps` steps of cross-entropy on what `next_batch()` draws (images (B, C, S, S) in
    [-1, 1] and targets (B,), on the net's device): AdamW, warm-up + cosine, channels_last (about 1.6x
    faster convolutions on CPU). Prints a progress line every `log_every` steps; returns every step's loss. A loss
    or weights that stop being finite end it with a UserError: training diverged at step N, lower --lr."""
    net.to(memory_format=torch.channels_last)
    sched = adamw_warmup_cosine(net, lr, 5e-4, min(100, steps // 10), steps)["lr_scheduler"]["scheduler"]
    opt = sched.optimizer
    net.train()
    losses, t0 = [], time.perf_counter()
    for step in range(steps):
        x, target = next_batch()
        loss = F.cross_entropy(net(x.contiguous(memory_format=torch.channels_last)), target)
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            raise _diverged(step, steps, lr, f"loss {losses[-1]}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        try:
            opt.step()
        except RuntimeError as e:  # AdamW's decay factor 1 - lr * weight_decay beyond float32 (lr 1e308)
            if "overflow" not in str(e):
                raise
            raise _diverged(step, steps, lr, "the update overflowed") from None
        sched.step()
        if log_every and ((step + 1) % log_every == 0 or step + 1 == steps):
            rate = (step + 1) * batch_size / max(time.perf_counter() - t0, 1e-9)
            print(f"step {step + 1}/{steps} loss={np.mean(losses[-log_every:]):.4f} {rate:.0f} img/s", flush=True)
    if not all(v.isfinite().all() for v in net.state_dict().values() if v.is_floating_point()):
        raise _diverged(steps - 1, steps, lr, "the weights are not finite")  # the last update, which no loss saw
    return losses


def _diverged(step: int, steps: int, lr: float, why: str) -> UserError:
    """The error for a run whose loss or weights stopped being finite at (0-based) `step`."""
    return UserError(f"training diverged at step {step + 1} of {steps} ({why}); lower --lr (now {lr:g})")


def state_dict_cpu(net: nn.Module) -> dict[str, torch.Tensor]:
    """The net's weights and buffers, detached, on the CPU (what the files store)."""
    return {k: v.detach().cpu() for k, v in net.state_dict().items()}


def save_net_file(path: str | Path, fmt: str, version: int, arch: dict, net: nn.Module | None, **info: Any) -> Path:
    """Write the record to `path` atomically (temp file + rename); tensors are saved from the CPU. With
    `net` None the caller puts the weights in `info` (several nets in one file)."""
    path = Path(path)
    weights = {} if net is None else {"state_dict": state_dict_cpu(net)}
    record = {"format": fmt, "version": version, "arch": arch, **weights, **info}
    try:
        with atomic_file(path) as f:
            torch.save(record, f)
    except (RuntimeError, OSError) as e:
        if (cause := _write_error(e)) is None or (isinstance(e, OSError) and not no_space(e)):
            raise  # a plain OSError that names its file already ends the command with one line
        if not no_space(cause):
            raise UserError(f"--out {path}: cannot write it ({cause.strerror or cause}); choose another --out") from e
        need, free = _tensor_bytes(record), shutil.disk_usage(path.parent).free
        raise UserError(
            f"--out {path}: no space left on device (the file needs about {size_text(need)}, "
            f"{size_text(free)} is free there); free some space or choose another --out"
        ) from e
    return path


def _tensor_bytes(obj: Any) -> int:
    """The bytes of the tensors in `obj` (dicts and lists of them): about what torch.save writes."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    return sum(_tensor_bytes(v) for v in items)


def _write_error(e: BaseException) -> OSError | None:
    """The OSError of a failed write (a full disk), or None. torch.save re-raises its file's OSError as a
    RuntimeError ("[enforce fail at inline_container.cc] unexpected pos ...") with the OSError as its context;
    an OutputError (--out taken meanwhile) already says what to do."""
    while e is not None and not isinstance(e, OSError):
        e = e.__cause__ or e.__context__
    return None if isinstance(e, OutputError) or e is None or e.errno is None else e


def load_net_file(path: str | Path, fmt: str, version: int | tuple[int, ...], kind: str, train: str,
                  error: type[Exception], what: str = "") -> dict[str, Any]:  # fmt: skip
    """The record of a `kind` file ("feature-net") of format `fmt` and `version` (or one of a tuple of them),
    or `error` with one line that names `what` (the flag, if any) and the file, and says how to make one
    (`train`: the command)."""
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
    versions = version if isinstance(version, tuple) else (version,)
    if record.get("version") not in versions:
        readable = " or ".join(filter(None, [", ".join(map(str, versions[:-1])), str(versions[-1])]))  # "1, 2 or 3"
        raise error(f"{name}: {kind} format version {record.get('version')!r}, this code reads {readable}; "
                    f"re-run {train}")  # fmt: skip
    return record


@contextmanager
def rebuilding(path: str | Path, error: type[Exception], train: str, what: str = "") -> Iterator[None]:
    """Around rebuilding nets from a record `load_net_file` returned: a right header over wrong contents
    (missing keys, weights of another shape, ...) becomes `error` with one line that names the file and says
    to re-run `train`, instead of a traceback."""
    try:
        yield
    except UserError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        detail = (str(e).strip().splitlines() or [""])[0]
        raise error(f"{what} {path}".strip() + f" is damaged ({type(e).__name__}: {detail}); re-run {train}") from e
