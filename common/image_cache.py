"""A folder's decoded images kept in one file (`--data.cache_dir`), memory-mapped by later runs.

Decoding a large folder (CelebA's 200k JPEGs: about two minutes on 2 cores) is paid by every command that
reads it (`train_stage1 fit`, `extract_codes`, `evaluate`, a resumed run), and a folder whose pixels do not
fit in memory cannot be held at all. With a cache directory the splits are decoded once into
`DIR/<folder>_<size>px_<rgb|gray>_<n>img_<key>.npy` (uint8 (N, C, S, S), split after split) and every run
maps that file: the operating system keeps in memory what fits and reads the rest from disk as batches ask.

The key hashes what decides the pixels: each file's path under the folder, size and modification time, in
row order, with the image size, channels and DECODE_VERSION. Edit, add or remove a file, change the split
seed, sizes or `--data.limit`, and the key (so the file) changes: a stale cache is never read. Files are
written under a temporary name and renamed into place (common.io.atomic_file); nothing in the directory is
ever deleted or overwritten (the other caches of a folder are named in the message with their sizes, for the user
to remove).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
from pathlib import Path

import numpy as np

from common.images import read_images
from common.io import OutputError, atomic_file, check_writable_dir, no_space, reserve_space
from common.readers import DatasetError

# bump when common.images.read_image changes the pixels it makes: old caches are then not read (2: 16-bit and float
# images scaled by their format's range, 2026-11-29; 3: float images past 1 read as [0, 255], the same day)
DECODE_VERSION = 3
SPARE_BYTES = 64 << 20  # left free on the cache's disk beyond the file itself


def size_text(n: int) -> str:
    """Bytes for people: 812 bytes, 6.1 KiB, 23.4 MiB, 1.40 GiB."""
    for power, unit, digits in ((4, "TiB", 2), (3, "GiB", 2), (2, "MiB", 1), (1, "KiB", 1)):
        if n >= 1024**power:
            return f"{n / 1024**power:.{digits}f} {unit}"
    return f"{n} bytes"


def cache_key(root: Path, files: list[Path], image_size: int, channels: int) -> str:
    """Hex digest of what decides the cached array: the files (path under `root`, size, mtime) in row order."""
    digest = hashlib.sha256(f"vqgen image cache v{DECODE_VERSION} {image_size} {channels} {len(files)}\n".encode())
    for path in files:
        try:
            st = path.stat()
        except OSError as e:
            raise DatasetError(f"{path}: cannot read ({e}); the folder changed while it was read, run again") from e
        name = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.as_posix()
        digest.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode(errors="surrogateescape"))
    return digest.hexdigest()


def folder_name(root: Path) -> str:
    """How a cache file's name starts: the image folder's own name, made safe for a file name."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", Path(root).resolve().name) or "folder"


def cache_path(cache_dir: Path, root: Path, n: int, image_size: int, channels: int, key: str) -> Path:
    return cache_dir / f"{folder_name(root)}_{image_size}px_{'rgb' if channels == 3 else 'gray'}_{n}img_{key[:16]}.npy"


def _older_caches(path: Path, root: Path, named: int = 10) -> str:
    """The words " (N other cache file(s) ...: FILE (SIZE), ...; delete them if unused)" naming the other cache
    files in `path`'s directory made for a folder of the same name (any size, channels or file list), or "". They
    are never deleted here (another run may still map one, and only the user knows), but each can be as large as
    the data set (CelebA at 256 px: 40 GB), so the user is told exactly which files and how much to delete."""
    folder = folder_name(root)
    pattern = re.compile(re.escape(folder) + r"_\d+px_(rgb|gray)_\d+img_[0-9a-f]{16}\.npy")
    older = []
    for f in sorted(path.parent.iterdir()):
        if f != path and pattern.fullmatch(f.name):
            with contextlib.suppress(OSError):  # removed meanwhile: nothing to name
                older.append((f, f.stat().st_size))
    if not older:
        return ""
    shown = ", ".join(f"{f} ({size_text(n)})" for f, n in older[:named])
    more = f" and {len(older) - named} more" if len(older) > named else ""
    total = size_text(sum(n for _, n in older))
    return (f" ({len(older)} other cache file(s) of a folder named {folder} there, {total} in all, not read by this "
            f"run: {shown}{more}; delete them if unused)")


def _writable_dir(path: Path) -> Path:
    """`path` made if missing and checked writable by a real write (common.io.check_writable_dir: permission
    bits say nothing for root or a read-only file system); a cache only read may sit in a read-only directory."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DatasetError(f"--data.cache_dir {path}: cannot create it ({e.strerror}); pass a writable one "
                           "(or --data.cache_dir null to decode into memory)") from e
    try:
        check_writable_dir(path, "--data.cache_dir")
    except OutputError as e:
        raise DatasetError(f"{e} (or --data.cache_dir null to decode into memory)") from None
    return path


def _open(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """The cache file mapped copy-on-write (writable in this process, so torch takes it without a copy;
    nothing is ever written back to the file)."""
    try:
        array = np.load(path, mmap_mode="c", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path}: not a readable image cache ({e}); delete it and run again") from e
    if array.dtype != np.uint8 or array.shape != shape:
        raise DatasetError(
            f"{path}: holds {array.dtype} {array.shape}, not the uint8 {shape} its name promises; "
            "delete it and run again"
        )
    return array


def cached_images(cache_dir: str | Path, root: str | Path, files: list[Path], image_size: int, channels: int,
                  rows: np.ndarray | None = None) -> tuple[np.ndarray, Path, bool]:  # fmt: skip
    """(uint8 (N, channels, S, S) memory-mapped, its file, whether it was decoded now): the images `files` name
    as `read_images(files, image_size, channels, rows=rows, channels_first=True)` would return them, read from
    the cache file when one for exactly these files exists, else decoded once into it."""
    root, directory = Path(root), Path(cache_dir)
    if directory.exists() and not directory.is_dir():
        raise DatasetError(f"--data.cache_dir {directory} is a file; pass a directory (it is created if missing)")
    in_rows = files if rows is None else [files[i] for i in np.argsort(rows)]  # row r holds file argsort(rows)[r]
    shape = (len(files), channels, image_size, image_size)
    path = cache_path(directory, root, len(files), image_size, channels, cache_key(root, in_rows, image_size, channels))
    if path.is_file():
        return _open(path, shape), path, False
    _writable_dir(directory)
    need, free = int(np.prod(shape)) + 128, shutil.disk_usage(directory).free
    if need + SPARE_BYTES > free:
        raise DatasetError(
            f"--data.cache_dir {directory}: the decoded images need {size_text(need)} there but "
            f"{size_text(free)} {'is' if free >= 1024 else 'are'} free; free some space or pass another "
            f"--data.cache_dir (the cache also leaves {size_text(SPARE_BYTES)} free for other writers: "
            f"{size_text(need + SPARE_BYTES)} in all)"
        )
    print(f"cache: decoding {len(files):,} images of {root} once into {path} ({size_text(need)}); later runs read it"
          f"{_older_caches(path, root)}", flush=True)  # fmt: skip
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": shape}
    with atomic_file(path, "w+b") as f:  # renamed into place only once every image is in it
        np.lib.format.write_array_header_1_0(f, header)
        offset = f.tell()
        f.truncate(offset + int(np.prod(shape)))
        try:  # the check above passed, but another writer (a job, logs) may have taken the space since
            reserve_space(f.fileno())
        except OSError as e:
            if not no_space(e):
                raise
            free = shutil.disk_usage(directory).free + os.fstat(f.fileno()).st_blocks * 512  # + what the temp holds
            raise DatasetError(
                f"--data.cache_dir {directory}: no space left on device: the decoded images need {size_text(need)} "
                f"there but only {size_text(free)} is free now (another process filled it since the check?); free "
                "some space or pass another --data.cache_dir (or --data.cache_dir null to decode into memory)"
            ) from e
        out = np.memmap(f, np.uint8, "r+", offset, shape)  # the images are decoded straight into the file
        read_images(files, image_size, channels, rows=rows, channels_first=True, out=out,
                    progress=f"images of {root} into the cache")
        out.flush()
        del out
        f.flush()
        os.fsync(f.fileno())  # on disk before the name says the file is complete
    return _open(path, shape), path, True
