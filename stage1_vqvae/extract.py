"""`extract_codes`: encode a dataset with a trained stage-1 VQ-VAE into a codes directory (common/codes.py).

    extract_codes --ckpt runs/stage1/latest/checkpoints/best.ckpt --out codes/fashion_mnist
    extract_codes --ckpt X.ckpt --out codes/ --splits train,val --batch_size 4096 --overwrite  # on a GPU
    python -m stage1_vqvae.extract --ckpt X.ckpt --out codes/ --accelerator cpu --devices 2 --strategy ddp

The data options (--data.dataset, --data.root, ...) default to the ones stored in the checkpoint, so the
codes come from the dataset stage 1 was trained on; image size and channels always come from the model.
Encoding runs in Lightning's predict loop: each rank encodes a contiguous shard of every split and rank 0
gathers the shards and writes them, so N devices give the same arrays as one. fp32 (no TF32), inference
mode, channels_last (about 2x faster convolutions on CPU). The Lightning loop costs nothing measurable
over a plain loop of `encode_to_codes` (same images/s on 2 CPU cores), so there is one code path. On a GPU
the codes stay on the device until a split is done, and one batch is encoded before the clock starts, so
the printed images/s is the steady rate (on an H200 the first run printed 105,000-252,000 images/s for
splits that took 0.04-0.5 s, mostly start-up and one host wait per batch; not re-measured since).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies.launchers import _SubprocessScriptLauncher
from torch.utils.data import DataLoader, Dataset

from common.checkpoint import open_checkpoint
from common.cli import (
    Parser,
    UserError,
    add_overwrite,
    at_least,
    ctrl_c_raises_interrupted,
    make_parser,
    run_command,
)
from common.codes import CodesMeta, sha256_file
from common.codes_writer import CodesWriter
from common.datamodule import ImageDataModule
from common.images import from_uint8
from common.io import check_named
from common.launch import machine_error
from common.logging import quiet_lightning
from common.readers import SPLITS
from common.splits import data_options
from stage1_vqvae.model import VQModel, load_stage1

# Not --data options: image size and channels come from the model; the split is sliced from memory in
# batches of --batch_size, so the loader's batch_size and num_workers do not apply.
SKIPPED_DATA_ARGS = ("image_size", "channels", "batch_size", "num_workers")
GATHER_ELEMENTS = 1 << 24  # codes per all_gather call: bounds the memory a gather needs on every rank


class ExtractError(UserError, RuntimeError):
    """A bad command line; `main` prints the message and exits."""


def make_datamodule(model: VQModel, **data_args: Any) -> ImageDataModule:
    """The data, at the model's image size and channels."""
    return ImageDataModule(**data_args, image_size=model.image_size, channels=model.in_channels)


# ------------------------------------------------------------------------------------------ encoding
def shard_bounds(n: int, world_size: int) -> list[int]:
    """Rank r encodes rows bounds[r]..bounds[r + 1]: contiguous, no padding, no duplicates."""
    return [n * r // world_size for r in range(world_size + 1)]


class _Batches(Dataset):
    """(start, stop) row ranges of one shard; the images stay one uint8 tensor, sliced in predict_step."""

    def __init__(self, start: int, stop: int, batch_size: int) -> None:
        self.starts = list(range(start, stop, batch_size))
        self.stop, self.batch_size = stop, batch_size

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> tuple[int, int]:
        return self.starts[i], min(self.starts[i] + self.batch_size, self.stop)


class CodesPredictor(pl.LightningModule):
    """Runs `encode_to_codes` in Lightning's predict loop over each rank's shard of every split.

    `images` maps split -> uint8 (N, C, H, W). After `trainer.predict`, `local[split]` holds this rank's
    codes (uint16, rows `bounds[split][rank]..bounds[split][rank + 1]`).
    """

    def __init__(self, vqvae: VQModel, images: dict[str, torch.Tensor], batch_size: int, log_every: int = 50):
        super().__init__()
        self.allow_zero_length_dataloader_with_multiple_devices = True  # a split smaller than the world size
        self.vqvae = vqvae
        self.images = images
        self.batch_size = batch_size
        self.log_every = log_every
        self.splits = list(images)
        self.local: dict[str, np.ndarray] = {}
        self.bounds: dict[str, list[int]] = {}
        self._t0: dict[int, float] = {}
        self._pending: dict[str, list[torch.Tensor]] = {}  # split -> codes of its batches so far, on the device

    def predict_dataloader(self) -> list[DataLoader]:
        rank, world = self.global_rank, self.trainer.world_size
        loaders = []
        for split in self.splits:
            bounds = shard_bounds(len(self.images[split]), world)
            self.bounds[split] = bounds
            self.local[split] = np.zeros((bounds[rank + 1] - bounds[rank], *self.vqvae.grid_shape), np.uint16)
            loaders.append(DataLoader(_Batches(bounds[rank], bounds[rank + 1], self.batch_size), batch_size=None))
        return loaders

    def on_predict_start(self) -> None:
        self.vqvae.to(memory_format=torch.channels_last)
        if self.device.type == "cuda":
            # One batch before any timer starts: CUDA's lazy module loading and cuDNN's first calls cost
            # a few hundred ms, more than encoding all of Fashion-MNIST, and would swamp the printed rate.
            first = next((s for s in self.splits if len(self.images[s])), None)
            if first is not None:
                self._encode(self.images[first][: self.batch_size])
                torch.cuda.synchronize(self.device)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images (B, C, H, W) on the host -> codes (B, *grid_shape) int32 on the device."""
        images = from_uint8(x.to(self.device, non_blocking=True))  # (B, C, H, W) in [-1, 1]
        return self.vqvae.encode_to_codes(images.contiguous(memory_format=torch.channels_last)).to(torch.int32)

    def predict_step(self, batch: tuple[int, int], batch_idx: int, dataloader_idx: int = 0) -> int:
        start, stop = (int(b) for b in batch)
        split = self.splits[dataloader_idx]
        self._t0.setdefault(dataloader_idx, time.perf_counter())
        # The codes stay on the device until the shard is done: one copy (and one wait) per split instead
        # of one per batch, so a GPU is never idle while the host waits for a small transfer.
        self._pending.setdefault(split, []).append(self._encode(self.images[split][start:stop]))
        if stop == self.bounds[split][self.global_rank + 1]:
            self.local[split][:] = torch.cat(self._pending.pop(split)).cpu().numpy()
        return stop - start  # not None: Lightning warns about a predict_step that returns None

    def on_predict_batch_end(self, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.global_rank != 0:
            return
        split = self.splits[dataloader_idx]
        done, total = batch[1] - self.bounds[split][0], self.bounds[split][1] - self.bounds[split][0]
        elapsed = time.perf_counter() - self._t0[dataloader_idx]
        world, n = self.trainer.world_size, len(self.images[split])
        if done == total:
            rate = n / max(elapsed, 1e-9)
            procs = f", {world} processes" if world > 1 else ""
            print(f"{split}: {n} images in {elapsed:.1f}s ({rate:.0f} images/s{procs})", flush=True)
        elif (batch_idx + 1) % self.log_every == 0:
            rate = done * world / max(elapsed, 1e-9)
            shard = " of rank 0's shard" if world > 1 else ""
            print(f"{split}: {done}/{total} images{shard} ({rate:.0f} images/s)", flush=True)


def gather_and_write(
    predictor: CodesPredictor, strategy: pl.strategies.Strategy, writer: CodesWriter | None,
    labels: dict[str, torch.Tensor],
) -> None:  # fmt: skip
    """Collect every rank's shard on rank 0 (chunked all_gather) and write it in dataset order."""
    world = strategy.world_size
    for split in predictor.splits:
        bounds, local = predictor.bounds[split], predictor.local[split]
        split_writer = writer.splits[split] if writer is not None else None
        if world == 1:
            split_writer.write(0, local, labels[split])
            continue
        longest = max(b - a for a, b in zip(bounds, bounds[1:]))
        rows = max(1, GATHER_ELEMENTS // max(1, int(np.prod(local.shape[1:]))))
        for c0 in range(0, longest, rows):
            c1 = min(c0 + rows, longest)
            part = torch.zeros((c1 - c0, *local.shape[1:]), dtype=torch.int32)
            mine = torch.from_numpy(local[c0:c1].astype(np.int32))
            part[: len(mine)] = mine
            part = part.to(strategy.root_device)
            gathered = [torch.empty_like(part) for _ in range(world)]
            torch.distributed.all_gather(gathered, part)  # every rank's rows c0..c1 of its shard
            if split_writer is None:
                continue
            for r in range(world):
                a = bounds[r] + c0
                b = min(bounds[r] + c1, bounds[r + 1])
                if b > a:
                    split_writer.write(a, gathered[r][: b - a].cpu(), labels[split][a:b])


def extract_codes(
    model: VQModel,
    datamodule: ImageDataModule,
    out: str | Path,
    stage1_ckpt: str | Path,
    splits: Sequence[str] = SPLITS,
    batch_size: int = 512,
    overwrite: bool = False,
    accelerator: str = "auto",
    devices: int | str = 1,
    strategy: str = "auto",
    stage1_sha256: str | None = None,
) -> CodesMeta | None:
    """Encode `splits` of `datamodule` into the codes directory `out`; returns its meta on rank 0 (else None).
    `stage1_sha256`: the hash of the file `model`'s weights were loaded from (default: the file's now).
    The codes record it, and the copy of `stage1_ckpt` kept beside them must have it: a file rewritten since the
    weights were loaded (a run still training) is refused, not paired with codes another model made."""
    ckpt = str(Path(stage1_ckpt).resolve())
    meta = CodesMeta(
        codebook_size=model.codebook_size,
        grid_shape=model.grid_shape,
        levels=model.levels,
        num_classes=datamodule.num_classes,
        class_names=datamodule.class_names,
        image_size=model.image_size,
        channels=model.in_channels,
        stage1_ckpt=ckpt,
        stage1_sha256=stage1_sha256 or sha256_file(ckpt),
        dataset=datamodule.options.dataset,
    )
    writer = CodesWriter(out, meta, overwrite=overwrite)  # checks `out` now, before the long part
    try:  # before the data: a GPU setting on a CPU machine fails at once
        trainer = pl.Trainer(
            accelerator=accelerator, devices=devices, strategy=strategy, precision="32-true", logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            use_distributed_sampler=False, inference_mode=True,
        )  # fmt: skip
    except Exception as e:
        if (machine := machine_error(e, "--accelerator, --devices and --strategy")) is not None:
            raise machine from None
        raise
    arrays = {split: datamodule.split_arrays(split) for split in splits}
    launcher = trainer.strategy.launcher
    if trainer.world_size > 1 and not (launcher is None or isinstance(launcher, _SubprocessScriptLauncher)):
        raise ExtractError(
            f"--strategy {strategy} starts worker processes that cannot hand the codes back; "
            "use --strategy ddp (run as `extract_codes ...` or `python -m stage1_vqvae.extract ...`)"
        )
    rank0 = trainer.is_global_zero  # known already: Lightning's launcher gives the processes it starts their rank
    with writer if rank0 else contextlib.nullcontext():
        if rank0:  # every output's disk space now: a disk too small fails before the encoding, not after it
            for split, (images, _) in arrays.items():
                writer.add_split(split, len(images))
            writer.copy_stage1(ckpt)  # the codes decode even after this checkpoint's run is resumed, moved or deleted
        predictor = CodesPredictor(model, {s: images for s, (images, _) in arrays.items()}, batch_size)
        with _no_tf32(), ctrl_c_raises_interrupted():  # Ctrl-C: our one line and exit 130, not Lightning's exit 1
            trainer.predict(predictor, return_predictions=False)
        gather_and_write(predictor, trainer.strategy, writer if rank0 else None, {s: y for s, (_, y) in arrays.items()})
        return writer.commit() if rank0 else None


@contextlib.contextmanager
def _no_tf32():
    """fp32 convolutions on CUDA: cuDNN's default TF32 flipped 0.1% of the codes vs the CPU (H200, 10k
    Fashion-MNIST images); true fp32 left 0.008% (summation order). No effect on CPU."""
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = old


# ------------------------------------------------------------------------------------------ CLI
def build_parser(data_defaults: dict[str, Any] | None = None) -> Parser:
    parser = make_parser("extract_codes", __doc__)
    parser.add_argument("--ckpt", type=str, required=True, help="stage-1 checkpoint (.ckpt)")
    parser.add_argument("--out", type=str, required=True, help="codes directory to write")
    parser.add_argument("--splits", type=str, default=",".join(SPLITS), help="comma-separated splits")
    parser.add_argument("--batch_size", type=int, default=512,
                        help="images per batch and device (the model encodes them in passes of at most 256k pixels "
                             "on a CPU, 16M on a GPU)")  # fmt: skip
    parser.add_argument("--accelerator", type=str, default="auto", help="cpu, gpu, ... (Lightning's)")
    parser.add_argument("--devices", type=int | str, default=1, help="number of devices (or Lightning's list)")
    parser.add_argument("--strategy", type=str, default="auto", help="with several devices: ddp")
    add_overwrite(parser, "an existing codes directory (its stage1.ckpt, if of another stage 1, is kept as "
                          "stage1-<sha12>.ckpt for the priors trained on the earlier codes)")  # fmt: skip
    parser.add_class_arguments(ImageDataModule, "data", skip=set(SKIPPED_DATA_ARGS))
    if data_defaults:
        parser.set_defaults({f"data.{k}": v for k, v in data_defaults.items()})
    return parser


def parse_splits(text: str) -> list[str]:
    splits = list(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    unknown = [s for s in splits if s not in SPLITS]
    if unknown or not splits:
        raise ExtractError(f"--splits {text!r}: unknown split(s) {unknown}; choose from {', '.join(SPLITS)}")
    return splits


def _run(args: list[str] | None) -> str | None:
    args = sys.argv[1:] if args is None else list(args)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--ckpt")
    ckpt = pre.parse_known_args(args)[0].ckpt
    model, data_defaults, sha = None, {}, None
    if ckpt:  # the checkpoint's data options become the --data.* defaults
        # opened once, loaded and hashed through that open file: the codes record the hash of these weights even
        # if a run still training replaces the file meanwhile
        source = open_checkpoint(ckpt, "--ckpt", "stage1")
        (model, saved), sha = load_stage1(source, "--ckpt"), source.sha256
        del source  # closes the file: not needed while encoding
        data_defaults = data_options(saved, skip=SKIPPED_DATA_ARGS)
    cfg = build_parser(data_defaults).parse_args(args)
    check_named(cfg.out, "--out", "directory")  # "" is "." once a Path: the codes would fill the working folder
    splits = parse_splits(cfg.splits)
    at_least(1, batch_size=cfg.batch_size)
    datamodule = make_datamodule(model, **cfg.data.as_dict())
    meta = extract_codes(
        model, datamodule, cfg.out, cfg.ckpt, splits, cfg.batch_size, cfg.overwrite,
        cfg.accelerator, cfg.devices, cfg.strategy, sha,
    )  # fmt: skip
    if meta is None:  # not rank 0
        return None
    counts = ", ".join(f"{s} {n}" for s, n in meta.counts.items())
    levels = ", ".join(f"{lv['name']} {lv['grid_shape'][0]}x{lv['grid_shape'][1]} K={lv['codebook_size']}"
                       for lv in meta.levels)  # fmt: skip
    return f"codes ({counts}; {levels}) written to {cfg.out}"


def main(args: list[str] | None = None) -> None:
    quiet_lightning()
    run_command("extract_codes", _run, args)


if __name__ == "__main__":
    main()
