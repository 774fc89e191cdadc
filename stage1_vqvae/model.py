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

from common.checkpoint import (
    TRAINING_ONLY_PREFIXES,
    CheckpointError,
    CheckpointFile,
    constructor_args,
    read_checkpoint,
    rebuild_reason,
)
from common.codes import sequence_shape, split_levels
from stage1_vqvae.arguments import check_arguments, level_specs
from stage1_vqvae.networks import Decoder, Encoder, latent_size
from stage1_vqvae.quantizer import FSQ, Quantized, VectorQuantizer

# Pixels one pass of `encode_to_codes` / `decode_codes` takes at most (benchmarks/coding_passes.py, 2-core CPU,
# 512 images): on a CPU passes of 256k pixels (334 images at 28 px, 64 at 64 px, 4 at 256 px) keep the
# activations in cache and under glibc's mmap threshold: encoding 1.27x / 1.51x / 2.3x as fast as one pass
# at 64 / 128 / 256 px (28 px unchanged), and at 256 px 1.1 GB instead of 6.5. On a GPU the bound only keeps
# memory in reach (2 GB an activation at width 128) and leaves every measured batch (8,192 at 28 px) whole.
PIXELS_PER_PASS = {"cpu": 1 << 18, "cuda": 1 << 24}
class VQModel(nn.Module):
    """VQ-VAE network with a VQ (EMA or loss-learned codebook) or FSQ bottleneck, on one level or on a
    hierarchy of levels (VQ-VAE-2); arguments as :class:`stage1_vqvae.vqvae.VQVAE` documents them.

    With levels, each level above the bottom encodes the features of the level below further (``level_encoders``),
    has its own quantizer, and is upsampled back to the bottom grid (``level_upsamplers``); the decoder reads
    the bottom's quantized features concatenated with the upsampled ones. With ``condition_levels`` (VQ-VAE-2's
    design) each level below the top is quantized from its features joined with the level above's quantized
    ones (``level_conditioners``). The codes the rest of the pipeline
    sees are then one flat sequence per image, top level first: ``grid_shape == (1, T)`` with T the sum of
    the levels' h * w (``levels`` lists them; :func:`common.codes.split_levels` cuts a sequence back). One
    level is the same code path with one entry, its codes (B, h, w), state-dict keys as before levels existed.
    """

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
        rotation_trick: bool = False,
        fsq_levels: list[int] | None = None,
        levels: list[dict] | None = None,
        condition_levels: bool = False,
    ) -> None:
        super().__init__()
        check_arguments(width, res_blocks, res_width, downsample, code_dim, quantizer, codebook_size, beta, decay,
                        restart_threshold, lookup_dim, fsq_levels, levels)  # fmt: skip
        self.in_channels, self.image_size = int(in_channels), int(image_size)
        specs = level_specs(levels, downsample, codebook_size, fsq_levels)  # bottom first
        for spec in specs:  # each halving floors the side (networks.latent_size): image_size // downsample
            side, f = self.image_size, spec["downsample"]
            if side // f < 1:
                what = "--model.downsample" if not levels else f"--model.levels: level {spec['name']}'s downsample"
                raise ValueError(f"{what} {f} leaves no code grid of {side}-px images ({side} // {f} = 0); "
                                 f"use at most {side}")  # fmt: skip

        def make_quantizer(spec: dict) -> nn.Module:
            if quantizer == "vq":
                return VectorQuantizer(spec["codebook_size"], code_dim, beta, ema, decay, 1e-5, kmeans_init,
                                       restart_threshold, lookup_dim, l2_normalize, rotation_trick)  # fmt: skip
            return FSQ(spec["fsq_levels"] or [8, 5, 5, 5], code_dim)  # quantizer "fsq": check_arguments

        f0 = specs[0]["downsample"]
        # encoder, decoder, quantizer: the order one-level models always drew their initial weights in
        self.encoder = Encoder(in_channels, width, res_blocks, res_width, f0, code_dim)
        self.decoder = Decoder(in_channels, width, res_blocks, res_width, f0, code_dim * len(specs), image_size)
        self.quantizer = make_quantizer(specs[0])
        bottom_side = latent_size(image_size, f0)
        self.level_encoders = nn.ModuleList(
            Encoder(code_dim, width, res_blocks, res_width, above["downsample"] // below["downsample"], code_dim)
            for below, above in zip(specs, specs[1:])
        )  # fmt: skip
        self.level_quantizers = nn.ModuleList(make_quantizer(s) for s in specs[1:])
        self.level_upsamplers = nn.ModuleList(
            Decoder(code_dim, width, res_blocks, res_width, s["downsample"] // f0, code_dim, bottom_side)
            for s in specs[1:]
        )  # fmt: skip
        quantizers = [self.quantizer, *self.level_quantizers]
        # The public order, as codes, meta.json and priors see the levels: top (coarsest) first.
        self.levels = [
            {"name": s["name"], "grid_shape": (latent_size(image_size, s["downsample"]),) * 2,
             "codebook_size": q.codebook_size}
            for s, q in zip(specs, quantizers)
        ][::-1]  # fmt: skip
        self.codebook_size = max(level["codebook_size"] for level in self.levels)
        self.grid_shape = sequence_shape(self.levels)
        # VQ-VAE-2's conditioning (made last, so the modules above draw the same initial weights either way):
        # each level below the top is quantized from its features joined with the level above's quantized
        # features, upsampled to its grid, so it codes what the level above leaves out.
        self.condition_levels = bool(condition_levels) and len(specs) > 1
        if self.condition_levels:
            self.level_conditioners = nn.ModuleList(
                nn.ModuleDict({
                    "up": Decoder(code_dim, width, res_blocks, res_width, above["downsample"] // below["downsample"],
                                  code_dim, latent_size(image_size, below["downsample"])),
                    "join": nn.Conv2d(2 * code_dim, code_dim, 1),
                })
                for below, above in zip(specs, specs[1:])
            )  # fmt: skip

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _quantizers_top_first(self) -> list[nn.Module]:
        return [*self.level_quantizers][::-1] + [self.quantizer]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, list[Quantized]]:
        """images -> (reconstructions (B, C, H, W), one Quantized per level, top first)."""
        qs = self.quantize(images)
        return self._decode([q.quantized for q in qs]), qs[::-1]  # (B, C, H, W), top first

    def quantize(self, images: torch.Tensor) -> list[Quantized]:
        """images -> one Quantized per level, bottom first: the encoders and quantizers of `forward`."""
        zs = [self.encoder(images)]  # (B, code_dim, h0, w0)
        for enc in self.level_encoders:
            zs.append(enc(zs[-1]))  # (B, code_dim, h_i, w_i), coarser each time
        quantizers = [self.quantizer, *self.level_quantizers]
        if not self.condition_levels:
            qs = [q(z) for q, z in zip(quantizers, zs)]
        else:  # top down: each level below sees the one above's quantized features
            qs = [quantizers[-1](zs[-1])]
            for i in range(len(zs) - 2, -1, -1):
                cond = self.level_conditioners[i]
                joined = cond["join"](torch.cat([zs[i], cond["up"](qs[0].quantized)], 1))  # (B, code_dim, h_i, w_i)
                qs.insert(0, quantizers[i](joined))
        return qs

    def _decode(self, quantized: list[torch.Tensor]) -> torch.Tensor:
        """Quantized features bottom first -> images; upper levels are upsampled to the bottom grid."""
        parts = [quantized[0]] + [up(q) for up, q in zip(self.level_upsamplers, quantized[1:])]
        return self.decoder(torch.cat(parts, 1) if len(parts) > 1 else parts[0])

    pixels_per_pass: int | None = None  # overrides PIXELS_PER_PASS for this model (benchmarks, tests)

    def images_per_pass(self) -> int:
        """How many images one network pass of `encode_to_codes` / `decode_codes` takes (PIXELS_PER_PASS)."""
        budget = self.pixels_per_pass or PIXELS_PER_PASS.get(self.device.type, PIXELS_PER_PASS["cuda"])
        return max(1, budget // self.image_size**2)

    def _model_images(self, images: torch.Tensor) -> torch.Tensor:
        """images as this model takes them, on its device and in its dtype; ValueError saying what differs."""
        c, s = self.in_channels, self.image_size
        if not isinstance(images, torch.Tensor) or not images.is_floating_point():
            got = images.dtype if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be a float tensor (B, {c}, {s}, {s}) in [-1, 1], got {got} (uint8 "
                             "pixels: common.images.from_uint8; a file: common.images.load_image)")  # fmt: skip
        if images.dim() != 4 or tuple(images.shape[1:]) != (c, s, s):
            raise ValueError(f"images must have shape (B, {c}, {s}, {s}) for this model, got {tuple(images.shape)}")
        if images.numel():  # one pass, no copy of the batch (abs() made one: 400 MB for 512 images at 256 px)
            lo, hi = torch.aminmax(images)
            if not (lo >= -1.01 and hi <= 1.01):  # NaN fails too; 1.01: rounding of a rescale
                raise ValueError(f"images must lie in [-1, 1], got [{lo}, {hi}] (from [0, 1]: images * 2 - 1; "
                                 "uint8 pixels: common.images.from_uint8)")  # fmt: skip
        return images.to(self.device, next(self.parameters()).dtype)

    @torch.no_grad()
    def encode_to_codes(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) in [-1, 1] (floats; [0, 1] would be encoded as dark images) -> codes
        (B, *grid_shape) long on the model's device. Deterministic (eval mode); no gradient.

        Any B (0 too): the batch is encoded in passes of `images_per_pass` images, without the decoder."""
        images = self._model_images(images)
        if not len(images):
            return torch.zeros(0, *self.grid_shape, dtype=torch.long, device=images.device)
        was_training = self.training
        self.eval()
        try:
            parts = [self.join_codes([q.codes for q in self.quantize(x)[::-1]])
                     for x in images.split(self.images_per_pass())]  # fmt: skip
        finally:
            self.train(was_training)
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def join_codes(self, levels: list[torch.Tensor]) -> torch.Tensor:
        """One (B, h_i, w_i) tensor per level, top first -> codes (B, *grid_shape); undoes `split_codes`."""
        return levels[0] if len(levels) == 1 else torch.cat([c.flatten(1) for c in levels], 1).unsqueeze(1)

    def split_codes(self, codes: torch.Tensor) -> list[torch.Tensor]:
        """codes (B, *grid_shape) -> one (B, h_i, w_i) tensor per level, top first."""
        return split_levels(codes, self.levels)

    def _checked_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """codes of any integer dtype -> long on the model's device; ValueError for a wrong shape or range."""
        codes = torch.as_tensor(codes)
        if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise ValueError(f"codes must be integers, got {codes.dtype}")
        codes = codes.to(self.device, torch.long)
        if codes.shape[1:] != self.grid_shape:
            raise ValueError(f"codes must have shape (B, *{self.grid_shape}), got {tuple(codes.shape)}")
        for level, c in zip(self.levels, self.split_codes(codes)):
            k = level["codebook_size"]
            if c.numel() and (c.min() < 0 or c.max() >= k):
                raise ValueError(f"codes of level {level['name']} must lie in [0, {k}), got [{c.min()}, {c.max()}]")
        return codes

    # Latent editing (a notebook): codes -> features -> images with gradients, and features back to codes
    def codes_to_features(self, codes: torch.Tensor) -> list[torch.Tensor]:
        """codes (B, *grid_shape) -> the quantized features the decoder takes, one (B, code_dim, h_i, w_i) tensor
        per level, top first (what `decode_features` takes; an edit by gradient starts from them, detached:
        ``[f.detach().requires_grad_() for f in ...]``)."""
        return self._features(self._checked_codes(codes))

    def _features(self, codes: torch.Tensor) -> list[torch.Tensor]:
        """codes_to_features for codes already checked (long, on the model's device)."""
        return [q.lookup(c) for q, c in zip(self._quantizers_top_first(), self.split_codes(codes))]

    def decode_features(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Features of each level, top first (`codes_to_features`, edited or not) -> images (B, C, H, W), with
        gradients, in one pass and not clamped: `decode_codes` without its no_grad, passes and clamp."""
        return self._decode(list(features)[::-1])

    @torch.no_grad()
    def features_to_codes(self, features: list[torch.Tensor]) -> torch.Tensor:
        """Features of each level, top first -> the codes (B, *grid_shape) whose features are nearest (squared
        distance), without the codebook updates and restarts of a training forward; codes_to_features's back."""
        codes = []
        for q, f, level in zip(self._quantizers_top_first(), features, self.levels):
            k = level["codebook_size"]
            table = q.lookup(torch.arange(k, device=f.device).view(1, k, 1))[0, :, :, 0].t()  # (K, code_dim)
            flat = f.detach().permute(0, 2, 3, 1).reshape(-1, f.shape[1])  # (B*h*w, code_dim)
            nearest = torch.cdist(flat.float(), table.float()).argmin(1)  # (B*h*w,), fp32 whatever the cast
            codes.append(nearest.view(f.shape[0], f.shape[2], f.shape[3]))
        return self.join_codes(codes)

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, *grid_shape), integers of any dtype (the uint16 arrays of common.codes too) -> images
        (B, C, H, W) in [-1, 1] on the model's device, decoded in passes of `images_per_pass`; no gradient
        (with one: ``decode_features(codes_to_features(codes))``)."""
        codes = self._checked_codes(codes)
        images = None  # (B, C, H, W), filled pass by pass (a torch.cat of the passes would hold them twice)
        n = self.images_per_pass()
        for start in range(0, max(len(codes), 1), n):
            decoded = self.decode_features(self._features(codes[start : start + n])).clamp_(-1, 1)  # checked above
            if images is None:
                images = decoded.new_empty(len(codes), *decoded.shape[1:])
            images[start : start + n] = decoded
        return images

    def dead_codes(self) -> list[int | None]:
        """Per level, top first: codes whose EMA usage is under the restart threshold; None for FSQ, which has
        no restarts (it read 0, "codes awaiting restart 0", as if it had been checked)."""
        out: list[int | None] = []
        for q in self._quantizers_top_first():
            if isinstance(q, VectorQuantizer):
                out.append(int((q.cluster_size < max(q.restart_threshold, 1e-3)).sum()))
            else:
                out.append(None)
        return out


def load_stage1(path: str | Path | CheckpointFile, flag: str = "--vqvae") -> tuple[VQModel, dict[str, Any]]:
    """(the stage-1 network rebuilt from a VQVAE checkpoint, read weights-only, on the CPU in eval mode;
    the data module's saved arguments, possibly empty). A `CheckpointFile` is loaded through its open file, whose
    `sha256` is then the hash of these very weights."""
    ckpt = read_checkpoint(path, flag, want="stage1")
    try:
        model = VQModel(**constructor_args(VQModel, ckpt["hyper_parameters"]))
        weights = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith(TRAINING_ONLY_PREFIXES)}
        model.load_state_dict(weights)
    except (TypeError, ValueError, RuntimeError, KeyError) as e:  # missing hparams, shapes that do not fit
        raise CheckpointError(f"{flag} {path}: cannot rebuild the VQ-VAE from it ({rebuild_reason(e)})") from None
    return model.eval(), dict(ckpt.get("datamodule_hyper_parameters") or {})
