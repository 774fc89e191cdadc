"""Where `sample`'s files go: its outputs checked before any drawing (none may replace an input, none an
earlier file without --overwrite, none beyond memory), and written together at the end.

The grid, the .npz and the --images folder are written under temporary names and renamed into place
together once all are written, so a failure or Ctrl-C never leaves a new grid beside an old .npz; without
--overwrite, nor does another process that writes the same names meanwhile (common.io.OutputClash).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common.cli import UserError
from common.grids import GRID_FORMATS
from common.images import to_uint8
from common.io import (
    OutputClash,
    atomic_file,
    check_named,
    check_not_an_input,
    check_output,
    check_output_dir,
    staging_dir,
)  # fmt: skip


def outputs(a: argparse.Namespace) -> tuple[Path | None, Path]:
    """(grid path or None, npz path), both checked before any work; neither may be one of the inputs."""
    check_named(a.out)  # as typed: Path("") is "." ("--out . is a directory")
    out = Path(a.out)
    if out.is_dir():
        check_output(out, a.overwrite)  # says it is a directory
    suffix = out.suffix.lower()
    if suffix != ".npz" and suffix not in GRID_FORMATS:
        raise UserError(f"--out {out}: use a .png, .jpg, .webp (grid + .npz) or .npz (codes and images) name")
    grid = None if suffix == ".npz" else check_output(out, a.overwrite, inputs=input_files(a))
    return grid, check_output(out.with_suffix(".npz"), a.overwrite, inputs=input_files(a))


def input_files(a: argparse.Namespace) -> dict[str, str | None]:
    """The files `sample` reads, which no output may replace."""
    return {"--prior": a.prior, "--vqvae": a.vqvae, "--prime": a.prime, "--mask": a.mask}


def sample_names(n: int) -> list[str]:
    return [f"{i:06d}.png" for i in range(n)]


def check_images_dir(a: argparse.Namespace, n: int) -> Path | None:
    """--images DIR for `n` samples: refused if it would replace a file (without --overwrite), or, with it, if DIR
    holds sample files this run would not replace (an earlier, larger run's: a folder scored as one set would
    mix the two, and they are not ours to delete); None if not asked."""
    if not a.images:
        return None
    names = sample_names(n)
    folder, ours = check_output_dir(a.images, names, a.overwrite, "--images"), set(names)
    # neither an input (a --prime kept there) nor another output (--out DIR/000000.png) among the sample files
    out = Path(a.out).resolve()
    if out.parent == folder.resolve() and (out.name in ours or out.suffix == ".npz" and out.with_suffix(".png").name
                                           in ours):  # fmt: skip  (the grid or the .npz on a sample's name)
        raise UserError(f"--out {a.out} is one of the sample files --images {folder} gets; choose another --out")
    inputs = input_files(a)
    for name in names:
        check_not_an_input(folder / name, inputs, "--images")
    stale = sorted(p.name for p in folder.glob("[0-9]*.png") if re.fullmatch(r"\d{6}\.png", p.name)
                   and p.name not in ours) if folder.is_dir() else []  # fmt: skip
    if stale:
        raise UserError(f"--images {folder} holds {len(stale)} sample file(s) beyond the {n} this run writes "
                        f"({stale[0]} ...) that --overwrite would leave among them; empty it or choose another "
                        "--images")  # fmt: skip
    return folder


MAX_GRID_BYTES = 2**31  # 2 GiB of pixels: far beyond any screen; a larger --scale is a typo, not a wish


def check_grid_size(n: int, size: int, channels: int, scale: int) -> None:
    """Refuse a --scale whose grid of n tiles would not fit in memory, before anything is drawn."""
    side = size * scale + 2  # a tile and its padding
    need = n * side * side * channels
    if need > MAX_GRID_BYTES:
        raise UserError(f"--scale {scale}: a grid of {n} tiles of {size * scale}x{size * scale} px would take "
                        f"{need / 2**30:,.1f} GiB; lower --scale")  # fmt: skip


# Bytes a sample holds at once (float images on the device and on the host, uint8 copies for the .npz and the
# grid) per pixel value, and per code (int64 codes, their uint16 copy): what `sample` keeps until it writes.
BYTES_PER_VALUE, BYTES_PER_CODE = 10, 10


def check_sample_memory(n: int, size: int, channels: int, codes_per_sample: int, available: int | None,
                        given: str | None = None) -> None:  # fmt: skip
    """Refuse an --n whose samples would not fit in memory (`available` bytes; None: unknown, not checked),
    before anything is drawn: 10**9 samples were drawn until the kernel killed the process without a word.
    `given`: the option that asked for n samples, when not --n (--per_class 1000000)."""
    need = n * (size * size * channels * BYTES_PER_VALUE + codes_per_sample * BYTES_PER_CODE)
    if available is not None and need > available:
        raise UserError(f"{given or f'--n {n}'}: {n:,} samples of {size}x{size} px would hold about "
                        f"{need / 2**30:,.1f} GiB in "
                        f"memory, and {available / 2**30:,.1f} GiB are free; draw fewer (several runs with "
                        "different --seed values add up)")  # fmt: skip


def write_outputs(grid_path: Path | None, grid: np.ndarray | None, npz_path: Path, codes: torch.Tensor,
                  images: torch.Tensor, labels: torch.Tensor | None, stage1_ckpt: Path,
                  images_dir: Path | None) -> None:  # fmt: skip
    """The grid (if named), the .npz (codes (n, *grid_shape) uint16, images (n, C, H, W) uint8, labels (n,), -1
    when unconditional) and the --images PNGs, renamed into place together."""
    # stage1_ckpt: where `evaluate samples` finds the data options; also relative to the .npz's folder, so a
    # copy of the project (runs/ beside it) on another machine still finds it
    stage1 = stage1_ckpt.resolve()
    # Every output goes to a temporary name first; they are renamed into place together when all are written
    # (the ExitStack's exits, last entered first: the .npz, the grid, then --images), so a failure or Ctrl-C
    # never leaves a new grid beside an old .npz. Without --overwrite none replaces a file that appeared while
    # we drew (another `sample --out` the same name): OutputClash, and the ones already in place are taken back.
    placed: list[Path] = []
    try:
        with contextlib.ExitStack() as outputs_written:
            if images_dir is not None:
                tmp = outputs_written.enter_context(staging_dir(images_dir))
                for name, x in zip(sample_names(len(images)), to_uint8(images).cpu().permute(0, 2, 3, 1).numpy()):
                    Image.fromarray(x[..., 0] if x.shape[-1] == 1 else x).save(tmp / name, format="PNG")
            if grid_path:
                Image.fromarray(grid[..., 0] if grid.shape[2] == 1 else grid).save(
                    outputs_written.enter_context(atomic_file(grid_path, placed=placed)),
                    format=GRID_FORMATS[grid_path.suffix.lower()])  # fmt: skip
            np.savez(outputs_written.enter_context(atomic_file(npz_path, placed=placed)),
                     codes=codes.cpu().numpy().astype(np.uint16), images=to_uint8(images).cpu().numpy(),
                     labels=(labels.numpy() if labels is not None else np.full(len(codes), -1)),
                     stage1_ckpt=np.array(str(stage1)),
                     stage1_ckpt_relative=np.array(os.path.relpath(stage1, npz_path.resolve().parent)))  # fmt: skip
    except OutputClash:
        for path in placed:  # linked in a moment ago under names that did not exist: ours to take back
            path.unlink(missing_ok=True)
        raise
