"""Dataset readers: Fashion-MNIST/MNIST (IDX), CIFAR-10 (python batches), folders of image files.

Every reader returns `ImageArrays` (uint8 (N, H, W, C), int64 labels, class names). numpy, Pillow and
the standard library; nothing here runs code from a data file (CIFAR-10's pickles are read with an
unpickler that only builds plain containers and numpy arrays).
"""

from __future__ import annotations

import gzip
import hashlib
import math
import pickle
import struct
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.cli import UserError
from common.images import IMAGE_SUFFIXES, SUFFIXES_TEXT, check_channels, find_images, infer_channels, read_images
from common.io import atomic_file
from common.memory import available_memory

DATASETS = ("fashion_mnist", "mnist", "cifar10", "image_folder", "emoji")
SPLITS = ("train", "val", "test")
FASHION_MNIST_CLASSES = "T-shirt/top,Trouser,Pullover,Dress,Coat,Sandal,Shirt,Sneaker,Bag,Ankle boot".split(
    ","
)
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
DOWNLOAD_TIMEOUT_S = 20  # short: on a closed network we want the clear error now, not after minutes
_NATIVE = {"fashion_mnist": (1, 28), "mnist": (1, 28), "cifar10": (3, 32), "emoji": (3, 64)}  # (channels, size)
_OTHER_SIZES = {"fashion_mnist": 32, "mnist": 32, "emoji": 32}  # 28 -> 32: zero-padded; emoji 64 -> 32: resized
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


class DatasetError(UserError, ValueError):
    """A dataset file is corrupt or not what it should be; the message names it."""


class DatasetNotFoundError(UserError, FileNotFoundError):
    """A dataset's files are missing; the message lists where we looked and how to get them."""


def where(path: str | Path) -> str:
    """`path` for a message, saying what a relative one is relative to: checkpoints keep --data.root as it was
    typed, so a command run from another directory looks for it somewhere else."""
    return str(path) if Path(path).is_absolute() else f"{path} (relative to the current directory {Path.cwd()})"


@dataclass
class ImageArrays:
    """What every reader returns."""

    images: np.ndarray  # uint8 (N, H, W, C)
    labels: np.ndarray  # int64 (N,)
    class_names: list[str]


# -------------------------------------------------------------------------------- IDX (MNIST-like)
def _read_idx_array(path: Path, ndim: int) -> np.ndarray:
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":  # gzip magic; IDX files start with 0x00
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as e:
        raise DatasetError(f"{path}: cannot read IDX file ({e}); re-download it") from e
    header = 4 + 4 * ndim
    expected = 0x800 | ndim  # 0x00000803 images (N, H, W), 0x00000801 labels (N,)
    if len(raw) < header:
        raise DatasetError(
            f"{path}: truncated IDX file ({len(raw)} bytes, header needs {header}); re-download it"
        )
    magic, *dims = struct.unpack(f">{1 + ndim}I", raw[:header])
    if magic != expected:
        kind = "images" if ndim == 3 else "labels"
        raise DatasetError(
            f"{path}: bad IDX magic 0x{magic:08x}, expected 0x{expected:08x} for an {kind} file; "
            "is this the right file?"
        )
    if len(raw) - header != math.prod(dims):
        raise DatasetError(
            f"{path}: IDX header says shape {tuple(dims)} ({math.prod(dims)} bytes) but the file "
            f"holds {len(raw) - header} data bytes; it is truncated or corrupt, re-download it"
        )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def read_idx(images_path: str | Path, labels_path: str | Path) -> ImageArrays:
    """Read an IDX images file (N, H, W) and labels file (N,), plain or gzipped."""
    images = _read_idx_array(Path(images_path), 3)
    labels = _read_idx_array(Path(labels_path), 1).astype(np.int64)
    if len(images) != len(labels):
        raise DatasetError(
            f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels; "
            "are they from the same split?"
        )
    names = [str(i) for i in range(int(labels.max()) + 1)] if len(labels) else []
    return ImageArrays(images[..., None].copy(), labels, names)  # copy: frombuffer arrays are read-only


def _download(url: str, dest: Path, md5: str) -> Path:
    digest = hashlib.md5()
    # Open the URL first, so a closed network leaves no empty folder or temp file behind.
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, atomic_file(dest) as out:
        while chunk := response.read(1 << 20):
            digest.update(chunk)
            out.write(chunk)
        if digest.hexdigest() != md5:
            raise DatasetError(f"{url}: MD5 {digest.hexdigest()} does not match the expected {md5}")
    return dest


def mnist_like_files(name: str, root: str | None, split: str, download: bool) -> tuple[Path, Path]:
    """Find (or download into `root`, default data/<name>) the IDX images and labels files of one split.

    The system copy (Debian's package) is used only when no `root` is given: a root the user names is
    where the data must be, never silently replaced by another copy."""
    if name not in _MNIST_LIKE or split not in ("train", "test"):
        raise ValueError(
            f"mnist_like_files: name must be one of {list(_MNIST_LIKE)} and split train|test, "
            f"got name={name!r} split={split!r}"
        )
    source = _MNIST_LIKE[name]
    base = Path(root) if root else Path("data") / name
    dirs = [base, base / source["torchvision"] / "raw", *([] if root else map(Path, source["system_dirs"]))]
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
    searched = ", ".join(f"{d / s}[.gz]" for d in dirs for s in stems)
    system = [d for d in source["system_dirs"] if (Path(d) / f"{stems[0]}.gz").is_file()]
    hint = f"; or drop --data.root to use the system copy in {system[0]}" if root and system else ""
    raise DatasetNotFoundError(
        f"{name} {split} split not found ({problem}); looked for {searched}. To fix: {source['apt']}pass "
        f"--data.root DIR holding {stems[0]}.gz and {stems[1]}.gz (from {source['url']}){hint}"
    )


def load_mnist_like(
    name: str = "fashion_mnist", root: str | None = None, split: str = "train", download: bool = True
) -> ImageArrays:
    """Fashion-MNIST or MNIST (28x28 grayscale) from `root`, the system copy, or the official mirror."""
    arrays = read_idx(*mnist_like_files(name, root, split, download))
    arrays.class_names = list(_MNIST_LIKE[name]["classes"])
    return arrays


# -------------------------------------------------------------------------------- CIFAR-10
class _ArraysOnlyUnpickler(pickle.Unpickler):
    """CIFAR-10 batches are pickles by format: build plain containers and numpy arrays, refuse every other
    global (a crafted batch could otherwise run code while being read)."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("_codecs", "encode")}  # fmt: skip

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}: only numpy arrays and plain containers")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise DatasetNotFoundError(f"{path}: missing CIFAR-10 file; re-extract cifar-10-python.tar.gz there")
    try:
        with open(path, "rb") as f:
            batch = _ArraysOnlyUnpickler(f, encoding="bytes").load()
    except Exception as e:  # a corrupt pickle can raise almost anything; name the file whatever it is
        raise DatasetError(f"{path}: not a CIFAR-10 python batch ({type(e).__name__}: {e}); re-extract it") from None
    if not isinstance(batch, dict):
        raise DatasetError(f"{path}: not a CIFAR-10 python batch (a {type(batch).__name__}, not a dict); re-extract it")
    return batch


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
            raise DatasetError(f"{folder / name}: not a CIFAR-10 batch (no b'data'/b'labels': {e})") from e
        if data.ndim != 2 or data.shape[1] != 3072 or len(y) != len(data):
            raise DatasetError(
                f"{folder / name}: expected data (N, 3072) and N labels, got data {data.shape} "
                f"and {len(y)} labels"
            )
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # (N, H, W, C)
        labels.append(y)
    meta = _unpickle(folder / "batches.meta")
    names = [n.decode() for n in meta.get(b"label_names", [])] or list(CIFAR10_CLASSES)
    return ImageArrays(np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels), names)


# -------------------------------------------------------------------------------- image files
def scan_image_folder(root: str | Path) -> tuple[list[Path], np.ndarray, list[str]]:
    """(files, labels, class_names): each sub-folder holding images is a class, else one class. Hidden files
    and folders (`.ipynb_checkpoints/`, `a/.thumbs/`) are skipped: as a class they would shift every label."""
    root = Path(root)
    if root.is_file():
        raise DatasetError(f"--data.root {root} is a file; pass the folder holding the images (one sub-folder "
                           "per class, or none)")  # fmt: skip
    if not root.is_dir():
        raise DatasetNotFoundError(
            f"image folder {where(root)} does not exist; pass --data.root DIR holding {SUFFIXES_TEXT} "
            "images (optionally in one sub-folder per class)"
        )
    subdirs = [d for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")]
    classes = [(d.name, files) for d in subdirs if (files := find_images(d))]
    loose = [p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")]
    if classes and loose:  # silently dropping the loose images would surprise; make the layout explicit
        raise DatasetError(
            f"{root} holds both class sub-folders and loose images (e.g. {loose[0].name}); "
            "move the loose images into a sub-folder"
        )
    if not classes:
        classes = [(root.resolve().name, find_images(root))]
    if not classes[0][1]:
        raise DatasetNotFoundError(f"no {SUFFIXES_TEXT} images found under {root}")
    # A symbolic link to an image read already would put one picture in two splits (train and test): read once
    seen: dict[Path, Path] = {}
    twice = [f for _, fs in classes for f in fs if seen.setdefault(f.resolve(), f) is not f]
    if twice:
        print(f"warning: {len(twice)} image file(s) under {root} link to a file read already (e.g. {twice[0]} -> "
              f"{twice[0].resolve()}); each image is read once, so that it lands in one split", file=sys.stderr)
        once = {id(f) for f in seen.values()}
        classes = [(name, kept) for name, fs in classes if (kept := [f for f in fs if id(f) in once])]  # a class
        # folder that is a link to another is no class of its own
    files = [f for _, fs in classes for f in fs]
    labels = np.concatenate([np.full(len(fs), i, np.int64) for i, (_, fs) in enumerate(classes)])
    return files, labels, [name for name, _ in classes]


def check_fits_in_memory(root: Path, n: int, image_size: int, channels: int) -> None:
    """Refuse, before decoding anything, a folder whose array cannot fit in memory (with a tenth to spare
    for the rest of the process; a SLURM job's or container's limit counts, common.memory): an out-of-memory
    kill after an hour of decoding would say nothing."""
    need, free = n * image_size * image_size * channels, available_memory()
    if free is not None and 1.1 * need > free:
        raise DatasetError(
            f"image folder {root}: {n:,} images at {image_size}x{image_size}x{channels} take {need / 2**30:.1f} GiB "
            f"in memory, but {free / 2**30:.1f} GiB is available; "
            "pass --data.cache_dir DIR (decoded once into a file there and read from disk), a smaller "
            "--data.image_size, or --data.limit N (N images per split)"
        )


def load_image_folder(root: str | Path, image_size: int, channels: int | None = None, only: np.ndarray | None = None,
                      scan: tuple[list[Path], np.ndarray, list[str]] | None = None,
                      rows: np.ndarray | None = None, channels_first: bool = False) -> ImageArrays:  # fmt: skip
    """All images (IMAGE_SUFFIXES) under `root` as (N, image_size, image_size, C); labels as `scan_image_folder`
    (or `scan`, its result). `only`: the ascending positions in the scan to decode, the others left unread.
    `rows` (a permutation) and `channels_first` as `read_images` takes them; the labels follow the rows."""
    check_channels(channels, "load_image_folder")
    files, labels, class_names = scan or scan_image_folder(root)
    channels = channels or infer_channels(files)
    if only is not None:
        files, labels = [files[i] for i in only], labels[only]
    check_fits_in_memory(Path(root), len(files), image_size, channels)
    images = read_images(files, image_size, channels, rows=rows, channels_first=channels_first,
                         progress=f"images of {root}")
    if rows is not None:
        labels = labels[np.argsort(rows)]  # row r holds file argsort(rows)[r]
    return ImageArrays(images, labels, class_names)
