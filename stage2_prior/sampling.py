"""Drawing codes from a stage-2 prior (any :class:`stage2_prior.decoding.CodePrior`), torch only.

``filter_logits`` does top-k / top-p (nucleus) filtering. ``sample_codes`` draws codes (n, H, W) in
raster order with temperature, filtering, classifier-free guidance and completion of given codes. Its
fast path (the prior's ``begin``/``step_logits``: a KV cache for the Transformer, per-layer row caches
for the PixelCNN) and its naive path (a full forward over the whole grid at every step,
``use_cache=False``) make the same random draws in the same order, so for the same generator seed they
give identical codes.
"""

from collections.abc import Callable

import torch

from stage2_prior.decoding import CodePrior


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """logits (B, K) -> logits (B, K) with -inf outside the kept set.

    top_k keeps exactly k candidates (ties are broken by ``torch.topk``). top_p keeps the smallest set,
    by descending probability, whose probability mass reaches top_p, and always at least the argmax.
    With both, top_k is applied first and top_p works on the renormalised remainder.
    """
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1 (or None), got {top_k}")
        k = min(int(top_k), logits.shape[-1])
        idx = logits.topk(k, dim=-1).indices  # (B, k)
        drop = torch.ones_like(logits, dtype=torch.bool).scatter(-1, idx, False)
        logits = logits.masked_fill(drop, float("-inf"))
    if top_p is not None:
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (or None), got {top_p}")
        if top_p < 1.0:  # top_p == 1 keeps everything; skip it so rounding cannot drop a token
            probs, order = logits.float().softmax(dim=-1).sort(dim=-1, descending=True, stable=True)
            mass_before = probs.cumsum(dim=-1) - probs  # (B, K): mass of the tokens ranked above
            drop_sorted = mass_before >= top_p
            drop_sorted[..., 0] = False  # always keep the most likely token
            drop = drop_sorted.scatter(-1, order, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
    return logits


CFG_SCHEDULES = ("constant", "linear")
# Below this the scaled logits overflow to inf (1e-300 made every probability NaN); --top_k 1 is the greedy draw.
MIN_TEMPERATURE = 1e-6


def check_cfg_schedule(schedule: str) -> None:
    if schedule not in CFG_SCHEDULES:
        raise ValueError(f"cfg_schedule must be one of {CFG_SCHEDULES}, got {schedule!r}")


def guide(cond: torch.Tensor, uncond: torch.Tensor, cfg_scale: float, schedule: str, done) -> torch.Tensor:
    """Classifier-free guidance: uncond + s * (cond - uncond), logits (B, K) each.

    schedule "constant": s = cfg_scale at every draw. "linear" (MAR, Li et al. 2024): s = 1 + (cfg_scale - 1)
    * done, where done (a float, or (B, 1)) is the fraction of the grid fixed once this draw is made, so the
    first draws, which set the layout, are nearly unguided (diversity) and the last get the full scale.
    """
    check_cfg_schedule(schedule)
    scale = 1 + (cfg_scale - 1) * done if schedule == "linear" else cfg_scale
    return uncond + scale * (cond - uncond)


def scheduled_temperature(temperature: float, temperature_end: float | None, i: int, count: int) -> float:
    """The token temperature of draw i of count: `temperature` throughout (temperature_end None), else linear
    from `temperature` at the first draw to `temperature_end` at the last (raster position, or masked step).
    Rising over the raster order lowered the Transformer's sample FID (README, Sampling)."""
    if temperature_end is None or count < 2:
        return temperature
    return temperature + (temperature_end - temperature) * i / (count - 1)


def _check_inputs(
    prior: CodePrior,
    n: int,
    labels: torch.Tensor | None,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    prime: torch.Tensor | None,
    keep: torch.Tensor | None,
    device: torch.device,
    cfg_schedule: str = "linear",
    temperature_end: float | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Validate the arguments of sample_codes; return labels (n,), prime (n, T), keep (n, T) on device."""
    H, W = prior.grid_shape
    K = prior.codebook_size
    check_cfg_schedule(cfg_schedule)  # checked even without guidance, so a typo never passes silently
    if top_k is not None and not 1 <= top_k <= K:
        raise ValueError(f"top_k must be in [1, {K}] (the codebook size), got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if n <= 0:
        raise ValueError(f"n (number of samples) must be >= 1, got {n}")
    if not temperature >= MIN_TEMPERATURE:
        raise ValueError(f"temperature must be >= {MIN_TEMPERATURE}, got {temperature}")
    if temperature_end is not None and not temperature_end >= MIN_TEMPERATURE:
        raise ValueError(f"temperature_end must be >= {MIN_TEMPERATURE}, got {temperature_end}")
    if labels is not None:
        if prior.num_classes == 0:
            raise ValueError(
                "labels given, but this prior is unconditional (num_classes=0); pass labels=None"
            )
        labels = torch.as_tensor(labels, device=device)
        if labels.shape != (n,) or labels.is_floating_point():
            raise ValueError(f"labels must be an integer tensor of shape ({n},), got {tuple(labels.shape)}")
        bad = labels[(labels < 0) | (labels >= prior.num_classes)]
        if bad.numel():
            raise ValueError(
                f"unknown class id {int(bad[0])}; this prior has {prior.num_classes} classes "
                f"(0..{prior.num_classes - 1})"
            )
        labels = labels.long()
    if (prime is None) != (keep is None):
        raise ValueError("completion needs both prime (codes) and keep (which of them to keep), or neither")
    if prime is not None:
        if tuple(prime.shape) != (n, H, W):
            raise ValueError(f"prime must have shape (n, H, W) = {(n, H, W)}, got {tuple(prime.shape)}")
        if tuple(keep.shape) not in ((n, H, W), (H, W)):
            raise ValueError(f"keep must have shape {(n, H, W)} or {(H, W)}, got {tuple(keep.shape)}")
        if keep.dtype != torch.bool:
            raise ValueError(f"keep must be a bool tensor, got {keep.dtype}")
        prime = prime.to(device=device, dtype=torch.long).reshape(n, H * W)
        keep = keep.to(device).expand(n, H, W).reshape(n, H * W)
        kept = prime[keep]
        if kept.numel() and (kept.min() < 0 or kept.max() >= prior.codebook_size):
            raise ValueError(f"kept prime codes must lie in [0, {prior.codebook_size})")
    return labels, prime, keep


def sample_codes(
    prior: CodePrior,
    n: int,
    labels: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    cfg_scale: float = 1.0,
    cfg_schedule: str = "linear",
    generator: torch.Generator | None = None,
    prime: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
    use_cache: bool = True,
    temperature_end: float | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Draw n grids of codes (n, H, W) from ``prior`` in raster order.

    labels: (n,) class ids in [0, num_classes), or None for the null (unconditional) class.
    cfg_scale: classifier-free guidance, logits = uncond + cfg_scale * (cond - uncond), with the
        conditional and null-label batches run together (2n). 1.0 (the default) means no guidance, and
        so does labels=None (there is nothing to guide towards); 0.0 with cfg_schedule "constant" samples the
        null class (under "linear" the scale moves from 1 towards it over the grid).
    cfg_schedule: "linear" (the default): the scale grows from 1 to cfg_scale over the grid (see ``guide``);
        "constant": cfg_scale at every draw (lower sample FID was measured with linear, README).
    temperature, top_k, top_p: applied in that order to the (guided) logits, see ``filter_logits``.
    temperature_end: None (the default) keeps `temperature` for every code; else the temperature goes
        linearly from `temperature` at the first position to `temperature_end` at the last.
    prime, keep: completion; where keep (n, H, W) or (H, W) is True the code is taken from prime
        (n, H, W) instead of being drawn. A draw is still made there, so the random stream is the
        same whatever is kept.
    generator: the source of every random draw, one ``torch.multinomial`` per position.
    use_cache: False runs the full forward over the whole grid at each step (slow, for checking).
    on_step: called as on_step(t + 1, H * W) after each position is drawn (a progress line; it draws nothing).
    """
    param = next(prior.parameters())
    device = param.device
    labels, prime, keep = _check_inputs(prior, n, labels, temperature, top_k, top_p, prime, keep, device, cfg_schedule,
                                        temperature_end)  # fmt: skip
    H, W = prior.grid_shape
    T = H * W
    guided = labels is not None and cfg_scale != 1.0
    if guided:
        labels = torch.cat([labels, torch.full_like(labels, prior.null_label)])  # (2n,)
    nb = 2 * n if guided else n
    codes = torch.zeros(nb, T, dtype=torch.long, device=device)  # both halves hold the same codes
    grid = codes.view(nb, H, W)

    was_training = prior.training
    prior.eval()
    try:
        with torch.no_grad(), prior.decoding(nb, labels):
            for t in range(T):
                if use_cache:
                    logits = prior.step_logits(codes, t).float()  # (nb, K)
                else:
                    r, c = divmod(t, W)
                    logits = prior(grid, labels)[:, :, r, c].float()
                if guided:
                    cond, uncond = logits.chunk(2)  # (n, K) each
                    logits = guide(cond, uncond, cfg_scale, cfg_schedule, (t + 1) / T)
                temp = scheduled_temperature(temperature, temperature_end, t, T)
                probs = filter_logits(logits / temp, top_k, top_p).softmax(dim=-1)
                drawn = torch.multinomial(probs, 1, generator=generator)[:, 0]  # (n,)
                if keep is not None:
                    drawn = torch.where(keep[:, t], prime[:, t], drawn)
                codes[:, t] = drawn.repeat(nb // n)
                if on_step is not None:
                    on_step(t + 1, T)
    finally:
        prior.train(was_training)
    return codes[:n].view(n, H, W).clone()
