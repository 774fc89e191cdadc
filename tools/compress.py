"""`compress` / `decompress`: store images as their stage-1 codes, entropy-coded with the stage-2 prior.

    compress a.png b.png more_images/ --prior prior.ckpt --out images.vqz
    decompress images.vqz --prior prior.ckpt --out decoded/          # decoded/000000.png, 000001.png, ...

`compress` encodes each image to codes with stage 1 and codes them with the prior's probabilities
(:mod:`tools.codec`: range coding, a versioned ``.vqz`` container with both checkpoints' SHA-256
and CRCs). `decompress` recovers the codes exactly and writes stage 1's decoding of them as PNGs, so the
images come back as stage-1 reconstructions: lossless for the codes, lossy for the pixels. The stage-1
checkpoint is the one the prior's codes metadata names (checked by SHA-256) unless ``--vqvae`` is given.
Both run on the CPU with one thread (exact decoding needs identical floats) and never replace an existing
file without ``--overwrite``; `compress` writes a temp file renamed into place, `decompress` writes into
a hidden temporary folder whose files are moved into ``--out`` only once all of them are written.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common.cli import add_overwrite, make_parser, run_command
from common.images import image_files, load_images, to_uint8
from common.io import check_output, check_output_dir, staging_dir, write_atomic
from stage1_vqvae.model import VQModel
from tools.codec import MAX_BATCH_SIZE, Container, ContainerError, decode_codes, encode_codes, pack, unpack
from tools.load import Models, load_models

DEFAULT_BATCH_SIZE = 256


def encode_images(vqvae: VQModel, images: torch.Tensor, batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
    return torch.cat([vqvae.encode_to_codes(x) for x in images.split(batch_size)]).numpy()


def compress_codes(m: Models, codes: np.ndarray, batch_size: int = DEFAULT_BATCH_SIZE) -> tuple[bytes, float]:
    """codes (N, H, W) -> (.vqz bytes, ideal payload bits -sum log2 p)."""
    streams, crcs, ideal = encode_codes(m.prior, codes, batch_size)
    c = Container(m.prior_sha256, m.stage1_sha256, m.image_size, m.channels, tuple(m.vqvae.grid_shape),
                  m.vqvae.codebook_size, len(codes), batch_size, m.prior.step_version,
                  streams, crcs)  # fmt: skip
    return pack(c), ideal


def decompress_codes(m: Models, data: bytes, name: str = "<bytes>") -> np.ndarray:
    """.vqz bytes -> codes (N, H, W); ContainerError if the file is bad or made with other checkpoints."""
    c = unpack(data, name)
    for what, flag, ours, theirs in [("prior", "--prior", m.prior_sha256, c.prior_sha256),
                                     ("stage-1 checkpoint", "--vqvae", m.stage1_sha256, c.stage1_sha256)]:  # fmt: skip
        if ours != theirs:
            raise ContainerError(f"{name} was made with a different {what}: checkpoint SHA-256 differs (file: "
                                 f"{theirs[:12]}..., given: {ours[:12]}...); pass the {what} it was made with "
                                 f"({flag})")  # fmt: skip
    if (c.image_size, c.channels) != (m.image_size, m.channels):
        raise ContainerError(f"{name}: holds {c.channels}-channel {c.image_size}px images, but stage 1 makes "
                             f"{m.channels}-channel {m.image_size}px ones; pass the checkpoints it was "
                             "made with")  # fmt: skip
    return decode_codes(m.prior, c, name)


def decode_images(vqvae: VQModel, codes: np.ndarray, batch_size: int = DEFAULT_BATCH_SIZE) -> torch.Tensor:
    codes_t = torch.from_numpy(np.asarray(codes, dtype=np.int64))
    return torch.cat([vqvae.decode_codes(c) for c in codes_t.split(batch_size)]) if len(codes_t) else codes_t


def _parser(prog: str):
    p = make_parser(prog, __doc__)
    p.add_argument("--prior", type=str, required=True, help="stage-2 prior checkpoint (.ckpt)")
    p.add_argument("--vqvae", type=str, help="stage-1 checkpoint (default: the one the prior's codes came from)")
    add_overwrite(p)
    return p


def cpu_models(a) -> Models:
    """Prior and stage 1 in fp32 on the CPU: the coder's probabilities must be bit-identical both ways."""
    m = load_models(a.prior, a.vqvae, "cpu")
    m.prior.float()
    m.vqvae.float()
    return m


def run_compress(args: list[str] | None) -> str:
    p = _parser("compress")
    p.add_argument("images", nargs="+", type=str, help="image files and/or directories of images")
    p.add_argument("--out", type=str, required=True, help="the .vqz file to write")
    p.add_argument("--batch_size", type=int, default=DEFAULT_BATCH_SIZE, help="images per coded batch")
    a = p.parse_args(args)
    if not 1 <= a.batch_size <= MAX_BATCH_SIZE:
        raise ValueError(f"--batch_size must be in [1, {MAX_BATCH_SIZE}], got {a.batch_size}")
    out = check_output(a.out, a.overwrite)
    files = image_files(a.images)
    m = cpu_models(a)
    t0 = time.perf_counter()
    codes = encode_images(m.vqvae, load_images(files, m.image_size, m.channels))
    data, ideal = compress_codes(m, codes, a.batch_size)
    seconds = time.perf_counter() - t0
    write_atomic(out, data)
    pixels = len(files) * m.image_size**2
    return (f"{len(files)} images -> {out}: {len(data)} bytes, {8 * len(data) / pixels:.4f} bits per pixel "
            f"(ideal {ideal / pixels:.4f}), {len(files) / seconds:.1f} images/s")  # fmt: skip


def run_decompress(args: list[str] | None) -> str:
    p = _parser("decompress")
    p.add_argument("file", type=str, help="a .vqz file written by `compress`")
    p.add_argument("--out", type=str, required=True, help="directory for the decoded images (000000.png, ...)")
    a = p.parse_args(args)
    path = Path(a.file)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    data = path.read_bytes()
    count = unpack(data, str(path)).count  # check the file before loading the models
    names = [f"{i:06d}.png" for i in range(count)]
    out = check_output_dir(a.out, names, a.overwrite)
    m = cpu_models(a)
    t0 = time.perf_counter()
    images = to_uint8(decode_images(m.vqvae, decompress_codes(m, data, str(path))))
    seconds = time.perf_counter() - t0
    with staging_dir(out) as tmp:
        for name, image in zip(names, images.permute(0, 2, 3, 1).numpy()):
            Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(tmp / name, format="PNG")
    pixels = max(1, count * m.image_size**2)
    return (f"{path} -> {count} images in {out}/: {8 * len(data) / pixels:.4f} bits per pixel, "
            f"{count / max(seconds, 1e-9):.1f} images/s")  # fmt: skip


def main_compress(args: list[str] | None = None) -> None:
    run_command("compress", run_compress, args)


def main_decompress(args: list[str] | None = None) -> None:
    run_command("decompress", run_decompress, args)
