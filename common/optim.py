"""AdamW with linear warm-up and cosine decay: the one optimiser setup both stages use."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn


def adamw_warmup_cosine(
    module: nn.Module,
    lr: float,
    weight_decay: float,
    warmup_steps: int,
    total_steps: int,
    cosine: bool = True,
    betas: tuple[float, float] = (0.9, 0.99),
    final_fraction: float = 0.0,
    no_decay: Callable[[str, nn.Parameter], bool] = lambda name, p: p.ndim < 2,
) -> dict:
    """Lightning's configure_optimizers dict. Biases, norms and embeddings-like 1-D params get no decay;
    the learning rate warms up linearly, then follows a cosine from lr down to final_fraction * lr."""
    groups: tuple[list, list] = ([], [])
    for name, p in module.named_parameters():
        if p.requires_grad:
            groups[no_decay(name, p)].append(p)
    opt = torch.optim.AdamW(
        [{"params": groups[0], "weight_decay": weight_decay}, {"params": groups[1], "weight_decay": 0.0}],
        lr=lr,
        betas=betas,
    )
    total = max(1, int(total_steps))
    warmup = min(warmup_steps, total // 2)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if not cosine:
            return 1.0
        t = min((step - warmup) / max(1, total - warmup), 1.0)
        return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
