"""Image utilities both stages and the tools share: uint8 <-> [-1, 1], reading user image files (grids:
:mod:`common.grids`).

Vocabulary: `images` are float32 tensors (B, C, H, W) in [-1, 1]; uint8 images are (B, C, H, W) in [0, 255].
Imports torch, numpy and Pillow only (no Lightning), so the model commands start fast.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from common.cli import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
# The decoders a file (or an upload) may reach, whatever its name says: Pillow knows ~40 formats, some of which
# run other programs (EPS: Ghostscript) or are rarely exercised. (JPEG's opener also returns cameras' MPO files.)
PIL_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF")
SUFFIXES_TEXT = "/".join(IMAGE_SUFFIXES)  # for messages: ".png/.jpg/..."
GRAY_MODES = {"1", "L", "LA", "I", "F", "I;16", "I;16B", "I;16L", "I;16N"}  # Pillow modes without colour


class ImageError(UserError, ValueError):
    """An image file cannot be read; the message names it (`path`, and `reason`: what the reader said)."""

    def __init__(self, message: str, path: Path | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.path, self.reason = path, reason


MAX_NAMED = 20  # unreadable files named in one error; the count says how many more
PROGRESS_S = 10.0  # a long read of a folder says how far it is this often


def cannot_read(path: Path, e: Exception) -> ImageError:
    """The error for one file Pillow cannot read (it raises OSError, SyntaxError, ValueError, ...)."""
    reason = f"{type(e).__name__}: {e}"
    with contextlib.suppress(OSError):
        if path.stat().st_size == 0:  # Pillow says "cannot identify image file", which hides the plain cause
            reason = "an empty file, 0 bytes"
    return ImageError(f"{path}: cannot read image ({reason}); fix or delete the file", path, reason)


def unreadable(errors: list[tuple[int, ImageError]], n: int) -> ImageError:
    """One error for every file of a read that failed (its position, its error): a folder with a few broken
    files among thousands is fixed in one go, not one rerun per file. One file: its own error."""
    errors = sorted(errors, key=lambda e: e[0])
    if len(errors) == 1:
        return errors[0][1]
    names = ", ".join(str(e.path) for _, e in errors[:MAX_NAMED])
    more = f" and {len(errors) - MAX_NAMED} more" if len(errors) > MAX_NAMED else ""
    return ImageError(f"{len(errors)} of {n} image files cannot be read ({errors[0][1].reason}, the first): "
                      f"{names}{more}; fix or delete them")  # fmt: skip


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




# -------------------------------------------------------------------------------- files
def check_channels(channels: int | None, where: str) -> None:
    if channels not in (None, 1, 3):
        raise ValueError(
            f"{where}: channels must be 1 (grayscale), 3 (RGB) or None (infer), got {channels!r}"
        )


def infer_channels(files: list[Path]) -> int:
    """1 if every image is grayscale, else 3 (reads headers only). A file whose header cannot be read is passed
    over: the decode that follows names every such file at once (`read_images`); only when none can be read
    are they all named here."""
    errors: list[tuple[int, ImageError]] = []
    for i, path in enumerate(files):
        try:
            with Image.open(path, formats=PIL_FORMATS) as img:
                if img.mode not in GRAY_MODES:
                    return 3
        except Exception as e:
            errors.append((i, cannot_read(path, e)))
    if files and len(errors) == len(files):
        raise unreadable(errors, len(files))
    return 1


def over_white(img: Image.Image) -> Image.Image:
    """An image with transparency (RGBA, LA, a palette or colour key with tRNS) composited over white; others
    unchanged. Dropping alpha instead would show whatever colour the file hides under transparent pixels
    (often black, sometimes noise); white is also what the emoji data set is composited over."""
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return img


def white_level(img: Image.Image) -> float:
    """The value that is white in `img`'s format, whatever it holds: 65535 for the 16-bit modes ("I;16",
    "I;16B", ...); for "I", 2**bits - 1 as a TIFF's BitsPerSample and SampleFormat say (signed: 2**(bits-1) - 1),
    else 65535 (16-bit PNGs and PGMs open as "I" in older Pillows); 1.0 for float ("F"); 255 for the rest."""
    if img.mode == "F":
        return 1.0
    if not img.mode.startswith("I"):
        return 255.0
    tags = getattr(img, "tag_v2", None) if img.mode == "I" else None  # TIFF only
    bits, fmt = (tags.get(258), tags.get(339)) if tags is not None else (None, None)
    bits, fmt = (v[0] if isinstance(v, tuple) and v else v for v in (bits, fmt))
    if not isinstance(bits, int) or not 8 <= bits <= 32:
        return 65535.0
    return 2.0 ** (bits - (fmt == 2)) - 1


def to_8bit(img: Image.Image, white: float) -> Image.Image:
    """A grey image of more than 8 bits as mode "L", scaled by its format's range (`white_level`), never by its
    content: 16 bits divide by 257 (65535 -> 255), float takes [0, 1] as black to white (NaN: black; one whose
    finite values pass 1 is read as [0, 255], or [0, 65535] past 255: it has no range of its own); values
    outside are clipped. Pillow's own convert clips integers at 255 and truncates floats, so a 16-bit image
    read black and white (or, scaled only when its maximum was over 255, as if 8-bit) and a float TIFF in
    [0, 1] read all black. Other modes are returned unchanged."""
    if img.mode != "F" and not img.mode.startswith("I"):
        return img
    x = np.asarray(img)
    if img.mode == "I" and white > 2**31:  # unsigned 32-bit: Pillow holds it in int32
        x = x.view(np.uint32)
    if img.mode == "F":  # a float image has no range of its own: [0, 1], or as ImageJ writes 8- and 16-bit data
        top = float(np.max(x[np.isfinite(x)], initial=0.0))  # (Pillow's own convert read those) [0, 255] or 65535
        white = 1.0 if top <= 1.0 else 255.0 if top <= 255.0 else 65535.0
    x = np.nan_to_num(x.astype(np.float64), nan=0.0, posinf=white, neginf=0.0) / (white / 255)  # 16 bits: / 257.0
    return Image.fromarray(x.round().clip(0, 255).astype(np.uint8))  # 2-D uint8: mode "L"


LONG_IMAGE = 4  # an image whose resized whole would hold more than this many target squares is read by its centre


def read_image(path: Path, image_size: int, channels: int) -> np.ndarray:
    """One file -> uint8 (image_size, image_size, channels): transparency over white, 16-bit and float images
    scaled to 8 bits by their format's range (`to_8bit`), shorter side resized, then centre-cropped (a strip:
    only its centre square resized, LONG_IMAGE)."""
    try:
        with Image.open(path, formats=PIL_FORMATS) as img:
            if img.format == "JPEG":  # decode at 1/2, 1/4 or 1/8 scale where that still covers the target:
                img.draft(img.mode, (image_size, image_size))  # 12-MP photos 5.9x faster (benchmarks/read_images)
            white = white_level(img)  # before exif_transpose: its copy has no TIFF tags
            img = to_8bit(ImageOps.exif_transpose(img), white)  # phone JPEGs store rotation in EXIF
            img = over_white(img).convert("L" if channels == 1 else "RGB")
            w, h = img.size
            s = image_size / min(w, h)  # the shorter side to image_size, then the centre square
            nw, nh = max(image_size, round(w * s)), max(image_size, round(h * s))
            left, top = (nw - image_size) // 2, (nh - image_size) // 2
            if nw * nh > LONG_IMAGE * image_size**2:
                # A strip: resize only the centre square (`box`, in source pixels; the crop's place as below).
                # Resized whole first, a 12000x1 strip became 3,072,000x256 pixels at 256 px (3.4 GB, 4.4 s; the
                # scale audit). Other images keep the way below, whose pixels existing image caches hold.
                box = (left / s, top / s, (left + image_size) / s, (top + image_size) / s)
                img = img.resize((image_size, image_size), Image.Resampling.LANCZOS, box=box, reducing_gap=3.0)
            else:
                if (nw, nh) != (w, h):
                    # reducing_gap: a box reduction by an integer factor first where the image is over 3x the target
                    img = img.resize((nw, nh), Image.Resampling.LANCZOS, reducing_gap=3.0)
                img = img.crop((left, top, left + image_size, top + image_size))
            # np.array copies: PIL's buffer is read-only, and torch.from_numpy warns on such arrays
            arr = np.array(img, dtype=np.uint8)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for broken files
        raise cannot_read(path, e) from e
    return arr.reshape(image_size, image_size, channels)


def read_images(paths: list[Path], image_size: int, channels: int, threads: int | None = None,
                rows: np.ndarray | None = None, channels_first: bool = False,
                out: np.ndarray | None = None, progress: str | None = None) -> np.ndarray:  # fmt: skip
    """Many files -> uint8 (N, image_size, image_size, channels), each as `read_image` reads it, in order;
    `rows`: file i goes to row rows[i] instead (a permutation), `channels_first`: (N, channels, S, S), so a
    caller needs no second, rearranged copy of a folder that barely fits in memory. `out`: the array to fill
    (e.g. a memory-mapped file, common.image_cache), of that shape and uint8; by default a new one.
    `progress`: what is read ("images of data/photos"), for a line every PROGRESS_S seconds of a long read
    (CelebA: about two minutes on 2 cores), printed by the first process of a job only.

    Threads pay off where decoding dominates (photos, JPEGs, PNGs of a few hundred pixels: Pillow decodes
    without the GIL; 1.5-1.9x on 2 cores) and lose where Python's per-file work does (64-px RGBA glyphs: 0.7x),
    so the first files are read both ways and the faster way reads the rest. The array is the same either
    way. Broken files do not stop the read: every one is named, in the files' order, in one ImageError at the
    end (`unreadable`)."""
    one = (channels, image_size, image_size) if channels_first else (image_size, image_size, channels)
    shape = (len(paths), *one)
    if out is None:
        out = np.empty(shape, np.uint8)
    elif out.shape != shape or out.dtype != np.uint8:
        raise ValueError(f"read_images: out must be uint8 {shape}, got {out.dtype} {out.shape}")
    errors: list[tuple[int, ImageError]] = []

    def read(i: int) -> None:
        try:
            image = read_image(paths[i], image_size, channels)  # (S, S, C)
        except ImageError as e:
            errors.append((i, e))  # list.append is atomic: safe from the pool's threads
            return
        out[i if rows is None else rows[i]] = image.transpose(2, 0, 1) if channels_first else image

    start_time = last_report = time.perf_counter()
    say = progress is not None and os.environ.get("RANK", "0") == os.environ.get("LOCAL_RANK", "0") == "0"

    def report(done: int) -> None:  # from the main thread, between chunks
        nonlocal last_report
        now = time.perf_counter()
        if say and now - last_report >= PROGRESS_S and done < len(paths):
            last_report = now
            print(f"read {done:,} of {len(paths):,} {progress} ({done / (now - start_time):,.0f} images/s)", flush=True)

    # the CPUs this process may run on (a SLURM job's or taskset's share), not the machine's
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads, probe, done = threads or min(8, usable), 32, 0
    if threads > 1 and len(paths) >= 8 * probe:
        t = time.perf_counter()
        for i in range(probe):
            read(i)
        serial = time.perf_counter() - t
        with ThreadPoolExecutor(threads) as pool:
            t = time.perf_counter()
            list(pool.map(read, range(probe, 2 * probe)))
            done = 2 * probe
            if time.perf_counter() - t < 0.8 * serial:
                # chunks: a few hundred futures at a time, so Ctrl-C waits for one chunk, not the whole folder
                for start in range(done, len(paths), 512):
                    list(pool.map(read, range(start, min(len(paths), start + 512))))
                    report(min(len(paths), start + 512))
                done = len(paths)
    for i in range(done, len(paths)):
        read(i)
        if (i + 1) % 512 == 0:
            report(i + 1)
    if errors:
        raise unreadable(errors, len(paths))
    return out


def load_image(path: str | Path, image_size: int, channels: int | None = None) -> Tensor:
    """One user image -> (1, C, image_size, image_size) in [-1, 1], resized/cropped like the folder reader."""
    path = Path(path)
    check_channels(channels, "load_image")
    if path.is_dir():
        raise FileNotFoundError(f"{path} is a folder; give one image file")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image file")
    arr = read_image(path, image_size, channels or infer_channels([path]))
    return from_uint8(torch.from_numpy(arr).permute(2, 0, 1).contiguous()[None])


def find_images(folder: Path) -> list[Path]:
    """The image files (IMAGE_SUFFIXES) anywhere under `folder`, sorted. Hidden files and folders below it (a
    name starting with ".": .ipynb_checkpoints, .thumbs, .git) are skipped with all they hold: they are tools'
    leftovers, and a checkpoint copy of an image would be read twice. Symlinked folders are not followed."""
    found = []
    for top, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # pruned: never walked
        found += [Path(top, n) for n in names if not n.startswith(".") and Path(n).suffix.lower() in IMAGE_SUFFIXES]
    return sorted(f for f in found if f.is_file())


def named_image_files(paths: list[str | Path]) -> list[tuple[Path, str]]:
    """(file, name) for the given image files, each directory replaced by the image files anywhere under it
    (`find_images`: sorted, hidden paths skipped). The name is the path below the directory given, with "/"
    (`cats/1f595.png`), or a file's own name for a file given itself: what `compress` stores and
    `score_anomalies` prints."""
    files: list[tuple[Path, str]] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = find_images(p)
            if not found:
                raise FileNotFoundError(f"{p}: directory holds no {SUFFIXES_TEXT} images (sub-folders included)")
            files += [(f, f.relative_to(p).as_posix()) for f in found]
        elif p.is_file():
            files.append((p, p.name))
        else:
            raise FileNotFoundError(f"{p}: no such image file or directory")
    return files


def image_files(paths: list[str | Path]) -> list[Path]:
    """The given image files, with each directory replaced by the image files under it (`named_image_files`)."""
    return [f for f, _ in named_image_files(paths)]


def load_images(files: list[Path], image_size: int, channels: int) -> Tensor:
    """Image files -> (N, C, S, S) in [-1, 1], read as the folder reader reads them (`read_images`)."""
    return from_uint8(torch.from_numpy(read_images(files, image_size, channels)).permute(0, 3, 1, 2).contiguous())


CHUNK_BYTES = 256 << 20  # the float pixels of one chunk of image_chunks: 85,000 images at 28 px, 341 at 256 px


def image_chunks(files: list[Path], image_size: int, channels: int, multiple: int = 1) -> Iterator[Tensor]:
    """`load_images` a chunk of files at a time (CHUNK_BYTES of pixels, a multiple of `multiple` files), so a
    command that goes through a folder once holds about one chunk, whatever the folder's size: `score_anomalies`
    and `compress` read 30,000 files at 256 px whole (23 GB as floats, before any work) and ran out of memory in a
    way no --batch_size could help. `multiple`: the caller's batch, so that its batches are those of a whole read
    (the same floats: a batch of other images can round the last digit otherwise)."""
    per_chunk = max(1, CHUNK_BYTES // (4 * channels * image_size**2) // multiple) * multiple
    for start in range(0, len(files), per_chunk):
        chunk = files[start : start + per_chunk]
        try:
            yield load_images(chunk, image_size, channels)
        except ImageError as e:
            if len(chunk) == len(files):
                raise
            raise ImageError(f"{e} (among files {start + 1:,}-{start + len(chunk):,} of {len(files):,}, read a "
                             "chunk at a time: later files are not checked yet)", e.path, e.reason) from None
