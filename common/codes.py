"""THE codes format: the one contract between stage 1 (writes codes) and stage 2 (reads them).

A codes directory holds::

    meta.json              CodesMeta: format version, levels, codebook size, grid shape, classes, stage-1 ckpt + hash
    stage1.ckpt            a byte copy of that stage-1 checkpoint (since 2026-11-29): the codes decode even
                           after its run is resumed (which rewrites last.ckpt), moved or deleted
    stage1-<sha12>.ckpt    an earlier stage1.ckpt that `extract_codes --overwrite` with another stage 1 kept
                           (named by its SHA-256): the priors trained on the earlier codes decode with it
    <split>/codes.npy      uint16 (N, H, W), read with memory mapping  (one level)
    <split>/codes_<level>.npy   uint16 (N, h, w) per level            (several levels: VQ-VAE-2)
    <split>/labels.npy     int64 (N,), -1 where unlabelled

Version 2 lists the levels in meta.json (name, grid shape, codebook size), top (coarsest) first; version-1
directories (one level, no list) are still read. Readers get every level as one flat sequence per image,
top level first, like the stage-1 model's ``encode_to_codes``: (N, *grid_shape), where ``grid_shape`` is
the level's (h, w) for one level and (1, T), T = sum of h * w, for several (`split_levels` cuts it back).

`common.codes_writer.CodesWriter` writes every array to a temporary file beside its final name and moves
them into place, meta.json last: a directory with a meta.json is complete. `read_meta`, `load_split`, `check_stage1`
and `check_matches` (the one check that a prior fits its codes or stage 1) reject anything else with a
`CodesError` that names the path and what to re-run. numpy and the standard library only.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from common.cli import UserError

FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)
META_FILE = "meta.json"
STAGE1_COPY = "stage1.ckpt"  # the copy of the stage-1 checkpoint in a codes directory
KEPT_COPY = re.compile(r"stage1-[0-9a-f]{12}(?:[0-9a-f]{52})?\.ckpt")  # earlier copies: `kept_copy_names`
CODES_FILE = "codes.npy"
LABELS_FILE = "labels.npy"
SPLIT_NAMES = ("train", "val", "test")  # the only splits a writer creates, and the only ones it ever deletes
CODES_DTYPE = np.dtype(np.uint16)
LABELS_DTYPE = np.dtype(np.int64)
MAX_CODEBOOK_SIZE = int(np.iinfo(CODES_DTYPE).max) + 1  # 65536


class CodesError(UserError, ValueError):
    """A codes directory (or what is about to be written into one) is unusable; the message says why."""


def _rerun(codes_dir: str | Path, ckpt: str | None = None) -> str:
    return f"re-run `extract_codes --ckpt {ckpt or 'STAGE1.ckpt'} --out {codes_dir} --overwrite`"


@dataclass(kw_only=True)
class CodesMeta:
    """What meta.json holds. `counts` maps each extracted split to its number of images."""

    format_version: int = FORMAT_VERSION
    codebook_size: int
    grid_shape: tuple[int, int]
    num_classes: int
    class_names: list[str]
    image_size: int
    channels: int
    stage1_ckpt: str  # absolute path
    stage1_sha256: str
    counts: dict[str, int] = field(default_factory=dict)
    dataset: str = ""  # informational
    levels: list[dict] = field(default_factory=list)  # top first: {name, grid_shape, codebook_size}
    stage1_copy: str = ""  # STAGE1_COPY when the directory holds a copy of the checkpoint (older ones do not)

    def __post_init__(self) -> None:
        self.grid_shape = tuple(int(s) for s in self.grid_shape)  # JSON has lists
        if not self.levels:  # version 1, or a one-level writer that did not say
            self.levels = [{"name": "codes", "grid_shape": self.grid_shape, "codebook_size": self.codebook_size}]
        self.levels = [{"name": str(lv["name"]), "grid_shape": tuple(int(s) for s in lv["grid_shape"]),
                        "codebook_size": int(lv["codebook_size"])} for lv in self.levels]  # fmt: skip
        names = [lv["name"] for lv in self.levels]
        if len(set(names)) != len(names) or not all(n.isidentifier() for n in names):
            raise ValueError(f"level names must be distinct identifiers, got {names}")
        if any(len(lv["grid_shape"]) != 2 for lv in self.levels):
            raise ValueError("every level's grid_shape must have 2 entries")
        flat = sequence_shape(self.levels)
        if self.grid_shape != flat or self.codebook_size != max(lv["codebook_size"] for lv in self.levels):
            raise ValueError(f"grid_shape {self.grid_shape} and codebook_size {self.codebook_size} do not match the "
                             f"levels {self.levels} (expected {flat} and the largest codebook)")  # fmt: skip

    @property
    def level_files(self) -> list[str]:
        """The codes file of each level, top first: codes.npy for one level, codes_<name>.npy for several."""
        return [CODES_FILE] if len(self.levels) == 1 else [f"codes_{lv['name']}.npy" for lv in self.levels]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = META_FILE) -> CodesMeta:
        """Parse meta.json text; `source` (its path) only goes into error messages."""
        codes_dir = Path(source).parent
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise CodesError(f"{source}: not valid JSON ({e}); {_rerun(codes_dir)}") from e
        if not isinstance(raw, dict):
            raise CodesError(f"{source}: expected a JSON object, got {type(raw).__name__}; {_rerun(codes_dir)}")
        version = raw.get("format_version")
        ckpt = raw.get("stage1_ckpt") if isinstance(raw.get("stage1_ckpt"), str) else None
        if version not in READ_VERSIONS:
            raise CodesError(
                f"{source}: codes format version {version!r}, but this code reads versions "
                f"{', '.join(map(str, READ_VERSIONS))}; {_rerun(codes_dir, ckpt)}"
            )
        names = {f.name for f in fields(cls)}
        missing = sorted(n for n in names if n not in raw and n not in ("counts", "dataset", "levels", "stage1_copy"))
        if missing:
            raise CodesError(f"{source}: missing {', '.join(missing)}; {_rerun(codes_dir, ckpt)}")
        try:
            if len(raw["grid_shape"]) != 2:
                raise ValueError(f"grid_shape must have 2 entries, got {raw['grid_shape']}")
            if version == 1:
                raw.pop("levels", None)
            meta = cls(**{k: v for k, v in raw.items() if k in names})
        except (TypeError, ValueError, KeyError) as e:
            raise CodesError(f"{source}: malformed ({e}); {_rerun(codes_dir, ckpt)}") from e
        return meta


def sequence_shape(levels: list[dict]) -> tuple[int, int]:
    """The shape of one image's codes as the pipeline sees them: the level's grid for one level, else
    (1, T), T = sum of h * w (the levels flattened one after the other, top first)."""
    if len(levels) == 1:
        return tuple(int(s) for s in levels[0]["grid_shape"])
    return (1, sum(int(lv["grid_shape"][0]) * int(lv["grid_shape"][1]) for lv in levels))


def split_levels(codes: Any, levels: list[dict]) -> list[Any]:
    """codes (N, *sequence_shape(levels)) -> one (N, h, w) array per level, top first (numpy or torch)."""
    if len(levels) == 1:
        return [codes]
    n, out, start = codes.shape[0], [], 0
    flat = codes.reshape(n, sequence_shape(levels)[1])
    for lv in levels:
        h, w = lv["grid_shape"]
        out.append(flat[:, start : start + h * w].reshape(n, h, w))
        start += h * w
    return out


def class_counts(labels: Any, num_classes: int) -> list[int]:
    """How many of `labels` (a split's, -1 = unlabelled and skipped) fall in each of the classes: what a prior
    keeps (codes_meta "class_counts") so that `sample --class_mix data` draws the data's proportions."""
    labels = np.asarray(labels)
    return np.bincount(labels[labels >= 0], minlength=num_classes).tolist()


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks (checkpoints can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def kept_copy_names(sha256: str) -> list[str]:
    """Where a codes directory keeps an earlier stage-1 copy with this hash: stage1-<first 12 hex>.ckpt, or with
    all 64 if that name holds another file. The stage 1 of priors trained on codes the directory held before."""
    return [f"stage1-{sha256[:12]}.ckpt", f"stage1-{sha256}.ckpt"]


# ------------------------------------------------------------------------------------------ reading
def codes_files(codes_dir: str | Path) -> list[Path]:
    """The files of a codes directory that the pipeline reads (meta.json, the stage-1 copy and the earlier ones
    kept, every split's arrays): what no output may replace. Other files there (an earlier `evaluate --json`)
    are not listed."""
    d = Path(codes_dir)
    if not d.is_dir():
        return []
    top = [d / name for name in (META_FILE, STAGE1_COPY) if (d / name).is_file()]
    top += sorted(f for f in d.iterdir() if KEPT_COPY.fullmatch(f.name) and f.is_file())
    return top + sorted(f for sub in d.iterdir() if sub.is_dir() for f in sub.rglob("*") if f.is_file())


def read_meta(codes_dir: str | Path) -> CodesMeta:
    """meta.json of a complete codes directory, or CodesError saying what to re-run."""
    codes_dir = Path(codes_dir)
    if codes_dir.is_file():
        raise CodesError(f"codes directory {codes_dir} is a file; give the folder extract_codes --out wrote")
    if not codes_dir.is_dir():
        raise CodesError(
            f"codes directory {codes_dir} does not exist; run `extract_codes --ckpt STAGE1.ckpt --out {codes_dir}`"
        )
    path = codes_dir / META_FILE
    if not path.is_file():
        raise CodesError(
            f"{codes_dir} has no {META_FILE}: not a codes directory, or an extraction that did not finish; "
            f"{_rerun(codes_dir)}"
        )
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise CodesError(f"{path}: cannot read ({e}); {_rerun(codes_dir)}") from e
    return CodesMeta.from_json(text, str(path))


def _load_array(path: Path, mmap: bool, rerun: str) -> np.ndarray:
    if not path.is_file():
        raise CodesError(f"{path} is missing; {rerun}")
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise CodesError(f"{path}: not a readable .npy array ({e}); {rerun}") from e


def load_split(codes_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(codes uint16 (N, *grid_shape), labels int64 (N,)) of one split, all checked. One level is memory-mapped
    read-only; several are read and joined into one flat sequence per image, top level first."""
    codes_dir = Path(codes_dir)
    meta = read_meta(codes_dir)
    rerun = _rerun(codes_dir, meta.stage1_ckpt)
    if split not in meta.counts:
        raise CodesError(
            f"{codes_dir} has no {split!r} split (it has: {', '.join(meta.counts) or 'none'}); "
            f"re-run `extract_codes --ckpt {meta.stage1_ckpt} --out {codes_dir} --splits ... --overwrite` "
            f"with {split} among the splits"
        )
    n = meta.counts[split]
    labels_path = codes_dir / split / LABELS_FILE
    levels = []
    for level, name in zip(meta.levels, meta.level_files):
        codes_path, k = codes_dir / split / name, level["codebook_size"]
        codes = _load_array(codes_path, mmap=n > 0, rerun=rerun)
        expected = (n, *level["grid_shape"])
        if codes.dtype != CODES_DTYPE:
            raise CodesError(f"{codes_path}: dtype {codes.dtype}, expected {CODES_DTYPE}; {rerun}")
        if codes.shape != expected:
            raise CodesError(
                f"{codes_path}: shape {codes.shape}, but meta.json says {n} images of grid {level['grid_shape']} "
                f"{expected}; {rerun}"
            )
        if n and int(codes.max()) >= k:
            raise CodesError(f"{codes_path}: code {int(codes.max())} out of range for codebook_size {k}; {rerun}")
        levels.append(codes)
    labels = _load_array(labels_path, mmap=False, rerun=rerun)
    if labels.dtype != LABELS_DTYPE or labels.shape != (n,):
        raise CodesError(f"{labels_path}: {labels.dtype} {labels.shape}, expected {LABELS_DTYPE} ({n},); {rerun}")
    # several levels: one flat sequence per image, top first (a copy: the levels live in separate files)
    if len(levels) > 1:
        levels = [np.concatenate([c.reshape(n, c.shape[1] * c.shape[2]) for c in levels], 1)[:, None]]
    codes = levels[0]
    if n and (labels.min() < -1 or labels.max() >= max(meta.num_classes, 0)):
        raise CodesError(
            f"{labels_path}: labels in [{labels.min()}, {labels.max()}], expected -1 (unlabelled) or "
            f"[0, {meta.num_classes}); {rerun}"
        )
    return codes, labels


def check_stage1(meta: CodesMeta, ckpt_path: str | Path | None = None, codes_dirs: Sequence[str | Path] = (),
                 remedy: str = "pass --vqvae PATH (the checkpoint the codes came from); if no copy of it is left, "
                               "retrain the prior on codes extracted with the stage 1 you have",
                 sha256: Callable[[str | Path], str] = sha256_file) -> str:  # fmt: skip
    """The stage-1 checkpoint to decode with (`ckpt_path`, else the one the codes came from), verified by hash.

    Without `ckpt_path`: the checkpoint meta.json names if it is unchanged, else the copy extract_codes kept in
    the codes directory (the first of `codes_dirs`, where the caller may find it, that holds it unchanged, as
    stage1.ckpt or, once codes of another stage 1 replaced those, as stage1-<sha12>.ckpt), so a resumed, moved
    or deleted training run does not strand its codes, priors and .vqz files. `remedy` ends the message when
    none is there (the default: a prior's, for which extracting again cannot help). `sha256` hashes an existing
    file (a loader passes one that keeps the file open, to load the weights it hashed without hashing again)."""
    path = str(ckpt_path or meta.stage1_ckpt)
    if ckpt_path and not os.path.isfile(path):
        raise CodesError(f"stage-1 checkpoint {path} does not exist; pass the checkpoint the codes came from")
    digest = sha256(path) if os.path.isfile(path) else None
    if digest == meta.stage1_sha256 or ckpt_path:
        if digest != meta.stage1_sha256:
            raise CodesError(
                f"stage-1 checkpoint {path} is not the one the codes came from (sha256 {digest[:12]}..., the codes "
                f"were extracted from {meta.stage1_ckpt} with sha256 {meta.stage1_sha256[:12]}...); pass that one"
            )
        return path
    copies = [Path(d) / meta.stage1_copy for d in codes_dirs if d] if meta.stage1_copy else []
    earlier = [Path(d) / name for d in codes_dirs if d for name in kept_copy_names(meta.stage1_sha256)]
    for copy in copies + earlier:
        if copy.is_file() and sha256(copy) == meta.stage1_sha256:
            return str(copy)
    kept = f" and its copy {copies[0]} is {'changed' if copies[0].is_file() else 'missing'}" if copies else ""
    if digest is None:
        raise CodesError(f"stage-1 checkpoint {path} was moved or deleted since extraction{kept}; {remedy}")
    raise CodesError(f"stage-1 checkpoint {path} changed since extraction (sha256 {digest[:12]}..., the codes were "
                     f"extracted with sha256 {meta.stage1_sha256[:12]}...){kept}; {remedy}")  # fmt: skip


def check_matches(prior: dict[str, Any], target: dict[str, Any], what: str, fix: str) -> None:
    """CodesError unless a prior (its codebook_size, grid_shape, num_classes and, from its codes' meta, the
    stage-1 stage1_sha256) fits `target` (a codes directory's meta, or a stage-1 checkpoint's facts).

    Only facts both sides know are compared; an unconditional prior (num_classes 0) fits labelled codes.
    `what` names the thing that does not fit, `fix` says what to pass instead.
    """
    problems = []
    for key in ("codebook_size", "grid_shape", "num_classes", "stage1_sha256"):
        mine, theirs = prior.get(key), target.get(key)
        if mine is None or theirs is None or (key == "num_classes" and mine == 0):
            continue
        if key == "grid_shape":
            mine, theirs = tuple(int(s) for s in mine), tuple(int(s) for s in theirs)
        if mine != theirs:
            short = (lambda v: f"{v[:12]}...") if key == "stage1_sha256" else (lambda v: v)
            problems.append(f"{key} {short(theirs)} (the prior's: {short(mine)})")
    if problems:
        raise CodesError(f"{what} does not fit the prior: {'; '.join(problems)}; {fix}")
