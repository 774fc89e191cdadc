"""Image grids: tiles of images ([-1, 1] floats or uint8) in one uint8 array, and written atomically in the format
a file's suffix names. Imports torch, numpy and Pillow only."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image
from torch import Tensor

from common.images import to_uint8
from common.io import atomic_file


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


GRID_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def save_grid(
    images: Tensor,
    path: str | Path,
    nrow: int | None = None,
    padding: int = 2,
    scale: int = 1,
    pad_value: int = 255,
) -> np.ndarray:
    """Write `make_grid(...)` in the format its suffix names (.png, .jpg, .webp), atomically; return the grid."""
    path = Path(path)
    fmt = GRID_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: an image grid is written as {', '.join(GRID_FORMATS)}; use one of those suffixes")
    grid = make_grid(images, nrow, padding, scale, pad_value)
    with atomic_file(path) as f:
        Image.fromarray(grid[..., 0] if grid.shape[2] == 1 else grid).save(f, format=fmt)
    return grid
