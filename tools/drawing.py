"""Drawing and completing code grids for the tools, and laying the decoded images out (no Lightning).

    labels, per_row = class_labels(prior.num_classes, label=None, n=16)   # one row per class
    codes = draw_codes(prior, n, labels, opts)                           # opts: sample_codes' keywords
    keep = keep_from_painted(vqvae, painted)                             # pixels painted -> codes kept
    codes = complete_codes(prior, prime, keep, opts)                     # the painted codes re-drawn
    repairs, keep = repair_images(vqvae, prior, image, painted, n, opts)  # all that, to uint8 pixels

`draw_codes` and `complete_codes` are the one place each where the page (`serve`) meets a sampler: the
raster-order sampler for autoregressive priors, the parallel one (``opts["steps"]`` passes) for masked priors.
"""

from __future__ import annotations

import torch

from common.images import from_uint8, to_uint8
from common.memory import available_memory
from stage1_vqvae.model import VQModel
from stage2_prior.decoding import CodePrior
from stage2_prior.masked_sampling import sample_masked
from stage2_prior.maskgit import MaskedPrior
from stage2_prior.sampling import sample_codes
from tools.repair import cell_pixels, codes_to_redraw


def class_labels(num_classes: int, label: int | None, n: int) -> tuple[torch.Tensor | None, int]:
    """(labels (n,) or None, images per grid row). label None: every class in turn, sorted, so the grid has one
    row per class (the labels `sample --n n` draws); a class id: n of that class; unconditional priors: None."""
    if num_classes == 0:
        if label is not None:
            raise ValueError("this prior is unconditional: it has no classes to choose from")
        return None, max(1, int(n**0.5 + 0.999))
    if label is None:
        return labels_in_turn(list(range(num_classes)), n)
    if not 0 <= label < num_classes:
        raise ValueError(f"unknown class id {label}; this prior has {num_classes} classes (0..{num_classes - 1})")
    return torch.full((n,), label, dtype=torch.long), max(1, int(n**0.5 + 0.999))


def labels_in_turn(classes: list[int], n: int) -> tuple[torch.Tensor, int]:
    """(n labels cycling through `classes`, sorted so the grid has one row per class; the longest row)."""
    labels = torch.tensor(classes).repeat(-(-n // len(classes)))[:n].sort().values
    return labels, int(torch.bincount(labels).max())


def labels_in_proportion(counts: list[int], n: int, seed: int) -> torch.Tensor:
    """n labels (sorted) drawn at random in the proportions of `counts` (the training split's count of each
    class): the class mix of the data, which a sample FID against unbalanced data needs (emoji: 59 % "People &
    Body"). Drawn on the CPU from their own generator: the same labels on every device, and the codes'
    generator is left as --seed set it."""
    weights = torch.tensor(counts, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    return torch.multinomial(weights, n, replacement=True, generator=gen).sort().values


def rows_by_label(images: torch.Tensor, labels: torch.Tensor | None, per_row: int) -> torch.Tensor:
    """Lay images out one row per label, padding short rows with blank tiles of the grid's own white (+1: black
    ones looked like failed samples on emoji's white backgrounds)."""
    if labels is None:
        return images
    rows = []
    for c in labels.unique(sorted=True):
        row = images[labels == c]
        blank = torch.full((per_row - len(row), *images.shape[1:]), 1.0)
        rows.append(torch.cat([row, blank]))
    return torch.cat(rows)


MASKED_ONLY = ("steps", "choice_temperature")  # the masked sampler's keywords


def _sampler(prior: CodePrior | MaskedPrior, opts: dict):
    """The sampler for this kind of prior, and its keywords (MASKED_ONLY's are for masked priors only)."""
    if isinstance(prior, MaskedPrior):
        return sample_masked, opts
    return sample_codes, {k: v for k, v in opts.items() if k not in MASKED_ONLY}


def free_memory(device: torch.device) -> int | None:
    """Bytes new tensors on `device` can still take (None: unknown): the process's share of the machine's
    memory on a CPU (common.memory: cgroup limits count), the card's free memory plus what torch's caching
    allocator holds unused on a GPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return available_memory() if device.type == "cpu" else None


def check_decoding_fits(prior: CodePrior | MaskedPrior, n: int, sequences_per_grid: int = 1,
                        remedy: str = "pass --batch_size {fits} or less") -> None:  # fmt: skip
    """Refuse (ValueError, one line ending in `remedy`, given the batch that fits) n grids whose decoding
    caches cannot fit in free memory, with a tenth to spare, before anything is allocated: a batch of 256
    sequences of 1,280 codes at the `base` size needs 5 GiB of K/V (twice that with guidance, which decodes
    each grid twice), and the kernel's OOM kill, or CUDA's out-of-memory traceback, would come instead."""
    if not isinstance(prior, CodePrior):
        return  # a masked prior keeps no caches
    need = prior.state_bytes(n * sequences_per_grid)
    free = free_memory(next(prior.parameters()).device)
    if need and free is not None and 1.1 * need > free:
        fits = int(free / 1.2 / (need / n))  # more to spare than the check: free memory moves between runs
        twice = " (each drawn twice for guidance)" if sequences_per_grid > 1 else ""
        raise ValueError(f"{n:,} grids at once{twice} need {need / 2**30:.1f} GiB for the prior's decoding caches "
                         f"({prior.seq_len:,} codes each), but {free / 2**30:.1f} GiB is available; "
                         + remedy.replace("{fits}", str(max(fits, 1))))  # fmt: skip (names may hold braces)


def draw_codes(prior: CodePrior | MaskedPrior, n: int, labels: torch.Tensor | None = None,
               opts: dict | None = None) -> torch.Tensor:  # fmt: skip
    """n new code grids (n, *grid_shape); opts are the samplers' keywords (temperature, top_k, top_p,
    cfg_scale with cfg_schedule "linear" by default, rising from 1, or "constant", generator; steps and
    choice_temperature for a masked prior, ignored by the others). Refused first when the caches cannot fit."""
    opts = opts or {}
    guided = labels is not None and opts.get("cfg_scale", 1.0) != 1.0  # as sample_codes decides
    check_decoding_fits(prior, n, 2 if guided else 1)
    sampler, kwargs = _sampler(prior, opts)
    return sampler(prior, n, labels, **kwargs)


def complete_codes(prior: CodePrior | MaskedPrior, prime: torch.Tensor, keep: torch.Tensor, opts: dict,
                   labels: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """Re-draw the codes of prime (n, *grid_shape) where keep (*grid_shape) is False, keeping the others
    exactly, towards `labels` (n,) (None: the null class, unconditional); opts as in :func:`draw_codes`
    (cfg_scale guides towards the labels). A raster-order prior sees only the codes before each position, so a
    re-drawn code cannot look at the kept codes below or right of it; a masked prior sees them all."""
    guided = labels is not None and opts.get("cfg_scale", 1.0) != 1.0  # as the samplers decide
    check_decoding_fits(prior, len(prime), 2 if guided else 1)
    sampler, kwargs = _sampler(prior, opts)
    return sampler(prior, len(prime), labels, prime=prime, keep=keep, **kwargs)


def keep_from_painted(vqvae: VQModel, painted: torch.Tensor) -> torch.Tensor:
    """painted pixels (S, S) bool -> which codes to keep (*grid_shape) bool: a code is re-drawn when any
    pixel of its cell is painted. A multi-level stage 1 (codes flattened into grid_shape (1, T)) gets the
    same rule on each level's own grid, in the order `VQModel.split_codes` reads them."""
    if painted.shape != (vqvae.image_size, vqvae.image_size):
        raise ValueError(f"the painted mask must be {vqvae.image_size}x{vqvae.image_size}, got {tuple(painted.shape)}")
    redraw = [codes_to_redraw(painted, level["grid_shape"])[None] for level in vqvae.levels]  # (1, h, w) each
    return ~vqvae.join_codes(redraw)[0]


def repair_images(vqvae: VQModel, prior: CodePrior | MaskedPrior, image: torch.Tensor, painted: torch.Tensor, n: int,
                  opts: dict | None = None,
                  labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """image uint8 (C, S, S) and the painted pixels (S, S) bool -> (n repairs uint8 (n, C, S, S) on the CPU, the
    codes kept (*grid_shape)): the codes of every cell with a painted pixel redrawn (`complete_codes`, towards
    `labels` (n,) on the prior's device, None: unconditional), the others kept exactly, decoded, and the original
    pixels put back outside the painted ones, so they stay the same (decoding also changes the pixels next to the
    redrawn cells). The page's repair."""
    painted, image = painted.cpu(), image.cpu()
    if not painted.any():
        raise ValueError("nothing is painted: paint the region to repair on the image first")
    keep = keep_from_painted(vqvae, painted).to(vqvae.device)
    prime = vqvae.encode_to_codes(from_uint8(image[None])).expand(n, *vqvae.grid_shape)  # moved to its device
    codes = complete_codes(prior, prime, keep, opts or {}, labels)
    decoded = to_uint8(vqvae.decode_codes(codes)).cpu()  # (n, C, S, S)
    return torch.where(painted[None, None], decoded, image[None]), keep


def redrawn_pixels(vqvae: VQModel, keep: torch.Tensor) -> torch.Tensor:
    """keep (*grid_shape) bool -> (S, S) bool: the pixels of every redrawn code's cell, on any level."""
    parts = vqvae.split_codes(~keep.cpu()[None])  # one (1, h, w) per level
    return torch.stack([cell_pixels(p[0], vqvae.image_size) for p in parts]).any(0)
