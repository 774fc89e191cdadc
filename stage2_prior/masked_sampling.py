"""Drawing codes from a masked-token prior (:class:`stage2_prior.maskgit.MaskedPrior`) in a few parallel steps.

MaskGIT's iterative decoding (Chang et al. 2022): start with every position masked (or, for repair, the
positions not kept); at each of S steps run the network once, draw a code at every masked position from
the (guided, temperature-scaled, filtered) distribution, and keep the most confident draws fixed, leaving
floor(n0 * cos(pi/2 * (s + 1) / S)) of the n0 initially masked positions masked for the next step (at
least one fewer each step, none after the last). Confidence is the log-probability of the drawn code
plus Gumbel noise scaled by ``choice_temperature * (1 - (s + 1) / S)`` (the temperature schedule: random
choices early, greedy ones at the end). Fixed codes are never re-masked, and kept codes never change.

A grid with at least 6 masked positions takes exactly S network passes at S = 8 (fewer masked positions
can finish sooner): 8 passes for a 16x16 grid instead of the autoregressive prior's 256.
Torch only.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from stage2_prior.maskgit import MaskedPrior

# the same argument checks and guidance as sample_codes
from stage2_prior.sampling import _check_inputs, filter_logits, guide, scheduled_temperature

DEFAULT_STEPS = 8
# MaskGIT used 4.5 on ImageNet; on Fashion-MNIST's 7x7 codes a more random order gave lower validation FID
# (benchmarks/maskgit_quality.py: 4.5, 16 and 64 tried with and without guidance; 64 best with guidance).
DEFAULT_CHOICE_TEMPERATURE = 64.0


def still_masked(n0: torch.Tensor, now: torch.Tensor, step: int, steps: int) -> torch.Tensor:
    """(n,) how many positions stay masked after `step` (0-based): the cosine schedule applied to the n0
    positions masked at the start, at least one fewer than `now`, 0 after the last step."""
    if step >= steps - 1:
        return torch.zeros_like(now)
    target = torch.floor(n0.double() * math.cos(math.pi / 2 * (step + 1) / steps)).long()
    return torch.minimum(target, now - 1).clamp(min=0)


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One code per row of probs (M, K) by inverse-CDF sampling: one uniform per row, so it costs a
    cumulative sum instead of K random numbers per row (torch.multinomial). Never a zero-probability code."""
    cdf = probs.cumsum(dim=-1)  # (M, K)
    total = cdf[:, -1:]
    u = torch.rand(total.shape, generator=generator, device=probs.device, dtype=cdf.dtype) * total
    u = torch.minimum(u, total * (1 - 2.0**-23))  # strictly below the last positive code's cdf (fp32 rounding)
    return torch.searchsorted(cdf, u, right=True)  # (M, 1): the first code whose cdf exceeds u


@torch.no_grad()
def sample_masked(
    prior: MaskedPrior,
    n: int,
    labels: torch.Tensor | None = None,
    *,
    steps: int = DEFAULT_STEPS,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    cfg_scale: float = 1.0,
    cfg_schedule: str = "linear",
    choice_temperature: float = DEFAULT_CHOICE_TEMPERATURE,
    generator: torch.Generator | None = None,
    prime: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
    temperature_end: float | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Draw n grids of codes (n, H, W) in `steps` parallel steps (one network pass each).

    labels: (n,) class ids or None (the null class). cfg_scale: classifier-free guidance,
        logits = uncond + cfg_scale * (cond - uncond), both halves in one pass of 2n (1.0: off).
    cfg_schedule: "linear" (the default): a grid's scale grows from 1 to cfg_scale with the fraction of its
        codes fixed after each step (see ``stage2_prior.sampling.guide``); "constant": cfg_scale throughout.
    temperature, top_k, top_p: applied in that order to the guided logits of each draw.
    temperature_end: None keeps `temperature` at every step; else linear from `temperature` at the first step
        to `temperature_end` at the last (falling lowered this prior's FID; README, Sampling).
    choice_temperature: the scale of the Gumbel noise on the confidences at the first step; it falls
        linearly to 0 at the last.
    prime, keep: repair; where keep (n, H, W) or (H, W) is True the code is prime's and stays exactly that,
        the others are drawn with context from every side.
    generator: the source of every random draw (the codes, then the confidence noise, each step).
    on_step: called as on_step(step + 1, steps) after each step (a progress line; it draws nothing).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if choice_temperature < 0:
        raise ValueError(f"choice_temperature must be >= 0, got {choice_temperature}")
    device = next(prior.parameters()).device
    labels, prime, keep = _check_inputs(prior, n, labels, temperature, top_k, top_p, prime, keep, device, cfg_schedule,
                                        temperature_end)  # fmt: skip
    H, W = prior.grid_shape
    T = H * W
    guided = labels is not None and cfg_scale != 1.0
    net_labels = torch.cat([labels, torch.full_like(labels, prior.null_label)]) if guided else labels
    codes = torch.zeros(n, T, dtype=torch.long, device=device)
    masked = torch.ones(n, T, dtype=torch.bool, device=device)
    if keep is not None:
        codes, masked = torch.where(keep, prime, codes), ~keep
    n0 = masked.sum(1)  # (n,)

    was_training = prior.training
    prior.eval()
    try:
        for step in range(steps):
            if not masked.any():
                break
            left = still_masked(n0, masked.sum(1), step, steps)  # (n,) masked after this step
            x, m = (codes.repeat(2, 1), masked.repeat(2, 1)) if guided else (codes, masked)
            logits = prior.masked_logits(x.view(-1, H, W), m.view(-1, H, W), net_labels).float()  # (M or 2M, K)
            if guided:
                cond, uncond = logits.chunk(2)  # (M, K) each: both halves hold the same masked positions
                done = (1 - left.float() / T)[:, None].expand_as(masked)[masked][:, None]  # (M, 1): per grid
                logits = guide(cond, uncond, cfg_scale, cfg_schedule, done)
            temp = scheduled_temperature(temperature, temperature_end, step, steps)
            probs = filter_logits(logits / temp, top_k, top_p).softmax(dim=-1)  # (M, K)
            drawn = draw(probs, generator)  # (M, 1)
            confidence = torch.full((n, T), float("inf"), device=device)  # known codes: never re-masked
            confidence[masked] = probs.gather(1, drawn)[:, 0].log()
            codes = codes.masked_scatter(masked, drawn[:, 0])
            u = torch.rand(n, T, generator=generator, device=device).clamp_(min=1e-20)  # Gumbel: -log(-log u)
            confidence = confidence - choice_temperature * (1 - (step + 1) / steps) * torch.log(-torch.log(u))
            ranks = confidence.argsort(dim=1, stable=True).argsort(dim=1)  # 0: the least confident
            masked = ranks < left[:, None]
            if on_step is not None:
                on_step(step + 1, steps)
    finally:
        prior.train(was_training)
    if keep is not None:
        codes = torch.where(keep, prime, codes)  # unchanged by construction; made explicit
    return codes.view(n, H, W)
