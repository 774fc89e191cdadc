"""Image repair (inpainting) in code space: pixel holes -> which codes to redraw, and back to pixels.

    hole = hole_from_mask_image("mask.png", 28)          # (28, 28) bool: True where the image is to be repaired
    redraw = codes_to_redraw(hole, (7, 7))               # (7, 7) bool: a code is redrawn if ANY pixel of its
                                                         #   cell is in the hole; the others are kept exactly
    region = cell_pixels(redraw, 28)                     # (28, 28) bool: the pixels those codes cover

Used, on each stage-1 level, by `sample --prime IMAGE --mask MASK` and the page's Repair (through
:mod:`tools.drawing`) and by the repair benchmark, so all of them draw the same holes. Torch only (plus the
image reader).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from common.images import load_image


def hole_from_mask_image(path: str | Path, image_size: int) -> torch.Tensor:
    """A mask image (any size; resized like the images) -> (S, S) bool hole: True where it is not white
    (white = keep, as for completion)."""
    mask = load_image(path, image_size, channels=1)  # (1, 1, S, S) in [-1, 1]
    return mask[0, 0] <= 0


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
