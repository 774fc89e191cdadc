"""Emoji: a real colour data set that installs offline-first (`make data-emoji`), and its reader.

The npm packages ``emoji-datasource-{apple,google,twitter,facebook}@16.0.0`` each ship
``img/<vendor>/64/*.png`` (RGBA 64x64: about 1,900 emoji plus skin-tone variants) and ``emoji.json``
(name, category, subcategory, ``has_img_<vendor>``, ``skin_variations``). `fetch` gets the four tarballs
with ``npm pack`` (checked against pinned SHA-256s) and extracts only those PNGs and emoji.json into
``data/emoji/``; it does nothing when they are already there. Each package is downloaded and extracted in a
hidden staging folder of `root` (the next run removes one a killed run left), renamed into place, then marked
by a hidden file ``.<vendor>-16.0.0.ok``; a vendor folder or emoji.json there that is not the package's is
refused, never replaced. A folder with some markers but not all is a fetch stopped part-way: the reader refuses it.

`load_emoji` composites every RGBA glyph over white, at 64 px or resized to 32. Labels are the category
(the "Component" category, skin-tone swatches and hair parts, is dropped). Each image's base emoji (its
row in emoji.json) is its split group: all vendors and skin tones of one emoji fall in the same split, so
the test split holds glyphs the model has never seen. Vendor and name are kept for grids.
"""

from __future__ import annotations

import filecmp
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.cli import UserError
from common.images import ImageError, read_images
from common.io import lock_folder
from common.readers import DatasetError, DatasetNotFoundError, ImageArrays, where

VERSION = "16.0.0"
VENDORS = ("apple", "google", "twitter", "facebook")
TARBALL_SHA256 = {  # npm pack of each package at VERSION
    "apple": "b34d1665e136f163b0d4433318df151895b785186e8c729b2211b43017945075",
    "google": "fb5fd131b362aab7a55542d2a147a79708cce0a8b1c1bbacd470172708b5c438",
    "twitter": "f64a530c63bca463bd8317fdc4615ce63a53a0c65018e4ce2d848aaba7a28877",
    "facebook": "017038cf5a4e7fcf03dd9133cbed43d4c281c4b3ce7b927c7160261b92b8821e",
}
DROPPED_CATEGORIES = ("Component",)
DEFAULT_ROOT = Path("data") / "emoji"
SIZES = (64, 32)
HOW_TO_GET = "run `make data-emoji` (npm fetches the emoji-datasource packages) or pass --data.root DIR"


@dataclass
class EmojiArrays(ImageArrays):
    """ImageArrays plus what the split and the grids need."""

    groups: np.ndarray  # int64 (N,): the base emoji's row in emoji.json
    vendors: list[str]
    names: list[str]


# ------------------------------------------------------------------------------------------ fetch
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _marker(root: Path, vendor: str) -> Path:
    """Written only once img/<vendor>/64 is in place, so a vendor without one was not fetched (or not finished)."""
    return root / f".{vendor}-{VERSION}.ok"


def _staging(root: Path, vendor: str) -> Path:
    """Where one vendor's tarball is downloaded and extracted: inside `root`, never /tmp, so a killed fetch leaves
    nothing elsewhere; hidden, and of a fixed name only the fetcher uses, so the next run removes what it left."""
    return root / f".fetch-{vendor}.tmp"


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()  # a link is removed, never followed
    elif path.is_dir():
        shutil.rmtree(path)


def fetch(root: str | Path = DEFAULT_ROOT, vendors: tuple[str, ...] = VENDORS, npm: str = "npm") -> Path:
    """Put emoji.json and img/<vendor>/64/*.png under `root` (idempotent: a vendor whose marker file is
    there is skipped). Each tarball is checked against its pinned SHA-256 before anything is extracted, and
    nothing of the user's is replaced: a vendor folder or emoji.json that differs from the package's is refused."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    lock = _one_fetch_at_a_time(root)
    try:
        for vendor in VENDORS:  # all of them: a killed run's vendor may have been marked before its staging went
            _remove(_staging(root, vendor))
        for vendor in vendors:
            done = _marker(root, vendor).is_file() and (root / "img" / vendor / "64").is_dir()
            if done and (root / "emoji.json").is_file():
                print(f"emoji: {vendor} already in {root}")
                continue
            staging = _staging(root, vendor)
            staging.mkdir()
            try:
                print(_install(_pack(vendor, staging, npm), vendor, root))
            finally:
                _remove(staging)
    finally:
        if lock is not None:
            os.close(lock)  # drops the lock
    return root


def _one_fetch_at_a_time(root: Path) -> int | None:
    """The lock on `root` (common.io.lock_folder), waited for if another fetch holds it: a second fetch removed the
    first's staging folders as a killed run's and downloaded the same packages. Once it has the lock it finds the
    vendors the first fetched marked, and skips them."""
    try:
        return lock_folder(root, wait=False)
    except BlockingIOError:
        print(f"emoji: another fetch into {root} is running (`make data-emoji` twice?); waiting for it to end",
              flush=True)  # fmt: skip
        return lock_folder(root)


def _pack(vendor: str, staging: Path, npm: str) -> Path:
    """`npm pack` the vendor's package into `staging`; its tarball, checked against the pinned SHA-256."""
    package = f"emoji-datasource-{vendor}@{VERSION}"
    try:
        subprocess.run([npm, "pack", package, "--silent"], cwd=staging, check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        raise UserError(f"`npm pack {package}` failed ({' '.join(detail.split())[:300]}); "
                        "it needs npm and the npm registry") from None  # fmt: skip
    tarball = staging / f"emoji-datasource-{vendor}-{VERSION}.tgz"
    if not tarball.is_file() or _sha256(tarball) != TARBALL_SHA256[vendor]:
        raise UserError(f"{package}: the tarball's SHA-256 is not the pinned one; refusing to extract it")
    return tarball


def _install(tarball: Path, vendor: str, root: Path) -> str:
    """Extract only emoji.json and img/<vendor>/64/*.png next to `tarball`, as plain files (tarfile's "data"
    filter: no links, no paths outside), then rename them into `root`; the marker last. Refuses, before
    anything moves, a vendor folder or emoji.json there that is not the package's."""
    staging, package = tarball.parent, f"emoji-datasource-{vendor}@{VERSION}"
    prefix = f"package/img/{vendor}/64/"
    with tarfile.open(tarball, "r:gz") as tar:
        members = [m for m in tar.getmembers() if m.isfile() and (m.name == "package/emoji.json" or (
            m.name.startswith(prefix) and m.name.endswith(".png") and "/" not in m.name[len(prefix):]))]  # fmt: skip
        tar.extractall(staging, members=members, filter="data")
    glyphs, entries = staging / prefix, staging / "package" / "emoji.json"
    if not glyphs.is_dir() or not entries.is_file():
        raise UserError(f"{package}: the tarball holds no img/{vendor}/64/*.png or no emoji.json")
    target, json_path, marker = root / "img" / vendor / "64", root / "emoji.json", _marker(root, vendor)
    kept = _holds_package(target, glyphs, marker.is_file(), package)
    if json_path.exists() and not filecmp.cmp(json_path, entries, shallow=False):
        raise UserError(f"{json_path} exists but is not the emoji.json of {package}, so it was not fetched by "
                        "`make data-emoji`; move it away, or fetch into another folder")  # fmt: skip
    if not kept:
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_dir():
            target.rmdir()  # empty (checked): nothing of the user's is lost
        glyphs.rename(target)  # one rename inside `root`: the folder is never there half-filled
    marker.write_text(TARBALL_SHA256[vendor] + "\n")
    if not json_path.exists():  # after the marker: a fetch stopped before it has no emoji.json, so reads as none
        entries.rename(json_path)
    if kept:
        return f"emoji: {target} already holds the glyphs of {package}; marked as fetched"
    return f"emoji: {vendor} -> {target}"


def _holds_package(target: Path, glyphs: Path, marked: bool, package: str) -> bool:
    """Whether `target` stays as it is: fetched before (marked), or a copy of exactly the package's files (a
    hand copy that lost the hidden markers, or a fetch killed between the rename and its marker), which only
    needs its marker. False when it is absent or empty (so can be filled); anything else is the user's: refused."""
    if not target.exists():
        return False
    if marked:
        return True
    if target.is_dir() and not any(target.iterdir()):
        return False
    names = sorted(p.name for p in glyphs.iterdir())
    if target.is_dir() and sorted(p.name for p in target.iterdir()) == names and all(
            (target / n).is_file() and filecmp.cmp(target / n, glyphs / n, shallow=False) for n in names):  # fmt: skip
        return True
    raise UserError(f"{target} exists but was not fetched by `make data-emoji` (its files are not those of "
                    f"{package}); move it away, or fetch into another folder")  # fmt: skip


# ------------------------------------------------------------------------------------------ read
def _entries(root: Path) -> list[dict]:
    path = root / "emoji.json"
    if not path.is_file():
        raise DatasetNotFoundError(f"emoji not found: no {where(path)}; {HOW_TO_GET}")
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path}: not a readable emoji.json ({e}); {HOW_TO_GET}") from None
    if not isinstance(entries, list):
        raise DatasetError(f"{path}: expected a list of emoji; {HOW_TO_GET}")
    return entries


def emoji_class_names(root: str | Path | None = None) -> list[str]:
    """The categories that become labels, sorted (cheap: reads emoji.json only)."""
    entries = _entries(Path(root) if root else DEFAULT_ROOT)
    return sorted({e.get("category") for e in entries} - {None, *DROPPED_CATEGORIES})


def _broken(e: ImageError) -> DatasetError:
    """A glyph file that cannot be read: the fix is to fetch the packages again, not to delete it."""
    return DatasetError(f"{str(e).removesuffix('; fix or delete the file')}; re-run `make data-emoji`")


def _check_fetch_finished(root: Path, vendors: list[str]) -> None:
    """A folder with markers is a fetch, which is only done once every vendor is marked and there: one stopped
    part-way would otherwise train on a quarter of the glyphs without a word. A folder without any marker is
    the user's own layout (built by hand, or by benchmarks/carry_emoji.py) and is read as it is."""
    marked = [v for v in VENDORS if _marker(root, v).is_file()]
    missing = [v for v in VENDORS if v not in marked or v not in vendors]
    if marked and missing:
        raise DatasetError(f"emoji: {where(root)} is a fetch stopped part-way ({', '.join(missing)} missing); "
                           f"run `make data-emoji` (`python -m common.emoji {root}` for this folder) "
                           "to finish it")  # fmt: skip


def load_emoji(root: str | Path | None = None, image_size: int = 64) -> EmojiArrays:
    """Every vendor's glyphs under `root` (default data/emoji) with their category labels and split groups."""
    if image_size not in SIZES:
        raise DatasetError(f"data: emoji images are 64 or 32 px, got image_size={image_size}")
    root = Path(root) if root else DEFAULT_ROOT
    entries = _entries(root)
    names = emoji_class_names(root)
    vendors = [v for v in VENDORS if (root / "img" / v / "64").is_dir()]
    _check_fetch_finished(root, vendors)
    if not vendors:
        raise DatasetNotFoundError(f"emoji not found: no <vendor>/64 folder in {where(root / 'img')}; {HOW_TO_GET}")
    files, labels, groups, who, what = [], [], [], [], []
    for row, e in enumerate(entries):
        if e.get("category") not in names:
            continue
        variants = [e, *(e.get("skin_variations") or {}).values()]
        for vendor in vendors:
            for v in variants:
                file = root / "img" / vendor / "64" / str(v.get("image", ""))
                if v.get(f"has_img_{vendor}") and file.is_file():
                    files.append(file)
                    labels.append(names.index(e["category"]))
                    groups.append(row)
                    who.append(vendor)
                    what.append(str(e.get("name") or e.get("short_name") or ""))
    if not files:
        raise DatasetNotFoundError(f"emoji: no glyph images found under {root}/img; {HOW_TO_GET}")
    try:
        images = read_images(files, image_size, 3)  # over white, as every user image is read
    except ImageError as e:
        raise _broken(e) from None
    return EmojiArrays(images, np.asarray(labels, np.int64), names, np.asarray(groups, np.int64), who, what)


def group_split(groups: np.ndarray, n_val: int, n_test: int, seed: int) -> dict[str, np.ndarray]:
    """Image indices of train/val/test when whole groups (base emoji) are assigned: `n_val` and `n_test`
    groups (0: 10% each), chosen by a permutation fixed by `seed`."""
    unique = np.unique(groups)
    n_val, n_test = n_val or max(1, len(unique) // 10), n_test or max(1, len(unique) // 10)
    if n_val + n_test >= len(unique):
        raise DatasetError(f"data: emoji has {len(unique)} base emoji; val_size={n_val} and test_size={n_test} "
                           "(counted in base emoji) leave none to train on")  # fmt: skip
    order = unique[np.random.default_rng(seed).permutation(len(unique))]
    chosen = {"test": order[:n_test], "val": order[n_test : n_test + n_val], "train": order[n_test + n_val :]}
    return {split: np.flatnonzero(np.isin(groups, g)) for split, g in chosen.items()}


def main(args: list[str] | None = None) -> None:
    """`python -m common.emoji [ROOT]`: what `make data-emoji` runs."""
    import sys

    from common.cli import run_command

    argv = sys.argv[1:] if args is None else args
    if argv and argv[0] in ("-h", "--help"):  # it was taken for the folder: four packages fetched into ./--help
        print(f"usage: python -m common.emoji [ROOT]  (default {DEFAULT_ROOT}): fetch the emoji data set there")
        return

    def run(a: list[str]) -> str:
        if len(a) > 1 or (a and a[0].startswith("-")):
            raise UserError(f"data-emoji takes one folder (default {DEFAULT_ROOT}), got {' '.join(a)}")
        return f"emoji ready in {fetch(a[0] if a else DEFAULT_ROOT)}"

    run_command("data-emoji", run, argv, memory_flag=None)


if __name__ == "__main__":
    main()
