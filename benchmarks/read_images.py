"""Reading user image files (`common.images.read_image`): images/s against a full decode, and how close.

    python benchmarks/read_images.py [--n 20] [--image_size 64]

Every command that reads your files (image-folder training, extraction, `compress`, `score_anomalies`,
`sample --prime`, the page) goes through `read_image`, which decodes a JPEG at 1/2, 1/4 or 1/8 scale where
that still covers the target size (Pillow's `draft`) and lets LANCZOS reduce by an integer factor first when
the image is over 3x the target (`reducing_gap`). The reference here is the same reading without both: the
whole image decoded, then one LANCZOS resize. Photo-like test images are generated (a smooth gradient plus
noise, so the JPEGs are photo-sized): a 12-MP phone photo (4032x3024) and a CelebA-sized 178x218 face crop,
as JPEG and PNG. Timed interleaved, best of --rounds; PSNR of read_image's output against the reference's.
Then a folder's worth through `read_images` (threads where they pay) against one thread: the face crops, and
64-px RGBA glyphs like the emoji set's.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import machine, report  # also puts the repo root on sys.path
from PIL import Image, ImageOps

from common.images import read_image, read_images


def full_decode(path: Path, image_size: int) -> np.ndarray:
    """The reference: every pixel decoded, one LANCZOS resize, centre crop (read_image without its shortcuts)."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img).convert("RGB")
        w, h = img.size
        s = image_size / min(w, h)
        nw, nh = max(image_size, round(w * s)), max(image_size, round(h * s))
        img = img.resize((nw, nh), Image.Resampling.LANCZOS)
        left, top = (nw - image_size) // 2, (nh - image_size) // 2
        return np.array(img.crop((left, top, left + image_size, top + image_size)))


def photo(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, w)[None, :, None] * np.linspace(0.3, 1, h)[:, None, None]
    colour = ramp * rng.uniform(0.5, 1, 3) + rng.normal(0, 12, (h, w, 3))
    return Image.fromarray(colour.clip(0, 255).astype(np.uint8))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def folder_speed(result: dict, key: str, files: list[Path], a: argparse.Namespace) -> None:
    """A folder's worth (`read_images`, which times one thread against several on its first files and keeps
    the faster) against one thread; interleaved, best of --rounds."""
    best = {"auto": float("inf"), "one_thread": float("inf")}
    for _ in range(a.rounds):
        for label, threads in (("auto", None), ("one_thread", 1)):
            t = time.perf_counter()
            read_images(files, a.image_size, 3, threads=threads)
            best[label] = min(best[label], time.perf_counter() - t)
    result[f"{key}_folder_of_{len(files)}_images_per_s"] = round(len(files) / best["auto"], 1)
    result[f"{key}_folder_one_thread_images_per_s"] = round(len(files) / best["one_thread"], 1)
    result[f"{key}_folder_speedup"] = round(best["one_thread"] / best["auto"], 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20, help="files of each kind")
    ap.add_argument("--image_size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default="benchmarks/results/read_images_cpu.json")
    a = ap.parse_args()
    result: dict = {**machine(), "n": a.n, "image_size": a.image_size}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (w, h) in {"phone_4032x3024": (4032, 3024), "celeba_178x218": (178, 218)}.items():
            for fmt in ("jpg", "png"):
                files = []
                for i in range(a.n):
                    files.append(Path(tmp) / f"{name}_{i}.{fmt}")
                    photo(w, h, i).save(files[-1], **({"quality": 90} if fmt == "jpg" else {}))
                best = {"read_image": float("inf"), "full_decode": float("inf")}
                for _ in range(a.rounds):
                    for label, fn in (("read_image", lambda f: read_image(f, a.image_size, 3)),
                                      ("full_decode", lambda f: full_decode(f, a.image_size))):  # fmt: skip
                        t = time.perf_counter()
                        for f in files:
                            fn(f)
                        best[label] = min(best[label], time.perf_counter() - t)
                close = min(psnr(read_image(f, a.image_size, 3), full_decode(f, a.image_size)) for f in files)
                key = f"{name}_{fmt}"
                result[f"{key}_images_per_s"] = round(a.n / best["read_image"], 1)
                result[f"{key}_full_decode_images_per_s"] = round(a.n / best["full_decode"], 1)
                result[f"{key}_speedup"] = round(best["full_decode"] / best["read_image"], 2)
                result[f"{key}_min_psnr_vs_full_decode_db"] = round(close, 2) if close != float("inf") else "identical"
                print(f"{key}: {result[f'{key}_speedup']}x, PSNR >= {result[f'{key}_min_psnr_vs_full_decode_db']}",
                      flush=True)  # fmt: skip
                if name.startswith("celeba"):
                    folder_speed(result, key, files * 16, a)
        glyphs = []  # 64-px RGBA glyphs (the emoji set's kind): threads lose here, read_images keeps one
        for i in range(a.n):
            glyphs.append(Path(tmp) / f"glyph_{i}.png")
            rgba = np.asarray(photo(64, 64, i).convert("RGBA")).copy()
            rgba[:16, :, 3] = 0
            Image.fromarray(rgba, "RGBA").save(glyphs[-1])
        folder_speed(result, "glyph_64_rgba_png", glyphs * 16, a)
    report(result, a.json)


if __name__ == "__main__":
    main()
