"""Masked-token (MaskGIT-style) prior: a bidirectional Transformer over codes and its masked-token loss.

MaskGIT (Chang et al. 2022) learns p(masked codes | visible codes, label): the input is the code grid with
some positions replaced by a [MASK] token, the output predicts the code at every position, and the loss
is the cross-entropy at the masked positions only. Training masks a fraction cos(pi/2 * r) of the
positions, r ~ U(0, 1) per grid (the cosine schedule); sampling (:mod:`stage2_prior.masked_sampling`)
starts from an all-masked grid and fixes the most confident codes over a few steps.

Sequence layout: the grid is a flat sequence of T = H * W positions (raster order), with one learned
position embedding per position, so any `grid_shape` works the same way (a multi-level code map flattened
into one sequence, grid_shape (1, T), included). Input position 0 is the class token (num_classes + 1
rows; the last, ``null_label``, is the unconditional class for label dropout and classifier-free
guidance); positions 1..T hold the codes or [MASK] (token id ``codebook_size``). Attention is
bidirectional: every position sees every other.

This is not an autoregressive :class:`stage2_prior.decoding.CodePrior`: it has no exact likelihood and
no step decoding (``is_autoregressive = False``), so the codec and the anomaly scores refuse it. Imports
torch only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from stage2_prior.decoding import PriorNetwork, pass_slices
from stage2_prior.transformer import TRANSFORMER_SIZES, Block, gpt2_init

MASKGIT_SIZES = TRANSFORMER_SIZES  # the same named sizes: equal-size comparisons


class MaskedPrior(PriorNetwork):
    """p(codes at masked positions | the other codes, label), all positions predicted in one pass."""

    sizes = MASKGIT_SIZES
    is_autoregressive = False  # no exact likelihood, no begin/step_logits: compress and anomaly refuse it

    def __init__(
        self,
        codebook_size: int,
        grid_shape: tuple[int, int],
        num_classes: int = 0,
        n_layer: int = 4,
        n_head: int = 4,
        n_embd: int = 128,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(codebook_size, grid_shape, num_classes)
        self.mask_token = self.codebook_size  # the last row of the token table: [MASK]
        self.tok_emb = nn.Embedding(self.codebook_size + 1, n_embd)
        self.class_emb = nn.Embedding(self.num_classes + 1, n_embd)
        self.pos_emb = nn.Parameter(torch.zeros(self.seq_len + 1, n_embd))  # 0: the class token
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout, causal=False) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, self.codebook_size)
        self._init_weights(n_layer)

    def _init_weights(self, n_layer: int) -> None:
        gpt2_init(self, n_layer)
        nn.init.normal_(self.pos_emb, mean=0.0, std=0.02)

    def features(self, codes: torch.Tensor, masked: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """codes (B, H, W) long, masked (B, H, W) bool, labels (B,) or None -> (B, T, C) before the head."""
        B = codes.shape[0]
        if tuple(codes.shape[1:]) != self.grid_shape or masked.shape != codes.shape:
            raise ValueError(f"codes {tuple(codes.shape)} and masked {tuple(masked.shape)} must both be "
                             f"(B, {self.grid_shape[0]}, {self.grid_shape[1]})")  # fmt: skip
        tokens = codes.reshape(B, -1).masked_fill(masked.reshape(B, -1), self.mask_token)  # (B, T)
        start = self.class_emb(self.labels_or_null(labels, B, codes.device))[:, None]  # (B, 1, C)
        x = self.drop(torch.cat([start, self.tok_emb(tokens)], dim=1) + self.pos_emb)  # (B, T + 1, C)
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x[:, 1:])  # (B, T, C)

    def forward(self, codes: torch.Tensor, masked: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """codes (B, H, W) long, masked (B, H, W) bool (True: the code is hidden, its value ignored), labels
        (B,) or None -> logits (B, K, H, W) at every position."""
        logits = self.head(self.features(codes, masked, labels))  # (B, T, K)
        return logits.transpose(1, 2).reshape(codes.shape[0], self.codebook_size, *self.grid_shape)

    def masked_logits(self, codes: torch.Tensor, masked: torch.Tensor,
                      labels: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """One network pass for the sampler: logits (M, K) at the M masked positions only, in row-major
        order of `masked` (the head runs on those positions alone); long sequences go `maps_per_pass` maps a
        forward (the same logits, in the same order)."""
        parts = [self.head(self.features(codes[rows], masked[rows], None if labels is None else labels[rows])
                           [masked[rows].reshape(len(codes[rows]), -1)])  # (M_i, K)
                 for rows in pass_slices(len(codes), self.grid_shape)]  # fmt: skip
        return parts[0] if len(parts) == 1 else torch.cat(parts)


# ------------------------------------------------------------------------------------------ training
def cosine_mask_ratio(r: torch.Tensor) -> torch.Tensor:
    """MaskGIT's schedule gamma(r) = cos(pi/2 * r): the fraction of positions masked at r in [0, 1]."""
    return torch.cos(r * (math.pi / 2))


def random_mask(shape: torch.Size | tuple[int, ...], generator: torch.Generator | None = None,
                device: torch.device | str = "cpu") -> torch.Tensor:  # fmt: skip
    """(B, *grid) bool: per grid, ceil(gamma(r) * T) positions (at least 1) chosen uniformly, r ~ U(0, 1).
    Drawn on the generator's device (the CPU when none), then moved to `device`."""
    B, T = shape[0], math.prod(shape[1:])
    gen_device = generator.device if generator is not None else device
    r = torch.rand(B, generator=generator, device=gen_device)
    count = torch.ceil(cosine_mask_ratio(r) * T).clamp(1, T).long()  # (B,)
    ranks = torch.rand(B, T, generator=generator, device=gen_device).argsort(1).argsort(1)  # a random order
    return (ranks < count[:, None]).reshape(shape).to(device)


def masked_token_loss(logits: torch.Tensor, codes: torch.Tensor, masked: torch.Tensor) -> dict[str, torch.Tensor]:
    """Cross-entropy at the masked positions: {"nll": nats per masked code (mean), "accuracy": top-1 at
    the masked positions, "count": how many}. logits (B, K, H, W), codes and masked (B, H, W)."""
    per_code = F.cross_entropy(logits.float(), codes, reduction="none")  # (B, H, W)
    count = masked.sum()
    nll = (per_code * masked).sum() / count.clamp(min=1)
    accuracy = ((logits.argmax(1) == codes) & masked).sum() / count.clamp(min=1)
    return {"nll": nll, "accuracy": accuracy, "count": count}
