"""`ImageDataModule`: :class:`common.splits.ImageSplits` with Lightning's hooks (download once, the loaders
the Trainer asks for); its options are saved as hyperparameters, so a stage-1 checkpoint knows its data.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from torch.utils.data import DataLoader

from common.readers import _MNIST_LIKE, DatasetError, mnist_like_files
from common.splits import ImageSplits


class ImageDataModule(ImageSplits, pl.LightningDataModule):
    """The Lightning data module of one image dataset; arguments as :class:`common.splits.ImageSplits`."""

    def record_options(self, options: dict[str, Any]) -> None:
        self.save_hyperparameters(options)

    def prepare_data(self) -> None:
        if self.options.dataset in _MNIST_LIKE:  # download once, on rank 0
            for split in ("train", "test"):
                mnist_like_files(self.options.dataset, self.options.root, split, self.options.download)

    def setup(self, stage: str | None = None) -> None:
        self._load()

    def train_dataloader(self) -> DataLoader:
        n, b = len(self.split_arrays("train")[1]), self.options.batch_size
        if n < b:
            raise DatasetError(
                f"data: the train split has {n} images, fewer than batch_size={b}, so "
                "drop_last would leave no batches; lower --data.batch_size"
            )
        return self.dataloader("train", shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return self.dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self.dataloader("test")

    def predict_dataloader(self, split: str = "test") -> DataLoader:
        return self.dataloader(split)
