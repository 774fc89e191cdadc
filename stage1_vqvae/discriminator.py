"""The opt-in adversarial loss of stage 1 (VQGAN, Esser et al. 2021): a PatchGAN discriminator and its losses
(torch only).

``PatchDiscriminator(images) -> logits (B, 1, h, w)``: one real/fake logit per overlapping patch (Isola et al.
2017; taming-transformers' NLayerDiscriminator). The discriminator trains on the hinge loss, the encoder and
decoder on ``-mean(D(recon))`` weighted by taming's adaptive weight (:func:`adaptive_weight`). Only
:class:`stage1_vqvae.vqvae.VQVAE` (the LightningModule) holds one; the plain network
(:class:`stage1_vqvae.model.VQModel`) never does, and ``load_stage1`` drops its weights.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MAX_WIDTH_FACTOR = 8  # taming's cap on the width doubling (64 -> 512 channels)


def check_adversarial(weight: float, start: int, width: int) -> None:
    """ValueError naming the --model flag of an adversarial setting that cannot train (before any module is made)."""
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not 0 <= weight < math.inf:
        raise ValueError(f"--model.adversarial_weight must be a finite number >= 0 (0: off), got {weight!r}")
    for flag, value, least in (("adversarial_start", start, 0), ("discriminator_width", width, 1)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
            raise ValueError(f"--model.{flag} must be an integer >= {least}, got {value!r}")


def stride2_layers(image_size: int) -> int:
    """Halvings before the two stride-1 convolutions: 2 up to 32 px (a 6x6 map of 34-px patches at 32 px, 5x5 at
    28 px), 3 above (taming's 3 at 256 px; at 64 px a 6x6 map). A third halving at 32 px would leave a 2x2 map of
    70-px patches: one judgement of the whole image, not of its textures."""
    return 2 if image_size <= 32 else 3


def _norm(channels: int) -> nn.GroupNorm:
    # GroupNorm, not taming's BatchNorm: per-sample statistics do not depend on the batch, so real and fake images
    # in one batch do not leak into each other's logits (BatchNorm over the concatenated batch lets D tell them
    # apart by batch statistics), and the logits are the same under DDP (no SyncBatchNorm), gradient accumulation,
    # any batch size, and in eval mode; there are no running buffers for the generator's pass to update.
    return nn.GroupNorm(math.gcd(32, channels), channels)


class PatchDiscriminator(nn.Module):
    """images (B, C, S, S) in [-1, 1] -> patch logits (B, 1, h, w): 4x4 convolutions, stride 2 then 1, LeakyReLU
    0.2, width doubling per layer (capped at 8x), GroupNorm after each but the first and the last."""

    def __init__(self, in_channels: int, image_size: int, width: int = 64) -> None:
        super().__init__()
        n = stride2_layers(image_size)
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]  # (B, w, S/2, S/2)
        c_in = width
        for i in range(1, n + 1):  # n - 1 more halvings, then one stride-1 layer (taming's layout)
            c_out = width * min(2**i, MAX_WIDTH_FACTOR)
            stride = 2 if i < n else 1
            layers += [nn.Conv2d(c_in, c_out, 4, stride, 1, bias=False), _norm(c_out), nn.LeakyReLU(0.2)]
            c_in = c_out  # (B, c_out, S/2^(i+1), ...), the last one 1 px smaller instead
        layers.append(nn.Conv2d(c_in, 1, 4, 1, 1))  # (B, 1, h, w): one logit per patch, 1 px smaller again
        self.net = nn.Sequential(*layers)

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """The discriminator's hinge loss (taming): 0 once real logits are >= 1 and fake ones <= -1."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adversarial_losses(disc: nn.Module, images: Tensor, recon: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(g_loss, d_loss, real logits, fake logits) for one simultaneous step of both players, each loss reaching only
    its own player, so that one backward of their sum trains both (tests/test_adversarial.py checks it):

    * g_loss = -mean(D(recon)) runs D on detached copies of its parameters: gradients reach the encoder and
      decoder (through recon), never D;
    * d_loss, the hinge loss, runs D on the detached reconstructions: gradients reach D, never the network."""
    frozen = {name: p.detach() for name, p in disc.named_parameters()}
    g_loss = -torch.func.functional_call(disc, frozen, (recon,)).float().mean()
    # real and fake in one pass: GroupNorm normalises each image alone, so this equals two passes
    logits = disc(torch.cat([images, recon.detach().to(images.dtype)])).float()  # (2B, 1, h, w)
    logits_real, logits_fake = logits.chunk(2)  # (B, 1, h, w) each
    return g_loss, hinge_d_loss(logits_real, logits_fake), logits_real, logits_fake


def adaptive_weight(recon_loss: Tensor, g_loss: Tensor, last_layer: Tensor, max_weight: float = 1e4) -> Tensor:
    """taming's adaptive weight: ||d recon_loss / d last_layer|| / (||d g_loss / d last_layer|| + 1e-4), clamped
    to [0, max_weight] and detached, so the adversarial gradient at the decoder's last layer is a fixed fraction of
    the reconstruction's whatever their scales. torch.autograd.grad leaves .grad alone and, under DDP, fires no
    gradient hook (no all-reduce: each rank weighs with its own batch's ratio, as taming's does)."""
    (g_recon,) = torch.autograd.grad(recon_loss, last_layer, retain_graph=True)
    (g_adv,) = torch.autograd.grad(g_loss, last_layer, retain_graph=True)
    weight = g_recon.float().norm() / (g_adv.float().norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()
