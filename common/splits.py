"""Train/val/test splits of one image dataset, each held as one uint8 tensor (`ImageSplits`), torch only.

A batch costs one indexing op and one conversion to [-1, 1] (stage 1 must see > 1500 images/s on 2 CPU
cores). The readers live in :mod:`common.readers`, the DataLoader plumbing in :mod:`common.loaders`; the
Lightning data module (:mod:`common.datamodule`) adds Lightning's hooks to this class. `data_options` turns a
checkpoint's saved data arguments back into this class's.
"""

from __future__ import annotations

import hashlib
import inspect
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from common.emoji import DEFAULT_ROOT as EMOJI_ROOT
from common.emoji import emoji_class_names, group_split, load_emoji
from common.image_cache import cached_images
from common.images import check_channels, infer_channels
from common.loaders import MAX_WORKERS, SplitIndices, UInt8ImageDataset, loader_options
from common.readers import (
    _MNIST_LIKE,
    _NATIVE,
    _OTHER_SIZES,
    CIFAR10_CLASSES,
    DATASETS,
    SPLITS,
    DatasetError,
    ImageArrays,
    load_cifar10,
    load_image_folder,
    load_mnist_like,
    scan_image_folder,
)  # fmt: skip
from common.shuffle import resumable_loader

RESOLVED_ROOT = "resolved_root"  # the hyperparameter: --data.root as an absolute path where training ran
RESOLVED_CACHE_DIR = "resolved_cache_dir"  # and --data.cache_dir, likewise
OFFICIAL_TEST_SPLIT = {"fashion_mnist": 10_000, "mnist": 10_000, "cifar10": 10_000}  # the test images each ships


class ImageSplits:
    """Train/val/test splits of one image dataset, and loaders over them.

    Each split is one uint8 tensor; loaders give images in [-1, 1] and labels. Plain Python and torch: the
    Lightning data module is :class:`common.datamodule.ImageDataModule`, this class plus Lightning's hooks;
    commands that only read data use this one.

    Args:
        dataset: fashion_mnist, mnist, cifar10, emoji or image_folder (your own images: PNG, JPEG, WebP, BMP,
            TIFF, GIF; one sub-folder per class, or none for one class).
        root: where the data is (image_folder: the folder; emoji: data/emoji; the others: their files, else
            the system copy or a download).
        image_size: pixels a side; None: the data's own (image_folder: 64; 28-px data may be padded to 32).
        channels: 1 or 3; None: the data's own (inferred for a folder).
        batch_size: images per training batch.
        num_workers: loader worker processes (the splits are in memory: 0 is fastest).
        val_size: validation images, carved from the training data. fashion_mnist, mnist, cifar10: None (the
            default) means 5,000, 0 means none (no validation, so no best.ckpt); image_folder: None or 0 means
            10 % (at least 1); emoji: counted in base emoji (all vendors and skin tones of one), None or 0 means
            10 % of them. (0 keeps these meanings: configs and checkpoints' saved options rely on them.)
        test_size: image_folder: test images carved from the folder, 0 (the default) means 10 %; emoji: counted
            in base emoji, 0 means 10 % of them; fashion_mnist, mnist, cifar10: 0 only, their official test
            split is used whole.
        seed: the permutation that draws the splits.
        download: fetch Fashion-MNIST/MNIST (MD5-checked) when not found locally.
        limit: keep the first N images of each split (quick runs: a folder then decodes only those).
        on_device: hold each split on the training device and draw batches there (GPU training is never
            loader-bound); plain loaders ignore it.
        cache_dir: image_folder only: decode the splits once into a file there and memory-map it in every run
            (later runs start at once; a folder larger than memory is read from disk).
        folder_key: set from a checkpoint: the file list its splits were drawn from (a folder that differs
            is named in a warning); leave it unset.
        hflip: in training (the Lightning data module), mirror half of each batch left to right.
    """

    def __init__(
        self,
        dataset: str = "fashion_mnist",
        root: str | None = None,
        image_size: int | None = None,
        channels: int | None = None,
        batch_size: int = 128,
        num_workers: int = 0,
        val_size: int | None = None,
        test_size: int = 0,
        seed: int = 0,
        download: bool = True,
        limit: int | None = None,
        on_device: bool = False,
        cache_dir: str | None = None,
        folder_key: str | None = None,
        hflip: bool = False,
    ) -> None:
        super().__init__()
        if dataset not in DATASETS:
            raise DatasetError(
                f"data: unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}"
            )
        check_channels(channels, "ImageDataModule")
        if dataset == "image_folder" and root is None:
            raise DatasetError("data: dataset=image_folder needs --data.root DIR holding the images")
        if cache_dir is not None and dataset != "image_folder":
            raise DatasetError(
                f"data: --data.cache_dir is for --data.dataset image_folder; {dataset} is read whole into memory "
                "in seconds, so drop --data.cache_dir"
            )
        native, other = _NATIVE.get(dataset, (0, image_size))[1], _OTHER_SIZES.get(dataset)
        if image_size not in (None, native, other):
            how = {28: " (zero-padded)", 64: " (resized)"}.get(native, "")
            raise DatasetError(
                f"data: {dataset} images are {native}x{native}; image_size must be None, {native}"
                f"{f' or {other}{how}' if other else ''}; got {image_size}"
            )
        at_least = {
            "batch_size": (batch_size, 1),
            "image_size": (image_size, 1),
            "limit": (limit, 1),
            "val_size": (val_size, 0),
            "test_size": (test_size, 0),
            "num_workers": (num_workers, 0),
            "seed": (seed, 0),  # numpy's own error for -1 named no flag
        }
        bad = [f"{k}={v} (must be >= {m})" for k, (v, m) in at_least.items() if v is not None and v < m]
        if num_workers is not None and num_workers > MAX_WORKERS:  # 100,000 hung starting them
            bad.append(f"num_workers={num_workers} (must be <= {MAX_WORKERS}; the splits are in memory: 0 is fastest)")
        if bad:
            raise DatasetError(f"data: {', '.join(bad)}")
        if test_size and dataset in OFFICIAL_TEST_SPLIT:  # it was ignored: the run tested on the official split
            raise DatasetError(
                f"data: --data.test_size {test_size}: {dataset} has an official test split ("
                f"{OFFICIAL_TEST_SPLIT[dataset]:,} images), used whole; drop --data.test_size or set it to 0 (it "
                "carves a test split from image_folder and emoji data only; --data.limit N keeps the first N of each "
                "split)"
            )
        # image_size/channels may be None here (resolved from the data); the model saves the resolved ones.
        self.options = SimpleNamespace(dataset=dataset, root=root, batch_size=batch_size, num_workers=num_workers,
                                       val_size=val_size, test_size=test_size, seed=seed, download=download,
                                       limit=limit, on_device=on_device, cache_dir=cache_dir,
                                       folder_key=folder_key, hflip=hflip)  # fmt: skip
        self.record_options(vars(self.options))
        self._image_size_arg, self._channels_arg = image_size, channels
        self._splits: dict[str, UInt8ImageDataset] | None = None
        self._scan: tuple[list[Path], np.ndarray, list[str]] | None = None
        self._channels: int | None = None
        self._cache_file: Path | None = None  # the memory-mapped decoded folder, with --data.cache_dir

    def record_options(self, options: dict[str, Any]) -> None:
        """Where a subclass keeps the options (the Lightning data module saves them as hyperparameters)."""

    def _check_folder_key(self, files: list[Path]) -> None:
        """The splits of a folder are a seeded permutation of its file list, so any file added or removed
        redraws them all: say so when the list differs from the one a checkpoint's splits came from
        (`folder_key`, saved by training), and record this list's key for the checkpoints to come."""
        root = Path(self.options.root)
        digest = hashlib.sha256("\n".join(f.relative_to(root).as_posix() for f in files).encode()).hexdigest()
        key = f"{len(files)}:{digest[:16]}"
        then = self.options.folder_key
        if then and then != key:
            print(f"warning: image folder {root} is not the one the checkpoint's splits were drawn from "
                  f"({then.split(':')[0]} files then, {len(files)} now, or other files): train/val/test are drawn "
                  "anew, so the test split may hold images stage 1 trained on and its figures are not comparable; "
                  "restore the folder for those", file=sys.stderr, flush=True)  # fmt: skip
        # A run resumed on a changed folder keeps the key its splits were first drawn from: later commands
        # still warn (its test split may have been trained on, whichever folder it is read from now).
        self.options.folder_key = then or key
        self.record_folder_key(then or key)

    def record_folder_key(self, key: str) -> None:
        """Where a subclass keeps the folder's key (the Lightning data module: in its hyperparameters)."""

    # Cheap facts (no pixels read), so LightningCLI can link them into the model before setup().
    @property
    def image_size(self) -> int:
        return self._image_size_arg or _NATIVE.get(self.options.dataset, (0, 64))[1]

    @property
    def channels(self) -> int:
        if self._channels is None:
            native = _NATIVE.get(self.options.dataset, (None,))[0]
            self._channels = self._channels_arg or native or infer_channels(self._folder_scan()[0])
        return self._channels

    @property
    def class_names(self) -> list[str]:
        if self.options.dataset == "image_folder":
            return list(self._folder_scan()[2])
        if self.options.dataset == "cifar10":
            return list(CIFAR10_CLASSES)  # the same names batches.meta holds
        if self.options.dataset == "emoji":
            return emoji_class_names(self.options.root)
        return list(_MNIST_LIKE[self.options.dataset]["classes"])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _folder_scan(self) -> tuple[list[Path], np.ndarray, list[str]]:
        if self._scan is None:
            self._scan = scan_image_folder(self.options.root)
            self._check_folder_key(self._scan[0])
        return self._scan

    def _read(self, split: str) -> ImageArrays:
        h = self.options
        if h.dataset == "cifar10":
            return load_cifar10(h.root, split)
        return load_mnist_like(h.dataset, h.root, split, h.download)

    def _to_tensor(self, images: np.ndarray) -> Tensor:
        """(N, H, W, C) uint8 array -> (N, C, H, W) uint8 tensor with the requested channels and size."""
        x = torch.from_numpy(images).permute(0, 3, 1, 2)
        if self.channels == 3 and x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        elif self.channels == 1 and x.shape[1] == 3:  # ITU-R 601-2 luma, as PIL's convert("L")
            luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            x = (x.float() * luma).sum(1, keepdim=True).round().to(torch.uint8)
        pad = (self.image_size - x.shape[-1]) // 2  # 28 -> 32: a zero border, like the black background
        return torch.nn.functional.pad(x, (pad,) * 4).contiguous() if pad else x.contiguous()

    def _load(self) -> dict[str, UInt8ImageDataset]:
        if self._splits is not None:
            return self._splits
        h = self.options
        if h.dataset == "emoji":  # whole base emoji per split: the test split holds unseen glyphs
            arrays = load_emoji(h.root, self.image_size)
            index = group_split(arrays.groups, h.val_size or 0, h.test_size, h.seed)
            return self._make_splits(index, {s: arrays for s in SPLITS})
        if h.dataset == "image_folder":
            n = len(self._folder_scan()[1])  # the files are listed; none is decoded yet
            n_test, n_val = h.test_size or max(1, n // 10), h.val_size or max(1, n // 10)
        else:
            arrays, test = self._read("train"), self._read("test")
            n, n_test, n_val = len(arrays.labels), 0, 5000 if h.val_size is None else h.val_size
        if n_test + n_val >= n:
            raise DatasetError(
                f"data: {h.dataset} has {n} training images but val_size={n_val} and "
                f"test_size={n_test} leave none to train on; pass smaller --data.val_size/--data.test_size"
            )
        perm = np.random.default_rng(h.seed).permutation(n)
        index = {"test": perm[:n_test], "val": perm[n_test : n_test + n_val], "train": perm[n_test + n_val :]}
        if h.dataset == "image_folder":
            return self._folder_splits(index)
        index["test"] = np.arange(len(test.labels))
        return self._make_splits(index, {"train": arrays, "val": arrays, "test": test})

    def _folder_splits(self, index: dict[str, np.ndarray]) -> dict[str, UInt8ImageDataset]:
        """Decode only what the splits keep (with --data.limit a try-out on a large folder reads 3 x limit
        files, not the folder), in the files' order, each straight into its split's rows of one (N, C, H, W)
        array: each split is a slice of it, so the folder is held once, never copied (a user's folder may
        only just fit in memory)."""
        order = [np.sort(index[s])[: self.options.limit] for s in SPLITS]  # sorted: the folder's order
        grouped = np.concatenate(order)  # scan positions, split after split
        kept = np.sort(grouped)  # the reading order
        if self.options.cache_dir is not None:  # decoded once into a file, memory-mapped (larger than memory is fine)
            files, labels, names = self._folder_scan()
            rows = np.argsort(grouped)
            images, self._cache_file, _ = cached_images(self.options.cache_dir, self.options.root,
                                                        [files[i] for i in kept], self.image_size, self.channels, rows)
            arrays = ImageArrays(images, labels[kept][np.argsort(rows)], names)
        else:
            arrays = load_image_folder(self.options.root, self.image_size, self.channels, only=kept,
                                       scan=self._folder_scan(), rows=np.argsort(grouped), channels_first=True)
        cuts = np.cumsum([len(o) for o in order])[:-1]  # views, not copies
        parts = zip(SPLITS, np.split(arrays.images, cuts), np.split(arrays.labels, cuts))
        self._splits = {s: UInt8ImageDataset(torch.from_numpy(x), torch.from_numpy(y).long()) for s, x, y in parts}
        return self._splits

    def _make_splits(
        self, index: dict[str, np.ndarray], source: dict[str, ImageArrays]
    ) -> dict[str, UInt8ImageDataset]:
        self._splits = {}
        for split in SPLITS:
            idx = np.sort(index[split])[: self.options.limit]  # sorted: the source's order, whatever the seed
            self._splits[split] = UInt8ImageDataset(
                self._to_tensor(source[split].images[idx]), torch.from_numpy(source[split].labels[idx]).long()
            )
        return self._splits

    def describe(self) -> str:
        """One line saying what was read, for the user to check before a long run: the split sizes, the image
        size and colour, the classes (an image folder's labels are its sub-folders' names)."""
        h, names = self.options, self.class_names
        where = f" {h.root}" if h.root and h.dataset in ("image_folder", "emoji", "cifar10") else ""
        sizes = " / ".join(f"{s} {len(self.split_arrays(s)[1]):,}" for s in SPLITS)
        shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
        colour = "RGB" if self.channels == 3 else "grayscale"
        classes = f"{len(names)} classes ({shown})" if len(names) > 1 else f"one class ({shown}): no labels to use"
        size, cached = self.image_size, f", memory-mapped from {self._cache_file}" if self._cache_file else ""
        return f"data: {h.dataset}{where}: {sizes} images, {size}x{size} {colour}, {classes}{cached}"

    def split_arrays(self, split: str) -> tuple[Tensor, Tensor]:
        """(uint8 images (N, C, H, W), long labels (N,)) of "train", "val" or "test"."""
        if split not in SPLITS:
            raise DatasetError(f"split must be one of {SPLITS}, got {split!r}")
        ds = self._load()[split]
        return ds.images, ds.labels

    def dataloader(
        self, split: str, batch_size: int | None = None, indices_only: bool = False, resumable: bool = False,
        shard: dict[str, int] | None = None,
    ) -> DataLoader:  # fmt: skip
        """A loader over one split; by default every image once, in order (what code extraction needs).
        `indices_only`: batches of row numbers (`SplitIndices`), drawn in the same order as the images.
        `resumable`: shuffled whole batches that a checkpoint can resume mid-epoch (common.shuffle; the
        same order as a DataLoader's shuffle=True, drop_last=True), this rank's `shard` of them under DDP."""
        images, _ = self.split_arrays(split)  # validates the name, loads once
        workers = self.options.num_workers
        dataset = SplitIndices(split, len(images)) if indices_only else self._load()[split]
        # Workers persist across epochs for the training loader only. An evaluation loader makes its iterator
        # (and draws its worker seed from torch's global RNG) at every pass, so a run resumed mid-epoch, whose
        # first validation would otherwise make one that the uninterrupted run made earlier, draws the same.
        options = dict(loader_options(workers, persistent=resumable, shard=shard), pin_memory=torch.cuda.is_available())
        if resumable:
            return resumable_loader(dataset, batch_size or self.options.batch_size, shard, **options)
        return DataLoader(dataset, batch_size=batch_size or self.options.batch_size, **options)


def data_options(saved: dict[str, Any], skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The saved arguments (e.g. a checkpoint's datamodule_hyper_parameters) that ImageDataModule takes.

    A relative root (or cache_dir) is saved as typed; where it is not found from the current directory but
    was found where training ran (RESOLVED_ROOT and RESOLVED_CACHE_DIR, saved since 2026-11-29), that absolute
    path is used instead: a command run from elsewhere reads the same folder and maps the same cache."""
    known = set(inspect.signature(ImageSplits.__init__).parameters) - {"self", *skip}
    options = {k: v for k, v in saved.items() if k in known}
    if options.get("test_size") and options.get("dataset") in OFFICIAL_TEST_SPLIT:
        # saved before test_size was refused there, where it did nothing: the test split was the official one
        options["test_size"] = 0
    typed = {"root": data_root(options.get("dataset"), options.get("root")), "cache_dir": options.get("cache_dir")}
    for key, resolved_key in (("root", RESOLVED_ROOT), ("cache_dir", RESOLVED_CACHE_DIR)):
        path, resolved = typed[key], saved.get(resolved_key)
        if path and resolved and not Path(path).is_absolute() and not Path(path).exists() \
                and Path(resolved).exists():  # fmt: skip
            options[key] = resolved
    return options


def data_root(dataset: str | None, root: str | None) -> str | None:
    """Where `dataset` is read from: --data.root, else emoji's default folder (data/emoji, relative to the
    current directory); None where the reader finds the files itself (Fashion-MNIST's system copy, downloads)."""
    return root or (str(EMOJI_ROOT) if dataset == "emoji" else None)
