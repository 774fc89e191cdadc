"""Quantizers: a vector quantizer (EMA or loss-learned codebook) and FSQ, behind one interface.

Both take encoder features ``z`` of shape (B, D, H, W) and return a :class:`Quantized` with the
straight-through quantized features (same shape), the quantizer's loss term and the integer ``codes``
(B, H, W).  ``lookup(codes)`` maps codes back to features, so ``decode_codes`` never needs ``z``.

Training health is built in rather than bolted on: k-means initialisation from the first batch,
dead-code restarts from recent encoder outputs, and every statistic that shapes the codebook is
all-reduced (sums) or broadcast (random choices) so that all DDP ranks hold the same codebook.
Distances and EMA updates always run in fp32, also under bf16 autocast. A model cast as a whole
(``.to(torch.bfloat16)``, inference) keeps its codebook in that dtype; its distances are still taken in fp32.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


@dataclass
class Quantized:
    quantized: torch.Tensor  # (B, D, H, W), straight-through: gradients flow to z
    loss: torch.Tensor  # scalar: beta * commitment (+ codebook loss when not EMA)
    codes: torch.Tensor  # (B, H, W) long
    commitment: torch.Tensor  # scalar, unweighted ||z - sg(e)||^2, for logging


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if _distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _broadcast(t: torch.Tensor) -> torch.Tensor:
    if _distributed():
        dist.broadcast(t, src=0)
    return t


def kmeans(x: torch.Tensor, k: int, iters: int = 10, generator: torch.Generator | None = None) -> torch.Tensor:
    """Plain Lloyd k-means on x (N, D); returns (k, D) centroids. Empty clusters keep their seed point."""
    n = x.shape[0]
    idx = torch.randperm(n, generator=generator, device="cpu")[:k].to(x.device)
    if n < k:  # fewer points than codes: sample with replacement
        idx = torch.randint(0, n, (k,), generator=generator, device="cpu").to(x.device)
    centroids = x[idx].clone()
    for _ in range(iters):
        assign = torch.cdist(x, centroids).argmin(dim=1)  # (N,)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]
    return centroids


def rotate_onto(z: torch.Tensor, e: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """z (N, D) -> s R z (N, D): the rotation R that turns z's direction into e's, and the scale s = |e| / |z|,
    both treated as constants, so the value is e (up to rounding) while the gradient reaching z is s R^T
    times the incoming one: it keeps the angle between the gradient and z, which the straight-through copy
    does not. R z = z - 2 r (r.z) + 2 v (u.z) with u = z/|z|, v = e/|e|, r = (u + v)/|u + v|."""
    zd = z.detach()
    z_norm = zd.norm(dim=1, keepdim=True).clamp_min(eps)
    e_norm = e.norm(dim=1, keepdim=True).clamp_min(eps)
    u, v = zd / z_norm, e / e_norm
    r = F.normalize(u + v, dim=1, eps=eps)
    rotated = z - 2 * r * (z * r).sum(1, keepdim=True) + 2 * v * (z * u).sum(1, keepdim=True)
    return rotated * (e_norm / z_norm)


class VectorQuantizer(nn.Module):
    """VQ-VAE quantizer (van den Oord et al. 2017) with the fixes that keep every code alive.

    Args:
        codebook_size: number of codes K.
        code_dim: channels D of the encoder features it quantizes.
        beta: weight of the commitment loss ||z - sg(e)||^2 (encoder side only).
        ema: learn the codebook by exponential moving averages (True) or by the codebook loss.
        decay: EMA decay.
        eps: Laplace smoothing of the EMA cluster sizes.
        kmeans_init: initialise the codebook by k-means on the first training batch.
        restart_threshold: codes whose EMA usage (expected assignments per batch) falls below this
            are re-seeded from recent encoder outputs; 0 disables restarts.
        lookup_dim: if set, quantize in a low-dimensional space (a linear projection D -> lookup_dim
            and back), as in ViT-VQGAN's factorised codes; it raises codebook usage.
        l2_normalize: compare l2-normalised vectors (cosine similarity) in the lookup space.
        rotation_trick: pass gradients to the encoder through the rotation and rescaling that maps each
            encoder vector onto its code vector (Fifty et al. 2024, "Restructuring Vector Quantization with
            the Rotation Trick") instead of copying them unchanged (the straight-through estimator). The
            forward values are the code vectors either way.
    """

    def __init__(
        self,
        codebook_size: int = 512,
        code_dim: int = 64,
        beta: float = 0.25,
        ema: bool = True,
        decay: float = 0.99,
        eps: float = 1e-5,
        kmeans_init: bool = True,
        restart_threshold: float = 1.0,
        lookup_dim: int | None = None,
        l2_normalize: bool = False,
        rotation_trick: bool = False,
    ) -> None:
        super().__init__()
        self.rotation_trick = rotation_trick
        self.codebook_size = codebook_size
        self.code_dim = code_dim
        self.beta = beta
        self.ema = ema
        self.decay = decay
        self.eps = eps
        self.restart_threshold = restart_threshold
        self.l2_normalize = l2_normalize
        dim = lookup_dim or code_dim
        self.lookup_dim = dim
        self.in_proj = nn.Conv2d(code_dim, dim, 1) if lookup_dim else nn.Identity()
        self.out_proj = nn.Conv2d(dim, code_dim, 1) if lookup_dim else nn.Identity()
        embed = torch.randn(codebook_size, dim) * (dim**-0.5)
        if ema:
            self.register_buffer("embed", embed)
            self.register_buffer("cluster_size", torch.ones(codebook_size))
            self.register_buffer("embed_sum", embed.clone())
        else:
            self.embed = nn.Parameter(embed)
            self.register_buffer("cluster_size", torch.ones(codebook_size))
        self.register_buffer("initialized", torch.tensor(not kmeans_init))

    # ----------------------------------------------------------------- helpers
    def codebook(self) -> torch.Tensor:
        """(K, lookup_dim) code vectors as used for lookup (normalised when l2_normalize)."""
        e = self.embed.float()
        return F.normalize(e, dim=1) if self.l2_normalize else e

    def _flat(self, z: torch.Tensor) -> torch.Tensor:
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).float()  # (B*H*W, dim)
        return F.normalize(flat, dim=1) if self.l2_normalize else flat

    def _nearest(self, flat: torch.Tensor) -> torch.Tensor:
        e = self.codebook()
        # ||x - e||^2 = ||x||^2 - 2 x.e + ||e||^2; the ||x||^2 term does not change the argmin.
        dist_ = e.pow(2).sum(1)[None, :] - 2 * flat @ e.t()  # (N, K)
        return dist_.argmin(dim=1)

    @torch.no_grad()
    def _kmeans_init(self, flat: torch.Tensor) -> None:
        # Rank 0 decides, everyone receives: identical codebooks on every rank.
        centroids = kmeans(flat, self.codebook_size)
        centroids = _broadcast(centroids.contiguous())
        self.embed.data.copy_(centroids)
        # Start every code at the average usage per batch, so a code must stay unused for a while
        # (not just miss the first batch) before it counts as dead.
        world = dist.get_world_size() if _distributed() else 1  # EMA counts are summed over ranks
        average = flat.shape[0] * world / self.codebook_size
        self.cluster_size.fill_(average)
        self._check_restart_threshold(average)
        if self.ema:
            self.embed_sum.copy_(centroids * self.cluster_size[:, None])
        self.initialized.fill_(True)

    def _check_restart_threshold(self, average: float) -> None:
        """Warn when restarts would come too late at this batch size. The threshold counts assignments per
        batch, so a config tuned at batch 32 (Fashion-MNIST: 3 per code on average, threshold 1) leaves an
        unused code alone for about 525 steps at batch 2048 (196 per code): on an H200 such a run sat on
        one code around step 600 and ended 2 dB below the CPU config."""
        t = self.restart_threshold
        if 0 < t < 0.05 * average:
            steps = math.log(average / t) / -math.log(self.decay)
            warnings.warn(f"restart_threshold {t:g} is {t / average:.1%} of a code's average assignments per batch "
                          f"({average:.0f} at this batch size): an unused code waits about {steps:.0f} steps for a "
                          f"restart; scale restart_threshold with the batch (about a third of the average: "
                          f"{average / 3:.0f})", stacklevel=2)  # fmt: skip

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, codes: torch.Tensor) -> None:
        onehot_counts = torch.bincount(codes, minlength=self.codebook_size).float()  # (K,)
        sums = torch.zeros(self.codebook_size, flat.shape[1], device=flat.device).index_add_(0, codes, flat)
        _all_reduce_sum(onehot_counts)
        _all_reduce_sum(sums)
        self.cluster_size.mul_(self.decay).add_(onehot_counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.codebook_size * self.eps) * n
        self.embed.copy_(self.embed_sum / smoothed[:, None])

    @torch.no_grad()
    def _track_usage(self, codes: torch.Tensor) -> None:
        counts = _all_reduce_sum(torch.bincount(codes, minlength=self.codebook_size).float())
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)

    @torch.no_grad()
    def _restart_dead(self, flat: torch.Tensor) -> int:
        dead = self.cluster_size < self.restart_threshold  # identical on all ranks (reduced stats)
        n_dead = int(dead.sum())
        if n_dead == 0:
            return 0
        # Re-seed from encoder outputs of this batch (rank 0's, broadcast), with a little noise so
        # that several restarted codes do not land on the same point.
        pick = torch.randint(0, flat.shape[0], (n_dead,), device=flat.device)
        new = flat[pick] + 0.01 * flat.std() * torch.randn_like(flat[pick])
        new = _broadcast(new.contiguous())
        self.embed.data[dead] = new.to(self.embed.dtype)
        # Give restarted codes the usage of an average code so they are not restarted again at once.
        self.cluster_size[dead] = self.cluster_size.sum() / self.codebook_size
        if self.ema:
            self.embed_sum[dead] = new * self.cluster_size[dead, None]
        return n_dead

    # ----------------------------------------------------------------- interface
    def forward(self, z: torch.Tensor) -> Quantized:
        b, _, h, w = z.shape
        with torch.autocast(device_type=z.device.type, enabled=False):
            zl = self.in_proj(z.to(self.embed.dtype))  # (B, dim, H, W); fp32 unless the model was cast
            flat = self._flat(zl)  # (B*H*W, dim)
            if self.training and not bool(self.initialized):
                self._kmeans_init(flat.detach())
            codes = self._nearest(flat.detach())  # (B*H*W,)
            if self.training:
                if self.ema:
                    self._ema_update(flat.detach(), codes)
                else:
                    self._track_usage(codes)
                if self.restart_threshold > 0:
                    self._restart_dead(flat.detach())
            e = self.codebook()[codes]  # (B*H*W, dim)
            commitment = F.mse_loss(flat, e.detach())
            loss = self.beta * commitment
            if not self.ema:
                loss = loss + F.mse_loss(e, flat.detach())
            # Straight-through estimator (or the rotation trick) in training; in eval exactly the code vector.
            if self.training:
                carrier = rotate_onto(flat, e.detach()) if self.rotation_trick else flat
                q = carrier + (e - carrier).detach()  # the value of e, the gradient of carrier
            else:
                q = e
            # contiguous, as in lookup(): the same memory layout makes out_proj give bit-identical outputs
            q = q.view(b, h, w, -1).permute(0, 3, 1, 2).contiguous()  # (B, dim, H, W)
            quantized = self.out_proj(q.to(self.embed.dtype))
        return Quantized(quantized, loss, codes.view(b, h, w), commitment.detach())

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, H, W) -> features (B, code_dim, H, W), exactly what forward outputs in eval."""
        e = self.codebook()[codes]  # (B, H, W, dim)
        with torch.autocast(device_type=codes.device.type, enabled=False):
            return self.out_proj(e.permute(0, 3, 1, 2).contiguous().to(self.embed.dtype))


class FSQ(nn.Module):
    """Finite scalar quantization (Mentzer et al. 2023): each of len(levels) channels is bounded and
    rounded to one of levels[i] values; the code is the mixed-radix number of those digits.

    No codebook to learn, so no collapse: K = prod(levels). A 1x1 projection maps code_dim channels to
    len(levels) and back.
    """

    def __init__(self, levels: list[int] = (8, 5, 5, 5), code_dim: int = 64) -> None:
        super().__init__()
        levels = list(levels)
        if not levels or any(int(l) < 2 for l in levels):
            raise ValueError(f"FSQ levels must be integers >= 2, got {levels}")
        self.levels_list = levels
        self.code_dim = code_dim
        self.register_buffer("levels", torch.tensor(levels, dtype=torch.long), persistent=False)
        basis = torch.cumprod(torch.tensor([1] + levels[:-1], dtype=torch.long), dim=0)
        self.register_buffer("basis", basis, persistent=False)
        self.codebook_size = int(torch.prod(torch.tensor(levels)))
        self.in_proj = nn.Conv2d(code_dim, len(levels), 1)
        self.out_proj = nn.Conv2d(len(levels), code_dim, 1)

    def _bound(self, z: torch.Tensor) -> torch.Tensor:
        # z (..., L) -> values in a range that rounds to exactly `levels` integers.
        lv = self.levels.float()
        half = (lv - 1) * (1 + 1e-3) / 2  # 1 + eps as in the paper's code: 1 - eps makes level 2 NaN
        offset = torch.where(self.levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half)
        return torch.tanh(z + shift) * half - offset

    def _digits_to_values(self, digits: torch.Tensor) -> torch.Tensor:
        half_width = (self.levels // 2).float()
        return (digits.float() - half_width) / half_width

    def forward(self, z: torch.Tensor) -> Quantized:
        with torch.autocast(device_type=z.device.type, enabled=False):
            dtype = self.in_proj.weight.dtype  # fp32 unless the model was cast
            zl = self.in_proj(z.to(dtype)).permute(0, 2, 3, 1).float()  # (B, H, W, L)
            bounded = self._bound(zl)
            rounded = bounded + (bounded.round() - bounded).detach()  # straight-through rounding
            half_width = (self.levels // 2).float()
            digits = (rounded.detach() + half_width).round().long()  # (B, H, W, L) in [0, level)
            codes = (digits * self.basis).sum(-1)  # (B, H, W)
            values = rounded / half_width
            quantized = self.out_proj(values.permute(0, 3, 1, 2).contiguous().to(dtype))  # same layout as lookup()
        zero = torch.zeros((), device=z.device)
        return Quantized(quantized, zero, codes, zero)

    def codes_to_digits(self, codes: torch.Tensor) -> torch.Tensor:
        return (codes[..., None] // self.basis) % self.levels  # (..., L)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        values = self._digits_to_values(self.codes_to_digits(codes))  # (B, H, W, L)
        with torch.autocast(device_type=codes.device.type, enabled=False):
            return self.out_proj(values.permute(0, 3, 1, 2).contiguous().to(self.in_proj.weight.dtype))
