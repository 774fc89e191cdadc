"""Images <-> ``.vqz`` bytes with loaded models: what `compress`/`decompress` and the page (`serve`) share.

    codes = encode_images(m.vqvae, images)            # (N, C, S, S) in [-1, 1] -> codes (N, H, W)
    data, ideal_bits = compress_codes(m, codes)       # -> the .vqz file's bytes (names=[...]: version 4 or 5)
    codes = decompress_codes(m, data, "x.vqz")        # -> codes, exactly; ContainerError if the file is bad
    images = decode_images(m.vqvae, codes)            # -> stage 1's decoding, [-1, 1]

The coding itself (range coder) is :mod:`tools.codec`, the file layout :mod:`tools.container`; `m` must hold
fp32 CPU models (:func:`cpu_models`), since exact decoding needs bit-identical probabilities on both sides.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from stage1_vqvae.model import VQModel
from tools.codec import decode_codes, encode_codes
from tools.container import (
    FORMAT_VERSION,
    MAX_NAME_BYTES,
    MAX_PATH_BYTES,
    NAMES_VERSION,
    Container,
    ContainerError,
    pack,
    unpack,
)
from tools.load import Models, load_models

DEFAULT_BATCH_SIZE = 256
LABEL_CHOICES = ("best", "null")  # compress_codes(labels=...): the best label per image, or the null class


def cpu_models(prior_path: str | Path, vqvae_path: str | Path | None = None) -> Models:
    """Prior and stage 1 in fp32 on the CPU: the coder's probabilities must be bit-identical both ways."""
    return as_codec_models(load_models(prior_path, vqvae_path, "cpu"))


def as_codec_models(m: Models) -> Models:
    """`m` itself, its networks made fp32 (they must already be on the CPU)."""
    if m.device.type != "cpu":
        raise ValueError(f"the codec runs on the CPU; these models are on {m.device}: load them with device='cpu'")
    m.prior.float()
    m.vqvae.float()
    return m


def encode_images(vqvae: VQModel, images: torch.Tensor) -> np.ndarray:
    return vqvae.encode_to_codes(images).numpy()  # in the model's passes (memory stays bounded for any N)


def compress_codes(
    m: Models, codes: np.ndarray, batch_size: int = DEFAULT_BATCH_SIZE, labels: str = "best",
    names: list[str] | None = None,
) -> tuple[bytes, float]:
    """codes (N, H, W) -> (.vqz bytes, ideal payload bits -sum log2 p). labels "best": with a
    class-conditional prior, code each image under its best label (stored); "null": the null class, no labels.
    names: the images' file names, stored for `decompress` to write them back: format version 4, or 5 when
    one lies below a sub-folder (`cats/1f595.png`), so that plain names make the very files they did."""
    if labels not in LABEL_CHOICES:
        raise ValueError(f"--labels must be one of {LABEL_CHOICES}, got {labels!r}")
    streams, crcs, ideal = encode_codes(m.prior, codes, batch_size, code_labels=labels == "best")
    # without names, "best" is format version 3 and "null" exactly what version 2 stores (null class, no
    # labels): the files stay byte-identical to those versions
    if names is not None:
        version = FORMAT_VERSION if any("/" in n for n in names) else NAMES_VERSION
    else:
        version = 3 if labels == "best" else 2
    c = Container(m.prior_sha256, m.stage1_sha256, m.image_size, m.channels, tuple(m.vqvae.grid_shape),
                  m.vqvae.codebook_size, len(codes), batch_size, m.prior.step_version, streams, crcs,
                  version=version, names=names, coded_labels=labels == "best")  # fmt: skip
    return pack(c), ideal


def png_names(names: list[str], where: str, fix: str, error: type[Exception] = ValueError,
              shown: list[str] | None = None) -> list[str]:
    """The files `decompress` writes for stored `names`: each name's stem + .png (decoded images are PNGs), in
    the name's sub-folders (`cats/1f595.jpg` -> `cats/1f595.png`); `error` naming `where`, both names and `fix`
    if two would land on one file, or one on a folder that others go into (`a.png` and `a.png/b.png`).
    `shown`: what to call each name in those messages (`compress`: the files' paths)."""
    out, seen = [], {}  # png -> what made it
    for n, label in zip(names, shown or names):
        folder, _, base = n.rpartition("/")
        png = f"{folder}/{Path(base).stem}.png" if folder else f"{Path(base).stem}.png"
        for part, limit in [(Path(png).name, MAX_NAME_BYTES), (png, MAX_PATH_BYTES)]:  # a long name without .png
            if len(part.encode("utf-8", "surrogateescape")) > limit:
                raise error(f"{where}: {label} would decompress to a name longer than {limit} bytes; {fix}")
        if png in seen:
            raise error(f"{where}: {seen[png]} and {label} would both decompress to {png}; {fix}")
        seen[png] = label
        out.append(png)
    folders = {png.rsplit("/", k)[0]: label for png, label in seen.items() for k in range(1, png.count("/") + 1)}
    if clash := next((png for png in seen if png in folders), None):
        raise error(f"{where}: {seen[clash]} would decompress to {clash}, the folder of {folders[clash]}; {fix}")
    return out


def decompress_codes(m: Models, data: bytes, name: str = "<bytes>") -> np.ndarray:
    """.vqz bytes -> codes (N, H, W); ContainerError if the file is bad or made with other checkpoints."""
    c = unpack(data, name)
    for what, flag, ours, theirs in [("prior", "--prior", m.prior_sha256, c.prior_sha256),
                                     ("stage-1 checkpoint", "--vqvae", m.stage1_sha256, c.stage1_sha256)]:  # fmt: skip
        if ours != theirs:
            # the usual way to lose the prior a file needs: its training run went on (resumed, or validated again)
            why = "; a resumed or continued training run rewrites its last.ckpt/best.ckpt" if what == "prior" else ""
            raise ContainerError(f"{name} was made with a different {what}: checkpoint SHA-256 differs (file: "
                                 f"{theirs[:12]}..., given: {ours[:12]}...); pass the {what} it was made with "
                                 f"({flag}){why}")  # fmt: skip
    if (c.image_size, c.channels) != (m.image_size, m.channels):
        raise ContainerError(f"{name}: holds {c.channels}-channel {c.image_size}px images, but stage 1 makes "
                             f"{m.channels}-channel {m.image_size}px ones; pass the checkpoints it was "
                             "made with")  # fmt: skip
    return decode_codes(m.prior, c, name)


def decode_images(vqvae: VQModel, codes: np.ndarray) -> torch.Tensor:
    return vqvae.decode_codes(torch.from_numpy(np.asarray(codes, dtype=np.int64)))  # in the model's passes
