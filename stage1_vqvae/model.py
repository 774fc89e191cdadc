"""The stage-1 network without training machinery: encoder -> quantizer -> decoder (torch only).

``encode_to_codes(images) -> codes (B, h, w)`` and ``decode_codes(codes) -> images`` are what the rest of
the pipeline uses. :class:`stage1_vqvae.vqvae.VQVAE` (the LightningModule: losses, metrics, logging) is a
`VQModel` too, with the same state-dict keys, so :func:`load_stage1` rebuilds a plain `VQModel` from any
VQVAE checkpoint, read weights-only, without importing Lightning (the model commands start fast).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.checkpoint import CheckpointError, constructor_args, read_checkpoint
from stage1_vqvae.networks import Decoder, Encoder, latent_size
from stage1_vqvae.quantizer import FSQ, Quantized, VectorQuantizer


class VQModel(nn.Module):
    """VQ-VAE network with a VQ (EMA or loss-learned codebook) or FSQ bottleneck; arguments as
    :class:`stage1_vqvae.vqvae.VQVAE` documents them."""

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        width: int = 128,
        res_blocks: int = 2,
        res_width: int = 64,
        downsample: int = 4,
        code_dim: int = 64,
        quantizer: str = "vq",
        codebook_size: int = 512,
        beta: float = 0.25,
        ema: bool = True,
        decay: float = 0.99,
        kmeans_init: bool = True,
        restart_threshold: float = 1.0,
        lookup_dim: int | None = None,
        l2_normalize: bool = False,
        fsq_levels: list[int] | None = None,
    ) -> None:
        super().__init__()
        self.in_channels, self.image_size = int(in_channels), int(image_size)
        self.encoder = Encoder(in_channels, width, res_blocks, res_width, downsample, code_dim)
        self.decoder = Decoder(in_channels, width, res_blocks, res_width, downsample, code_dim, image_size)
        if quantizer == "vq":
            self.quantizer = VectorQuantizer(
                codebook_size, code_dim, beta, ema, decay, 1e-5, kmeans_init, restart_threshold, lookup_dim,
                l2_normalize,
            )  # fmt: skip
        elif quantizer == "fsq":
            self.quantizer = FSQ(fsq_levels or [8, 5, 5, 5], code_dim)
        else:
            raise ValueError(f"model.quantizer must be 'vq' or 'fsq', got {quantizer!r}")
        self.codebook_size = self.quantizer.codebook_size
        side = latent_size(image_size, downsample)
        self.grid_shape = (side, side)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, Quantized]:
        z = self.encoder(images)  # (B, code_dim, h, w)
        q = self.quantizer(z)
        recon = self.decoder(q.quantized)  # (B, C, H, W)
        return recon, q

    @torch.no_grad()
    def encode_to_codes(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) in [-1, 1] -> codes (B, h, w) long. Deterministic (eval mode)."""
        was_training = self.training
        self.eval()
        codes = self.quantizer(self.encoder(images)).codes
        self.train(was_training)
        return codes

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, h, w) -> images (B, C, H, W) in [-1, 1]."""
        if codes.min() < 0 or codes.max() >= self.codebook_size:
            raise ValueError(f"codes must lie in [0, {self.codebook_size}), got [{codes.min()}, {codes.max()}]")
        return self.decoder(self.quantizer.lookup(codes.long())).clamp(-1, 1)

    def dead_codes(self) -> int:
        """Codes whose EMA usage is under the restart threshold (VQ) — 0 for FSQ, which has no codebook."""
        if isinstance(self.quantizer, VectorQuantizer):
            threshold = max(self.quantizer.restart_threshold, 1e-3)
            return int((self.quantizer.cluster_size < threshold).sum())
        return 0


def load_stage1(path: str | Path, flag: str = "--vqvae") -> tuple[VQModel, dict[str, Any]]:
    """(the stage-1 network rebuilt from a VQVAE checkpoint, read weights-only, on the CPU in eval mode;
    the data module's saved arguments, possibly empty)."""
    ckpt = read_checkpoint(path, flag, want="stage1")
    try:
        model = VQModel(**constructor_args(VQModel, ckpt["hyper_parameters"]))
        model.load_state_dict(ckpt["state_dict"])
    except (TypeError, ValueError, RuntimeError, KeyError) as e:  # missing hparams, shapes that do not fit
        first = str(e).splitlines()[0]
        raise CheckpointError(f"{flag} {path}: cannot rebuild the VQ-VAE from it ({first})") from None
    return model.eval(), dict(ckpt.get("datamodule_hyper_parameters") or {})
