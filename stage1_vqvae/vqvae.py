"""The stage-1 LightningModule: VQ-VAE losses, metrics, logging, and the codes interface.

``forward`` reads like the paper: ``z = encoder(images)``, ``q = quantizer(z)``, ``recon = decoder(q)``.
``encode_to_codes(images) -> codes (B, H, W)`` and ``decode_codes(codes) -> images`` are what the rest
of the pipeline uses (they live in :class:`stage1_vqvae.model.VQModel`, which this module extends);
``load_stage1`` rebuilds the plain network from a checkpoint read weights-only, Lightning's
``load_from_checkpoint`` the whole module (training, resume). With ``adversarial_weight > 0`` the module also
holds a PatchGAN discriminator (:mod:`stage1_vqvae.discriminator`; VQGAN's adversarial loss), trained in the same
single optimiser step as the network.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric
from torchmetrics.image import PeakSignalNoiseRatio

from common.grids import make_grid
from common.logging import log_histogram, log_image, metrics_step
from common.optim import adamw_warmup_cosine, check_optimiser, time_budget_progress
from common.precision import fp32_metrics
from stage1_vqvae.discriminator import PatchDiscriminator, adaptive_weight, adversarial_losses, check_adversarial
from stage1_vqvae.metrics import SSIM
from stage1_vqvae.model import VQModel


class CodeUsage(Metric):
    """Counts of each code over an epoch (summed across DDP ranks): perplexity, used fraction."""

    full_state_update = False

    def __init__(self, codebook_size: int) -> None:
        super().__init__()
        self.codebook_size = codebook_size
        self.add_state("counts", default=torch.zeros(codebook_size, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, codes: torch.Tensor) -> None:
        self.counts += torch.bincount(codes.flatten(), minlength=self.codebook_size)

    def compute(self) -> dict[str, torch.Tensor]:
        p = self.counts.float() / self.counts.sum().clamp(min=1)
        entropy = -(p * torch.log(p.clamp(min=1e-12))).sum()
        # counts too: after compute() `self.counts` holds this rank's counts again, not the sum over ranks
        return {"perplexity": entropy.exp(), "usage": (self.counts > 0).float().mean(), "counts": self.counts.clone()}


class VQVAE(VQModel, pl.LightningModule):
    """VQ-VAE with a VQ (EMA or loss-learned codebook) or FSQ bottleneck: the network is the plain
    :class:`stage1_vqvae.model.VQModel` (same state-dict keys); this class adds losses, metrics, logging.

    Args:
        in_channels: image channels (linked from the data; no default).
        image_size: image side in pixels (linked from the data; no default).
        width: channels of the encoder/decoder at the bottleneck resolution.
        res_blocks: residual blocks in the encoder and in the decoder.
        res_width: bottleneck width of each residual block.
        downsample: 2, 4, 8 or 16: the code grid is image_size / downsample on a side.
        code_dim: channels of the features that are quantized.
        quantizer: "vq" or "fsq".
        codebook_size: K for "vq" (for "fsq" it is prod(fsq_levels)).
        beta: commitment weight. decay, ema, kmeans_init, restart_threshold, lookup_dim, l2_normalize,
            rotation_trick: see :class:`stage1_vqvae.quantizer.VectorQuantizer`.
        fsq_levels: levels per channel for "fsq".
        levels: None for one level, or a list of levels (VQ-VAE-2), e.g. ``[{name: bottom, downsample: 4,
            codebook_size: 512}, {name: top, downsample: 8, codebook_size: 512}]``: each level's downsample is
            2-16 times the one below; codebook_size and fsq_levels default to the flat arguments, which
            ``downsample`` is ignored beside. Metrics are logged per level (``val/usage/top`` ...).
        condition_levels: with levels, quantize each level below the top from its features joined with the
            upsampled quantized level above (VQ-VAE-2's bottom conditioned on the top), so the lower level
            codes what the upper one leaves out; off: the levels are quantized independently.
        lr, weight_decay: AdamW. warmup_steps: linear warm-up. cosine: cosine decay to 0 over the run.
        channels_last: use the channels_last memory format (faster convolutions on many CPUs/GPUs).
        adversarial_weight: VQGAN's adversarial loss, times taming's adaptive weight; 0 (default): off, no
            discriminator at all (the network, its weights and its losses are as without the option).
        adversarial_start: the global step from which the adversarial terms count (taming's disc_start).
        discriminator_width: channels of the PatchGAN's first layer (doubled per layer, at most 8x).
    """

    monitor = ("val/psnr", "max")

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
        lr: float = 2e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 100,
        cosine: bool = True,
        channels_last: bool = False,
        adversarial_weight: float = 0.0,
        adversarial_start: int = 1000,
        discriminator_width: int = 64,
    ) -> None:
        check_optimiser(lr, weight_decay, warmup_steps)  # the network's: VQModel's check_arguments
        check_adversarial(adversarial_weight, adversarial_start, discriminator_width)
        if condition_levels and not (levels and len(levels) > 1):  # it did nothing, without a word
            raise ValueError("--model.condition_levels conditions each level on the one above: it needs two or more "
                             "--model.levels; drop it or add levels")  # fmt: skip
        super().__init__(
            in_channels, image_size, width, res_blocks, res_width, downsample, code_dim, quantizer, codebook_size,
            beta, ema, decay, kmeans_init, restart_threshold, lookup_dim, l2_normalize, rotation_trick, fsq_levels,
            levels, condition_levels,
        )  # fmt: skip  (VQModel's, then LightningModule's __init__)
        self.save_hyperparameters()
        self.val_psnr = PeakSignalNoiseRatio(data_range=2.0)  # images live in [-1, 1]
        self.val_ssim = SSIM(data_range=2.0)  # over valid windows (stage1_vqvae.metrics)
        self.val_usage = nn.ModuleList(CodeUsage(level["codebook_size"]) for level in self.levels)  # top first
        self._val_preview: torch.Tensor | None = None
        # Only when on: off, the state-dict keys (and checkpoints) are those from before the option existed. Made
        # last, on a fork of the RNG: the network's initial weights and every later draw (k-means, restarts) are
        # the same either way, so a run trains exactly as with the option off until adversarial_start.
        self.discriminator: PatchDiscriminator | None = None
        if adversarial_weight > 0:
            with torch.random.fork_rng(devices=[]):
                self.discriminator = PatchDiscriminator(self.in_channels, self.image_size, discriminator_width)

    # ------------------------------------------------------------------ training
    def _prep(self, images: torch.Tensor) -> torch.Tensor:
        return images.contiguous(memory_format=torch.channels_last) if self.hparams.channels_last else images

    def on_fit_start(self) -> None:
        if self.hparams.channels_last:
            self.to(memory_format=torch.channels_last)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images = self._prep(batch[0])
        recon, qs = self(images)
        recon_loss = F.mse_loss(recon.float(), images.float())
        loss = recon_loss + sum(q.loss for q in qs)
        metrics = {"train/loss": loss, "train/recon": recon_loss}
        if self.discriminator is not None:
            adversarial, adv_metrics = self._adversarial(images, recon, recon_loss)
            loss = loss + adversarial  # train/loss stays the VQ-VAE's (comparable with the option off)
            self.log_dict(adv_metrics, on_step=True, on_epoch=False)  # off the progress line, which is full
        for level, q in zip(self.levels, qs):
            counts = torch.bincount(q.codes.flatten(), minlength=level["codebook_size"]).float()
            p = counts / counts.sum()
            metrics[self._per_level("train/commitment", level)] = q.commitment
            metrics[self._per_level("train/perplexity", level)] = torch.exp(-(p * torch.log(p.clamp(min=1e-12))).sum())
        self.log_dict(metrics, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def _adversarial(self, images: torch.Tensor, recon: torch.Tensor,
                     recon_loss: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
        """(lambda * g_loss + d_loss, their metrics): both players' terms for the one backward of automatic
        optimisation (one optimiser, so Lightning's accumulation, precision, clipping, resume and DDP apply as
        they are); each term reaches only its own player (`adversarial_losses`)."""
        if self.global_step < self.hparams.adversarial_start:
            # Not yet (taming's disc_start: both terms off). A zero gradient for every discriminator parameter,
            # without running it, keeps DDP's default (find_unused_parameters=False) working.
            return 0.0 * sum(p.sum() for p in self.discriminator.parameters()), {}
        g_loss, d_loss, logits_real, logits_fake = adversarial_losses(self.discriminator, images, recon)
        lam = self.hparams.adversarial_weight * adaptive_weight(recon_loss, g_loss, self.decoder.head.weight)
        metrics = {"train/adv_g": g_loss, "train/adv_d": d_loss, "train/adv_lambda": lam,
                   "train/logits_real": logits_real.mean(), "train/logits_fake": logits_fake.mean()}  # fmt: skip
        return lam * g_loss + d_loss, {k: v.detach() for k, v in metrics.items()}

    def _per_level(self, key: str, level: dict) -> str:
        """One level keeps the names dashboards had before levels (val/usage); more get val/usage/<name>."""
        return key if len(self.levels) == 1 else f"{key}/{level['name']}"

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        """`train_stage1 test --ckpt_path ...`: the validation figures on the test split, as test/* (`evaluate
        stage1` adds the reconstruction FID)."""
        self._evaluate(batch, batch_idx, "test")

    def _evaluate(self, batch, batch_idx: int, split: str) -> None:
        images = self._prep(batch[0])
        with fp32_metrics(self.device):  # the same figures whatever the training precision (SSIM's convs too)
            recon, qs = self(images)
            recon = recon.float().clamp(-1, 1)
            self.val_psnr(recon, images.float())
            self.val_ssim(recon, images.float())
            loss = F.mse_loss(recon, images.float()) + sum(q.loss for q in qs)
        for usage, q in zip(self.val_usage, qs):
            usage(q.codes)
        self.log(f"{split}/loss", loss, sync_dist=True)
        if batch_idx == 0 and split == "val":
            n = min(8, len(images))
            self._val_preview = torch.cat([images[:n].float(), recon[:n]]).cpu()

    def on_validation_epoch_end(self) -> None:
        self._evaluation_end("val")

    def on_test_epoch_end(self) -> None:
        self._evaluation_end("test")

    def _evaluation_end(self, split: str) -> None:
        self.log_dict({f"{split}/psnr": self.val_psnr, f"{split}/ssim": self.val_ssim}, prog_bar=True)
        histograms, usages = {}, []
        for level, usage, dead in zip(self.levels, self.val_usage, self.dead_codes()):
            stats = usage.compute()
            if split == "val":  # the dashboard's code histograms (validation only)
                histograms[self._per_level("val/code_histogram", level)] = stats["counts"].cpu().numpy()  # all ranks
            usage.reset()
            usages.append(stats["usage"])
            # the same on every rank already (torchmetrics' synced counts, the all-reduced codebook): sync_dist
            # averages equal values and stops Lightning's per-metric warning under DDP
            self.log(self._per_level(f"{split}/perplexity", level), stats["perplexity"], sync_dist=True)
            self.log(self._per_level(f"{split}/usage", level), stats["usage"], prog_bar=len(self.levels) == 1,
                     sync_dist=True)  # fmt: skip
            if dead is not None:  # FSQ has no restarts
                self.log(self._per_level(f"{split}/dead_codes", level), float(dead), sync_dist=True)
        if len(self.levels) > 1:  # the least-used level: what a "codes used" target is about
            self.log(f"{split}/usage", torch.stack(usages).min(), prog_bar=True)
        if split == "val" and self.trainer.is_global_zero and not self.trainer.sanity_checking:
            step = metrics_step(self.trainer)  # the step of this validation's scalars
            for key, counts in histograms.items():
                log_histogram(self.logger, key, counts, step)
            if self._val_preview is not None:
                n = len(self._val_preview) // 2
                grid = make_grid(self._val_preview, nrow=n, scale=2)
                log_image(self.logger, "val/originals_vs_reconstructions", grid, step, "top: originals")

    def configure_optimizers(self):
        hp = self.hparams
        return adamw_warmup_cosine(
            self, hp.lr, hp.weight_decay, hp.warmup_steps, self.trainer.estimated_stepping_batches, hp.cosine,
            # never decay the codebook, nor the discriminator (taming's Adam has no decay; a decayed critic drifts
            # towards 0 logits, which would weaken the generator's signal for no gain)
            no_decay=lambda name, p: p.ndim < 2 or "quantizer" in name or name.startswith("discriminator."),
            time_progress=time_budget_progress(self.trainer),
        )
