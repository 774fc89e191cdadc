"""`sample`: draw code grids from a trained prior, decode them with stage 1, write an image grid.

    sample --prior prior.ckpt --n 64 --out samples.png                 # one row per class if conditional
    sample --prior prior.ckpt --per_class 8 --cfg_scale 2 --top_p 0.9
    sample --prior prior.ckpt --n 1000 --class_mix data --out s.npz  # classes as in the data: for evaluate samples
    sample --prior prior.ckpt --prime shirt.png --keep_rows 12 --n 6   # keep 12 pixel rows, redraw the rest
    sample --prior maskgit.ckpt --n 64 --steps 8                       # a masked-token prior: 8 passes per grid
    sample --prior maskgit.ckpt --prime shirt.png --mask hole.png --n 6  # repair with context from every side
    sample --prior maskgit.ckpt --prime shirt.png --mask hole.png --classes Pullover,Coat --per_class 4 --cfg_scale 3
                                                                       # repairs towards each class: a row each

``--out`` names the grid's format by its suffix (.png, .jpg, .webp); beside it goes ``<out>.npz`` with
``codes`` (n, H, W), ``images`` (n, C, H, W) uint8 and ``labels`` (n,), -1 for unconditional.
``--out x.npz`` writes only the .npz. ``--images DIR`` also writes every sample as its own PNG,
``DIR/000000.png`` ... in drawing order (labels in the .npz), for tools that score a folder of images
(clean-fid, torch-fidelity). Existing files are never replaced without ``--overwrite``. The
stage-1 checkpoint is the one the prior's codes metadata names (checked by SHA-256) unless ``--vqvae``
is given. ``--mask`` is in pixels (black or transparent = redraw, white = keep): a code is redrawn if any pixel
of its cell is darker than mid-grey or more than half transparent.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from common.cli import (
    UserError,
    add_device,
    add_overwrite,
    at_least,
    check_seed,
    make_parser,
    parse_classes,
    resolve_device,
    run_command,
    wandb_offline_unless_logged_in,
)  # fmt: skip
from common.grids import make_grid
from common.images import load_image
from common.io import check_output_dir
from common.memory import available_memory
from stage1_vqvae.model import VQModel
from stage2_prior.decoding import CodePrior
from stage2_prior.masked_sampling import DEFAULT_CHOICE_TEMPERATURE, DEFAULT_STEPS
from stage2_prior.maskgit import MaskedPrior
from stage2_prior.sampling import CFG_SCHEDULES, MIN_TEMPERATURE
from tools.draw_progress import DrawProgress
from tools.drawing import (
    complete_codes,
    draw_codes,
    keep_from_painted,
    labels_in_proportion,
    labels_in_turn,
    redrawn_pixels,
    rows_by_label,
)  # fmt: skip
from tools.load import load_models
from tools.repair import hole_from_mask_image
from tools.sample_outputs import check_grid_size, check_images_dir, check_sample_memory, outputs, write_outputs


def build_parser():
    p = make_parser("sample", __doc__)
    p.add_argument("--prior", type=str, required=True, help="stage-2 prior checkpoint (.ckpt)")
    p.add_argument("--vqvae", type=str, help="stage-1 checkpoint (default: the one the prior's codes came from)")
    p.add_argument("--n", type=int, default=64, help="number of samples (completions with --prime)")
    p.add_argument("--out", type=str, default="samples.png", help="grid (.png/.jpg/.webp; + <out>.npz) or .npz")
    p.add_argument("--temperature", type=float, default=1.0, help="token temperature (of the first draw with "
                   "--temperature_end)")
    p.add_argument("--temperature_end", type=float, default=None,
                   help="the last draw's temperature: linear from --temperature over the raster order (masked "
                        "priors: over the steps); default: --temperature throughout")
    p.add_argument("--top_k", type=int, default=None, help="keep the k most likely codes at each step")
    p.add_argument("--top_p", type=float, default=None, help="nucleus: keep the smallest set with mass >= p")
    p.add_argument("--classes", type=str, default=None,
                   help="comma-separated class ids or names, e.g. 0,3,7 or Sneaker,Bag")
    p.add_argument("--per_class", type=int, default=None, help="samples per class: one grid row per class")
    p.add_argument("--class_mix", choices=("turn", "data"), default="turn",
                   help="turn: classes in turn, one grid row per class; data: classes drawn at random in the "
                        "training codes' proportions (what a sample FID against unbalanced data needs)")
    p.add_argument("--cfg_scale", type=float, default=1.0, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--cfg_schedule", choices=CFG_SCHEDULES, default="linear",
                   help="guidance over the grid: linear grows from 1 to --cfg_scale as codes are fixed (lower FID "
                        "here), constant applies it to every draw")  # fmt: skip
    p.add_argument("--seed", type=int, default=0,
                   help="the same seed, --n, --batch_size and device draw identical samples (one generator runs "
                        "through each batch: another --n or --batch_size draws others)")  # fmt: skip
    p.add_argument("--batch_size", type=int, default=256, help="grids drawn at once (part of what --seed draws)")
    add_device(p)
    p.add_argument("--scale", type=int, default=None, help="nearest-neighbour upscale (default: 2 below 64 px)")
    p.add_argument("--prime", type=str, default=None, help="an image whose visible codes are kept (completion)")
    p.add_argument("--keep_rows", type=int, default=None, help="with --prime: keep the top R pixel rows (whole codes)")
    p.add_argument("--mask", type=str, default=None,
                   help="with --prime: a mask image, black (below mid-grey) or transparent = redraw, white = keep")
    p.add_argument("--steps", type=int, default=None,
                   help=f"maskgit priors only: decoding steps, one network pass each (default {DEFAULT_STEPS})")
    p.add_argument("--choice_temperature", type=float, default=None,
                   help="maskgit priors only: the Gumbel noise on the confidences that choose which codes to fix, "
                        f"falling to 0 over the steps (default {DEFAULT_CHOICE_TEMPERATURE:g}; lower: the most "
                        "confident first, which collapsed samples below 16 on emoji)")
    p.add_argument("--images", type=str, default=None,
                   help="also write each sample as DIR/000000.png, ... (for tools that score a folder)")
    p.add_argument("--wandb", action="store_true", help="also log the grid to a W&B run (offline if not logged in)")
    add_overwrite(p)
    return p


MAX_CFG_SCALE = 1000.0  # far past any useful guidance (the page allows 20)


def choose_labels(prior: CodePrior, a: argparse.Namespace, class_names: list[str],
                  class_counts: list[int] | None = None,
                  check_count: Callable[[int], None] = lambda n: None) -> tuple[torch.Tensor | None, int]:  # fmt: skip
    """Labels (n,) and the grid's row length: one row per class for a conditional prior; `--classes` takes ids
    or the names in `class_names` (one per class of the prior); `--class_mix data` draws them in the
    proportions of `class_counts` (the prior's training codes), sorted, in square rows."""
    k = prior.num_classes
    square = max(1, int(np.ceil(np.sqrt(a.n))))
    if k == 0:
        if a.classes is not None or a.per_class or a.class_mix == "data":
            raise ValueError("--classes/--per_class/--class_mix data given, but this prior is unconditional")
        return None, square
    if a.class_mix == "data":
        if a.classes is not None or a.per_class:
            raise ValueError("--class_mix data draws every class in the data's proportions: drop --classes/--per_class")
        if not class_counts:
            raise ValueError(f"--class_mix data: --prior {a.prior} does not record its training codes' class counts "
                             "(trained before 2026-11-29); retrain it with train_stage2, or use --class_mix turn")
        return labels_in_proportion(class_counts, a.n, a.seed), square
    classes = list(range(k))
    if a.classes is not None:  # "" too: parse_classes refuses it (it drew every class)
        classes = parse_classes(a.classes, class_names)
    if a.per_class is not None:
        if a.per_class <= 0:
            raise ValueError(f"--per_class must be >= 1, got {a.per_class}")
        check_count(len(classes) * a.per_class)  # before the labels: 10**10 of them ran out of memory
        return torch.tensor(classes).repeat_interleave(a.per_class), a.per_class
    if a.n <= 0:
        raise ValueError(f"--n must be >= 1, got {a.n}")
    return labels_in_turn(classes, a.n)


def completion_keep(a: argparse.Namespace, vqvae: VQModel) -> torch.Tensor:
    """(*grid_shape) bool: which codes of the primed image are kept. Both options are in pixels and map onto
    every level: a code is redrawn when any pixel of its cell is below --keep_rows or in --mask's hole."""
    size = vqvae.image_size
    if (a.keep_rows is None) == (a.mask is None):
        raise ValueError("--prime needs exactly one of --keep_rows R or --mask MASK.png")
    if a.keep_rows is not None:
        if not 0 <= a.keep_rows < size:  # all {size} rows kept: nothing to redraw (it drew copies, exit 0)
            raise ValueError(f"--keep_rows must be in [0, {size - 1}] (pixel rows of the {size}x{size} image to keep; "
                             f"the rows below are redrawn), got {a.keep_rows}")  # fmt: skip
        hole = torch.zeros(size, size, dtype=torch.bool)
        hole[a.keep_rows :] = True
    else:
        hole = hole_from_mask_image(a.mask, size)
    return keep_from_painted(vqvae, hole)


def _run(args: list[str] | None) -> str:
    a = build_parser().parse_args(args)
    at_least(1, n=a.n, batch_size=a.batch_size, scale=a.scale, per_class=a.per_class, steps=a.steps)
    check_seed(a.seed)
    for flag, value in (("temperature", a.temperature), ("temperature_end", a.temperature_end)):
        if value is not None and not value >= MIN_TEMPERATURE:  # below it the scaled logits overflow
            raise UserError(f"--{flag} must be >= {MIN_TEMPERATURE}, got {value} (--top_k 1 draws the most likely "
                            "code at every step)")  # fmt: skip
    if not 0 <= a.cfg_scale <= MAX_CFG_SCALE:  # 1e308 overflowed the guided logits into NaNs
        raise UserError(f"--cfg_scale must be in [0, {MAX_CFG_SCALE:g}] (1 = off), got {a.cfg_scale}")
    conditional = a.classes is not None or a.per_class is not None  # with --prime: repairs towards those classes
    if a.prime and a.class_mix != "turn":
        raise UserError("--class_mix data is for new samples; completions (--prime) take --classes/--per_class")
    if a.prime and a.cfg_scale != 1 and not conditional:
        raise UserError("--cfg_scale with --prime guides the completions towards --classes: give --classes (or "
                        "--per_class), or drop --cfg_scale for unconditional completions")  # fmt: skip
    if a.choice_temperature is not None and not 0 <= a.choice_temperature < float("inf"):
        raise UserError(f"--choice_temperature must be a finite number >= 0, got {a.choice_temperature}")
    grid_path, npz_path = outputs(a)
    if a.images is not None:  # the folder itself now ("" is refused); its files once their count is known, still
        # before any drawing
        check_output_dir(a.images, [], a.overwrite, "--images")
    device = resolve_device(a.device)
    m = load_models(a.prior, a.vqvae, device)
    prior, vqvae = m.prior, m.vqvae
    for flag in ("steps", "choice_temperature"):
        if getattr(a, flag) is not None and not isinstance(prior, MaskedPrior):
            raise UserError(f"--{flag} is for maskgit priors; --prior {a.prior} is autoregressive (one pass per "
                            "code)")  # fmt: skip
    if a.top_k is not None and not 1 <= a.top_k <= prior.codebook_size:
        raise UserError(f"--top_k must be in [1, {prior.codebook_size}] (the codebook size), got {a.top_k}")
    if a.top_p is not None and not 0 < a.top_p <= 1:
        raise UserError(f"--top_p must be in (0, 1], got {a.top_p}")
    if a.cfg_scale != 1 and prior.num_classes == 0:
        raise UserError(f"--cfg_scale guides towards a class; --prior {a.prior} is unconditional: drop it")
    gen = torch.Generator(device=device).manual_seed(a.seed)
    opts = dict(temperature=a.temperature, temperature_end=a.temperature_end, top_k=a.top_k, top_p=a.top_p,
                cfg_scale=a.cfg_scale, generator=gen, cfg_schedule=a.cfg_schedule)  # fmt: skip
    if isinstance(prior, MaskedPrior):
        opts["steps"] = a.steps or DEFAULT_STEPS
        opts["choice_temperature"] = a.choice_temperature
        if a.choice_temperature is None:
            opts["choice_temperature"] = DEFAULT_CHOICE_TEMPERATURE
    scale = a.scale or (2 if m.image_size < 64 else 1)
    codes_per_sample = int(np.prod(vqvae.grid_shape))
    check_sample_memory(a.n, m.image_size, m.channels, codes_per_sample, available_memory())  # before any labels

    def per_class_fits(n: int) -> None:
        check_sample_memory(n, m.image_size, m.channels, codes_per_sample, available_memory(),
                            f"--per_class {a.per_class}")  # fmt: skip

    if a.prime:
        keep = completion_keep(a, vqvae).to(device)  # the options before the image
        # towards --classes: one row per class, each starting with the original and the masked image
        labels, per_row = None, a.n
        if conditional:
            labels, per_row = choose_labels(prior, a, m.class_names, check_count=per_class_fits)
        n = len(labels) if labels is not None else a.n
        rows = len(labels.unique()) if labels is not None else 1
        images_dir = check_images_dir(a, n)
        check_grid_size(rows * (per_row + 2), m.image_size, m.channels, scale)
        image = load_image(a.prime, m.image_size, m.channels).to(device)
        prime = vqvae.encode_to_codes(image).expand(n, -1, -1)
        codes = complete_codes(prior, prime, keep, {**opts, "on_step": DrawProgress(n).step},
                               labels.to(device) if labels is not None else None)
        masked = vqvae.decode_codes(prime[:1]).clone()
        masked[:, :, redrawn_pixels(vqvae, keep)] = 0.0  # grey where codes are redrawn
        images = vqvae.decode_codes(codes)
        repairs = rows_by_label(images.cpu(), labels, per_row).view(rows, per_row, *images.shape[1:])
        heads = torch.cat([image, masked]).cpu()[None].expand(rows, -1, -1, -1, -1)  # (rows, 2, C, S, S)
        grid_images, per_row = torch.cat([heads, repairs], 1).flatten(0, 1), per_row + 2
    else:
        labels, per_row = choose_labels(prior, a, m.class_names, m.class_counts, per_class_fits)
        n = len(labels) if labels is not None else a.n
        images_dir = check_images_dir(a, n)
        check_grid_size(n, m.image_size, m.channels, scale)
        chunks, progress = [], DrawProgress(n)  # a long draw says how far it is (many samples, long grids, busy CPU)
        for start in range(0, n, a.batch_size):
            lab = labels[start : start + a.batch_size].to(device) if labels is not None else None
            progress.batch(start, min(a.batch_size, n - start))
            # The eager step loop on every device: per-step CUDA graphs (stage2_prior.cuda_graphs) do not pay
            # for one draw (on an H200, capture included, 0.66 s against 0.32 s for 64 grids of 16x16).
            chunks.append(draw_codes(prior, progress.size, lab, {**opts, "on_step": progress.step}))
            progress.batch_done()
        codes = torch.cat(chunks)
        images = vqvae.decode_codes(codes)  # in the model's passes
        # in turn: one row per class; in the data's mix the classes follow each other in square rows
        grid_images = rows_by_label(images.cpu(), labels, per_row) if a.class_mix == "turn" else images.cpu()
    grid = make_grid(grid_images, nrow=per_row, scale=scale) if grid_path or a.wandb else None
    write_outputs(grid_path, grid, npz_path, codes, images, labels, m.vqvae_path, images_dir)
    if a.wandb:
        _log_wandb(grid, a, npz_path.parent)
    done = [grid_path, npz_path] + ([f"{len(images)} PNGs in {images_dir}/"] if images_dir is not None else [])
    wrote = f"wrote {' and '.join(str(p) for p in done if p)}"
    if not a.prime and labels is not None and a.class_mix == "data":
        drawn = torch.bincount(labels, minlength=prior.num_classes).tolist()
        wrote += "; classes in the training codes' proportions: " + ", ".join(
            f"{k} {m.class_names[c]}" for c, k in enumerate(drawn) if k)
    elif labels is not None and grid_path:  # which row is which class: the grid has no captions
        rows = [f"{c} {m.class_names[c]}" for c in labels.unique(sorted=True).tolist()]
        wrote += f"; rows, top to bottom: {', '.join(rows)}"
    return wrote


def _log_wandb(grid: np.ndarray, a: argparse.Namespace, folder: Path) -> None:
    """Log the grid to a W&B run whose files go beside the outputs (offline unless logged in)."""
    import wandb  # only for --wandb: it costs seconds to import

    wandb_offline_unless_logged_in()
    run = wandb.init(project="vqgen", job_type="sample", config=vars(a), dir=str(folder))
    run.log({"samples": wandb.Image(grid)})
    run.finish()


def main(args: list[str] | None = None) -> None:
    run_command("sample", _run, args)


if __name__ == "__main__":
    main()
