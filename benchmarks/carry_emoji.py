"""Pack the emoji glyphs small enough to carry to a machine with no network, and unpack them there.

    python benchmarks/carry_emoji.py pack   data/emoji  .gpu/emoji      # here: ~38 MB instead of ~66 MB of PNGs
    python benchmarks/carry_emoji.py unpack .gpu/emoji  data/emoji      # there: the layout `make data-emoji` makes

The loader (common/emoji.py) composites every RGBA glyph over white, so each 64-px glyph is stored here as
that composited RGB array, all of one vendor in one xz-compressed uint8 block (xz beats the PNGs' zlib on
these mostly-white pictures), and unpacked into RGB PNGs of the same names. An RGB file composites to
itself, so `load_emoji` on the unpacked folder returns exactly the arrays it returns on the original one
(`check` compares them). emoji.json travels as is.
"""

from __future__ import annotations

import argparse
import json
import lzma
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from _common import ROOT  # noqa: F401  (puts the repo root on sys.path)
from PIL import Image

from common.emoji import VENDORS, load_emoji
from common.images import read_images


def pack_vendor(src: Path, dst: Path, vendor: str) -> str:
    files = sorted((src / "img" / vendor / "64").glob("*.png"))
    block = read_images(files, 64, 3)  # (N, 64, 64, 3) uint8, over white as load_emoji reads them
    (dst / f"{vendor}.xz").write_bytes(lzma.compress(block.tobytes(), preset=6))
    (dst / f"{vendor}.json").write_text(json.dumps([f.name for f in files]))
    return f"{vendor}: {len(files)} glyphs"


def unpack_vendor(src: Path, dst: Path, vendor: str) -> str:
    names = json.loads((src / f"{vendor}.json").read_text())
    block = np.frombuffer(lzma.decompress((src / f"{vendor}.xz").read_bytes()), np.uint8)
    block = block.reshape(len(names), 64, 64, 3)
    out = dst / "img" / vendor / "64"
    out.mkdir(parents=True, exist_ok=True)
    for name, rgb in zip(names, block):
        Image.fromarray(rgb).save(out / name, compress_level=1)
    return f"{vendor}: {len(names)} glyphs"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["pack", "unpack", "check"])
    p.add_argument("src")
    p.add_argument("dst")
    a = p.parse_args()
    src, dst = Path(a.src), Path(a.dst)
    if a.action == "check":  # src and dst are two emoji roots: the same arrays?
        x, y = load_emoji(src), load_emoji(dst)
        same = np.array_equal(x.images, y.images) and np.array_equal(x.labels, y.labels)
        print(f"{len(x.labels)} vs {len(y.labels)} glyphs; identical: {same}")
        sys.exit(0 if same else 1)
    vendors = [v for v in VENDORS if (src / "img" / v / "64").is_dir() or (src / f"{v}.xz").is_file()]
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "emoji.json", dst / "emoji.json")
    work = pack_vendor if a.action == "pack" else unpack_vendor
    with ProcessPoolExecutor(len(vendors)) as pool:
        for line in pool.map(work, [src] * len(vendors), [dst] * len(vendors), vendors):
            print(line, flush=True)


if __name__ == "__main__":
    main()
