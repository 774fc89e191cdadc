"""AdamW with linear warm-up and cosine decay: the one optimiser setup both stages use."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn


def check_optimiser(lr: float, weight_decay: float, warmup_steps: int) -> None:
    """ValueError naming the --model flag of an optimiser setting adamw_warmup_cosine cannot train with (checked
    when a model is made, before its run folder)."""
    if not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"--model.warmup_steps must be an integer >= 0, got {warmup_steps!r}")
    if not 0 < lr < math.inf:  # NaN and YAML's .inf too: both trained NaN weights and exited 0
        raise ValueError(f"--model.lr must be a finite number > 0, got {lr}")
    if not 0 <= weight_decay < math.inf:
        raise ValueError(f"--model.weight_decay must be a finite number >= 0, got {weight_decay}")


def warmup_length(warmup_steps: int, total_steps: float) -> int:
    """The warm-up a run of `total_steps` gets: `warmup_steps`, but at most half the run, so that the cosine
    has the other half (a run of `inf` steps, cut by time alone, gets all of it)."""
    if not math.isfinite(total_steps):
        return warmup_steps
    return min(warmup_steps, max(1, int(total_steps)) // 2)


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
    time_progress: Callable[[], float] | None = None,
) -> dict:
    """Lightning's configure_optimizers dict. Biases, norms and embeddings-like 1-D params get no decay;
    the learning rate warms up linearly, then follows a cosine from lr down to final_fraction * lr.

    The cosine runs over whichever budget ends first: the steps after warm-up, or `time_progress()` (the
    fraction of a wall-clock budget used, see :func:`time_budget_progress`), so a run cut by the Trainer's
    max_time still ends its schedule at lr * final_fraction instead of stopping at a high learning rate.
    Without a time budget the schedule depends on the step alone (runs are reproducible step for step)."""
    groups: tuple[list, list] = ([], [])
    for name, p in module.named_parameters():
        if p.requires_grad:
            groups[no_decay(name, p)].append(p)
    opt = torch.optim.AdamW(
        [{"params": groups[0], "weight_decay": weight_decay}, {"params": groups[1], "weight_decay": 0.0}],
        lr=lr,
        betas=betas,
    )
    finite = math.isfinite(total_steps)  # max_time with no max_steps/max_epochs: inf steps, time alone
    total = max(1, int(total_steps)) if finite else 1 << 62
    warmup = warmup_length(warmup_steps, total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if not cosine:
            return 1.0
        t = (step - warmup) / max(1, total - warmup)
        if time_progress is not None:
            t = max(t, time_progress())
        t = min(t, 1.0)
        return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def time_budget_progress(trainer) -> Callable[[], float] | None:
    """The fraction of the Trainer's max_time used so far (0..1), or None without one. Reads Lightning's
    Timer callback, which the Trainer adds for max_time and which keeps the time used across a resume;
    duck-typed so that this module never imports Lightning (inference paths import it)."""
    for cb in getattr(trainer, "callbacks", []):
        if callable(getattr(cb, "time_remaining", None)) and cb.time_remaining() is not None:

            def progress(timer=cb) -> float:
                used, left = timer.time_elapsed(), timer.time_remaining()
                return min(1.0, used / max(used + left, 1e-9))

            return progress
    return None
