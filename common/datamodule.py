"""`ImageDataModule`: :class:`common.splits.ImageSplits` with Lightning's hooks (download once, the loaders
the Trainer asks for); its options are saved as hyperparameters, so a stage-1 checkpoint knows its data.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from common.images import from_uint8
from common.logging import say_once
from common.readers import _MNIST_LIKE, DatasetError, mnist_like_files
from common.shuffle import ResumableTraining, shard_of
from common.splits import RESOLVED_CACHE_DIR, RESOLVED_ROOT, ImageSplits, data_root


class ImageDataModule(ResumableTraining, ImageSplits, pl.LightningDataModule):
    """The Lightning data module of one image dataset; arguments as :class:`common.splits.ImageSplits`."""

    def record_options(self, options: dict[str, Any]) -> None:
        # the root and cache as typed (a copied project keeps working from its own top) and where they were at
        # training time (common.splits.data_options falls back to those when a later command runs elsewhere)
        root, cache_dir = data_root(options.get("dataset"), options.get("root")), options.get("cache_dir")
        self.save_hyperparameters({**options, RESOLVED_ROOT: str(Path(root).resolve()) if root else None,
                                   RESOLVED_CACHE_DIR: str(Path(cache_dir).resolve()) if cache_dir else None})
        self._on_device: dict[tuple[str, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def record_folder_key(self, key: str) -> None:
        self.hparams["folder_key"] = key  # the checkpoints written after the folder was listed keep it

    def dataloader(self, split: str, batch_size: int | None = None, indices_only: bool | None = None,
                   resumable: bool = False, shard: dict[str, int] | None = None) -> DataLoader:  # fmt: skip
        """As ImageSplits.dataloader; with --data.on_device the batches are row numbers (see below)."""
        indices_only = self.options.on_device if indices_only is None else indices_only
        return super().dataloader(split, batch_size, indices_only, resumable, shard)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """--data.on_device: the whole split (uint8) is copied to the device once, and each batch of row numbers
        is gathered there: (images (B, C, H, W) in [-1, 1], labels (B,)) without a host-to-device copy of
        pixels per batch."""
        if not (isinstance(batch, tuple) and len(batch) == 2 and isinstance(batch[0], str)):
            return super().transfer_batch_to_device(batch, device, dataloader_idx)
        split, rows = batch
        key = (split, torch.device(device))
        if key not in self._on_device:
            images, labels = self.split_arrays(split)  # (N, C, H, W) uint8, (N,) long
            self._on_device[key] = (images.to(device), labels.to(device))
        images, labels = self._on_device[key]
        rows = rows.to(device, non_blocking=True)
        return from_uint8(images[rows]), labels[rows]

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """--data.hflip: in training, half of each batch's images (B, C, H, W) mirrored left to right, on the
        device. The choice comes from a generator seeded by the data seed, the step and the rank, so a resumed
        run mirrors the same images as an uninterrupted one and the global random streams are left alone."""
        if not self.options.hflip or self.trainer is None or not self.trainer.training:
            return batch
        images, labels = batch
        step, rank = self.trainer.global_step, self.trainer.global_rank
        gen = torch.Generator().manual_seed(self.options.seed * 1_000_003 + step * 1_009 + rank)
        mirror = (torch.rand(len(images), generator=gen) < 0.5).to(images.device)  # (B,)
        return torch.where(mirror[:, None, None, None], images.flip(-1), images), labels

    def prepare_data(self) -> None:
        if self.options.dataset in _MNIST_LIKE:  # download once, on rank 0
            for split in ("train", "test"):
                mnist_like_files(self.options.dataset, self.options.root, split, self.options.download)
        elif self.options.cache_dir is not None:  # decode into the cache once, on each node's rank 0; the other
            self._load()  # ranks map the file in setup() (all of them decoding would race to write the same file)

    def setup(self, stage: str | None = None) -> None:
        self._load()
        line = self.describe()  # is this the data meant?
        if stage == "fit":  # one process here (runs.py): before the run starts, not after its model summary
            self._check_train_batch(1)
            if not len(self.split_arrays("val")[1]):  # Lightning's "Total length of DataLoader ... is zero" said only
                warnings.filterwarnings("ignore", message=r"Total length of `DataLoader` across ranks is zero")
                line += ("; no validation split (--data.val_size 0): nothing is validated, so the run keeps last.ckpt "
                         "only, no best.ckpt")  # fmt: skip
        say_once(self, line)

    def train_dataloader(self) -> DataLoader:
        shard = shard_of(self.trainer)
        self._check_train_batch((shard or {}).get("num_replicas", 1))  # each rank trains on its 1/ranks
        return self.dataloader("train", resumable=True, shard=shard)

    def _check_train_batch(self, ranks: int) -> None:
        n, b = len(self.split_arrays("train")[1]), self.options.batch_size
        if n // ranks < b:
            per = f"{n // ranks} images on each of {ranks} processes" if ranks > 1 else f"{n} images"
            raise DatasetError(
                f"data: the train split has {per}, fewer than batch_size={b}, so drop_last would leave no "
                f"batches (the run would end at step 0); lower --data.batch_size{' or --trainer.devices' * (ranks > 1)}"
            )

    def val_dataloader(self) -> DataLoader:
        return self.dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self.dataloader("test")

    def predict_dataloader(self, split: str = "test") -> DataLoader:
        return self.dataloader(split)
