"""Gated PixelCNN prior over the grid of stage-1 codes (van den Oord et al. 2016, "Conditional Image
Generation with PixelCNN Decoders"), without the blind spot.

Causality is built from cropped/padded convolutions, never from masked weights, so a logit is exactly
independent of the codes at and after its raster position:
- the vertical stack convolves a (k//2 + 1, k) window of rows <= r, and reaches the horizontal stack
  only after a one-row down-shift, so it tells position (r, c) about rows < r (all columns);
- the horizontal stack convolves a (1, k//2 + 1) window of columns <= c; in the first layer its input
  is shifted one column right (mask 'A': the current code is excluded), and the first layer has no
  residual connection (it would carry the current code); later layers include the current position.
Class conditioning is a learned per-class bias on both stacks in every layer, from a table of
num_classes + 1 rows whose last row (``null_label``) is the unconditional class. Decoding
(:mod:`stage2_prior.decoding`) runs the rows up to the current one at each step. Imports torch only.
"""

import torch
import torch.nn.functional as F
from torch import nn

from stage2_prior.decoding import CodePrior

PIXELCNN_SIZES = {
    "tiny": dict(n_layer=3, channels=32),
    "small": dict(n_layer=8, channels=64),
    "base": dict(n_layer=15, channels=128),
}


def gate(x: torch.Tensor) -> torch.Tensor:
    """(B, 2C, H, W) -> tanh(a) * sigmoid(b): (B, C, H, W)."""
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


def shift_down(x: torch.Tensor) -> torch.Tensor:
    """Move every row one down (zeros enter at the top): row r then holds what row r - 1 held."""
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1]


def shift_right(x: torch.Tensor) -> torch.Tensor:
    """Move every column one right (zeros enter at the left)."""
    return F.pad(x, (1, 0))[:, :, :, :-1]


class GatedLayer(nn.Module):
    """One gated layer: vertical and horizontal stacks, vertical -> horizontal link, class biases."""

    def __init__(
        self, channels: int, kernel_size: int, num_classes: int, first: bool, dropout: float
    ) -> None:
        super().__init__()
        C, p = channels, kernel_size // 2
        self.p = p
        self.first = first
        self.v_conv = nn.Conv2d(C, 2 * C, (p + 1, kernel_size))
        self.h_conv = nn.Conv2d(C, 2 * C, (1, p + 1))
        self.v_to_h = nn.Conv2d(2 * C, 2 * C, 1)
        self.h_out = nn.Conv2d(C, C, 1)
        self.v_cond = nn.Embedding(num_classes + 1, 2 * C)
        self.h_cond = nn.Embedding(num_classes + 1, 2 * C)
        nn.init.normal_(self.v_cond.weight, std=0.02)
        nn.init.normal_(self.h_cond.weight, std=0.02)
        self.drop = nn.Dropout(dropout)

    def forward(
        self, v: torch.Tensor, h: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """v, h: (B, C, H, W), labels (B,) -> new v, h (B, C, H, W)."""
        p = self.p
        v_pre = self.v_conv(F.pad(v, (p, p, p, 0)))  # (B, 2C, H, W); row r sees rows r-p..r
        h_src = shift_right(h) if self.first else h
        h_pre = self.h_conv(F.pad(h_src, (p, 0)))  # (B, 2C, H, W); col c sees cols c-p..c
        h_pre = h_pre + self.v_to_h(shift_down(v_pre))  # rows < r only
        v_out = gate(v_pre + self.v_cond(labels)[:, :, None, None])  # (B, C, H, W)
        h_gated = self.drop(gate(h_pre + self.h_cond(labels)[:, :, None, None]))
        h_out = self.h_out(h_gated)
        return v_out, h_out if self.first else h + h_out


class GatedPixelCNN(CodePrior):
    """Autoregressive prior over codes (B, H, W) -> logits (B, codebook_size, H, W), raster order."""

    sizes = PIXELCNN_SIZES

    def __init__(
        self,
        codebook_size: int,
        grid_shape: tuple[int, int],
        num_classes: int = 0,
        n_layer: int = 8,
        channels: int = 64,
        kernel_size: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(codebook_size, grid_shape, num_classes)
        if kernel_size < 3 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and >= 3, got {kernel_size}")
        if n_layer < 1:
            raise ValueError(f"n_layer must be >= 1, got {n_layer}")
        self.embed = nn.Embedding(codebook_size, channels)
        self.layers = nn.ModuleList(
            GatedLayer(channels, kernel_size, num_classes, first=i == 0, dropout=dropout)
            for i in range(n_layer)
        )
        self.head = nn.Sequential(
            nn.ReLU(), nn.Conv2d(channels, channels, 1), nn.ReLU(), nn.Conv2d(channels, codebook_size, 1)
        )

    def forward(self, codes: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """codes (B, h, W) with h <= H, labels (B,) or None (= null class) -> logits (B, K, h, W).

        The network is causal in rows, so the logits for the first h rows are the same whether or
        not the later rows are given.
        """
        B, h, W = codes.shape
        if h > self.grid_shape[0] or W != self.grid_shape[1]:
            raise ValueError(f"codes of shape {tuple(codes.shape)} do not fit grid_shape {self.grid_shape}")
        labels = self.labels_or_null(labels, B, codes.device)
        x = self.embed(codes).permute(0, 3, 1, 2).contiguous()  # (B, C, h, W)
        v, hs = x, x
        for layer in self.layers:
            v, hs = layer(v, hs, labels)
        return self.head(hs)  # (B, K, h, W)

    def step_logits(self, codes: torch.Tensor, t: int) -> torch.Tensor:
        """codes (n, T) -> logits (n, K) at position t, computing only rows 0..t // W (causal in rows)."""
        if self.step_labels is None:
            raise RuntimeError(f"call begin({codes.shape[0]}, labels) before step_logits")
        r, c = divmod(t, self.grid_shape[1])
        rows = codes.view(codes.shape[0], -1, self.grid_shape[1])[:, : r + 1]  # (n, r + 1, W)
        return self.forward(rows, self.step_labels)[:, :, r, c]
