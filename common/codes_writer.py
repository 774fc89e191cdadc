"""Writing a codes directory (the format is :mod:`common.codes`): complete, or visibly not.

Every array goes to a temporary file beside its final name; `CodesWriter.commit()` moves them into place
and writes meta.json last, so a directory with a meta.json is complete. numpy and the standard library.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from common.codes import (
    CODES_DTYPE,
    CODES_FILE,
    LABELS_DTYPE,
    LABELS_FILE,
    MAX_CODEBOOK_SIZE,
    META_FILE,
    SPLIT_NAMES,
    STAGE1_COPY,
    CodesError,
    CodesMeta,
    read_meta,
    sha256_file,
    split_levels,
)  # fmt: skip
from common.io import OutputError, check_writable_dir, write_atomic


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor; no torch import needed
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _temp_path(final: Path) -> Path:
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
    os.close(fd)
    return Path(tmp)


class SplitWriter:
    """Fills one split's arrays (temporary memory-mapped files) batch by batch; see `CodesWriter`.

    Codes arrive as the pipeline sees them, (B, *grid_shape) (all levels in one flat sequence); with several
    levels the finished array is cut into one file per level before anything is moved into place."""

    def __init__(self, folder: Path, split: str, n: int, meta: CodesMeta) -> None:
        self.split, self.n, self.meta = split, n, meta
        folder.mkdir(parents=True, exist_ok=True)
        self.final = {name: folder / name for name in [*meta.level_files, LABELS_FILE]}
        self.temp = {name: _temp_path(path) for name, path in self.final.items()}
        if len(meta.levels) > 1:  # the flat sequences, cut into the level files by _finish
            self.temp[CODES_FILE] = _temp_path(folder / CODES_FILE)
        if n > 0:
            shape = (n, *meta.grid_shape)
            self.codes = np.lib.format.open_memmap(self.temp[CODES_FILE], "w+", CODES_DTYPE, shape)
            self.labels = np.lib.format.open_memmap(self.temp[LABELS_FILE], "w+", LABELS_DTYPE, (n,))
            self.labels[:] = -1
        else:  # numpy cannot memory-map an empty file; an empty split is saved as plain .npy files
            self.codes = np.zeros((0, *meta.grid_shape), CODES_DTYPE)
            self.labels = np.zeros((0,), LABELS_DTYPE)
        self._written = np.zeros(n, dtype=bool)

    def write(self, start: int, codes: Any, labels: Any = None) -> None:
        """Store codes (B, H, W) (ints in [0, codebook_size), numpy or torch) and labels (B,) at rows start..start+B."""
        codes = _to_numpy(codes)
        where = f"{self.split} split, rows {start}..{start + len(codes)}"
        if codes.ndim != 3 or codes.shape[1:] != self.meta.grid_shape:
            raise CodesError(f"{where}: codes must have shape (B, *{self.meta.grid_shape}), got {codes.shape}")
        if not np.issubdtype(codes.dtype, np.integer):
            raise CodesError(f"{where}: codes must be integers, got {codes.dtype}")
        if start < 0 or start + len(codes) > self.n:
            raise CodesError(f"{where}: out of bounds for a split of {self.n} images")
        if codes.size and (codes.min() < 0 or codes.max() >= self.meta.codebook_size):
            raise CodesError(
                f"{where}: codes must lie in [0, {self.meta.codebook_size}), got [{codes.min()}, {codes.max()}]"
            )
        stop = start + len(codes)
        self.codes[start:stop] = codes
        if labels is not None:
            labels = _to_numpy(labels)
            if labels.shape != (len(codes),):
                raise CodesError(f"{where}: labels must have shape ({len(codes)},), got {labels.shape}")
            self.labels[start:stop] = labels
        self._written[start:stop] = True

    def _finish(self) -> None:
        if not self._written.all():
            missing = int((~self._written).sum())
            raise CodesError(f"{self.split} split: {missing} of {self.n} rows were never written; nothing committed")
        if self.n > 0:
            self.codes.flush()
            self.labels.flush()
            del self.labels  # close the memory map before renaming
        else:
            with open(self.temp[LABELS_FILE], "wb") as f:  # a file object: np.save(path) would append .npy
                np.save(f, self.labels)
        if len(self.meta.levels) > 1 or self.n == 0:
            for name, level in zip(self.meta.level_files, split_levels(self.codes, self.meta.levels)):
                with open(self.temp[name], "wb") as f:
                    np.save(f, np.ascontiguousarray(level))
        del self.codes
        if len(self.meta.levels) > 1:
            self.temp.pop(CODES_FILE).unlink()
        for path in self.temp.values():
            os.chmod(path, 0o644)  # mkstemp makes 0600 files

    def _remove_temp(self) -> None:
        for path in self.temp.values():
            path.unlink(missing_ok=True)


class CodesWriter:
    """Writes a codes directory so that it is either complete (meta.json present) or visibly not.

    ``add_split(split, n)`` returns a `SplitWriter` backed by temporary files in ``out_dir/<split>/``;
    ``commit()`` checks every row was written, moves the arrays into place with os.replace and writes
    meta.json last (temp + rename). Policy for an existing complete directory: refused (CodesError) unless
    ``overwrite=True``; then the old directory stays valid until commit, which first removes the old
    meta.json, so a crash during commit leaves an incomplete directory, never a mixed one. Used as a
    context manager, an exception before commit removes the temporary files (a SIGKILL can leave hidden
    ``.*.tmp`` files behind: harmless, delete them at will).
    """

    def __init__(self, out_dir: str | Path, meta: CodesMeta, overwrite: bool = False) -> None:
        self.out_dir = Path(out_dir)
        if not 0 < meta.codebook_size <= MAX_CODEBOOK_SIZE:
            raise CodesError(
                f"{self.out_dir}: codebook_size {meta.codebook_size} does not fit the uint16 codes format "
                f"(1..{MAX_CODEBOOK_SIZE})"
            )
        if len(meta.grid_shape) != 2 or min(meta.grid_shape) < 1:
            raise CodesError(f"{self.out_dir}: grid_shape must be two positive sides, got {meta.grid_shape}")
        try:
            check_writable_dir(self.out_dir)  # now, not after encoding everything
        except OutputError as e:
            raise CodesError(str(e)) from None
        if (self.out_dir / META_FILE).exists() and not overwrite:
            raise CodesError(
                f"{self.out_dir} already holds extracted codes; pass --overwrite to replace them "
                "or choose another --out"
            )
        self.meta = meta
        self.splits: dict[str, SplitWriter] = {}
        self.stage1_temp: Path | None = None  # the stage-1 copy until commit
        self.committed = False

    def copy_stage1(self, ckpt: str | Path) -> None:
        """Keep a byte copy of the stage-1 checkpoint as STAGE1_COPY (moved into place at commit), checked
        against the hash the meta recorded: one that changed during extraction (a run still writing its
        last.ckpt) is refused rather than paired with codes another model made."""
        self.stage1_temp = _temp_path(self.out_dir / STAGE1_COPY)
        shutil.copyfile(ckpt, self.stage1_temp)
        if sha256_file(self.stage1_temp) != self.meta.stage1_sha256:  # the copy's bytes, not the file's now
            raise CodesError(f"stage-1 checkpoint {ckpt} changed while its codes were extracted (is its run still "
                             "training?); extract again from a checkpoint that no run writes to, e.g. best.ckpt "
                             "of a finished run or a copy")  # fmt: skip
        os.chmod(self.stage1_temp, 0o644)  # mkstemp makes 0600 files: the copy reads like the arrays beside it
        self.meta.stage1_copy = STAGE1_COPY

    def add_split(self, split: str, n: int) -> SplitWriter:
        if split in self.splits:
            raise CodesError(f"{self.out_dir}: split {split!r} added twice")
        if split not in SPLIT_NAMES:
            raise CodesError(f"{self.out_dir}: {split!r} is not a split name ({', '.join(SPLIT_NAMES)})")
        if n < 0:
            raise CodesError(f"{self.out_dir}: split {split!r} cannot have {n} images")
        self.splits[split] = SplitWriter(self.out_dir / split, split, n, self.meta)
        return self.splits[split]

    def commit(self) -> CodesMeta:
        """Move every array into place, then write meta.json (with `counts` filled in). Returns the meta."""
        if self.committed:
            raise CodesError(f"{self.out_dir}: already committed")
        for writer in self.splits.values():
            writer._finish()
        meta_path = self.out_dir / META_FILE
        old_counts: dict[str, int] = {}
        old_files: list[str] = [CODES_FILE]
        if meta_path.exists():  # overwrite: invalidate the old directory before touching its arrays
            try:
                old = read_meta(self.out_dir)
                old_counts, old_files = old.counts, old.level_files
            except CodesError:
                pass
            meta_path.unlink()
        # Stale splits the new meta won't list: only our own split names, whatever an old meta.json says
        # (a crafted "../victim" must not reach outside out_dir).
        for split in (set(old_counts) & set(SPLIT_NAMES)) - self.splits.keys():
            for name in (*old_files, LABELS_FILE):
                (self.out_dir / split / name).unlink(missing_ok=True)
        for writer in self.splits.values():
            for name, tmp in writer.temp.items():
                os.replace(tmp, writer.final[name])
            for name in set(old_files) - set(writer.final):  # e.g. one level's codes.npy, now two levels
                (writer.final[LABELS_FILE].parent / name).unlink(missing_ok=True)
        if self.stage1_temp is not None:
            os.replace(self.stage1_temp, self.out_dir / STAGE1_COPY)
        self.meta.counts = {split: w.n for split, w in self.splits.items()}
        write_atomic(meta_path, self.meta.to_json().encode())
        self.committed = True
        return self.meta

    def abort(self) -> None:
        """Remove the temporary files; the directory is left as it was before this writer."""
        for writer in self.splits.values():
            writer.__dict__.pop("codes", None)
            writer.__dict__.pop("labels", None)
            writer._remove_temp()
        if self.stage1_temp is not None:
            self.stage1_temp.unlink(missing_ok=True)

    def __enter__(self) -> CodesWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.committed:
            self.abort()
