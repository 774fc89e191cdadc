"""Image data for both stages: dataset readers, `ImageDataModule`, uint8 <-> [-1, 1] conversion, image grids.

Vocabulary: `images` are float32 tensors (B, C, H, W) in [-1, 1]. Readers return uint8 arrays (N, H, W, C);
the DataModule holds each split as one uint8 tensor (N, C, H, W), so a batch costs one indexing op and one
conversion (stage 1 must see > 1500 images/s on 2 CPU cores).
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import pickle
import struct
import tempfile
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

DATASETS = ("fashion_mnist", "mnist", "cifar10", "image_folder")
SPLITS = ("train", "val", "test")
FASHION_MNIST_CLASSES = "T-shirt/top,Trouser,Pullover,Dress,Coat,Sandal,Shirt,Sneaker,Bag,Ankle boot".split(
    ","
)
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DOWNLOAD_TIMEOUT_S = 20  # short: on a closed network we want the clear error now, not after minutes
_NATIVE = {"fashion_mnist": (1, 28), "mnist": (1, 28), "cifar10": (3, 32)}  # (channels, size)
_GRAY_MODES = {"1", "L", "LA", "I", "F", "I;16", "I;16B", "I;16L", "I;16N"}
_MNIST_LIKE = {
    "fashion_mnist": dict(
        url="http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        classes=FASHION_MNIST_CLASSES,
        system_dirs=["/usr/share/datasets/fashion-mnist"],
        torchvision="FashionMNIST",
        apt="install it with `apt-get install -y dataset-fashion-mnist` or ",
        md5={
            "train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12e480ee83fd310",
        },
    ),
    "mnist": dict(
        url="https://ossci-datasets.s3.amazonaws.com/mnist/",
        classes=[str(i) for i in range(10)],
        system_dirs=[],
        torchvision="MNIST",
        apt="",
        md5={
            "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b5f8b14c5",
        },
    ),
}


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are missing; the message lists where we looked and how to get them."""


@dataclass
class ImageArrays:
    """What every reader returns."""

    images: np.ndarray  # uint8 (N, H, W, C)
    labels: np.ndarray  # int64 (N,)
    class_names: list[str]


def to_uint8(images: Tensor) -> Tensor:
    """Float images in [-1, 1] -> uint8 in [0, 255], same layout (uint8 input is returned unchanged)."""
    if images.dtype == torch.uint8:
        return images
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def from_uint8(x: Tensor) -> Tensor:
    """uint8 images in [0, 255] -> float32 in [-1, 1]; `to_uint8(from_uint8(x)) == x` exactly."""
    if x.dtype != torch.uint8:
        raise TypeError(f"from_uint8 expects a uint8 tensor, got {x.dtype}")
    return x.float().div_(127.5).sub_(1.0)


@contextmanager
def _atomic_file(dest: Path) -> Iterator[BinaryIO]:
    """A temp file beside `dest`, moved into place only if the block succeeds: never a half-written file."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# -------------------------------------------------------------------------------- IDX (MNIST-like)
def _read_idx_array(path: Path, ndim: int) -> np.ndarray:
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":  # gzip magic; IDX files start with 0x00
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as e:
        raise ValueError(f"{path}: cannot read IDX file ({e}); re-download it") from e
    header = 4 + 4 * ndim
    expected = 0x800 | ndim  # 0x00000803 images (N, H, W), 0x00000801 labels (N,)
    if len(raw) < header:
        raise ValueError(
            f"{path}: truncated IDX file ({len(raw)} bytes, header needs {header}); re-download it"
        )
    magic, *dims = struct.unpack(f">{1 + ndim}I", raw[:header])
    if magic != expected:
        kind = "images" if ndim == 3 else "labels"
        raise ValueError(
            f"{path}: bad IDX magic 0x{magic:08x}, expected 0x{expected:08x} for an {kind} file; "
            "is this the right file?"
        )
    if len(raw) - header != math.prod(dims):
        raise ValueError(
            f"{path}: IDX header says shape {tuple(dims)} ({math.prod(dims)} bytes) but the file "
            f"holds {len(raw) - header} data bytes; it is truncated or corrupt, re-download it"
        )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def read_idx(images_path: str | Path, labels_path: str | Path) -> ImageArrays:
    """Read an IDX images file (N, H, W) and labels file (N,), plain or gzipped."""
    images = _read_idx_array(Path(images_path), 3)
    labels = _read_idx_array(Path(labels_path), 1).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(
            f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels; "
            "are they from the same split?"
        )
    names = [str(i) for i in range(int(labels.max()) + 1)] if len(labels) else []
    return ImageArrays(images[..., None].copy(), labels, names)  # copy: frombuffer arrays are read-only


def _download(url: str, dest: Path, md5: str) -> Path:
    digest = hashlib.md5()
    # Open the URL first, so a closed network leaves no empty folder or temp file behind.
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, _atomic_file(dest) as out:
        while chunk := response.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
        if digest.hexdigest() != md5:
            raise ValueError(f"{url}: MD5 {digest.hexdigest()} does not match the expected {md5}")
    return dest


def mnist_like_files(name: str, root: str | None, split: str, download: bool) -> tuple[Path, Path]:
    """Find (or download into `root`, default data/<name>) the IDX images and labels files of one split."""
    if name not in _MNIST_LIKE or split not in ("train", "test"):
        raise ValueError(
            f"mnist_like_files: name must be one of {list(_MNIST_LIKE)} and split train|test, "
            f"got name={name!r} split={split!r}"
        )
    source = _MNIST_LIKE[name]
    base = Path(root) if root else Path("data") / name
    dirs = [base, base / source["torchvision"] / "raw", *map(Path, source["system_dirs"])]
    prefix = "train" if split == "train" else "t10k"
    stems = [f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"]
    found = [next((d / n for d in dirs for n in (s, s + ".gz") if (d / n).is_file()), None) for s in stems]
    problem = "download=False"
    if download and None in found:
        try:
            found = [
                p or _download(source["url"] + s + ".gz", base / (s + ".gz"), source["md5"][s])
                for s, p in zip(stems, found)
            ]
        except (OSError, ValueError) as e:  # URLError and timeouts are OSErrors
            problem = f"download from {source['url']} failed: {e}"
    if None not in found:
        return found[0], found[1]
    searched = "\n  ".join(f"{d / s}[.gz]" for d in dirs for s in stems)
    raise DatasetNotFoundError(
        f"{name} {split} split not found ({problem}). Looked for:\n  {searched}\n"
        f"To fix: {source['apt']}pass --data.root DIR holding {stems[0]}.gz and {stems[1]}.gz "
        f"(from {source['url']})."
    )


def load_mnist_like(
    name: str = "fashion_mnist", root: str | None = None, split: str = "train", download: bool = True
) -> ImageArrays:
    """Fashion-MNIST or MNIST (28x28 grayscale) from `root`, the system copy, or the official mirror."""
    arrays = read_idx(*mnist_like_files(name, root, split, download))
    arrays.class_names = list(_MNIST_LIKE[name]["classes"])
    return arrays


# -------------------------------------------------------------------------------- CIFAR-10
def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise DatasetNotFoundError(f"{path}: missing CIFAR-10 file; re-extract cifar-10-python.tar.gz there")
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except Exception as e:  # a corrupt pickle can raise almost anything; name the file whatever it is
        raise ValueError(
            f"{path}: not a CIFAR-10 python batch ({type(e).__name__}: {e}); re-extract it"
        ) from e


def load_cifar10(root: str | None = None, split: str = "train") -> ImageArrays:
    """CIFAR-10 python batches; `root` is `cifar-10-batches-py` or its parent (default data/cifar10)."""
    if split not in ("train", "test"):
        raise ValueError(f"load_cifar10: split must be train|test, got {split!r}")
    base = Path(root) if root else Path("data") / "cifar10"
    folder = next((d for d in (base, base / "cifar-10-batches-py") if (d / "batches.meta").is_file()), None)
    if folder is None:
        raise DatasetNotFoundError(
            f"CIFAR-10 not found: no batches.meta in {base} or {base / 'cifar-10-batches-py'}. "
            "Download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz, extract it "
            "and pass --data.root DIR."
        )
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    images, labels = [], []
    for name in names:
        batch = _unpickle(folder / name)
        try:
            data = np.asarray(batch[b"data"], dtype=np.uint8)
            y = np.asarray(batch[b"labels"], dtype=np.int64)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{folder / name}: not a CIFAR-10 batch (no b'data'/b'labels': {e})") from e
        if data.ndim != 2 or data.shape[1] != 3072 or len(y) != len(data):
            raise ValueError(
                f"{folder / name}: expected data (N, 3072) and N labels, got data {data.shape} "
                f"and {len(y)} labels"
            )
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # (N, H, W, C)
        labels.append(y)
    meta = _unpickle(folder / "batches.meta")
    names = [n.decode() for n in meta.get(b"label_names", [])] or list(CIFAR10_CLASSES)
    return ImageArrays(np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels), names)


# -------------------------------------------------------------------------------- image files
def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()
    )


def scan_image_folder(root: str | Path) -> tuple[list[Path], np.ndarray, list[str]]:
    """(files, labels, class_names): each sub-folder holding images is a class, else one class."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetNotFoundError(
            f"image folder {root} does not exist; pass --data.root DIR holding .png/.jpg "
            "images (optionally in one sub-folder per class)"
        )
    classes = [(d.name, files) for d in sorted(root.iterdir()) if d.is_dir() and (files := _image_files(d))]
    loose = [p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")]
    if classes and loose:  # silently dropping the loose images would surprise; make the layout explicit
        raise ValueError(
            f"{root} holds both class sub-folders and loose images (e.g. {loose[0].name}); "
            "move the loose images into a sub-folder"
        )
    if not classes:
        classes = [(root.resolve().name, _image_files(root))]
    if not classes[0][1]:
        raise DatasetNotFoundError(f"no .png/.jpg images found under {root}")
    files = [f for _, fs in classes for f in fs]
    labels = np.concatenate([np.full(len(fs), i, np.int64) for i, (_, fs) in enumerate(classes)])
    return files, labels, [name for name, _ in classes]


def _check_channels(channels: int | None, where: str) -> None:
    if channels not in (None, 1, 3):
        raise ValueError(
            f"{where}: channels must be 1 (grayscale), 3 (RGB) or None (infer), got {channels!r}"
        )


def infer_channels(files: list[Path]) -> int:
    """1 if every image is grayscale, else 3 (reads headers only)."""
    for path in files:
        try:
            with Image.open(path) as img:
                if img.mode not in _GRAY_MODES:
                    return 3
        except Exception as e:
            raise ValueError(
                f"{path}: cannot read image ({type(e).__name__}: {e}); fix or delete the file"
            ) from e
    return 1


def _read_image(path: Path, image_size: int, channels: int) -> np.ndarray:
    """One file -> uint8 (image_size, image_size, channels): shorter side resized, then centre-cropped."""
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)  # phone JPEGs store rotation in EXIF
            if img.mode.startswith("I") and np.asarray(img).max() > 255:  # 16-bit: PIL's convert would clip
                img = Image.fromarray(
                    (np.asarray(img, np.float64) / 257).round().clip(0, 255).astype(np.uint8)
                )
            img = img.convert("L" if channels == 1 else "RGB")
            w, h = img.size
            s = image_size / min(w, h)
            nw, nh = max(image_size, round(w * s)), max(image_size, round(h * s))
            if (nw, nh) != (w, h):
                img = img.resize((nw, nh), Image.Resampling.LANCZOS)
            left, top = (nw - image_size) // 2, (nh - image_size) // 2
            arr = np.asarray(img.crop((left, top, left + image_size, top + image_size)), dtype=np.uint8)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for broken files
        raise ValueError(
            f"{path}: cannot read image ({type(e).__name__}: {e}); fix or delete the file"
        ) from e
    return arr.reshape(image_size, image_size, channels)


def load_image_folder(root: str | Path, image_size: int, channels: int | None = None) -> ImageArrays:
    """All .png/.jpg/.jpeg under `root` as (N, image_size, image_size, C); labels as `scan_image_folder`."""
    _check_channels(channels, "load_image_folder")
    files, labels, class_names = scan_image_folder(root)
    channels = channels or infer_channels(files)
    return ImageArrays(np.stack([_read_image(p, image_size, channels) for p in files]), labels, class_names)


def load_image(path: str | Path, image_size: int, channels: int | None = None) -> Tensor:
    """One user image -> (1, C, image_size, image_size) in [-1, 1], resized/cropped like the folder reader."""
    path = Path(path)
    _check_channels(channels, "load_image")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image file")
    arr = _read_image(path, image_size, channels or infer_channels([path]))
    return from_uint8(torch.from_numpy(arr).permute(2, 0, 1).contiguous()[None])


# -------------------------------------------------------------------------------- grids
def make_grid(
    images: Tensor, nrow: int | None = None, padding: int = 2, scale: int = 1, pad_value: int = 255
) -> np.ndarray:
    """Tile (B, C, H, W) images ([-1, 1] float or uint8) into a uint8 (H, W, C) array, `nrow` per row."""
    if images.ndim != 4 or images.shape[1] not in (1, 3) or len(images) == 0:
        raise ValueError(f"make_grid expects images (B>0, C in 1|3, H, W), got shape {tuple(images.shape)}")
    x = to_uint8(images).cpu().permute(0, 2, 3, 1).numpy()  # (B, H, W, C)
    if scale > 1:  # scale tiles, not the grid, so `padding` is in output pixels
        x = x.repeat(scale, axis=1).repeat(scale, axis=2)
    b, h, w, c = x.shape
    cols = min(nrow or math.ceil(math.sqrt(b)), b)
    rows = math.ceil(b / cols)
    grid = np.full((rows * (h + padding) + padding, cols * (w + padding) + padding, c), pad_value, np.uint8)
    for i in range(b):
        r, q = divmod(i, cols)
        top, left = padding + r * (h + padding), padding + q * (w + padding)
        grid[top : top + h, left : left + w] = x[i]
    return grid


def save_grid(
    images: Tensor,
    path: str | Path,
    nrow: int | None = None,
    padding: int = 2,
    scale: int = 1,
    pad_value: int = 255,
) -> np.ndarray:
    """Write `make_grid(...)` as a PNG (atomically: temp file + rename) and return the grid."""
    grid = make_grid(images, nrow, padding, scale, pad_value)
    with _atomic_file(Path(path)) as f:
        Image.fromarray(grid[..., 0] if grid.shape[2] == 1 else grid).save(f, format="PNG")
    return grid


# -------------------------------------------------------------------------------- DataModule
class UInt8ImageDataset(Dataset):
    """One split as a uint8 tensor; `__getitems__` lets the DataLoader fetch a batch in one indexing op."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images, self.labels = images, labels  # (N, C, H, W) uint8, (N,) long

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return from_uint8(self.images[index]), self.labels[index]

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long)
        return from_uint8(self.images[index]), self.labels[index]


def already_batched(batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    return batch  # module-level so worker processes can pickle it


class ImageDataModule(pl.LightningDataModule):
    """Train/val/test splits of one image dataset as batches (images in [-1, 1], labels).

    train/val are carved from the official train split (`val_size` images, permutation fixed by `seed`);
    test is the official test split. An image_folder has no official split: val and test are both carved
    from it, and a size of 0 there means 10%. `limit` truncates every split (quick runs, tests).
    `image_size` None means the native size; 28-px data can be zero-padded to 32; image_folder defaults
    to 64. `channels` None means native (inferred for a folder); 1 <-> 3 conversion is allowed.
    """

    def __init__(
        self,
        dataset: str = "fashion_mnist",
        root: str | None = None,
        image_size: int | None = None,
        channels: int | None = None,
        batch_size: int = 128,
        num_workers: int = 0,
        val_size: int = 5000,
        test_size: int = 0,
        seed: int = 0,
        download: bool = True,
        limit: int | None = None,
    ) -> None:
        super().__init__()
        if dataset not in DATASETS:
            raise ValueError(
                f"ImageDataModule: unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}"
            )
        _check_channels(channels, "ImageDataModule")
        if dataset == "image_folder" and root is None:
            raise ValueError("ImageDataModule: dataset=image_folder needs --data.root DIR holding the images")
        native = _NATIVE.get(dataset, (0, image_size))[1]
        if image_size not in (None, native) and (native, image_size) != (28, 32):
            raise ValueError(
                f"ImageDataModule: {dataset} images are {native}x{native}; image_size must be None, {native}"
                f"{' or 32 (zero-padded)' if native == 28 else ''}; got {image_size}"
            )
        at_least = {
            "batch_size": (batch_size, 1),
            "image_size": (image_size, 1),
            "limit": (limit, 1),
            "val_size": (val_size, 0),
            "test_size": (test_size, 0),
            "num_workers": (num_workers, 0),
        }
        bad = [f"{k}={v} (must be >= {m})" for k, (v, m) in at_least.items() if v is not None and v < m]
        if bad:
            raise ValueError(f"ImageDataModule: {', '.join(bad)}")
        # image_size/channels may be None here (resolved from the data); the model saves the resolved ones.
        self.save_hyperparameters(ignore=["image_size", "channels"])
        self._image_size_arg, self._channels_arg = image_size, channels
        self._splits: dict[str, UInt8ImageDataset] | None = None
        self._scan: tuple[list[Path], np.ndarray, list[str]] | None = None
        self._channels: int | None = None

    # Cheap facts (no pixels read), so LightningCLI can link them into the model before setup().
    @property
    def image_size(self) -> int:
        return self._image_size_arg or _NATIVE.get(self.hparams.dataset, (0, 64))[1]

    @property
    def channels(self) -> int:
        if self._channels is None:
            native = _NATIVE.get(self.hparams.dataset, (None,))[0]
            self._channels = self._channels_arg or native or infer_channels(self._folder_scan()[0])
        return self._channels

    @property
    def class_names(self) -> list[str]:
        if self.hparams.dataset == "image_folder":
            return list(self._folder_scan()[2])
        if self.hparams.dataset == "cifar10":
            return list(CIFAR10_CLASSES)  # the same names batches.meta holds
        return list(_MNIST_LIKE[self.hparams.dataset]["classes"])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _folder_scan(self) -> tuple[list[Path], np.ndarray, list[str]]:
        if self._scan is None:
            self._scan = scan_image_folder(self.hparams.root)
        return self._scan

    def prepare_data(self) -> None:
        if self.hparams.dataset in _MNIST_LIKE:  # download once, on rank 0
            for split in ("train", "test"):
                mnist_like_files(self.hparams.dataset, self.hparams.root, split, self.hparams.download)

    def setup(self, stage: str | None = None) -> None:
        self._load()

    def _read(self, split: str) -> ImageArrays:
        h = self.hparams
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
        h = self.hparams
        if h.dataset == "image_folder":
            arrays = load_image_folder(h.root, self.image_size, self.channels)
            n = len(arrays.labels)
            n_test, n_val = h.test_size or max(1, n // 10), h.val_size or max(1, n // 10)
            test = arrays
        else:
            arrays, test = self._read("train"), self._read("test")
            n, n_test, n_val = len(arrays.labels), 0, h.val_size
        if n_test + n_val >= n:
            raise ValueError(
                f"ImageDataModule: {h.dataset} has {n} training images but val_size={n_val} and "
                f"test_size={n_test} leave none to train on; pass smaller --data.val_size/--data.test_size"
            )
        perm = np.random.default_rng(h.seed).permutation(n)
        index = {"test": perm[:n_test], "val": perm[n_test : n_test + n_val], "train": perm[n_test + n_val :]}
        if h.dataset != "image_folder":
            index["test"] = np.arange(len(test.labels))
        images = {"train": arrays.images, "val": arrays.images, "test": test.images}
        labels = {"train": arrays.labels, "val": arrays.labels, "test": test.labels}
        self._splits = {}
        for split in SPLITS:
            idx = np.sort(index[split])[: h.limit]  # sorted: same order as the source, whatever the seed
            self._splits[split] = UInt8ImageDataset(
                self._to_tensor(images[split][idx]), torch.from_numpy(labels[split][idx]).long()
            )
        return self._splits

    def split_arrays(self, split: str) -> tuple[Tensor, Tensor]:
        """(uint8 images (N, C, H, W), long labels (N,)) of "train", "val" or "test"."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        ds = self._load()[split]
        return ds.images, ds.labels

    def dataloader(
        self, split: str, shuffle: bool = False, batch_size: int | None = None, drop_last: bool = False
    ) -> DataLoader:
        """A loader over one split; by default every image once, in order (what code extraction needs)."""
        self.split_arrays(split)  # validates the name, loads once
        workers = self.hparams.num_workers
        return DataLoader(
            self._load()[split],
            batch_size=batch_size or self.hparams.batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=workers,
            persistent_workers=workers > 0,
            collate_fn=already_batched,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        n, b = len(self.split_arrays("train")[1]), self.hparams.batch_size
        if n < b:
            raise ValueError(
                f"ImageDataModule: the train split has {n} images, fewer than batch_size={b}, so "
                "drop_last would leave no batches; lower --data.batch_size"
            )
        return self.dataloader("train", shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return self.dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self.dataloader("test")

    def predict_dataloader(self, split: str = "test") -> DataLoader:
        return self.dataloader(split)
