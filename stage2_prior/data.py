"""The codes DataModule: batches of (codes (B, H, W) long, labels (B,) long) read from a codes directory.

Everything the prior must agree with — codebook size, grid shape, number of classes — is read from the
directory's meta.json and exposed as properties, which LightningCLI links into the model.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from common.codes import CodesError, class_counts, load_split, read_meta
from common.codes import check_stage1 as verify_stage1_ckpt
from common.loaders import MAX_WORKERS, loader_options
from common.logging import say_once
from common.shuffle import ResumableTraining, resumable_loader, shard_of


class CodesDataset(Dataset):
    """One split held in memory as int64 (a Fashion-MNIST split of 7x7 codes is a few MB)."""

    def __init__(self, codes: np.ndarray, labels: np.ndarray) -> None:
        self.codes = torch.from_numpy(np.asarray(codes, dtype=np.int64))  # (N, H, W)
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))  # (N,)

    def __len__(self) -> int:
        return len(self.codes)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.codes[i], self.labels[i]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(indices)
        return self.codes[idx], self.labels[idx]


class CodesDataModule(ResumableTraining, pl.LightningDataModule):
    """Train/val/test code grids from ``extract_codes`` output.

    Args:
        codes_dir: the directory extract_codes wrote (meta.json + <split>/codes.npy, labels.npy).
        batch_size: code grids per batch.
        num_workers: DataLoader workers (0 is fastest for in-memory codes).
        check_stage1: verify the stage-1 checkpoint named in meta.json still exists with the same
            SHA-256 (so samples are decoded by the model that made the codes).
        perturb: while training, replace each code by a uniformly random one with this probability: a
            background prior for `score_anomalies --background` (Ren et al. 2019); validation stays clean.
    """

    def __init__(self, codes_dir: str, batch_size: int = 128, num_workers: int = 0, check_stage1: bool = True,
                 perturb: float = 0.0) -> None:  # fmt: skip
        super().__init__()
        self.save_hyperparameters()
        if not 0.0 <= perturb < 1.0:
            raise CodesError(f"--data.perturb must be in [0, 1), got {perturb}")
        # here, not when the loader is made: the sampler's own ValueError came after the run folder was made
        if not isinstance(batch_size, int) or batch_size < 1:
            raise CodesError(f"--data.batch_size must be an integer >= 1, got {batch_size!r}")
        if not isinstance(num_workers, int) or not 0 <= num_workers <= MAX_WORKERS:
            raise CodesError(f"--data.num_workers must be an integer in 0..{MAX_WORKERS} (0: load in the main "
                             f"process), got {num_workers!r}")  # fmt: skip
        self.meta = read_meta(codes_dir)
        # The checkpoint meta.json names, else the copy in the codes directory; CodesError if neither is as it was.
        self.stage1_ckpt = verify_stage1_ckpt(
            self.meta, codes_dirs=[codes_dir],
            remedy=f"re-run `extract_codes --ckpt STAGE1.ckpt --out {codes_dir} --overwrite` with the stage 1 "
                   "to decode the prior's samples",
        ) if check_stage1 else self.meta.stage1_ckpt  # fmt: skip
        self._splits: dict[str, CodesDataset] = {}

    # Linked into the model by train_stage2: never typed twice.
    @property
    def codebook_size(self) -> int:
        return self.meta.codebook_size

    @property
    def grid_shape(self) -> tuple[int, int]:
        return tuple(self.meta.grid_shape)

    @property
    def num_classes(self) -> int:
        return self.meta.num_classes

    @property
    def meta_dict(self) -> dict:
        """meta.json's fields, plus the training split's count of each class ("class_counts"), which the prior
        keeps so that `sample --class_mix data` can draw classes in the data's proportions."""
        meta = asdict(self.meta)
        # where the prior's tools look for the stage-1 copy when the checkpoint meta.json names is gone: the codes
        # directory as typed (from a moved project's top) and as it was where training ran
        codes_dir = self.hparams["codes_dir"]
        meta["codes_dir"], meta["codes_dir_resolved"] = str(codes_dir), str(Path(codes_dir).resolve())
        if self.meta.num_classes and "train" in self.meta.counts:
            meta["class_counts"] = class_counts(self.split("train").labels.numpy(), self.meta.num_classes)
        return meta

    def split(self, name: str) -> CodesDataset:
        if name not in self._splits:
            if name not in self.meta.counts:
                raise CodesError(
                    f"{self.hparams.codes_dir} has no split {name!r} (it has {', '.join(self.meta.counts)}); "
                    "re-run extract_codes with --splits train,val,test"
                )
            codes, labels = load_split(self.hparams.codes_dir, name)
            self._splits[name] = CodesDataset(codes, labels)
        return self._splits[name]

    def setup(self, stage: str | None = None) -> None:
        for name in ("train", "val", "test"):
            if name in self.meta.counts:
                self.split(name)
        if stage == "fit" and "train" in self.meta.counts:  # one process here (runs.py): before the run starts
            self._check_batch("train", 1)
        say_once(self, self.describe())

    def _check_batch(self, name: str, ranks: int) -> None:
        """ValueError when a shuffled split has fewer grids per process than a batch (drop_last: no steps)."""
        ds = self.split(name)
        if len(ds) // ranks < self.hparams.batch_size:
            each = f" ({len(ds) // ranks} on each of {ranks} processes: or lower --trainer.devices)" * (ranks > 1)
            raise ValueError(
                f"--data.batch_size {self.hparams.batch_size} is larger than the {len(ds)} {name} code grids{each}"
            )

    def describe(self) -> str:
        """One line: the splits' sizes, the grid (or levels), the codebook and the classes."""
        m = self.meta
        sizes = " / ".join(f"{s} {n:,}" for s, n in m.counts.items())
        levels = m.levels or []
        grid = " + ".join(f"{lv['name']} {lv['grid_shape'][0]}x{lv['grid_shape'][1]}" for lv in levels) \
            if len(levels) > 1 else f"{m.grid_shape[0]}x{m.grid_shape[1]}"
        classes = f"{m.num_classes} classes" if m.num_classes else "no classes"
        return f"codes: {self.hparams.codes_dir}: {sizes} code maps of {grid}, codebook {m.codebook_size}, {classes}"

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        ds, shard = self.split(name), shard_of(self.trainer)
        if shuffle:  # under DDP each rank trains on its 1/ranks of the split
            self._check_batch(name, (shard or {}).get("num_replicas", 1))
        workers = self.hparams.num_workers
        # persistent workers for the training loader only: see common.splits.ImageSplits.dataloader
        options = loader_options(workers, persistent=shuffle, shard=shard)
        if shuffle:  # __getitems__ returns whole batches (collate_fn)
            return resumable_loader(ds, self.hparams.batch_size, shard, **options)
        return DataLoader(ds, batch_size=self.hparams.batch_size, **options)  # in order, every grid

    def on_after_batch_transfer(self, batch: tuple[torch.Tensor, torch.Tensor], dataloader_idx: int) -> tuple:
        """--data.perturb: random codes in place of a fraction of the training codes (on the device)."""
        p = self.hparams.perturb
        if p <= 0 or self.trainer is None or not self.trainer.training:
            return batch
        codes, labels = batch  # (B, H, W), (B,)
        noise = torch.randint(0, self.codebook_size, codes.shape, device=codes.device)
        return torch.where(torch.rand(codes.shape, device=codes.device) < p, noise, codes), labels

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
