"""What `evaluate samples` scores, read from the user's files: a `sample` .npz (and the stage 1 it names,
whose data options become the defaults), or a folder of image files from any generator.
"""

from __future__ import annotations

import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common.images import PIL_FORMATS, image_files, read_images

# What np.load raises on a file that is not a whole .npz: a truncated or corrupt zip (BadZipFile; zlib.error in a
# compressed member), an empty file (EOFError), text or another format (ValueError: "pickled data"), unreadable
# (OSError). A file that is not a zip at all numpy takes for a pickle, hence its misleading "pickled" message.
NOT_AN_NPZ = (zipfile.BadZipFile, zlib.error, EOFError, ValueError, OSError)


def load_samples(path: str | Path, channels: int | None = None) -> torch.Tensor:
    """The uint8 images (n, C, H, W) of a `sample` .npz, checked; or of a folder of image files (any
    generator's samples), read as every command reads image files, at the first file's size (the shorter
    side, center-cropped) and with `channels` (the data's)."""
    path = Path(path)
    if path.is_dir():
        files = image_files([path])
        if len(files) < 2:
            raise ValueError(f"--samples {path}: a folder of samples needs at least 2 images, it has {len(files)}")
        with Image.open(files[0], formats=PIL_FORMATS) as first:
            size = min(first.size)
        return torch.from_numpy(read_images(files, size, channels)).permute(0, 3, 1, 2).contiguous()
    if not path.is_file():
        raise FileNotFoundError(f"--samples {path}: no such file; write one with `sample --prior PRIOR.ckpt --n 1000`")
    files, arrays = read_npz(path, ("images",))
    images = arrays.get("images")
    if images is None:
        raise ValueError(f"--samples {path} has no 'images' array (it has {', '.join(files) or 'none'}); "
                         "pass the .npz that `sample` writes beside its PNG")  # fmt: skip
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3) or len(images) < 2:
        raise ValueError(f"--samples {path}: 'images' must be uint8 (n >= 2, C in 1|3, H, W), "
                         f"got {images.dtype} {images.shape}")  # fmt: skip
    return torch.from_numpy(images)


def read_npz(path: Path, names: tuple[str, ...]) -> tuple[list[str], dict[str, np.ndarray]]:
    """(every array name, the arrays among `names` it has) of the .npz at `path`; a ValueError naming --samples
    and saying why for a file that is not one."""
    try:
        npz = np.load(path, allow_pickle=False)
        if isinstance(npz, np.ndarray):  # a .npy file (whatever its name): np.load returns its one array
            why = "one .npy array, not an archive of named arrays"
        else:
            with npz:  # a member cut short or changed fails here, when it is read
                return npz.files, {name: npz[name] for name in names if name in npz.files}
    except NOT_AN_NPZ as e:
        why = _why(e)
    raise ValueError(f"--samples {path} is not a readable .npz ({why}); pass the .npz that `sample` writes beside "
                     "its PNG (or a folder of images)")  # fmt: skip


def _why(e: Exception) -> str:
    """What np.load's exception says, in a few words."""
    if isinstance(e, ValueError) and "pickled" in str(e):
        return "neither a zip archive nor a .npy array"
    first = str(e).strip().split(". ")[0].rstrip(".")
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def sample_labels(path: str | Path) -> np.ndarray | None:
    """The class of each sample in a `sample` .npz (None: a folder, no labels, or unconditional samples)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            labels = np.asarray(npz["labels"]) if "labels" in npz.files else None
    except (*NOT_AN_NPZ, TypeError):
        return None
    if labels is None or labels.ndim != 1 or labels.dtype.kind not in "iu" or (labels < 0).any():
        return None
    return labels.astype(np.int64)


def stage1_of_samples(path: str | None) -> str | None:
    """The stage-1 checkpoint a `sample` .npz names, if that file is still there: its absolute path, else the
    same file relative to the .npz (the project copied elsewhere), else None: the --data.* defaults apply. A
    file that is not a .npz is a ValueError saying so here, the first time evaluate reads it (not later that it
    names no stage 1); no --samples, a missing one or a folder is None: evaluate and load_samples report them."""
    if path is None or not Path(path).is_file():
        return None
    _, arrays = read_npz(Path(path), ("stage1_ckpt", "stage1_ckpt_relative"))
    named = str(arrays["stage1_ckpt"]) if "stage1_ckpt" in arrays else None
    relative = str(arrays["stage1_ckpt_relative"]) if "stage1_ckpt_relative" in arrays else None
    if named and not Path(named).is_file() and relative and (Path(path).parent / relative).is_file():
        return str(Path(path).parent / relative)
    if named and not Path(named).is_file():
        print(f"evaluate: note: --samples {path} names the stage 1 {named}, which is gone; the --data.* options "
              "are the defaults unless given (or pass --ckpt)", file=sys.stderr)  # fmt: skip
        return None
    return named or None
