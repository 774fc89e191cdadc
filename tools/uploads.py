"""Bytes a browser sends -> checked arrays, and arrays -> the bytes it shows (the page, `serve`).

    image = read_upload_image(data, "shirt.png", image_size=28, channels=1)   # uint8 (C, S, S)
    painted = read_mask(data, image_size=28)                                 # bool (S, S)
    png = png_bytes(image)

Everything a user can get wrong is an :class:`common.images.ImageError` (a `UserError`) whose one-line
message names the upload and says what to send instead: not an image, too many pixels, a colour image for
a greyscale model. Images are composited over white (transparency), resized and centre-cropped exactly as
the commands read files (:func:`common.images.read_image`), so an image gives the same codes on the page as
in `compress`.
"""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from common.images import GRAY_MODES, PIL_FORMATS, ImageError, over_white, read_image

MAX_PIXELS = 4096 * 4096  # decoded size of one upload: ~50 MB as RGB; Pillow alone would allow ~180 MP


def _open(data: bytes, name: str, max_pixels: int, what: str = "image") -> Image.Image:
    """Decode `data` fully, refusing anything that is not an image or has more than `max_pixels` pixels."""
    if not data:
        raise ImageError(f"{name}: the file is empty; upload a PNG, JPEG or WebP {what}")
    try:
        img = Image.open(io.BytesIO(data), formats=PIL_FORMATS)  # no EPS (Ghostscript), no rare decoders
        w, h = img.size  # known from the header, before the pixels are decoded
        if w * h > max_pixels:
            raise ImageError(f"{name}: {w}x{h} pixels is too large; the limit is {max_pixels:,} pixels")
        img.load()
    except ImageError:
        raise
    except Image.DecompressionBombError:
        raise ImageError(f"{name}: too many pixels; the limit is {max_pixels:,} pixels") from None
    except Exception as e:  # Pillow raises UnidentifiedImageError, OSError, SyntaxError, ... for non-images
        raise ImageError(f"{name}: not an image this page can read ({type(e).__name__}); "
                         f"upload a PNG, JPEG or WebP {what}") from None  # fmt: skip
    return img


def _check_channels(img: Image.Image, name: str, channels: int) -> None:
    """Refuse a colour image for a greyscale model (turning it grey would be a guess). Transparency is not
    refused: it is composited over white, as the commands read files."""
    if channels == 1 and img.mode not in GRAY_MODES:
        rgb = np.asarray(over_white(img).convert("RGB"))
        if (rgb != rgb[..., :1]).any():
            raise ImageError(f"{name} is a colour image (3 channels), but this model reads 1-channel "
                             "(greyscale) images; upload a greyscale image")  # fmt: skip


def read_upload_image(data: bytes, name: str, image_size: int, channels: int,
                      max_pixels: int = MAX_PIXELS) -> torch.Tensor:  # fmt: skip
    """An uploaded image file -> uint8 (channels, image_size, image_size), read like the commands read files."""
    _check_channels(_open(data, name, max_pixels), name, channels)
    try:
        arr = read_image(io.BytesIO(data), image_size, channels)  # (S, S, C)
    except ImageError:
        raise ImageError(f"{name}: not an image this page can read; upload a PNG, JPEG or WebP image") from None
    return torch.from_numpy(np.array(arr)).permute(2, 0, 1).contiguous()  # a copy: Pillow's array is read-only


def read_mask(data: bytes, image_size: int, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """The painted mask (a PNG whose painted pixels are not fully transparent) -> bool (S, S).

    The page paints at the image's own resolution; a mask of another size is pooled so that an image pixel
    counts as painted if any mask pixel over it is painted."""
    img = _open(data, "the mask", max_pixels, "mask")
    alpha = torch.from_numpy(np.asarray(img.convert("RGBA"))[..., 3].copy())
    painted = (alpha > 0).float()[None, None]  # (1, 1, h, w)
    return F.adaptive_max_pool2d(painted, (image_size, image_size))[0, 0] > 0


def png_bytes(image: torch.Tensor) -> bytes:
    """uint8 (C, H, W), C in 1 or 3 -> PNG file bytes."""
    buf = io.BytesIO()
    Image.fromarray(png_ready(image)).save(buf, format="PNG")
    return buf.getvalue()


def encode_at_most(image: torch.Tensor, fmt: str, max_bytes: int) -> dict:
    """uint8 (C, S, S) -> the `fmt` ("JPEG" or "WEBP") file at the highest quality whose size is at most
    `max_bytes` (a binary search over Pillow's quality; sizes grow with quality, but not strictly, so this
    finds a quality at the boundary). If even the lowest quality is larger, that file, with fits False.
    Returns {"data", "quality", "bytes", "fits", "decoded": uint8 (C, S, S)}."""
    pil = Image.fromarray(png_ready(image))
    if fmt == "WEBP" and pil.mode == "L":
        pil = pil.convert("RGB")  # WebP stores colour; decoding converts back below

    def encode(q: int) -> bytes:
        buf = io.BytesIO()
        pil.save(buf, format=fmt, quality=q, **({"method": 6} if fmt == "WEBP" else {}))
        return buf.getvalue()

    lo, hi = 1, 100
    best = None
    while lo <= hi:
        mid = (lo + hi) // 2
        data = encode(mid)
        if len(data) <= max_bytes:
            best, lo = (mid, data), mid + 1
        else:
            hi = mid - 1
    quality, data = best if best else (1, encode(1))
    decoded = Image.open(io.BytesIO(data)).convert("L" if image.shape[0] == 1 else "RGB")
    arr = np.asarray(decoded).reshape(image.shape[1], image.shape[2], image.shape[0])
    return {"data": data, "quality": quality, "bytes": len(data), "fits": best is not None,
            "decoded": torch.from_numpy(arr.copy()).permute(2, 0, 1)}  # fmt: skip


def png_ready(image: torch.Tensor) -> np.ndarray:
    """uint8 (C, H, W) -> (H, W) for one channel, (H, W, 3) for three: what Pillow's fromarray takes."""
    arr = image.detach().cpu().permute(1, 2, 0).numpy()
    return arr[..., 0] if arr.shape[-1] == 1 else arr


def psnr(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """PSNR in dB of two uint8 images of one shape; None when identical (JSON has no infinity)."""
    mse = (a.float() - b.float()).pow(2).mean().item()
    return None if mse == 0 else float(10 * np.log10(255.0**2 / mse))
