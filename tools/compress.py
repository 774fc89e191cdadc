"""`compress` / `decompress`: store images as their stage-1 codes, entropy-coded with the stage-2 prior.

    compress a.png b.png more_images/ --prior prior.ckpt --out images.vqz
    decompress images.vqz --prior prior.ckpt --out decoded/          # decoded/a.png, b.png, <each file>.png

`compress` encodes each image to codes with stage 1 and codes them with the prior's probabilities
(:mod:`tools.codec`: range coding; :mod:`tools.container`: a versioned ``.vqz`` container with both
checkpoints' SHA-256 and CRCs). `decompress` recovers the codes exactly and writes stage 1's decoding of
them as PNGs, so the images come back as stage-1 reconstructions: lossless for the codes, lossy for the
pixels. A directory's images are found in its sub-folders too (hidden ones skipped, sorted). The file also
keeps each image's name (``--names none``: not, and `decompress` numbers them 000000.png, ...): a file's own
name, or for a directory's images the path below it (``cats/1f595.png``), so `decompress` writes
``<name without its extension>.png`` for each, in those sub-folders of ``--out``; two files whose names
would collide (``x.png`` and ``x.jpg`` of one folder, or of two folders given) are refused up front. The
stage-1 checkpoint is the one the prior's codes metadata names (checked by SHA-256) unless ``--vqvae`` is
given.
Both run on the CPU with one thread (exact decoding needs identical floats) and never replace an existing
file without ``--overwrite``; `compress` writes a temp file renamed into place, `decompress` writes into
a hidden temporary folder whose files are moved into ``--out`` only once all of them are written.
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from common.cli import add_overwrite, make_parser, run_command
from common.images import image_chunks, named_image_files, to_uint8
from common.io import OutputError, check_output, check_output_dir, staging_dir, write_atomic
from stage2_prior.build import require_likelihood
from tools.container import MAX_BATCH_SIZE, ContainerError, check_name, pack_names, unpack
from tools.load import Models  # noqa: F401  (re-exported: tests build Models through this module)
from tools.vqz import (
    DEFAULT_BATCH_SIZE,
    compress_codes,
    cpu_models,
    decode_images,
    decompress_codes,
    encode_images,
    png_names,
)


def _parser(prog: str):
    p = make_parser(prog, __doc__)
    p.add_argument("--prior", type=str, required=True, help="stage-2 prior checkpoint (.ckpt)")
    p.add_argument("--vqvae", type=str, help="stage-1 checkpoint (default: the one the prior's codes came from)")
    add_overwrite(p)
    return p


def run_compress(args: list[str] | None) -> str:
    p = _parser("compress")
    p.add_argument("images", nargs="+", type=str, help="image files and/or directories of images")
    p.add_argument("--out", type=str, required=True, help="the .vqz file to write")
    p.add_argument("--batch_size", type=int, default=DEFAULT_BATCH_SIZE, help="images per coded batch")
    labels_help = ("with a class-conditional prior: code each image under the label that costs it the fewest "
                   "bits (best: smaller files, one forward pass per label more) or the null class")
    p.add_argument("--labels", type=Literal["best", "null"], default="best", help=labels_help)
    names_help = ("keep: store each image's file name, for `decompress` to write <name>.png (a few bytes an "
                  "image); none: store none, `decompress` numbers the images")
    p.add_argument("--names", type=Literal["keep", "none"], default="keep", help=names_help)
    a = p.parse_args(args)
    if not 1 <= a.batch_size <= MAX_BATCH_SIZE:
        raise ValueError(f"--batch_size must be in [1, {MAX_BATCH_SIZE}], got {a.batch_size}")
    named = named_image_files(a.images)
    files = [f for f, _ in named]
    seen: dict[Path, Path] = {}
    for f in files:  # the same file twice (a folder and a file in it) said the two "would both decompress to" one
        if (real := f.resolve()) in seen:
            raise ValueError(f"{f} is given twice (also as {seen[real]}); give each image once")
        seen[real] = f
    out = check_output(a.out, a.overwrite, inputs={"--prior": a.prior, "--vqvae": a.vqvae,
                                                   "an image to compress": files})  # fmt: skip
    if out.suffix.lower() != ".vqz":  # x.png got a bitstream under an image's name
        raise ValueError(f"--out {out}: name a .vqz file (compress writes a bitstream for `decompress`, not an image)")
    names = [n for _, n in named] if a.names == "keep" else None
    if names is not None:  # names unfit to store, or two that would come back as one file: refused before any work
        for f, n in named:
            if problem := check_name(n, folders=True):
                raise ValueError(f"--names keep: {f}: {problem}; rename it or pass --names none")
        png_names(names, "--names keep", "rename one, compress them into separate files, or pass --names none "
                  "to number the images instead", shown=[str(f) for f in files])  # fmt: skip
    m = cpu_models(a.prior, a.vqvae)
    require_likelihood(m.prior, a.prior, "compress")  # the codec needs exact probabilities
    t0 = time.perf_counter()
    chunks = image_chunks(files, m.image_size, m.channels, m.vqvae.images_per_pass())  # a chunk in memory
    codes = np.concatenate([encode_images(m.vqvae, chunk) for chunk in chunks])
    data, ideal = compress_codes(m, codes, a.batch_size, a.labels, names)
    seconds = time.perf_counter() - t0
    write_atomic(out, data)
    if note := run_checkpoint_note(a.prior, out):  # after the work: a user error stays the one line on stderr
        print(f"compress: note: {note}", file=sys.stderr)
    pixels = len(files) * m.image_size**2
    kept = f" ({len(pack_names(names, len(names), folders=True))} of them file names)" if names is not None else ""
    return (f"{len(files)} images -> {out}: {len(data)} bytes{kept}, {8 * len(data) / pixels:.4f} bits per pixel "
            f"(ideal {ideal / pixels:.4f}), {len(files) / seconds:.1f} images/s")  # fmt: skip


def run_checkpoint_note(prior: str, out: Path) -> str | None:
    """What to do when `prior` is a training run's last.ckpt or best.ckpt (the path given or the file it links to):
    resuming the run, or a later validation, rewrites it, and `out` decodes with no other prior than this one."""
    run_file = next((p for p in (Path(prior), Path(prior).resolve())
                     if p.name in ("last.ckpt", "best.ckpt") and p.parent.name == "checkpoints"), None)  # fmt: skip
    if run_file is None:
        return None
    return (f"--prior {prior} is a training run's {run_file.name}, which resuming the run (or a later validation) "
            f"rewrites, and {out} decodes only with the exact prior it was made with: to decompress it later, keep "
            f"a copy (cp {shlex.quote(prior)} prior_for_vqz.ckpt) and compress with that copy")  # fmt: skip


def run_decompress(args: list[str] | None) -> str:
    p = _parser("decompress")
    p.add_argument("file", type=str, help="a .vqz file written by `compress`")
    p.add_argument("--out", type=str, required=True,
                   help="directory for the decoded images (<name>.png for each stored file name, else 000000.png, ...)")
    a = p.parse_args(args)
    path = Path(a.file)
    if path.is_dir():  # was "no such file"
        raise IsADirectoryError(f"{path} is a directory; pass a .vqz file (one `compress` wrote)")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    data = path.read_bytes()
    c = unpack(data, str(path))  # check the file before loading the models
    count = c.count
    names = [f"{i:06d}.png" for i in range(count)]
    if c.names is not None:  # two stored names on one file: only a hand-made .vqz has that
        names = png_names(c.names, str(path), "`compress` never writes such a file", ContainerError)
    out = check_output_dir(a.out, names, a.overwrite)
    check_folders(out, names)
    m = cpu_models(a.prior, a.vqvae)
    require_likelihood(m.prior, a.prior, "decompress")
    t0 = time.perf_counter()
    images = to_uint8(decode_images(m.vqvae, decompress_codes(m, data, str(path))))
    seconds = time.perf_counter() - t0
    with staging_dir(out) as tmp:
        for name, image in zip(names, images.permute(0, 2, 3, 1).numpy()):
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)  # names are checked: no "..", none absolute
            Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(tmp / name, format="PNG")
    pixels = max(1, count * m.image_size**2)
    return (f"{path} -> {count} images in {out}/: {8 * len(data) / pixels:.4f} bits per pixel, "
            f"{count / max(seconds, 1e-9):.1f} images/s")  # fmt: skip


def check_folders(out: Path, names: list[str]) -> None:
    """Refuse, before any work, names whose sub-folders exist in `out` as a file or a link: a link could lead
    the images outside `out` (the names themselves are checked when the file is read: no "..", none absolute)."""
    for name in names:
        folder = out
        for part in name.split("/")[:-1]:
            folder = folder / part
            if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
                what = "a link" if folder.is_symlink() else "a file"
                raise OutputError(f"{folder} is {what}, but {name} is written into a folder of that name; move it "
                                  "or choose another --out")  # fmt: skip


def main_compress(args: list[str] | None = None) -> None:
    run_command("compress", run_compress, args)


def main_decompress(args: list[str] | None = None) -> None:
    run_command("decompress", run_decompress, args, memory_flag=None)  # its batches are the file's
