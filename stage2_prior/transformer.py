"""GPT-style Transformer prior over raster-ordered stage-1 codes, with a static KV cache.

Sequence layout (T = H * W): input position 0 holds the start/class token and input positions 1..T-1
hold the codes c_0..c_{T-2}; the output at position t predicts code c_t, so it sees only the class and
c_<t. Position embeddings are 2-D: learned row and column tables, summed, where input position t gets
the (row, col) embedding of the code c_t it predicts (so the start token carries position (0, 0)).
The class table has num_classes + 1 rows; the last row (``null_label``) is the unconditional class
used for label dropout and classifier-free guidance, and ``labels=None`` means "all null".
Decoding (:mod:`stage2_prior.decoding`): `begin` allocates a static KV cache, `step_logits` feeds one
token and attends to the cached slots. Imports torch only.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from stage2_prior.decoding import CodePrior

TRANSFORMER_SIZES = {
    "tiny": dict(n_layer=2, n_head=2, n_embd=64),
    "small": dict(n_layer=4, n_head=4, n_embd=128),
    "base": dict(n_layer=8, n_head=8, n_embd=256),
}


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with an optional static KV cache for one-token steps
    (``causal=False``: every position attends to every position, as the masked prior needs).

    ``dropout`` acts on the output projection (the residual branch), not on the attention probabilities:
    with ``dropout_p > 0`` the CPU's scaled_dot_product_attention leaves its fused kernel for the math one,
    and a training step of the `small` prior took 1.75x as long (0.33 vs 0.19 s at batch 16, T 256, 2 cores;
    residual dropout alone: 0.21 s)."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, causal: bool = True) -> None:
        super().__init__()
        self.causal = causal
        if n_embd % n_head != 0:
            raise ValueError(f"n_embd={n_embd} must be divisible by n_head={n_head}")
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.resid_drop = nn.Dropout(dropout)
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def _heads(self, x: torch.Tensor) -> list[torch.Tensor]:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        hs = C // self.n_head
        return [z.view(B, T, self.n_head, hs).transpose(1, 2) for z in (q, k, v)]  # (B, nh, T, hs)

    def _merge(self, y: torch.Tensor) -> torch.Tensor:
        B, _, T, _ = y.shape
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, C)
        return self.resid_drop(self.proj(y))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(x)
        if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            # Under CPU bf16 autocast the matmuls run 2.6x faster, but the fused attention's bf16 backward
            # ran 5.6x slower than its fp32 one (2-core AVX512-BF16 host), so attention stays fp32.
            with torch.autocast("cpu", enabled=False):
                y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=self.causal)
            return self._merge(y)
        return self._merge(F.scaled_dot_product_attention(q, k, v, is_causal=self.causal))

    def forward_step(self, x: torch.Tensor, t: int) -> torch.Tensor:
        """x: (B, 1, C) at sequence position t; writes K/V at slot t and attends to slots 0..t."""
        q, k, v = self._heads(x)  # (B, nh, 1, hs)
        self.k_cache[:, :, t : t + 1] = k
        self.v_cache[:, :, t : t + 1] = v
        y = F.scaled_dot_product_attention(q, self.k_cache[:, :, : t + 1], self.v_cache[:, :, : t + 1])
        return self._merge(y)  # (B, 1, C)


class MLP(nn.Module):
    def __init__(self, n_embd: int, dropout: float) -> None:
        super().__init__()
        self.fc = nn.Linear(n_embd, 4 * n_embd)
        self.proj = nn.Linear(4 * n_embd, n_embd)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-norm Transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, causal: bool = True) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, causal)
        self.ln2 = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))

    def forward_step(self, x: torch.Tensor, t: int) -> torch.Tensor:
        x = x + self.attn.forward_step(self.ln1(x), t)
        return x + self.mlp(self.ln2(x))


def gpt2_init(net: nn.Module, n_layer: int) -> None:
    """GPT-2 init: N(0, 0.02), zero biases, residual projections scaled by 1/sqrt(2 * n_layer)."""
    for m in net.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
    for name, p in net.named_parameters():
        if name.endswith("proj.weight"):
            nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))


class Transformer(CodePrior):
    """Autoregressive prior p(codes | label) = prod_t p(c_t | label, c_<t) in raster order."""

    sizes = TRANSFORMER_SIZES

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
        H, W = self.grid_shape
        self.tok_emb = nn.Embedding(codebook_size, n_embd)
        self.class_emb = nn.Embedding(num_classes + 1, n_embd)  # last row: null / start token
        self.row_emb = nn.Embedding(H, n_embd)
        self.col_emb = nn.Embedding(W, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, codebook_size, bias=False)
        self._init_weights(n_layer)

    def _init_weights(self, n_layer: int) -> None:
        gpt2_init(self, n_layer)

    def _pos(self, t: torch.Tensor) -> torch.Tensor:
        """(row, col) embedding of the code at raster position(s) t."""
        W = self.grid_shape[1]
        return self.row_emb(t // W) + self.col_emb(t % W)

    def forward(self, codes: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """codes (B, h, W) with h <= H (rows beyond h are simply absent), labels (B,) or None
        -> logits (B, codebook_size, h, W); logits[:, :, r, c] predicts codes[:, r, c]."""
        B, h, W = codes.shape
        if h > self.grid_shape[0] or W != self.grid_shape[1]:
            raise ValueError(f"codes of shape {tuple(codes.shape)} do not fit grid_shape {self.grid_shape}")
        T = h * W
        codes = codes.reshape(B, T)
        start = self.class_emb(self.labels_or_null(labels, B, codes.device))[:, None]  # (B, 1, C)
        x = torch.cat([start, self.tok_emb(codes[:, :-1])], dim=1)  # (B, T, C)
        x = self.drop(x + self._pos(torch.arange(T, device=codes.device)))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))  # (B, T, K)
        return logits.transpose(1, 2).reshape(B, self.codebook_size, h, W)

    # --- incremental decoding with a static KV cache ---

    def state_bytes(self, n: int) -> int:
        """The K/V buffers `begin(n)` allocates: 2 per layer of (n, T, n_embd) (5 GiB for 256 sequences of 1,280
        codes at the `base` size)."""
        return 2 * len(self.blocks) * n * self.seq_len * self.head.in_features * self.head.weight.element_size()

    def begin(self, n: int, labels: torch.Tensor | None) -> None:
        """Allocate K/V buffers (n, n_head, T, head_dim) in every layer and the position table (T, C)."""
        super().begin(n, labels)
        ref = self.head.weight
        for block in self.blocks:
            attn = block.attn
            shape = (n, attn.n_head, self.seq_len, self.head.in_features // attn.n_head)
            attn.k_cache = torch.zeros(shape, device=ref.device, dtype=ref.dtype)
            attn.v_cache = torch.zeros(shape, device=ref.device, dtype=ref.dtype)
        self._pos_table = self._pos(torch.arange(self.seq_len, device=ref.device))  # (T, C)

    def step_logits(self, codes: torch.Tensor, t: int) -> torch.Tensor:
        """Feed input position t (the class token at t = 0, else code c_{t-1}) -> logits (n, K) for c_t."""
        if self.step_labels is None or self.blocks[0].attn.k_cache.shape[0] != codes.shape[0]:
            raise RuntimeError(f"call begin({codes.shape[0]}, labels) before step_logits")
        if not 0 <= t < self.seq_len:
            raise ValueError(f"step t={t} is outside the sequence 0..{self.seq_len - 1}")
        x = self.class_emb(self.step_labels) if t == 0 else self.tok_emb(codes[:, t - 1])  # (n, C)
        x = (x + self._pos_table[t])[:, None]  # (n, 1, C)
        for block in self.blocks:
            x = block.forward_step(x, t)
        return self.head(self.ln_f(x))[:, 0]  # (n, K)

    def end(self) -> None:
        super().end()
        for block in self.blocks:
            block.attn.k_cache = block.attn.v_cache = None
        self._pos_table = None
