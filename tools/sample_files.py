"""What `evaluate samples` scores, read from the user's files: a `sample` .npz (and the stage 1 it names,
whose data options become the defaults), or a folder of image files from any generator.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common.images import image_files, read_images


def load_samples(path: str | Path, channels: int | None = None) -> torch.Tensor:
    """The uint8 images (n, C, H, W) of a `sample` .npz, checked; or of a folder of image files (any
    generator's samples), read as every command reads image files, at the first file's size (the shorter
    side, center-cropped) and with `channels` (the data's)."""
    path = Path(path)
    if path.is_dir():
        files = image_files([path])
        if len(files) < 2:
            raise ValueError(f"--samples {path}: a folder of samples needs at least 2 images, it has {len(files)}")
        with Image.open(files[0]) as first:
            size = min(first.size)
        return torch.from_numpy(read_images(files, size, channels)).permute(0, 3, 1, 2).contiguous()
    if not path.is_file():
        raise FileNotFoundError(f"--samples {path}: no such file; write one with `sample --prior PRIOR.ckpt --n 1000`")
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "images" not in npz:
                raise ValueError(f"--samples {path} has no 'images' array (it has {', '.join(npz.files)}); "
                                 "pass the .npz that `sample` writes beside its PNG")  # fmt: skip
            images = npz["images"]
    except (OSError, EOFError, ValueError) as e:
        raise ValueError(f"--samples {path}: {e}" if str(path) not in str(e) else str(e)) from e
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3) or len(images) < 2:
        raise ValueError(f"--samples {path}: 'images' must be uint8 (n >= 2, C in 1|3, H, W), "
                         f"got {images.dtype} {images.shape}")  # fmt: skip
    return torch.from_numpy(images)


def sample_labels(path: str | Path) -> np.ndarray | None:
    """The class of each sample in a `sample` .npz (None: a folder, no labels, or unconditional samples)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            labels = np.asarray(npz["labels"]) if "labels" in npz.files else None
    except (OSError, EOFError, ValueError, TypeError, IsADirectoryError):
        return None
    if labels is None or labels.ndim != 1 or labels.dtype.kind not in "iu" or (labels < 0).any():
        return None
    return labels.astype(np.int64)


def stage1_of_samples(path: str | None) -> str | None:
    """The stage-1 checkpoint a `sample` .npz names, if that file is still there: its absolute path, else the
    same file relative to the .npz (the project copied elsewhere), else None: the --data.* defaults apply, and
    load_samples reports a bad file."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            named = str(npz["stage1_ckpt"]) if "stage1_ckpt" in npz.files else None
            relative = str(npz["stage1_ckpt_relative"]) if "stage1_ckpt_relative" in npz.files else None
    except (OSError, EOFError, ValueError, TypeError):
        return None
    if named and not Path(named).is_file() and relative and (Path(path).parent / relative).is_file():
        return str(Path(path).parent / relative)
    if named and not Path(named).is_file():
        print(f"evaluate: note: --samples {path} names the stage 1 {named}, which is gone; the --data.* options "
              "are the defaults unless given (or pass --ckpt)", file=sys.stderr)  # fmt: skip
        return None
    return named or None
