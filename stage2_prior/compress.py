"""`compress` / `decompress`: store images as their stage-1 codes, entropy-coded with the stage-2 prior.

    compress a.png b.png more_images/ --prior prior.ckpt --out images.vqz
    decompress images.vqz --prior prior.ckpt --out decoded/          # decoded/000000.png, 000001.png, ...

`compress` encodes each image to codes with stage 1 and codes them with the prior's probabilities
(:mod:`stage2_prior.codec`: range coding, a versioned ``.vqz`` container with both checkpoints' SHA-256
and CRCs). `decompress` recovers the codes exactly and writes stage 1's decoding of them as PNGs, so the
images come back as stage-1 reconstructions: lossless for the codes, lossy for the pixels. The stage-1
checkpoint is the one the prior's codes metadata names (checked by SHA-256) unless ``--vqvae`` is given.
Both run on the CPU with one thread (exact decoding needs identical floats), write atomically (temp file
+ rename) and never replace an existing file without ``--overwrite``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common.codes import CodesError, sha256_file
from common.images import IMAGE_SUFFIXES, load_image, to_uint8
from stage1_vqvae.vqvae import VQVAE
from stage2_prior.codec import Container, ContainerError, decode_codes, encode_codes, pack, unpack
from stage2_prior.prior import Prior
from stage2_prior.sample import load_prior, load_vqvae

DEFAULT_BATCH_SIZE = 256


@dataclass
class Models:
    prior: Prior
    vqvae: VQVAE
    prior_sha256: str
    stage1_sha256: str


def load_models(prior_path: str, vqvae_path: str | None = None) -> Models:
    """Prior and stage 1 on the CPU in fp32 eval mode, with the SHA-256 of both checkpoints."""
    cpu = torch.device("cpu")
    prior = load_prior(prior_path, cpu).float()
    vqvae = load_vqvae(prior, vqvae_path, cpu).float()
    stage1_sha = sha256_file(vqvae_path) if vqvae_path else prior.hparams.codes_meta["stage1_sha256"]
    return Models(prior, vqvae, sha256_file(prior_path), stage1_sha)


def image_files(paths: list[str]) -> list[Path]:
    """The given image files, with each directory replaced by its .png/.jpg/.jpeg files (sorted)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith("."))
            if not found:
                raise FileNotFoundError(f"{p}: directory holds no .png/.jpg/.jpeg images")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such image file or directory")
    return files


def load_images(files: list[Path], vqvae: VQVAE) -> torch.Tensor:
    """Image files -> (N, C, S, S) in [-1, 1] at stage 1's size and channels (resized/centre-cropped)."""
    hp = vqvae.hparams
    return torch.cat([load_image(f, hp.image_size, hp.in_channels) for f in files])


def encode_images(vqvae: VQVAE, images: torch.Tensor, batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
    return torch.cat([vqvae.encode_to_codes(x) for x in images.split(batch_size)]).numpy()


def compress_codes(m: Models, codes: np.ndarray, batch_size: int = DEFAULT_BATCH_SIZE) -> tuple[bytes, float]:
    """codes (N, H, W) -> (.vqz bytes, ideal payload bits -sum log2 p)."""
    streams, crcs, ideal = encode_codes(m.prior.net, codes, batch_size)
    hp = m.vqvae.hparams
    c = Container(m.prior_sha256, m.stage1_sha256, hp.image_size, hp.in_channels, tuple(m.vqvae.grid_shape),
                  m.vqvae.codebook_size, len(codes), batch_size, streams, crcs)  # fmt: skip
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
    hp = m.vqvae.hparams
    if (c.image_size, c.channels) != (hp.image_size, hp.in_channels):
        raise ContainerError(f"{name}: holds {c.channels}-channel {c.image_size}px images, but stage 1 makes "
                             f"{hp.in_channels}-channel {hp.image_size}px ones; pass the checkpoints it was "
                             "made with")  # fmt: skip
    return decode_codes(m.prior.net, c, name)


def decode_images(vqvae: VQVAE, codes: np.ndarray, batch_size: int = DEFAULT_BATCH_SIZE) -> torch.Tensor:
    codes_t = torch.from_numpy(np.asarray(codes, dtype=np.int64))
    return torch.cat([vqvae.decode_codes(c) for c in codes_t.split(batch_size)]) if len(codes_t) else codes_t


def write_atomic(path: Path, data: bytes | Image.Image) -> None:
    """Write bytes (or a PIL image as PNG) to a temp file beside `path`, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, Image.Image):
                data.save(f, format="PNG")
            else:
                f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def refuse_existing(paths: list[Path], overwrite: bool) -> None:
    existing = [p for p in paths if p.exists()]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise FileExistsError(
            f"{existing[0]} already exists{more}; pass --overwrite to replace, or choose another --out"
        )


def _parser(prog: str) -> argparse.ArgumentParser:
    doc = __doc__.split("\n\n")[0]
    p = argparse.ArgumentParser(prog=prog, description=doc)
    p.add_argument("--prior", required=True, help="stage-2 prior checkpoint (.ckpt)")
    p.add_argument("--vqvae", help="stage-1 checkpoint (default: the one named in the prior's codes metadata)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    return p


def run_compress(args: list[str] | None) -> str:
    p = _parser("compress")
    p.add_argument("images", nargs="+", help="image files and/or directories of images")
    p.add_argument("--out", required=True, help="the .vqz file to write")
    p.add_argument("--batch_size", type=int, default=DEFAULT_BATCH_SIZE, help="images per coded batch")
    a = p.parse_args(args)
    out = Path(a.out)
    refuse_existing([out], a.overwrite)
    files = image_files(a.images)
    m = load_models(a.prior, a.vqvae)
    t0 = time.perf_counter()
    codes = encode_images(m.vqvae, load_images(files, m.vqvae))
    data, ideal = compress_codes(m, codes, a.batch_size)
    seconds = time.perf_counter() - t0
    write_atomic(out, data)
    pixels = len(files) * m.vqvae.hparams.image_size**2
    return (f"{len(files)} images -> {out}: {len(data)} bytes, {8 * len(data) / pixels:.4f} bits per pixel "
            f"(ideal {ideal / pixels:.4f}), {len(files) / seconds:.1f} images/s")  # fmt: skip


def run_decompress(args: list[str] | None) -> str:
    p = _parser("decompress")
    p.add_argument("file", help="a .vqz file written by `compress`")
    p.add_argument("--out", required=True, help="directory for the decoded images (000000.png, ...)")
    a = p.parse_args(args)
    path = Path(a.file)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    data = path.read_bytes()
    count = unpack(data, str(path)).count  # check the file before loading the models
    out = Path(a.out)
    targets = [out / f"{i:06d}.png" for i in range(count)]
    refuse_existing(targets, a.overwrite)
    m = load_models(a.prior, a.vqvae)
    t0 = time.perf_counter()
    images = to_uint8(decode_images(m.vqvae, decompress_codes(m, data, str(path))))
    seconds = time.perf_counter() - t0
    for target, image in zip(targets, images.permute(0, 2, 3, 1).numpy()):
        write_atomic(target, Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image))
    pixels = max(1, count * m.vqvae.hparams.image_size**2)
    return (f"{path} -> {count} images in {out}/: {8 * len(data) / pixels:.4f} bits per pixel, "
            f"{count / max(seconds, 1e-9):.1f} images/s")  # fmt: skip


def _main(prog: str, fn, args: list[str] | None) -> None:
    try:
        print(fn(args))
    except (ContainerError, CodesError, ValueError, OSError) as e:  # OSError: missing, existing, unwritable files
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def main_compress(args: list[str] | None = None) -> None:
    _main("compress", run_compress, args)


def main_decompress(args: list[str] | None = None) -> None:
    _main("decompress", run_decompress, args)


if __name__ == "__main__":  # python -m stage2_prior.compress {compress,decompress} ARGS...
    commands = {"compress": main_compress, "decompress": main_decompress}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        raise SystemExit("usage: python -m stage2_prior.compress {compress,decompress} ARGS...")
    commands[sys.argv[1]](sys.argv[2:])
