"""Image repair (inpainting) in code space: pixel holes -> which codes to redraw, and back to pixels.

    hole = hole_from_mask_image("mask.png", 28)          # (28, 28) bool: True where the image is to be repaired
    redraw = codes_to_redraw(hole, (7, 7))               # (7, 7) bool: a code is redrawn if ANY pixel of its
                                                         #   cell is in the hole; the others are kept exactly
    region = cell_pixels(redraw, 28)                     # (28, 28) bool: the pixels those codes cover

Used, on each stage-1 level, by `sample --prime IMAGE --mask MASK` and the page's Repair (through
:mod:`tools.drawing`) and by the repair benchmark, so all of them draw the same holes. Torch only (plus the
image reader and Pillow for a mask's transparency).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from common.images import PIL_FORMATS, load_image


def hole_from_mask_image(path: str | Path, image_size: int) -> torch.Tensor:
    """A mask image (any size; resized like the images) -> (S, S) bool hole: True where it is darker than
    mid-grey (black paints the hole; white and light grey keep, which resizing and JPEG noise leave alone).
    A mask with no such pixel but transparent ones is a hole erased in a paint program: its more than half
    transparent pixels are the hole (read over white, as images are, they looked kept and nothing was redrawn).
    Strokes on a transparent layer keep the first rule: only the strokes are the hole. ValueError if nothing is
    left to redraw: the repair would only return the image."""
    mask = load_image(path, image_size, channels=1)  # (1, 1, S, S) in [-1, 1], transparency over white
    hole = mask[0, 0] <= 0
    if not hole.any():
        with Image.open(path, formats=PIL_FORMATS) as img:
            if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
                alpha = ImageOps.fit(ImageOps.exif_transpose(img).convert("RGBA").getchannel("A"),
                                     (image_size, image_size), Image.Resampling.BILINEAR)  # fmt: skip
                hole = torch.from_numpy(np.asarray(alpha) < 128)
    if not hole.any():
        raise ValueError(f"--mask {path} marks no pixel to redraw: paint the hole black (darker than mid-grey) or "
                         "erase it to transparency; white and light grey keep")  # fmt: skip
    return hole


def codes_to_redraw(hole: torch.Tensor, grid_shape: tuple[int, int]) -> torch.Tensor:
    """hole (..., S, S) bool in pixels -> (..., H, W) bool: True for every code whose cell holds a hole pixel."""
    lead = hole.shape[:-2]
    x = hole.reshape(-1, 1, *hole.shape[-2:]).float()
    return (F.adaptive_max_pool2d(x, tuple(grid_shape)) > 0).reshape(*lead, *grid_shape)


def cell_pixels(codes_mask: torch.Tensor, image_size: int) -> torch.Tensor:
    """codes_mask (..., H, W) bool -> (..., S, S) bool: the pixels of those codes' cells."""
    lead = codes_mask.shape[:-2]
    x = codes_mask.reshape(-1, 1, *codes_mask.shape[-2:]).float()
    return (F.interpolate(x, size=(image_size, image_size), mode="nearest") > 0.5).reshape(*lead, image_size,
                                                                                          image_size)  # fmt: skip
