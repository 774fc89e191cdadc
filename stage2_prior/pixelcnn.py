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
num_classes + 1 rows whose last row (``null_label``) is the unconditional class. Imports torch only.

Decoding (:mod:`stage2_prior.decoding`) is incremental, with caches that ``begin`` allocates, per layer:
- the vertical inputs of all rows, zero-padded (n, C, p + H - 1, W + 2p), p = k//2: when row r starts,
  the codes of row r - 1 are complete, so every layer's vertical stack runs once on row r - 1 alone
  (from its cached input rows r-1-p..r-1) and keeps v_to_h of it (n, 2C, W), v_link, for the horizontal stack;
- the horizontal input of the current row, zero-padded on the left (n, C, p + W): a step at (r, c)
  writes column c (in the first layer: the code at c - 1, the right shift) and runs every layer on the
  window of columns c-p..c only, then the head on that one position.
So a step costs about n_layer small matrix products instead of a forward over rows 0..r. It reads only
the codes at t - 1 and, when a row starts, the row before, and writes only into the preallocated caches
(nothing from Python values), so one step can be captured in a CUDA graph.
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

    def vertical_row(self, window: torch.Tensor, v_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One row q of the vertical stack. window (n, C, p + 1, W + 2p): this layer's vertical input,
        rows q-p..q, zero-padded; v_bias (n, 2C) -> v_to_h of v_pre (n, 2C, W), v_out (n, C, W)."""
        v_pre = self.v_conv(window)  # (n, 2C, 1, W)
        return self.v_to_h(v_pre)[:, :, 0], gate(v_pre[:, :, 0] + v_bias[:, :, None])

    def horizontal_step(
        self, window: torch.Tensor, v_term: torch.Tensor, h_bias: torch.Tensor, h: torch.Tensor | None
    ) -> torch.Tensor:
        """One position (r, c) of the horizontal stack. window (n, C, p + 1): this layer's horizontal source
        at columns c-p..c; v_term (n, 2C) or (2C,): v_to_h of v_pre at (r - 1, c); h_bias (n, 2C); h (n, C):
        this layer's input at (r, c), None in the first layer -> this layer's output (n, C) at (r, c)."""
        h_pre = F.linear(window.flatten(1), self.h_conv.weight.flatten(1), self.h_conv.bias) + v_term  # (n, 2C)
        h_gated = self.drop(gate(h_pre + h_bias))  # (n, C)
        h_out = F.linear(h_gated, self.h_out.weight.flatten(1), self.h_out.bias)  # (n, C)
        return h_out if self.first else h + h_out


class GatedPixelCNN(CodePrior):
    """Autoregressive prior over codes (B, H, W) -> logits (B, codebook_size, H, W), raster order."""

    sizes = PIXELCNN_SIZES
    step_version = 2  # 1: a full forward over rows 0..r per step; 2: the incremental caches

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
        self.v_in = self.v_link = self.h_src = self.v_bias = self.h_bias = None  # decoding caches (begin)

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

    def state_bytes(self, n: int) -> int:
        """The caches `begin(n)` allocates, per layer: v_in, v_link, h_src and the two class biases."""
        (H, W), p, C = self.grid_shape, self.layers[0].p, self.embed.embedding_dim
        per_layer = C * (p + H - 1) * (W + 2 * p) + 2 * C * W + C * (p + W) + 2 * 2 * C
        return len(self.layers) * n * per_layer * self.embed.weight.element_size()

    def begin(self, n: int, labels: torch.Tensor | None) -> None:
        """Allocate the decoding caches for n grids (see the module docstring)."""
        super().begin(n, labels)
        (H, W), p, C = self.grid_shape, self.layers[0].p, self.embed.embedding_dim
        new = self.embed.weight.new_zeros
        self.v_in = [new(n, C, p + H - 1, W + 2 * p) for _ in self.layers]  # row q at index p + q
        self.v_link = [new(n, 2 * C, W) for _ in self.layers]  # v_to_h(v_pre) of the row above
        self.h_src = [new(n, C, p + W) for _ in self.layers]  # column c at index p + c
        self.v_bias = [layer.v_cond(self.step_labels) for layer in self.layers]  # (n, 2C) each
        self.h_bias = [layer.h_cond(self.step_labels) for layer in self.layers]

    def end(self) -> None:
        super().end()
        self.v_in = self.v_link = self.h_src = self.v_bias = self.h_bias = None

    def step_logits(self, codes: torch.Tensor, t: int) -> torch.Tensor:
        """codes (n, T) -> logits (n, K) at position t, from the caches (steps t = 0..T-1 in order)."""
        if self.step_labels is None:
            raise RuntimeError(f"call begin({codes.shape[0]}, labels) before step_logits")
        if codes.shape[0] != self.step_labels.shape[0]:
            raise ValueError(f"begin() was for {self.step_labels.shape[0]} grids, codes hold {codes.shape[0]}")
        (H, W), p = self.grid_shape, self.layers[0].p
        r, c = divmod(t, W)
        grid = codes.view(codes.shape[0], H, W)
        if c == 0 and r > 0:
            self._vertical_row(grid[:, r - 1], r - 1)
        if c > 0:
            self.h_src[0][:, :, p + c] = self.embed(grid[:, r, c - 1])  # (n, C); the first layer's right shift
        h = None
        for i, layer in enumerate(self.layers):
            v_term = self.v_link[i][:, :, c] if r > 0 else layer.v_to_h.bias  # row -1 is zeros: v_to_h(0)
            h = layer.horizontal_step(self.h_src[i][:, :, c : c + p + 1], v_term, self.h_bias[i], h)  # (n, C)
            if i + 1 < len(self.layers):
                self.h_src[i + 1][:, :, p + c] = h
        for m in self.head:  # the 1x1 convolutions as matrix products (fewer overheads than conv2d)
            h = F.linear(h, m.weight.flatten(1), m.bias) if isinstance(m, nn.Conv2d) else m(h)
        return h  # (n, K)

    def _vertical_row(self, row_codes: torch.Tensor, q: int) -> None:
        """Run the vertical stack on row q (codes (n, W), now complete): fill v_in and v_link for row q."""
        p, W = self.layers[0].p, self.grid_shape[1]
        self.v_in[0][:, :, p + q, p : p + W] = self.embed(row_codes).transpose(1, 2)  # (n, C, W)
        for i, layer in enumerate(self.layers):
            v_to_h, v_out = layer.vertical_row(self.v_in[i][:, :, q : q + p + 1], self.v_bias[i])
            self.v_link[i].copy_(v_to_h)  # (n, 2C, W)
            if i + 1 < len(self.layers):
                self.v_in[i + 1][:, :, p + q, p : p + W] = v_out  # (n, C, W)
