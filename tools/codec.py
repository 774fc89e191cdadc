"""Lossless coding of stage-1 codes with a stage-2 prior, into the streams a ``.vqz`` container holds.

The entropy coder is ``constriction``'s range coder (``stream.queue``) with categorical models built from
the prior's probabilities (``Categorical(perfect=False)``: constriction quantizes them to 24-bit integer
frequencies, every symbol at least one unit, deterministically given identical floats).

Decoding is exact only if the decoder computes bit-identical probabilities, so encoder and decoder share
one function, :func:`code_positions`: the same network path (the prior's ``begin``/``step_logits``, see
:mod:`stage2_prior.decoding`, with the codes not yet known set to 0),
the same fixed batches of images, fp32 on the CPU, eval mode, one torch thread, and a float64 softmax of
the fp32 logits. The images' classes are unknown, so with a class-conditional prior the encoder picks, per
image, the label (a class or the null one) under which the prior gives its codes the fewest bits, codes
that label first (uniformly: log2(classes + 1) bits an image) and then the codes under it (format version
3). The prior's null class alone is trained on a tenth of the batches (label dropout), so it codes worse
than the best class by more than the label costs: on the emoji test split 0.2702 bits per pixel with the
null class, 0.2671 with the best labels, theirs included. An unconditional prior codes no labels.
The container (:mod:`tools.container`) stores a CRC32 of each batch's codes, so a machine that computes
different floats (another CPU or torch build) gets a clear error, never silently different images.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import constriction
import numpy as np
import torch
from torch import nn

from stage2_prior.decoding import CodePrior, code_bits
from tools.container import MAX_BATCH_SIZE, Container, ContainerError
from tools.drawing import check_decoding_fits


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


def code_positions(
    net: CodePrior, n: int, code_at: Callable[[int, np.ndarray], np.ndarray], labels: np.ndarray | None = None
) -> np.ndarray:
    """THE probability path of encoder and decoder: for raster positions t = 0 .. T-1, compute the
    probabilities (n, K) of the codes at t given the codes before t, and ask ``code_at(t, probs)`` for the
    codes (n,) at t (the encoder returns the known ones, the decoder decodes them). Returns codes (n, H, W).
    labels (n,): the class of each image (num_classes: the null one); None: all null. Call inside
    :func:`deterministic`."""
    grid = torch.zeros(n, net.seq_len, dtype=torch.long)  # codes not yet known are 0, identically on both sides
    with net.decoding(n, None if labels is None else torch.from_numpy(np.asarray(labels, dtype=np.int64))):
        for t in range(net.seq_len):
            logits = net.step_logits(grid, t)  # (n, K)
            grid[:, t] = torch.from_numpy(np.asarray(code_at(t, probabilities(logits)), dtype=np.int64))
    return grid.view(n, *net.grid_shape).numpy()


def _model() -> constriction.stream.model.Categorical:
    return constriction.stream.model.Categorical(perfect=False)


def _label_probs(net: CodePrior, n: int) -> np.ndarray:
    """(n, num_classes + 1) uniform probabilities: the model of the labels a stream begins with."""
    return np.full((n, net.num_classes + 1), 1.0 / (net.num_classes + 1))


def best_labels(net: CodePrior, codes: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """codes (N, H, W) -> labels (N,) int32 in [0, num_classes]: per image, the class (num_classes: null)
    under which the prior's teacher-forced forward gives the codes the fewest bits. Only a choice, which
    the decoder reads rather than recomputes, so it runs on every thread: the bits then come from the
    one-thread step path. Costs one forward pass per label."""
    was_training = net.training
    net.eval()
    out = []
    with torch.no_grad():
        for x in torch.from_numpy(np.asarray(codes, dtype=np.int64)).split(batch_size):
            nll = []
            for label in range(net.num_classes + 1):
                nll.append(code_bits(net, x, torch.full((len(x),), label, dtype=torch.long)).flatten(1).sum(1))  # (B,)
            out.append(torch.stack(nll, 1).argmin(1))  # (B,)
    net.train(was_training)
    return torch.cat(out).numpy().astype(np.int32) if out else np.zeros(0, np.int32)


def encode_batch(net: CodePrior, codes: np.ndarray, labels: np.ndarray | None = None) -> tuple[bytes, float]:
    """codes (B, H, W) -> (range-coder stream, ideal code length -sum log2 p in bits). With labels (B,)
    (a class-conditional prior, format version 3), the stream begins with them, uniformly coded."""
    encoder, model, ideal = constriction.stream.queue.RangeEncoder(), _model(), 0.0
    flat = codes.reshape(len(codes), -1).astype(np.int32)
    if labels is not None:
        encoder.encode(np.ascontiguousarray(labels, dtype=np.int32), model, _label_probs(net, len(codes)))
        ideal += len(codes) * math.log2(net.num_classes + 1)

    def code_at(t: int, probs: np.ndarray) -> np.ndarray:
        nonlocal ideal
        symbols = np.ascontiguousarray(flat[:, t])
        encoder.encode(symbols, model, probs)
        # a probability that underflowed to 0 is coded at the coder's floor (constriction's perfect=False), not
        # at infinite cost: the ideal length counts it there too (it printed "ideal inf" and numpy's warning)
        ideal -= float(np.log2(np.maximum(probs[np.arange(len(symbols)), symbols], 2.0**-24)).sum())
        return symbols

    code_positions(net, len(codes), code_at, labels)
    return encoder.get_compressed().astype("<u4").tobytes(), ideal


def decode_batch(net: CodePrior, stream: bytes, n: int, labels_coded: bool) -> np.ndarray:
    """A stream from :func:`encode_batch` -> codes (n, H, W); `labels_coded`: the stream begins with labels
    (format version 3 and a class-conditional prior, as encode_batch was given them). Garbage decodes to
    garbage or raises ContainerError, in bounded time (n * H * W steps)."""
    words = np.frombuffer(stream, dtype="<u4").astype(np.uint32)
    decoder, model, k = constriction.stream.queue.RangeDecoder(words), _model(), net.codebook_size

    def decode(probs: np.ndarray, where: str, what: str, bound: int) -> np.ndarray:
        try:
            symbols = decoder.decode(model, probs)
        except BaseException as e:  # constriction raises AssertionError; a Rust panic is a BaseException
            if not isinstance(e, Exception) and type(e).__name__ != "PanicException":
                raise  # KeyboardInterrupt, SystemExit
            raise ContainerError(f"invalid compressed data at {where} ({e})") from None
        if len(symbols) != n or symbols.min() < 0 or symbols.max() >= bound:
            raise ContainerError(f"invalid compressed data at {where} (decoded {what} out of range)")
        return symbols

    labels = None
    if labels_coded and net.num_classes > 0 and n:
        labels = decode(_label_probs(net, n), "the labels", "labels", net.num_classes + 1)

    def code_at(t: int, probs: np.ndarray) -> np.ndarray:
        return decode(probs, f"code position {t}", "codes", k)

    return code_positions(net, n, code_at, labels)


def encode_codes(
    net: CodePrior, codes: np.ndarray, batch_size: int, code_labels: bool = True
) -> tuple[list[bytes], list[int], float]:
    """codes (N, H, W) -> (one stream per batch, their codes' CRC32s, ideal total bits). `code_labels`
    False: null labels and no label symbols, as format versions 1 and 2 coded."""
    if not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise ValueError(f"batch_size must be in [1, {MAX_BATCH_SIZE}], got {batch_size}")
    codes = np.asarray(codes)
    if codes.ndim != 3 or codes.shape[1:] != tuple(net.grid_shape):
        raise ValueError(f"codes must have shape (N, *{tuple(net.grid_shape)}), got {codes.shape}")
    if codes.size and (codes.min() < 0 or codes.max() >= net.codebook_size):
        raise ValueError(f"codes must lie in [0, {net.codebook_size})")
    check_decoding_fits(net, min(batch_size, len(codes)))  # one line naming --batch_size, not an OOM kill
    streams, crcs, ideal = [], [], 0.0
    labels = best_labels(net, codes, batch_size) if code_labels and net.num_classes > 0 else None
    with deterministic(net):
        for start in range(0, len(codes), batch_size):
            batch = codes[start : start + batch_size]
            stream, bits = encode_batch(net, batch, None if labels is None else labels[start : start + batch_size])
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
    check_decoding_fits(net, min(c.batch_size, c.count), remedy=f"{name} was compressed in batches of "
                        f"{c.batch_size}: decompress it where more memory is free, or compress again with "
                        "--batch_size {fits}")  # fmt: skip
    out = np.zeros((c.count, *c.grid_shape), dtype=np.int64)
    with deterministic(net):
        for i, ((start, stop), stream) in enumerate(zip(c.batch_bounds(), c.streams)):
            try:
                out[start:stop] = decode_batch(net, stream, stop - start, c.labels_coded)
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
