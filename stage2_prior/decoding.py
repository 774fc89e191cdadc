"""The one interface every stage-2 prior network implements: a full forward, and step-by-step decoding.

    logits = prior(codes, labels)              # codes (B, H, W) -> logits (B, K, H, W), for training
    prior.begin(n, labels)                     # labels (n,) or None (= the null class); allocates state
    logits = prior.step_logits(codes, t)       # codes (n, T) with positions < t filled -> logits (n, K) at t
    prior.end()                                # releases the state

Steps go t = 0, 1, ..., T-1 (T = H * W, raster order) and may reuse the same `codes` buffer; they must
not create tensors from Python values (no host-to-device copy), so that one step can be captured in a
CUDA graph. The sampler (:mod:`stage2_prior.sampling`), the CUDA-graph sampler and the codec use only
this interface; a new prior is one new file that subclasses `CodePrior` (plus its entry in
``stage2_prior.build.PRIORS``). Imports torch only.
"""

from __future__ import annotations

import math
from abc import ABCMeta, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


class PriorNetwork(nn.Module):
    """What every prior network has, autoregressive or masked: the sizes of the codes it models, a class
    table whose last row (``null_label``) is the unconditional class, and the label convention."""

    sizes: dict[str, dict] = {}  # named sizes -> constructor kwargs

    def __init__(self, codebook_size: int, grid_shape: tuple[int, int], num_classes: int) -> None:
        super().__init__()
        self.codebook_size = int(codebook_size)
        self.grid_shape = (int(grid_shape[0]), int(grid_shape[1]))
        self.num_classes = int(num_classes)
        self.null_label = self.num_classes  # the last row of every class table: unconditional

    @property
    def seq_len(self) -> int:
        return self.grid_shape[0] * self.grid_shape[1]

    def labels_or_null(self, labels: torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
        """labels (n,) long, with None meaning all null and -1 (unlabelled, in the codes format) null."""
        if labels is None:
            return torch.full((n,), self.null_label, dtype=torch.long, device=device)
        labels = labels.to(device=device, dtype=torch.long)
        return labels.masked_fill(labels < 0, self.null_label)


class CodePrior(PriorNetwork, metaclass=ABCMeta):
    """Base class of the autoregressive prior networks. Subclasses define `sizes` (named sizes -> constructor
    kwargs), call `super().__init__(codebook_size, grid_shape, num_classes)` and implement
    forward/begin/step_logits/end."""

    # The floating-point arithmetic of step_logits, as .vqz files record it: exact decoding needs the same
    # arithmetic as the encoder, so bump it whenever a change to the step path can change a logit's bits.
    step_version: int = 1

    def __init__(self, codebook_size: int, grid_shape: tuple[int, int], num_classes: int) -> None:
        super().__init__(codebook_size, grid_shape, num_classes)
        self.step_labels: torch.Tensor | None = None  # (n,) while decoding

    def state_bytes(self, n: int) -> int:
        """Bytes of the caches `begin(n, labels)` allocates (subclasses with caches say; the tools check them
        against free memory before drawing: tools.drawing.check_decoding_fits)."""
        return 0

    def begin(self, n: int, labels: torch.Tensor | None) -> None:
        """Prepare to decode n grids with these labels; subclasses extend this to allocate caches."""
        self.step_labels = self.labels_or_null(labels, n, next(self.parameters()).device)

    @abstractmethod
    def forward(self, codes: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """codes (B, h, W), h <= H, labels (B,) or None -> logits (B, K, h, W); causal in raster order."""

    @abstractmethod
    def step_logits(self, codes: torch.Tensor, t: int) -> torch.Tensor:
        """codes (n, T) long, positions < t known -> logits (n, K) for the code at raster position t."""

    def end(self) -> None:
        self.step_labels = None

    @contextmanager
    def decoding(self, n: int, labels: torch.Tensor | None) -> Iterator[None]:
        """begin(n, labels) ... end(), also when the body raises."""
        self.begin(n, labels)
        try:
            yield
        finally:
            self.end()


# Codes one teacher-forced forward scores at most (`maps_per_pass`): its logits are (B, K, T) floats, 2.6 GB
# for 500 maps of 1,280 codes at K = 1,024 (`evaluate prior` at 256 px peaked at 7.7 GB and took 1.5x as long
# as in passes of 48 maps). 49-code maps (Fashion-MNIST) go 1,337 to a pass, so their batches stay whole.
TOKENS_PER_PASS = 1 << 16


def maps_per_pass(grid_shape: tuple[int, ...], at_most: int) -> int:
    """How many code maps of grid_shape one scoring forward takes: at most `at_most`, TOKENS_PER_PASS codes."""
    return max(1, min(at_most, TOKENS_PER_PASS // math.prod(grid_shape)))


def pass_slices(count: int, grid_shape: tuple[int, ...]) -> list[slice]:
    """The rows of a batch of `count` code maps, one slice per forward (`maps_per_pass`); one slice for 0."""
    n = maps_per_pass(grid_shape, max(count, 1))
    return [slice(start, start + n) for start in range(0, max(count, 1), n)]


def code_bits(prior: nn.Module, codes: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """codes (B, H, W), labels (B,) or None (the null class) -> -log2 p(c_t | c_<t, label) (B, H, W): what
    each code costs under teacher-forced forwards (`pass_slices`) of an autoregressive prior (a CodePrior or
    the LightningModule around one); the codec's label choice and the anomaly scores. Codes of any integer dtype
    (the uint16 arrays of common.codes too) and labels as a list or tensor are taken to the prior's device."""
    if not getattr(getattr(prior, "net", prior), "is_autoregressive", True):
        raise ValueError(f"code_bits needs an autoregressive prior (transformer or pixelcnn): a "
                         f"{type(getattr(prior, 'net', prior)).__name__} has no exact likelihood")  # fmt: skip
    device = next(prior.parameters()).device
    codes = torch.as_tensor(codes)
    if codes.is_floating_point() or codes.dtype == torch.bool:
        raise ValueError(f"codes must be integers, got {codes.dtype}")
    codes = codes.to(device, torch.long)
    labels = None if labels is None else torch.as_tensor(labels, device=device).long()
    bits = []
    for rows in pass_slices(len(codes), codes.shape[1:]):
        logits = prior(codes[rows], None if labels is None else labels[rows]).float()  # (b, K, H, W)
        bits.append(F.cross_entropy(logits, codes[rows], reduction="none") / math.log(2))
    return bits[0] if len(bits) == 1 else torch.cat(bits)
