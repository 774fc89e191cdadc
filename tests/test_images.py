"""Tests for common/images.py: readers, DataModule, uint8 <-> float, grids. Tiny data, no network."""

import gzip
import pickle
import struct
import sys
import threading
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from common import images as images_module
from common import readers as im
from common.datamodule import ImageDataModule
from common.grids import save_grid
from common.images import (
    ImageError,
    from_uint8,
    image_files,
    load_image,
    read_image,
    read_images,
    to_uint8,
)
from common.readers import (
    DatasetError,
    DatasetNotFoundError,
    load_cifar10,
    load_image_folder,
    load_mnist_like,
    read_idx,
)
from common.splits import ImageSplits


def write_idx(path: Path, array: np.ndarray, gz: bool = False, magic: int | None = None) -> Path:
    """Write a uint8 array as an IDX file (magic 0x0800 | ndim, big-endian dims)."""
    magic = 0x800 | array.ndim if magic is None else magic
    raw = struct.pack(f">{1 + array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def write_mnist_split(root: Path, prefix: str, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images, labels = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8)
    write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images, gz=True)
    write_idx(root / f"{prefix}-labels-idx1-ubyte", labels)
    return images, labels


@pytest.fixture
def mnist_root(tmp_path: Path) -> Path:
    write_mnist_split(tmp_path, "train", 40, seed=0)
    write_mnist_split(tmp_path, "t10k", 12, seed=1)
    return tmp_path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Two classes, mixed sizes/modes/formats: 4 gray PNGs in "a", 3 RGB (PNG and JPEG) in "b"."""
    rng = np.random.default_rng(0)
    for i, size in enumerate([(20, 30), (16, 16), (40, 24), (17, 33)]):
        (tmp_path / "root" / "a" / "sub").mkdir(parents=True, exist_ok=True)
        where = tmp_path / "root" / "a" / ("sub" if i == 3 else "")  # recursion into nested folders
        Image.fromarray(rng.integers(0, 256, size[::-1], dtype=np.uint8), "L").save(where / f"g{i}.png")
    (tmp_path / "root" / "b").mkdir()
    for i, (size, ext) in enumerate([((30, 20), "png"), ((16, 16), "JPG"), ((25, 25), "jpeg")]):
        rgb = rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)
        Image.fromarray(rgb, "RGB").save(tmp_path / "root" / "b" / f"c{i}.{ext}")
    return tmp_path / "root"


def test_uint8_round_trip_is_exact() -> None:
    x = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    images = from_uint8(x)
    assert images.dtype == torch.float32 and images.min() == -1 and images.max() == 1
    assert torch.equal(to_uint8(images), x)
    assert torch.equal(to_uint8(torch.tensor([-3.0, 3.0])), torch.tensor([0, 255], dtype=torch.uint8))
    with pytest.raises(TypeError, match="uint8"):
        from_uint8(images)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path: Path, gz: bool) -> None:
    images = np.arange(5 * 3 * 4, dtype=np.uint8).reshape(5, 3, 4)
    labels = np.array([0, 1, 2, 1, 0], np.uint8)
    arrays = read_idx(write_idx(tmp_path / "i", images, gz), write_idx(tmp_path / "l", labels, gz))
    assert arrays.images.shape == (5, 3, 4, 1) and arrays.images.dtype == np.uint8
    np.testing.assert_array_equal(arrays.images[..., 0], images)
    assert arrays.labels.dtype == np.int64 and arrays.labels.tolist() == labels.tolist()


def test_idx_errors_name_the_file(tmp_path: Path) -> None:
    images, labels = np.zeros((4, 2, 2), np.uint8), np.zeros(4, np.uint8)
    good_i, good_l = write_idx(tmp_path / "good_i", images), write_idx(tmp_path / "good_l", labels)
    bad_magic = write_idx(tmp_path / "bad_magic", images, magic=0x801)
    with pytest.raises(ValueError, match="bad_magic.*magic"):
        read_idx(bad_magic, good_l)
    truncated = tmp_path / "truncated"
    truncated.write_bytes(good_i.read_bytes()[:-3])
    with pytest.raises(ValueError, match="truncated.*truncated or corrupt"):
        read_idx(truncated, good_l)
    (tmp_path / "short").write_bytes(b"\x00\x00")
    with pytest.raises(ValueError, match="short"):
        read_idx(tmp_path / "short", good_l)
    three = write_idx(tmp_path / "three_labels", labels[:3])
    with pytest.raises(ValueError, match="three_labels"):
        read_idx(good_i, three)


def test_load_mnist_like_from_root(mnist_root: Path) -> None:
    arrays = load_mnist_like("mnist", str(mnist_root), "test", download=False)
    assert arrays.images.shape == (12, 28, 28, 1) and arrays.class_names == [str(i) for i in range(10)]


def test_missing_dataset_says_how_to_get_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(im._MNIST_LIKE["fashion_mnist"], "system_dirs", [str(tmp_path / "nowhere")])
    with pytest.raises(DatasetNotFoundError, match="apt-get install -y dataset-fashion-mnist") as info:
        load_mnist_like("fashion_mnist", str(tmp_path / "empty"), "train", download=False)
    assert "train-images-idx3-ubyte" in str(info.value) and str(tmp_path / "empty") in str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    dm = ImageDataModule("fashion_mnist", root=str(tmp_path / "empty"), download=False)
    with pytest.raises(DatasetNotFoundError, match="apt-get"):
        dm.prepare_data()


def test_a_named_root_is_never_replaced_by_the_system_copy(tmp_path: Path, monkeypatch) -> None:
    """--data.root DIR that does not hold the data is an error, not a silent fall-back to Debian's copy."""
    monkeypatch.chdir(tmp_path)  # no data/fashion_mnist of the checkout (the default root) may be found first
    system = tmp_path / "system"
    system.mkdir()
    write_mnist_split(system, "t10k", 12)
    monkeypatch.setitem(im._MNIST_LIKE["fashion_mnist"], "system_dirs", [str(system)])
    assert load_mnist_like("fashion_mnist", None, "test", download=False).images.shape == (12, 28, 28, 1)
    with pytest.raises(DatasetNotFoundError, match=f"drop --data.root to use the system copy in {system}"):
        load_mnist_like("fashion_mnist", str(tmp_path / "typo"), "test", download=False)


class _Marker:
    """An object whose unpickling would create a file: a crafted data file must never get that far."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def write_cifar(root: Path, n: int = 3) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for k, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        data = np.full((n, 3072), k, np.uint8)
        data[:, 1024:2048] = 100  # the green plane
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": [k % 10] * n}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [n.encode() for n in im.CIFAR10_CLASSES]}, f)
    return folder


def test_cifar10(tmp_path: Path) -> None:
    folder = write_cifar(tmp_path)
    for root in (tmp_path, folder):  # the batches folder or its parent
        train = load_cifar10(str(root), "train")
        assert train.images.shape == (15, 32, 32, 3) and train.labels.tolist() == sorted(list(range(5)) * 3)
        assert train.images[3, 0, 0].tolist() == [1, 100, 1]  # channels last, planes in R, G, B order
        assert train.class_names[0] == "airplane"
    assert load_cifar10(str(tmp_path), "test").labels.tolist() == [5, 5, 5]
    (folder / "data_batch_3").unlink()
    with pytest.raises(DatasetNotFoundError, match="data_batch_3"):
        load_cifar10(str(tmp_path), "train")
    (folder / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="test_batch"):
        load_cifar10(str(tmp_path), "test")
    with pytest.raises(DatasetNotFoundError, match="cifar-10-python.tar.gz"):
        load_cifar10(str(tmp_path / "nothing"), "test")
    marker = tmp_path / "ran"
    with open(folder / "test_batch", "wb") as f:  # a crafted batch: unpickling it would call Path.touch
        pickle.dump({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"x": _Marker(marker)}, f)
    with pytest.raises(ValueError, match="test_batch: not a CIFAR-10 python batch.*refused to load pathlib"):
        load_cifar10(str(tmp_path), "test")
    assert not marker.exists()


def test_image_folder(folder: Path) -> None:
    arrays = load_image_folder(folder, 16)
    assert arrays.images.shape == (7, 16, 16, 3) and arrays.images.dtype == np.uint8  # some RGB -> 3
    assert arrays.labels.tolist() == [0] * 4 + [1] * 3 and arrays.class_names == ["a", "b"]
    assert load_image_folder(folder, 8, channels=1).images.shape == (7, 8, 8, 1)
    gray = load_image_folder(folder / "a" / "sub", 16)  # no sub-folders: one class named after the folder
    assert gray.images.shape == (1, 16, 16, 1) and gray.class_names == ["sub"] and gray.labels.tolist() == [0]
    with pytest.raises(ValueError, match="loose images"):  # "a" holds both g0.png and the folder "sub"
        load_image_folder(folder / "a", 16)


def test_image_folder_errors(tmp_path: Path, folder: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError, match="no .png/.jpg/.jpeg/.webp/.bmp/.tif/.tiff/.gif images found under"):
        load_image_folder(tmp_path / "empty", 16)
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        load_image_folder(tmp_path / "missing", 16)
    with pytest.raises(ValueError, match="channels must be 1"):
        load_image_folder(folder, 16, channels=2)
    half = (folder / "b" / "c0.png").read_bytes()
    (folder / "b" / "c0.png").write_bytes(half[: len(half) // 2])  # valid header, truncated pixels
    with pytest.raises(ValueError, match="c0.png"):
        load_image_folder(folder, 16)
    (folder / "b" / "broken.png").write_bytes(np.random.default_rng(0).bytes(100))
    with pytest.raises(ValueError, match="broken.png"):
        load_image_folder(folder, 16)


def test_hidden_folders_are_neither_classes_nor_read(folder: Path) -> None:
    """A hidden folder (a notebook's .ipynb_checkpoints/, a viewer's a/.thumbs/) is no class and none of its
    images is read: as a class it shifted every label after it, inside a class its copies were read twice."""
    before = load_image_folder(folder, 16)
    for rel in [".ipynb_checkpoints/g0-checkpoint.png", "a/.thumbs/g0.png", "b/.cache/deep/c9.png", "a/.g9.png"]:
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / rel)
    files, labels, names = im.scan_image_folder(folder)
    assert names == ["a", "b"] and labels.tolist() == [0] * 4 + [1] * 3
    assert not [f for f in files if any(part.startswith(".") for part in f.relative_to(folder).parts)]
    after = load_image_folder(folder, 16)
    assert np.array_equal(after.images, before.images) and after.class_names == before.class_names
    one = load_image_folder(folder / "a" / "sub", 16)  # no class folders: the hidden one is still skipped
    (folder / "a" / "sub" / ".thumbs").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "a" / "sub" / ".thumbs" / "g3.png")
    assert np.array_equal(load_image_folder(folder / "a" / "sub", 16).images, one.images)
    hidden_root = folder.parent / ".data"  # the root itself may be hidden: only what lies below it counts
    folder.rename(hidden_root)
    assert im.scan_image_folder(hidden_root)[2] == ["a", "b"]


def test_image_files_of_a_directory_include_its_sub_folders(folder: Path) -> None:
    """`compress DIR` and `score_anomalies DIR` find the images of a folder of class sub-folders (it was
    "directory holds no images"), sorted, hidden paths skipped, each named by its path below DIR."""
    from common.images import named_image_files

    (folder / ".ipynb_checkpoints").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / ".ipynb_checkpoints" / "x.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "b" / ".x.png")
    named = named_image_files([folder, folder / "b" / "c0.png"])
    assert [n for _, n in named] == ["a/g0.png", "a/g1.png", "a/g2.png", "a/sub/g3.png", "b/c0.png", "b/c1.JPG",
                                     "b/c2.jpeg", "c0.png"]  # fmt: skip
    assert [f for f, _ in named] == image_files([folder, folder / "b" / "c0.png"])
    assert image_files([folder])[:5] == im.scan_image_folder(folder)[0][:5]  # the training reader's order
    (folder / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="empty: directory holds no .*images"):
        image_files([folder / "empty"])


def write_deep(path: Path, values: np.ndarray, mode: str) -> None:
    """A 16-bit ("I;16", "I;16B"), 32-bit integer ("I") or float ("F") grey image file of `values`."""
    if mode == "I;16B":
        Image.frombytes(mode, values.shape[::-1], values.astype(">u2").tobytes()).save(path)
    else:
        dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
        Image.fromarray(values.astype(dtype)).save(path)


@pytest.mark.parametrize("mode, suffix, full", [("I;16", "png", 65535), ("I;16", "tif", 65535),
                                                ("I;16B", "tif", 65535), ("I", "tif", 2**31 - 1),
                                                ("F", "tif", 1.0)])  # fmt: skip
def test_deep_images_are_scaled_by_their_format_not_their_content(tmp_path: Path, mode: str, suffix: str,
                                                                  full: float) -> None:  # fmt: skip
    """16-bit, 32-bit and float grey images read as their format's range, 0 to full (16 bits: 65535 -> 255, by
    257; float: [0, 1], clipped), whatever their largest value: a 16-bit image whose maximum is <= 255 was read
    as if 8-bit, and a float TIFF in [0, 1] read all black."""
    levels = np.array([0, 0.25, 0.5, 1.0])
    for top in (1.0, 0.003, 0.0002):  # a bright image, one whose 16-bit maximum is 196, a nearly black one
        values = np.tile(levels * top * full, (4, 1))  # (4, 4): columns 0, 1/4, 1/2, 1 of `top`
        if mode != "F":
            values = values.round()
        write_deep(tmp_path / f"deep.{suffix}", values, mode)
        with Image.open(tmp_path / f"deep.{suffix}") as img:
            assert img.mode == mode
        out = read_image(tmp_path / f"deep.{suffix}", 4, 1)[..., 0]
        expected = (values / full * 255).round()
        assert np.abs(out.astype(int) - expected).max() <= (0 if mode.startswith("I;16") else 1), (top, out, expected)
    assert to_uint8(load_image(tmp_path / f"deep.{suffix}", 4)).max() == 0  # 0.0002 of white: black, as 8 bits
    if mode == "F":  # float below 0 is clipped, NaN is black; one whose values pass 1 is [0, 255] (ImageJ's)
        from common.images import to_8bit

        odd = Image.fromarray(np.array([[-1, 0.5, 1, np.inf, np.nan]], np.float32))
        assert np.asarray(to_8bit(odd, 1.0)).tolist() == [[0, 128, 255, 255, 0]]
        bytes_as_float = Image.fromarray(np.array([[0, 64, 127.5, 255, 300]], np.float32)[:, :4])
        assert np.asarray(to_8bit(bytes_as_float, 1.0)).tolist() == [[0, 64, 128, 255]]


def test_a_16_bit_image_reads_as_its_8_bit_twin(tmp_path: Path) -> None:
    """8-bit values v stored as 16 bits (v * 257, what a 16-bit export of an 8-bit image holds) read exactly as
    the 8-bit file, in the folder reader too; RGB and RGBA are unaffected."""
    v = np.random.default_rng(0).integers(0, 256, (12, 12), dtype=np.uint8)
    Image.fromarray(v).save(tmp_path / "eight.png")
    Image.fromarray(v.astype(np.uint16) * 257).save(tmp_path / "sixteen.png")
    Image.fromarray((v / 255).astype(np.float32)).save(tmp_path / "float.tif")
    reads = [read_image(tmp_path / f, 12, 1) for f in ("eight.png", "sixteen.png", "float.tif")]
    assert np.array_equal(reads[0], reads[1]) and np.array_equal(reads[0], reads[2])
    assert np.array_equal(read_images([tmp_path / "sixteen.png"], 12, 3)[0], read_image(tmp_path / "eight.png", 12, 3))


def test_a_folder_too_big_for_memory_is_refused_before_decoding(folder: Path, monkeypatch) -> None:
    exact = 1.1 * 7 * 16 * 16 * 3  # 7 RGB images at 16 px, held once, and a tenth to spare
    monkeypatch.setattr(im, "available_memory", lambda: exact - 1)
    with monkeypatch.context() as m:
        m.setattr(im, "read_images", lambda *a, **k: pytest.fail("decoded although it cannot fit"))
        with pytest.raises(DatasetError, match=r"7 images at 16x16x3 take 0.0 GiB in memory, but 0.0 GiB is "
                                               r"available; pass --data.cache_dir DIR"):  # fmt: skip
            load_image_folder(folder, 16)
    monkeypatch.setattr(im, "available_memory", lambda: exact)
    assert load_image_folder(folder, 16).images.shape == (7, 16, 16, 3)
    monkeypatch.undo()
    assert im.available_memory() is None or im.available_memory() > 0  # this machine's, read for real


def test_load_image_resizes_and_crops(tmp_path: Path) -> None:
    rgb = np.zeros((20, 40, 3), np.uint8)
    rgb[:, 4:36] = (
        255  # white well beyond the centre crop (columns 10:30), so resampling ringing stays outside
    )
    Image.fromarray(rgb).save(tmp_path / "wide.png")
    x = load_image(tmp_path / "wide.png", 10, None)
    assert x.shape == (1, 3, 10, 10) and x.dtype == torch.float32 and x.min() == 1
    deep = (np.arange(100, dtype=np.uint16).reshape(10, 10) * 600).astype(np.uint16)  # 16-bit grayscale
    Image.fromarray(deep).save(tmp_path / "deep.png")
    y = to_uint8(load_image(tmp_path / "deep.png", 10))
    assert y.shape == (1, 1, 10, 10) and y.max() == round(99 * 600 / 257)  # scaled to 8 bits, not clipped
    with pytest.raises(FileNotFoundError, match="nope.png"):
        load_image(tmp_path / "nope.png", 10)


def test_transparency_is_composited_over_white(tmp_path: Path) -> None:
    """Transparent pixels read as white whatever colour the file hides under them (dropping alpha showed
    it: black for most icons); partly transparent ones blend; no Pillow palette warning."""
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[:, :2] = (10, 200, 30, 0)  # hidden colour, fully transparent
    rgba[:, 2] = (255, 0, 0, 255)  # opaque red
    rgba[:, 3] = (0, 0, 255, 128)  # half-transparent blue
    Image.fromarray(rgba, "RGBA").save(tmp_path / "icon.png")
    out = read_image(tmp_path / "icon.png", 4, 3)
    assert (out[:, :2] == 255).all() and (out[:, 2] == (255, 0, 0)).all()
    assert np.abs(out[:, 3].astype(int) - (127, 127, 255)).max() <= 1
    la = np.stack([np.full((4, 4), 50, np.uint8), np.where(np.eye(4, dtype=bool), 0, 255).astype(np.uint8)], -1)
    Image.fromarray(la, "LA").save(tmp_path / "gray.png")
    gray = read_image(tmp_path / "gray.png", 4, 1)[..., 0]
    assert (gray[np.eye(4, dtype=bool)] == 255).all() and (gray[~np.eye(4, dtype=bool)] == 50).all()
    pal = Image.fromarray(np.tile(np.arange(2, dtype=np.uint8), (4, 2)), "P")  # columns alternate index 0, 1
    pal.putpalette([0, 0, 0, 0, 128, 0])
    pal.save(tmp_path / "palette.png", transparency=0)  # index 0 (black) is transparent
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow warns when a palette with transparency is dropped
        out = read_image(tmp_path / "palette.png", 4, 3)
    assert (out[:, ::2] == 255).all() and (out[:, 1::2] == (0, 128, 0)).all()
    (tmp_path / "folder").mkdir()
    (tmp_path / "icon.png").rename(tmp_path / "folder" / "icon.png")  # the folder reader and load_image agree
    assert (load_image_folder(tmp_path / "folder", 4).images[0, :, :2] == 255).all()
    assert (to_uint8(load_image(tmp_path / "folder" / "icon.png", 4))[0, :, :, :2] == 255).all()


def test_a_limited_image_folder_decodes_only_the_images_it_keeps(shapes_folder: Path, monkeypatch) -> None:
    """--data.limit N on an image folder reads at most 3 N files (the splits' first N each), and its splits
    are the first N images of the unlimited splits."""
    full = ImageSplits("image_folder", root=str(shapes_folder), image_size=16, val_size=8, test_size=8)
    full.split_arrays("train")  # decoded now, before the count
    decoded = []
    real = im.read_images
    monkeypatch.setattr(im, "read_images", lambda files, *a, **k: decoded.extend(files) or real(files, *a, **k))
    limited = ImageSplits("image_folder", root=str(shapes_folder), image_size=16, val_size=8, test_size=8, limit=2)
    for split in ("train", "val", "test"):
        (x, y), (x_full, y_full) = limited.split_arrays(split), full.split_arrays(split)
        assert torch.equal(x, x_full[:2]) and torch.equal(y, y_full[:2])
    assert len(decoded) == 6 and len(set(decoded)) == 6  # of the folder's 64


def test_large_jpegs_are_read_like_a_full_decode(tmp_path: Path) -> None:
    """read_image decodes a large JPEG at reduced scale (Pillow's draft) and reduces before LANCZOS: the result
    stays within 40 dB of decoding every pixel, EXIF rotation and the centre crop included."""
    h, w = 480, 720
    ramp = np.linspace(0, 255, w)[None, :, None] * np.linspace(0.2, 1, h)[:, None, None] * (1.0, 0.6, 0.3)
    img = Image.fromarray(ramp.astype(np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90 degrees clockwise (a portrait phone photo)
    img.save(tmp_path / "photo.jpg", quality=95, exif=exif)
    with Image.open(tmp_path / "photo.jpg") as full:
        full = ImageOps.exif_transpose(full).convert("RGB")  # every pixel, then one resize: 480 x 720 portrait
        ref = np.asarray(full.resize((32, 48), Image.Resampling.LANCZOS))[8:40]  # centre crop of the long side
    out = read_image(tmp_path / "photo.jpg", 32, 3)
    assert out.shape == (32, 32, 3)
    mse = np.mean((out.astype(np.float64) - ref) ** 2)
    assert 10 * np.log10(255**2 / mse) > 40, mse


@pytest.mark.parametrize("work", ["releases_gil", "holds_gil"])
def test_read_images_equals_a_loop_threaded_or_not(tmp_path: Path, monkeypatch, work: str) -> None:
    """Whichever way read_images chooses (threads when decoding releases the GIL, here a sleep; one thread when
    Python's own work dominates: here each read advances the module's clock by 2 ms whichever thread it runs
    on, as work holding the GIL would, without a busy loop whose timing another process on the machine could
    skew), the array is a loop's, and every broken file is named."""
    rng = np.random.default_rng(0)
    files = []
    for i in range(300):
        files.append(tmp_path / f"{i:03d}.png")
        Image.fromarray(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)).save(files[-1])
    loop = np.stack([read_image(f, 4, 3) for f in files])
    real = images_module.read_image

    threads_of, reads = {}, []

    def slow_read(path, image_size, channels):
        threads_of[path] = threading.get_ident()
        if work == "releases_gil":
            time.sleep(0.002)
        else:
            reads.append(path)  # atomic; the clock below counts 2 ms per read, serial or not
        return real(path, image_size, channels)

    monkeypatch.setattr(images_module, "read_image", slow_read)
    if work == "holds_gil":
        monkeypatch.setattr(images_module, "time", SimpleNamespace(perf_counter=lambda: 0.002 * len(reads)))
    assert np.array_equal(read_images(files, 4, 3, threads=2), loop)
    rest = {threads_of[f] for f in files[64:]}  # after the two probes of 32 files
    assert rest == {threading.get_ident()} if work == "holds_gil" else len(rest) == 2
    files[270].write_bytes(b"not a png")
    with pytest.raises(ImageError, match="270.png: cannot read image"):  # one broken file: its own error
        read_images(files, 4, 3, threads=2)
    for i in (100, 20):  # in the threads' part and in the first probe: all three named, in the files' order
        files[i].write_bytes(b"not a png")
    with pytest.raises(ImageError, match=r"^3 of 300 image files cannot be read \(UnidentifiedImageError: .*020.png.*, "
                                         r"the first\): \S*020.png, \S*100.png, \S*270.png; fix or delete them$"):
        read_images(files, 4, 3, threads=2)


def test_a_process_allowed_one_cpu_reads_on_one_thread(tmp_path: Path, monkeypatch) -> None:
    """read_images counts the CPUs this process may use (a SLURM job's share), not the machine's."""
    files = []
    for i in range(300):
        files.append(tmp_path / f"{i:03d}.png")
        Image.fromarray(np.full((6, 5, 3), i % 256, np.uint8)).save(files[-1])
    seen = set()
    real = images_module.read_image
    monkeypatch.setattr(images_module, "read_image", lambda *a: seen.add(threading.get_ident()) or real(*a))
    monkeypatch.setattr(images_module.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    monkeypatch.setattr(images_module.os, "cpu_count", lambda: 64)
    assert read_images(files, 4, 3).shape == (300, 4, 4, 3) and seen == {threading.get_ident()}


def test_every_broken_file_of_a_folder_is_named_at_once(tmp_path: Path) -> None:
    """The header scan (infer_channels) passes over broken files and the decode names them all; a folder of
    nothing but broken files is named by the scan."""
    from conftest import write_shapes

    folder = write_shapes(tmp_path / "shapes", n=16)
    (folder / "discs" / "000_broken.png").write_bytes(b"not an image")
    (folder / "squares" / "zz_broken.png").write_bytes(b"nor this")
    with pytest.raises(ImageError, match=r"^2 of 18 image files cannot be read \(UnidentifiedImageError: .*, the "
                                         r"first\): \S*000_broken.png, \S*zz_broken.png; fix or delete them$"):
        ImageSplits("image_folder", root=str(folder), image_size=16, val_size=2, test_size=2).split_arrays("train")
    with pytest.raises(ImageError, match=r"^3 of 3 image files cannot be read \(.*\): \S*000_broken.png, "
                                         r"\S*zz_broken.png, \S*missing.png; fix or delete them$"):
        images_module.infer_channels(sorted(folder.rglob("*broken.png")) + [folder / "missing.png"])


def test_a_long_read_says_how_far_it_is_on_the_first_process_only(tmp_path: Path, monkeypatch, capsys) -> None:
    files = []
    for i in range(1100):
        files.append(tmp_path / f"{i:04d}.png")
        Image.fromarray(np.full((4, 4), i % 256, np.uint8)).save(files[-1])
    read_images(files, 4, 1, threads=1, progress="images of shapes")
    assert capsys.readouterr().out == ""  # quicker than PROGRESS_S: nothing said
    monkeypatch.setattr(images_module, "PROGRESS_S", 0.0)
    read_images(files, 4, 1, threads=1, progress="images of shapes")
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" (")[0] for line in lines] == ["read 512 of 1,100 images of shapes",
                                                       "read 1,024 of 1,100 images of shapes"]  # fmt: skip
    assert all(line.endswith(" images/s)") for line in lines)
    monkeypatch.setenv("LOCAL_RANK", "1")  # another rank of the job: silent
    read_images(files, 4, 1, threads=1, progress="images of shapes")
    assert capsys.readouterr().out == ""


def test_many_unreadable_files_are_counted_and_the_first_twenty_named() -> None:
    from common.images import MAX_NAMED, unreadable

    errors = [(i, ImageError(f"f{i}: ...", Path(f"f{i:02d}.png"), f"reason {i}")) for i in reversed(range(25))]
    message = str(unreadable(errors, 1000))
    assert message.startswith("25 of 1000 image files cannot be read (reason 0, the first): f00.png, f01.png, ")
    assert message.endswith(f"f{MAX_NAMED - 1}.png and 5 more; fix or delete them") and "f20.png" not in message


def test_more_image_formats(tmp_path: Path) -> None:
    """WebP, BMP and TIFF files count as images in folders and file lists, read exactly (lossless)."""
    rgb = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    (tmp_path / "c").mkdir()
    for ext, kw in [("webp", {"lossless": True}), ("bmp", {}), ("tif", {}), ("TIFF", {})]:
        Image.fromarray(rgb).save(tmp_path / "c" / f"x.{ext}", **kw)
    arrays = load_image_folder(tmp_path, 8)
    assert arrays.images.shape == (4, 8, 8, 3) and all((a == rgb).all() for a in arrays.images)
    assert [f.suffix for f in image_files([tmp_path / "c"])] == [".TIFF", ".bmp", ".tif", ".webp"]


def check_batch(batch: tuple[torch.Tensor, torch.Tensor], b: int, c: int, s: int) -> None:
    images, labels = batch
    assert images.shape == (b, c, s, s) and images.dtype == torch.float32 and labels.dtype == torch.long
    assert images.min() >= -1 and images.max() <= 1 and labels.shape == (b,)


def test_datamodule_idx(mnist_root: Path) -> None:
    dm = ImageDataModule("mnist", root=str(mnist_root), batch_size=8, val_size=10, download=False)
    assert (dm.channels, dm.image_size, dm.num_classes) == (1, 28, 10)  # before setup
    dm.prepare_data()
    dm.setup("fit")
    sizes = {s: len(dm.split_arrays(s)[1]) for s in im.SPLITS}
    assert sizes == {"train": 30, "val": 10, "test": 12}
    train = list(dm.train_dataloader())
    assert len(train) == 3  # drop_last
    check_batch(train[0], 8, 1, 28)
    check_batch(next(iter(dm.test_dataloader())), 8, 1, 28)
    assert sum(len(y) for _, y in dm.dataloader("train")) == 30  # every image, in order
    other = ImageDataModule("mnist", root=str(mnist_root), val_size=10, seed=0, download=False)
    assert torch.equal(other.split_arrays("val")[0], dm.split_arrays("val")[0])
    moved = ImageDataModule("mnist", root=str(mnist_root), val_size=10, seed=1, download=False)
    assert not torch.equal(moved.split_arrays("val")[0], dm.split_arrays("val")[0])
    padded = ImageDataModule("mnist", root=str(mnist_root), image_size=32, channels=3, val_size=10, limit=4)
    images, _ = padded.split_arrays("train")
    assert images.shape == (4, 3, 32, 32) and images[:, :, :2].max() == 0  # zero border
    assert torch.equal(images[:, :, 2:-2, 2:-2], dm.split_arrays("train")[0][:4].expand(-1, 3, -1, -1))


def test_test_size_is_refused_where_a_dataset_has_an_official_test_split(mnist_root: Path) -> None:
    """--data.test_size did nothing for MNIST-like data and CIFAR-10 (their test split is the official one): it is
    refused now, but a checkpoint saved with one still reads the data as it trained on it."""
    from common.splits import data_options

    with pytest.raises(ValueError, match="--data.test_size 5: mnist has an official test split"):
        ImageSplits("mnist", root=str(mnist_root), val_size=10, test_size=5, download=False)
    saved = dict(dataset="mnist", root=str(mnist_root), val_size=10, test_size=5, download=False)
    assert len(ImageSplits(**data_options(saved)).split_arrays("test")[1]) == 12  # the whole official split


def test_val_size_0_keeps_each_datasets_meaning_and_the_help_says_which(mnist_root, folder, capsys) -> None:
    """--data.val_size 0 is no validation for the data sets with an official split and 10 % for a folder and
    emoji (the configs and saved checkpoints rely on both, so neither changes); --help says which is which."""
    from common.emoji import group_split
    from tools.train_feature_net import main as train_feature_net

    mnist = ImageSplits("mnist", root=str(mnist_root), val_size=0, download=False)
    assert [len(mnist.split_arrays(s)[1]) for s in im.SPLITS] == [40, 0, 12]  # the whole train split trains
    images = ImageSplits("image_folder", root=str(folder), image_size=16, val_size=0, test_size=0)
    assert [len(images.split_arrays(s)[1]) for s in im.SPLITS] == [5, 1, 1]  # 10 %, at least 1
    groups = np.repeat(np.arange(20), 3)  # 20 base emoji, 3 glyphs each
    assert [len(set(groups[i])) for i in group_split(groups, 0, 0, seed=0).values()] == [2, 2, 16]  # 10 % of them
    with pytest.raises(SystemExit):
        train_feature_net(["--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert ("fashion_mnist, mnist, cifar10: None (the default) means 5,000, 0 means none (no validation, so no "
            "best.ckpt); image_folder: None or 0 means 10 % (at least 1); emoji: counted in base emoji") in shown


def test_a_fit_without_validation_says_so(mnist_root, capsys) -> None:
    """--data.val_size 0 on MNIST: only Lightning's "Total length of DataLoader ... is zero" said that nothing would
    be validated (and so no best.ckpt); the data line says it now, and only for a fit."""
    ImageDataModule("mnist", root=str(mnist_root), val_size=0, batch_size=4, download=False).setup("fit")
    assert "val 0 / test 12 images" in (out := capsys.readouterr().out) and "; no validation split (--data.val_size " \
        "0): nothing is validated, so the run keeps last.ckpt only, no best.ckpt" in out, out  # fmt: skip
    ImageDataModule("mnist", root=str(mnist_root), val_size=0, batch_size=4, download=False).setup("test")
    assert "no validation split" not in capsys.readouterr().out


def test_datamodule_image_folder(folder: Path) -> None:
    dm = ImageDataModule(
        "image_folder", root=str(folder), image_size=16, batch_size=2, val_size=0, test_size=2
    )
    assert (dm.channels, dm.image_size, dm.class_names) == (3, 16, ["a", "b"])
    dm.setup()
    assert [len(dm.split_arrays(s)[1]) for s in im.SPLITS] == [4, 1, 2]  # val_size=0: 10%, at least 1
    check_batch(next(iter(dm.train_dataloader())), 2, 3, 16)
    with pytest.raises(ValueError, match="leave none to train on"):
        ImageDataModule("image_folder", root=str(folder), val_size=5000).setup()


def test_loader_workers_of_a_ddp_rank_warn_before_python_3_12(shapes_folder: Path) -> None:
    """A DDP rank's fork of a worker can hang for good before Python 3.12 (README, *Loaders*): its loaders say
    so; one process, or no workers, say nothing."""
    options = dict(root=str(shapes_folder), image_size=16, batch_size=8, val_size=8, test_size=8)
    rank = {"num_replicas": 2, "rank": 1}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ImageSplits("image_folder", num_workers=1, **options).dataloader("train", resumable=True, shard=rank)
        ImageSplits("image_folder", num_workers=0, **options).dataloader("train", resumable=True, shard=rank)
        ImageSplits("image_folder", num_workers=1, **options).dataloader("train", resumable=True)
    said = [str(w.message) for w in caught if "gh-112275" in str(w.message)]
    assert len(said) == (1 if sys.version_info < (3, 12) else 0), said
    assert all(m.startswith("--data.num_workers 1 under DDP on Python 3.") for m in said)


def test_datamodule_bad_arguments() -> None:
    with pytest.raises(
        ValueError, match="unknown dataset 'imagenet'.*fashion_mnist, mnist, cifar10, image_folder"
    ):
        ImageDataModule("imagenet")
    with pytest.raises(ValueError, match="image_size must be"):
        ImageDataModule("cifar10", image_size=64)
    with pytest.raises(ValueError, match="needs --data.root"):
        ImageDataModule("image_folder")


def test_save_grid(tmp_path: Path) -> None:
    images = torch.linspace(-1, 1, 10 * 3 * 8 * 8).view(10, 3, 8, 8)
    grid = save_grid(images, tmp_path / "out" / "grid.png", nrow=5, padding=2, scale=2)
    # 5 columns x 2 rows of 16x16 tiles with 2 px between and around them
    assert grid.shape == (2 * 18 + 2, 5 * 18 + 2, 3)
    with Image.open(tmp_path / "out" / "grid.png") as png:
        assert png.size == (92, 38) and png.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(png), grid)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["grid.png"]  # no temp file left
    gray = save_grid(torch.zeros(3, 1, 4, 4, dtype=torch.uint8), tmp_path / "gray.png", padding=1)
    assert gray.shape == (2 * 5 + 1, 2 * 5 + 1, 1) and gray[0, 0, 0] == 255 and gray[1, 1, 0] == 0


def test_an_image_folder_is_held_once_in_its_splits(shapes_folder: Path) -> None:
    """The splits of an image folder are the scan's images, split by split in the folder's order, as (N, C, H, W)
    tensors decoded straight into one array: numpy's peak while making them is one copy of the pixels (it was
    about two, and torch's layout copy came on top: a folder that fit by the check could still run out)."""
    import tracemalloc

    from common.readers import scan_image_folder

    files, labels, _ = scan_image_folder(shapes_folder)
    tracemalloc.start()
    splits = ImageSplits("image_folder", root=str(shapes_folder), image_size=64, channels=3, val_size=8, test_size=8)
    arrays = {s: splits.split_arrays(s) for s in ("train", "val", "test")}
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    pixels = len(files) * 3 * 64 * 64  # 786 kB: the rest of the work allocates ~0.1 MB
    assert peak < 1.4 * pixels, (peak, pixels)
    perm = np.random.default_rng(0).permutation(len(files))  # the splits' rule: test, val, then train
    index = {"test": perm[:8], "val": perm[8:16], "train": perm[16:]}
    for split, (x, y) in arrays.items():
        rows = np.sort(index[split])
        expected = read_images([files[i] for i in rows], 64, 3)  # (n, H, W, C), the files' order
        assert x.shape == (len(rows), 3, 64, 64) and x.is_contiguous()
        assert torch.equal(x, torch.from_numpy(expected).permute(0, 3, 1, 2))
        assert torch.equal(y, torch.from_numpy(labels[rows]).long())


def test_only_the_centre_square_is_resized(tmp_path, monkeypatch):
    """A 12000x1 strip was resized whole to 3,072,000x256 before its centre was cropped (3.4 GB and 4.4 s at
    256 px, the scale audit): now only the centre square is resized, straight to the target size, and what the
    image holds there is what comes out."""
    from PIL import Image as PILImage

    sizes, resize = [], PILImage.Image.resize

    def spy(self, size, *args, **kwargs):
        sizes.append(size)
        return resize(self, size, *args, **kwargs)

    monkeypatch.setattr(PILImage.Image, "resize", spy)
    PILImage.fromarray(np.full((1, 12000, 3), 200, np.uint8)).save(tmp_path / "strip.png")
    assert (read_image(tmp_path / "strip.png", 256, 3) == 200).all() and sizes == [(256, 256)]
    bands = np.zeros((20, 40, 3), np.uint8)
    bands[:, :10], bands[:, 10:30], bands[:, 30:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)  # the centre is green
    PILImage.fromarray(bands).save(tmp_path / "bands.png")
    out = read_image(tmp_path / "bands.png", 8, 3).astype(int)
    assert (out[..., 1] >= 230).all() and (out[..., 0] <= 20).all() and (out[..., 2] <= 20).all()


def test_an_empty_file_and_a_link_to_an_image_read_already(tmp_path, capsys):
    """A 0-byte file is named as empty (Pillow's "cannot identify image file" hid it); a symbolic link to an image
    of the folder is read once, with a warning (it was a second image, which could land in another split)."""
    from common.images import read_image as read_one
    from common.readers import scan_image_folder

    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(Exception, match=r"empty\.png: cannot read image \(an empty file, 0 bytes\)"):
        read_one(tmp_path / "empty.png", 8, 1)
    folder = tmp_path / "folder"
    for name in ("cats", "dogs"):
        (folder / name).mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "cats" / "a.png")
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(folder / "dogs" / "b.png")
    (folder / "dogs" / "c.png").symlink_to(folder / "cats" / "a.png")
    files, labels, names = scan_image_folder(folder)
    assert [f.name for f in files] == ["a.png", "b.png"] and labels.tolist() == [0, 1] and names == ["cats", "dogs"]
    assert "1 image file(s) under" in capsys.readouterr().err
    (folder / "kittens").symlink_to(folder / "cats")  # a class folder that is a link to another: no class of its own
    files, labels, names = scan_image_folder(folder)
    assert [f.name for f in files] == ["a.png", "b.png"] and labels.tolist() == [0, 1] and names == ["cats", "dogs"]


def test_a_broken_file_in_a_later_chunk_says_where_it_was_found(tmp_path, monkeypatch):
    """image_chunks reads a folder a chunk at a time: an unreadable file is found when its chunk is read, and the
    error says which files that chunk held and that later ones are not checked yet (it read "1 of 3 ...")."""
    import common.images

    for i in range(7):
        Image.fromarray(np.full((8, 8), 10 * i, np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "4.png").write_bytes(b"not an image")
    files = sorted(tmp_path.glob("*.png"))
    monkeypatch.setattr(common.images, "CHUNK_BYTES", 3 * 4 * 8 * 8)  # 3 images a chunk
    chunks = common.images.image_chunks(files, 8, 1)
    assert next(chunks).shape == (3, 1, 8, 8)
    with pytest.raises(common.images.ImageError, match=r"4\.png: cannot read image .*\(among files 4-6 of 7, read "
                       r"a chunk at a time: later files are not checked yet\)"):  # fmt: skip
        next(chunks)
