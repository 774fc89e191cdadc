"""The stage-2 LightningModule: a prior over stage-1 codes.

It wraps one of the networks in ``PRIORS`` (each a :class:`stage2_prior.decoding.CodePrior`: codes
(B, H, W) + labels -> logits (B, K, H, W), plus step decoding), trains it with cross-entropy, reports
NLL in bits per code and in bits per image dimension plus top-1 accuracy, and samples through
:func:`stage2_prior.sampling.sample_codes`. A masked-token prior (``kind: maskgit``,
:mod:`stage2_prior.maskgit`) instead learns the codes at randomly masked positions (cosine schedule),
reports the masked-token NLL in bits and the accuracy there (``val/masked_nll``: not a likelihood), and
samples through :func:`stage2_prior.masked_sampling.sample_masked`.
The checkpoint keeps the codes' metadata (``codes_meta``: the stage-1 checkpoint and its hash, image
size, class names), so ``sample`` needs nothing but the prior checkpoint; ``stage2_prior.build.load_prior``
rebuilds the network from a checkpoint read weights-only. Labels of -1 (unlabelled) train the
unconditional (null) class.
"""

from __future__ import annotations

import inspect
import math

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from common.optim import adamw_warmup_cosine, check_optimiser, time_budget_progress
from common.precision import fp32_metrics
from stage2_prior.build import MASKED_PRIORS, OVERRIDES, PRIORS, build_network, check_levels
from stage2_prior.masked_sampling import sample_masked
from stage2_prior.maskgit import MaskedPrior, masked_token_loss, random_mask
from stage2_prior.sampling import sample_codes


def check_arguments(kind: str, size: str, overrides: dict, label_dropout: float, lr: float, weight_decay: float,
                    warmup_steps: int) -> None:  # fmt: skip
    """ValueError naming the --model flag of the first value no prior can be built (or trained) with, before any
    module is made. `overrides`: n_layer, n_head, n_embd, channels, dropout (None: the named size's)."""
    for flag in ("n_layer", "n_head", "n_embd", "channels"):
        value = overrides.get(flag)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"--model.{flag} must be an integer >= 1 (or null: size {size}'s), got {value!r}")
    for flag, value in (("dropout", overrides.get("dropout") or 0.0), ("label_dropout", label_dropout)):
        if not 0 <= value < 1:  # also NaN
            raise ValueError(f"--model.{flag} must be in [0, 1), got {value}")
    check_optimiser(lr, weight_decay, warmup_steps)
    cls = {**PRIORS, **MASKED_PRIORS}.get(kind)
    if cls is None or size not in cls.sizes:
        return  # build_network names the choices
    takes = inspect.signature(cls.__init__).parameters
    if ignored := [f for f in OVERRIDES if overrides.get(f) is not None and f not in takes]:  # was dropped silently
        raise ValueError(f"--model.{ignored[0]} is not an argument of the {kind} prior, which would ignore it; it "
                         f"takes {', '.join(f'--model.{f}' for f in OVERRIDES if f in takes)}")  # fmt: skip
    # the attention heads split the embedding: what the size gives, with what is overridden
    named = cls.sizes[size]
    given = {**named, **{k: v for k, v in overrides.items() if v is not None}}
    if "n_head" in named and given["n_embd"] % given["n_head"]:
        raise ValueError(f"--model.n_embd {given['n_embd']} must be divisible by --model.n_head {given['n_head']} "
                         f"(size {size} has n_embd {named['n_embd']}, n_head {named['n_head']})")  # fmt: skip


class Prior(pl.LightningModule):
    """Prior over code grids: autoregressive, or masked-token (maskgit).

    Args:
        codebook_size, grid_shape, num_classes: linked from the codes' meta.json — never typed, no defaults.
        kind: "transformer" (GPT-style, KV-cached sampling), "pixelcnn" (gated PixelCNN) or "maskgit"
            (bidirectional Transformer over masked codes, parallel sampling; no exact likelihood).
        size: a named size (tiny, small, base); n_layer/n_head/n_embd/channels override it.
        codes_meta: the codes' meta.json as a dict (linked), kept in the checkpoint for `sample`.
        label_dropout: probability of replacing a label by the null class while training, so that
            classifier-free guidance works at sampling time.
        lr, weight_decay, warmup_steps, cosine: AdamW with linear warm-up and cosine decay.
    """

    throughput_unit = "maps"  # progress lines report code maps/s

    def __init__(
        self,
        codebook_size: int,
        grid_shape: tuple[int, int],
        num_classes: int,
        kind: str = "transformer",
        size: str = "small",
        codes_meta: dict | None = None,
        n_layer: int | None = None,
        n_head: int | None = None,
        n_embd: int | None = None,
        channels: int | None = None,
        dropout: float = 0.0,
        label_dropout: float = 0.1,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        warmup_steps: int = 100,
        cosine: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        check_levels(kind, (codes_meta or {}).get("levels") or [])
        overrides = {k: self.hparams[k] for k in OVERRIDES}  # the same names load_prior reads back
        check_arguments(kind, size, overrides, label_dropout, lr, weight_decay, warmup_steps)
        self.net = build_network(kind, size, codebook_size, grid_shape, num_classes, overrides)
        self.codebook_size = codebook_size
        self.grid_shape = tuple(grid_shape)
        self.num_classes = num_classes
        meta = codes_meta or {}
        # bits per image dimension: a grid's NLL spread over the pixels (x channels) it stands for.
        self.image_dims = int(meta.get("image_size", 0)) ** 2 * int(meta.get("channels", 1)) or None

    @property
    def masked(self) -> bool:
        """A masked-token prior: trained and validated on masked positions only."""
        return isinstance(self.net, MaskedPrior)

    @property
    def monitor(self) -> tuple[str, str]:
        """The metric `best.ckpt` minimises."""
        return ("val/masked_nll", "min") if self.masked else ("val/bits_per_code", "min")

    def forward(self, codes: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(codes, labels)  # (B, K, H, W); autoregressive priors only

    def net_labels(self, labels: torch.Tensor) -> torch.Tensor | None:
        """Class ids for the network: None for an unconditional prior (the network maps -1, unlabelled, to
        its null class)."""
        return labels if self.num_classes > 0 else None

    def _metrics(self, batch, prefix: str, batch_idx: int = 0, drop_labels: bool = False) -> torch.Tensor:
        codes, labels = batch
        labels = self.net_labels(labels)
        if labels is not None and drop_labels and self.hparams.label_dropout > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.hparams.label_dropout
            labels = labels.masked_fill(drop, self.num_classes)  # the null class
        if self.masked:
            return self._masked_metrics(codes, labels, prefix, batch_idx)
        logits = self(codes, labels)
        nll = F.cross_entropy(logits.float(), codes)  # nats per code
        bits_per_code = nll / math.log(2)
        on_step = prefix == "train"
        metrics = {f"{prefix}/bits_per_code": bits_per_code}
        if self.image_dims:
            h, w = self.grid_shape
            metrics[f"{prefix}/bits_per_dim"] = bits_per_code * h * w / self.image_dims
        if prefix != "train":
            metrics[f"{prefix}/accuracy"] = (logits.argmax(1) == codes).float().mean()
        self.log_dict(metrics, prog_bar=True, on_step=on_step, on_epoch=not on_step, sync_dist=not on_step)
        return nll

    def _masked_metrics(self, codes: torch.Tensor, labels: torch.Tensor | None, prefix: str, batch_idx: int):
        """Masked-token cross-entropy under the cosine mask schedule. Validation and test masks are drawn
        from a generator seeded by the batch index, so every validation scores the same masks."""
        gen = None if prefix == "train" else torch.Generator().manual_seed(batch_idx)
        masked = random_mask(codes.shape, gen, codes.device)  # (B, H, W)
        out = masked_token_loss(self.net(codes, masked, labels), codes, masked)
        metrics = {f"{prefix}/masked_nll": out["nll"] / math.log(2)}  # bits per masked code: not a likelihood
        if prefix != "train":
            metrics[f"{prefix}/masked_accuracy"] = out["accuracy"]
        on_step = prefix == "train"
        self.log_dict(metrics, prog_bar=True, on_step=on_step, on_epoch=not on_step, sync_dist=not on_step)
        return out["nll"]

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._metrics(batch, "train", batch_idx, drop_labels=True)

    def validation_step(self, batch, batch_idx: int) -> None:
        with fp32_metrics(self.device):
            self._metrics(batch, "val", batch_idx)

    def test_step(self, batch, batch_idx: int) -> None:
        with fp32_metrics(self.device):
            self._metrics(batch, "test", batch_idx)

    @torch.no_grad()
    def sample(self, n: int, labels: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """Draw n code grids (n, H, W); kwargs go to :func:`stage2_prior.sampling.sample_codes` (or, for a
        masked-token prior, :func:`stage2_prior.masked_sampling.sample_masked`)."""
        if self.masked:
            return sample_masked(self.net, n, labels, **kwargs)
        return sample_codes(self.net, n, labels, **kwargs)

    def configure_optimizers(self):
        hp = self.hparams
        total = self.trainer.estimated_stepping_batches
        return adamw_warmup_cosine(self, hp.lr, hp.weight_decay, hp.warmup_steps, total, hp.cosine,
                                   betas=(0.9, 0.95), final_fraction=0.05,
                                   time_progress=time_budget_progress(self.trainer))  # fmt: skip
