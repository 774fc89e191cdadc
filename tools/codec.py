"""Lossless coding of stage-1 codes with a stage-2 prior, and the ``.vqz`` container that holds the result.

The entropy coder is ``constriction``'s range coder (``stream.queue``) with categorical models built from
the prior's probabilities (``Categorical(perfect=False)``: constriction quantizes them to 24-bit integer
frequencies, every symbol at least one unit, deterministically given identical floats).

Decoding is exact only if the decoder computes bit-identical probabilities, so encoder and decoder share
one function, :func:`code_positions`: the same network path (the prior's ``begin``/``step_logits``, see
:mod:`stage2_prior.decoding`, with the codes not yet known set to 0),
the same fixed batches of images, fp32 on the CPU, eval mode, one torch thread, and a float64 softmax of
the fp32 logits. Labels are always the null class (the images' classes are unknown). The container stores
a CRC32 of each batch's codes, so a machine that computes different floats (another CPU or torch build)
gets a clear error, never silently different images.

Container layout (little-endian; ``HEADER`` below)::

    offset  size  field
    0       4     magic b"VQZ1"
    4       2     format version (2; version 1 files, which have no step-version byte, are still read)
    6       32    SHA-256 of the prior checkpoint
    38      32    SHA-256 of the stage-1 checkpoint
    70      2     image_size          72  1  channels
    73      2+2   grid height, width  77  4  codebook_size
    81      4     image count         85  4  batch size (images per coded batch)
    89      1     the prior's step version (`CodePrior.step_version`: the arithmetic that made the streams)
    90      8*nb  per batch (nb = ceil(count / batch_size)): stream length in bytes, CRC32 of its codes
    ...           the batches' range-coder streams, concatenated (32-bit little-endian words)
    end-4   4     CRC32 of every byte before it

:func:`unpack` checks every length against the bytes left before using it and the file CRC before
anything is decoded; every problem is a :class:`ContainerError` naming the file.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import constriction
import numpy as np
import torch
from torch import nn

from common.cli import UserError
from stage2_prior.decoding import CodePrior

MAGIC = b"VQZ1"
FORMAT_VERSION = 2
HEADER = struct.Struct("<4sH32s32sHBHHIII")  # magic .. batch size: 89 bytes, the same in versions 1 and 2
STEP = struct.Struct("<B")  # version 2 only: the prior's step version (version 1 files: 1)
BATCH_ENTRY = struct.Struct("<II")  # stream length in bytes, CRC32 of the batch's codes
MAX_BATCH_SIZE = 4096  # bounds the work a (CRC-valid but hostile) header can ask for per batch entry
MAX_CODEBOOK_SIZE = 1 << 16
CRC_SIZE = 4


class ContainerError(UserError, ValueError):
    """A .vqz file is unusable (truncated, corrupt, another version, made with other checkpoints)."""


@dataclass
class Container:
    """What a .vqz file holds; ``streams[i]`` codes images ``i * batch_size`` .. ``(i + 1) * batch_size``."""

    prior_sha256: str  # hex
    stage1_sha256: str  # hex
    image_size: int
    channels: int
    grid_shape: tuple[int, int]
    codebook_size: int
    count: int
    batch_size: int
    step_version: int  # the prior's CodePrior.step_version: the arithmetic that made the streams
    streams: list[bytes] = field(default_factory=list)
    codes_crc: list[int] = field(default_factory=list)

    @property
    def num_batches(self) -> int:
        return -(-self.count // self.batch_size)

    def batch_bounds(self) -> list[tuple[int, int]]:
        return [(s, min(s + self.batch_size, self.count)) for s in range(0, self.count, self.batch_size)]


# ------------------------------------------------------------------------------------------ container
def pack(c: Container) -> bytes:
    """Serialize a container (see the module docstring for the layout)."""
    if len(c.streams) != c.num_batches or len(c.codes_crc) != c.num_batches:
        raise ValueError(f"{c.num_batches} batches expected, got {len(c.streams)} streams")
    head = HEADER.pack(MAGIC, FORMAT_VERSION, bytes.fromhex(c.prior_sha256), bytes.fromhex(c.stage1_sha256),
                       c.image_size, c.channels, *c.grid_shape, c.codebook_size, c.count, c.batch_size)  # fmt: skip
    head += STEP.pack(c.step_version)
    table = b"".join(BATCH_ENTRY.pack(len(s), crc) for s, crc in zip(c.streams, c.codes_crc))
    body = head + table + b"".join(c.streams)
    return body + struct.pack("<I", zlib.crc32(body))


def unpack(data: bytes, name: str = "<bytes>") -> Container:
    """Parse and check a .vqz file's bytes; ContainerError (naming `name`) on any problem."""
    size = len(data)
    if size < len(MAGIC) and MAGIC.startswith(bytes(data)):
        raise ContainerError(f"{name}: truncated ({size} bytes); re-create it with `compress`")
    if data[: len(MAGIC)] != MAGIC:
        raise ContainerError(f"{name}: not a .vqz file (no VQZ1 magic); pass a file written by `compress`")
    if size < HEADER.size + CRC_SIZE:
        raise ContainerError(f"{name}: truncated ({size} bytes, shorter than the {HEADER.size}-byte header)")
    (_, version, prior_sha, stage1_sha, image_size, channels, gh, gw, k, count, batch_size) = HEADER.unpack_from(data)
    if version not in (1, FORMAT_VERSION):
        raise ContainerError(f"{name}: unsupported .vqz format version {version}; this code reads versions 1 to "
                             f"{FORMAT_VERSION} (decompress it with the vqgen version that wrote it)")  # fmt: skip
    if zlib.crc32(data[:-CRC_SIZE]) != struct.unpack_from("<I", data, size - CRC_SIZE)[0]:
        raise ContainerError(f"{name}: file is corrupt or truncated (CRC32 mismatch); re-create it with `compress`")
    problems = [f"{what}={v}" for what, v, ok in [
        ("image_size", image_size, image_size >= 1), ("channels", channels, channels in (1, 3)),
        ("grid_height", gh, gh >= 1), ("grid_width", gw, gw >= 1),
        ("codebook_size", k, 1 <= k <= MAX_CODEBOOK_SIZE),
        ("batch_size", batch_size, 1 <= batch_size <= MAX_BATCH_SIZE),
    ] if not ok]  # fmt: skip
    if problems:
        raise ContainerError(f"{name}: corrupt header ({', '.join(problems)})")
    pos, end, step_version = HEADER.size, size - CRC_SIZE, 1  # version 1 files: step version 1
    if version >= 2:
        if end - pos < STEP.size:
            raise ContainerError(f"{name}: truncated (no step version after the header)")
        (step_version,) = STEP.unpack_from(data, pos)
        pos += STEP.size
    c = Container(prior_sha.hex(), stage1_sha.hex(), image_size, channels, (gh, gw), k, count, batch_size,
                  step_version)  # fmt: skip
    if c.num_batches * BATCH_ENTRY.size > end - pos:
        raise ContainerError(f"{name}: truncated or corrupt: the header announces {count} images in "
                             f"{c.num_batches} batches, more than the file can hold")  # fmt: skip
    entries = [BATCH_ENTRY.unpack_from(data, pos + i * BATCH_ENTRY.size) for i in range(c.num_batches)]
    pos += c.num_batches * BATCH_ENTRY.size
    for i, (length, crc) in enumerate(entries):
        if length % 4 or length > end - pos:
            raise ContainerError(f"{name}: truncated or corrupt: batch {i} claims {length} bytes, "
                                 f"{end - pos} are left")  # fmt: skip
        c.streams.append(bytes(data[pos : pos + length]))
        c.codes_crc.append(crc)
        pos += length
    if pos != end:
        raise ContainerError(f"{name}: corrupt: {end - pos} unexpected bytes after the last batch")
    return c


def codes_crc32(codes: np.ndarray) -> int:
    """CRC32 of codes (B, H, W) as little-endian uint16: the check the decoder runs on each batch."""
    return zlib.crc32(np.ascontiguousarray(codes, dtype="<u2").tobytes())


# ------------------------------------------------------------------------------------------ coding
@contextmanager
def deterministic(net: nn.Module) -> Iterator[None]:
    """fp32 CPU eval mode with one torch thread (restored afterwards): float results then do not depend on
    thread scheduling, so encoder and decoder see identical probabilities."""
    param = next(net.parameters())
    if param.device.type != "cpu" or param.dtype != torch.float32:
        raise ValueError(f"coding runs the prior in fp32 on the CPU, got {param.dtype} on {param.device}")
    threads, was_training = torch.get_num_threads(), net.training
    torch.set_num_threads(1)
    net.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        torch.set_num_threads(threads)
        net.train(was_training)


def probabilities(logits: torch.Tensor) -> np.ndarray:
    """fp32 logits (B, K) -> float64 probabilities (B, K), the model the coder quantizes."""
    return logits.float().double().softmax(dim=-1).numpy()


def code_positions(net: CodePrior, n: int, code_at: Callable[[int, np.ndarray], np.ndarray]) -> np.ndarray:
    """THE probability path of encoder and decoder: for raster positions t = 0 .. T-1, compute the
    probabilities (n, K) of the codes at t given the codes before t, and ask ``code_at(t, probs)`` for the
    codes (n,) at t (the encoder returns the known ones, the decoder decodes them). Returns codes (n, H, W).
    Labels are the null class. Call inside :func:`deterministic`."""
    grid = torch.zeros(n, net.seq_len, dtype=torch.long)  # codes not yet known are 0, identically on both sides
    with net.decoding(n, None):
        for t in range(net.seq_len):
            logits = net.step_logits(grid, t)  # (n, K)
            grid[:, t] = torch.from_numpy(np.asarray(code_at(t, probabilities(logits)), dtype=np.int64))
    return grid.view(n, *net.grid_shape).numpy()


def _model() -> constriction.stream.model.Categorical:
    return constriction.stream.model.Categorical(perfect=False)


def encode_batch(net: CodePrior, codes: np.ndarray) -> tuple[bytes, float]:
    """codes (B, H, W) -> (range-coder stream, ideal code length -sum log2 p in bits)."""
    encoder, model, ideal = constriction.stream.queue.RangeEncoder(), _model(), 0.0
    flat = codes.reshape(len(codes), -1).astype(np.int32)

    def code_at(t: int, probs: np.ndarray) -> np.ndarray:
        nonlocal ideal
        symbols = np.ascontiguousarray(flat[:, t])
        encoder.encode(symbols, model, probs)
        ideal -= float(np.log2(probs[np.arange(len(symbols)), symbols]).sum())
        return symbols

    code_positions(net, len(codes), code_at)
    return encoder.get_compressed().astype("<u4").tobytes(), ideal


def decode_batch(net: CodePrior, stream: bytes, n: int) -> np.ndarray:
    """A stream from :func:`encode_batch` -> codes (n, H, W); garbage decodes to garbage or raises
    ContainerError, in bounded time (n * H * W steps)."""
    words = np.frombuffer(stream, dtype="<u4").astype(np.uint32)
    decoder, model, k = constriction.stream.queue.RangeDecoder(words), _model(), net.codebook_size

    def code_at(t: int, probs: np.ndarray) -> np.ndarray:
        try:
            symbols = decoder.decode(model, probs)
        except BaseException as e:  # constriction raises AssertionError; a Rust panic is a BaseException
            if not isinstance(e, Exception) and type(e).__name__ != "PanicException":
                raise  # KeyboardInterrupt, SystemExit
            raise ContainerError(f"invalid compressed data at code position {t} ({e})") from None
        if len(symbols) != n or symbols.min() < 0 or symbols.max() >= k:
            raise ContainerError(f"invalid compressed data at code position {t} (decoded codes out of range)")
        return symbols

    return code_positions(net, n, code_at)


def encode_codes(net: CodePrior, codes: np.ndarray, batch_size: int) -> tuple[list[bytes], list[int], float]:
    """codes (N, H, W) -> (one stream per batch, their codes' CRC32s, ideal total bits)."""
    if not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise ValueError(f"batch_size must be in [1, {MAX_BATCH_SIZE}], got {batch_size}")
    codes = np.asarray(codes)
    if codes.ndim != 3 or codes.shape[1:] != tuple(net.grid_shape):
        raise ValueError(f"codes must have shape (N, *{tuple(net.grid_shape)}), got {codes.shape}")
    if codes.size and (codes.min() < 0 or codes.max() >= net.codebook_size):
        raise ValueError(f"codes must lie in [0, {net.codebook_size})")
    streams, crcs, ideal = [], [], 0.0
    with deterministic(net):
        for start in range(0, len(codes), batch_size):
            batch = codes[start : start + batch_size]
            stream, bits = encode_batch(net, batch)
            streams.append(stream)
            crcs.append(codes_crc32(batch))
            ideal += bits
    return streams, crcs, ideal


def decode_codes(net: CodePrior, c: Container, name: str = "<bytes>") -> np.ndarray:
    """Recover codes (N, H, W) from a parsed container, checking each batch's codes CRC32."""
    if tuple(net.grid_shape) != c.grid_shape or net.codebook_size != c.codebook_size:
        raise ContainerError(f"{name}: made for codes of grid {c.grid_shape} and codebook_size {c.codebook_size}, "
                             f"but the prior has {tuple(net.grid_shape)} and {net.codebook_size}; pass the prior "
                             "it was made with")  # fmt: skip
    if c.step_version != net.step_version:
        raise ContainerError(f"{name}: made with step arithmetic version {c.step_version} of this kind of prior, "
                             f"but this vqgen computes version {net.step_version} (the probabilities would differ); "
                             "decompress it with the vqgen release that made it")  # fmt: skip
    out = np.zeros((c.count, *c.grid_shape), dtype=np.int64)
    with deterministic(net):
        for i, ((start, stop), stream) in enumerate(zip(c.batch_bounds(), c.streams)):
            try:
                out[start:stop] = decode_batch(net, stream, stop - start)
            except ContainerError as e:
                raise ContainerError(f"{name}: batch {i}: {e}") from None
            if codes_crc32(out[start:stop]) != c.codes_crc[i]:
                raise ContainerError(
                    f"{name}: batch {i}: decoded codes fail their CRC32 check: this machine computes the prior's "
                    "probabilities differently from the one that compressed (another CPU, torch or constriction "
                    "build?), or the file was tampered with; decompress it where it was made"
                )
    return out


def uniform_bits(count: int, grid_shape: tuple[int, int], codebook_size: int) -> float:
    """Bits for coding every code uniformly (log2 K each): the no-prior baseline."""
    return count * grid_shape[0] * grid_shape[1] * math.log2(codebook_size)
