"""Writing a codes directory (the format is :mod:`common.codes`): complete, or visibly not.

Every array goes to a temporary file beside its final name; `CodesWriter.commit()` moves them into place
and writes meta.json last, so a directory with a meta.json is complete. Commits into one directory take
turns (an flock on it), so of two extractions into the same new --out the second finds the first's codes
and stops instead of replacing them. The memory-mapped arrays get their disk blocks before they are filled
(`common.io.reserve_space`), so a full disk is one CodesError, not a SIGBUS. numpy and the standard library.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
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
    kept_copy_names,
    read_meta,
    sha256_file,
    split_levels,
)  # fmt: skip
from common.image_cache import size_text
from common.io import OutputError, check_writable_dir, folder_turn, no_space, reserve_space, write_atomic


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor; no torch import needed
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _temp_path(final: Path) -> Path:
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
    os.close(fd)
    return Path(tmp)


def _split_bytes(n: int, meta: CodesMeta) -> int:
    """The most disk a split of `n` images takes while it is written (with several levels the flat array and its
    level files exist together)."""
    codes = n * int(np.prod(meta.grid_shape)) * CODES_DTYPE.itemsize
    return 128 + codes * (2 if len(meta.levels) > 1 else 1) + 128 + n * LABELS_DTYPE.itemsize


class SplitWriter:
    """Fills one split's arrays (temporary memory-mapped files) batch by batch; see `CodesWriter`.

    Codes arrive as the pipeline sees them, (B, *grid_shape) (all levels in one flat sequence); with several
    levels the finished array is cut into one file per level before anything is moved into place."""

    def __init__(self, folder: Path, split: str, n: int, meta: CodesMeta) -> None:
        self.split, self.n, self.meta = split, n, meta
        self.made_folder = None if folder.exists() else folder  # removed again (if empty) when the writer aborts
        folder.mkdir(parents=True, exist_ok=True)
        self.final = {name: folder / name for name in [*meta.level_files, LABELS_FILE]}
        self.temp: dict[str, Path] = {}
        try:  # a failure (a full disk) removes what this made: no CodesWriter lists it yet
            for name, path in self.final.items():
                self.temp[name] = _temp_path(path)
            if len(meta.levels) > 1:  # the flat sequences, cut into the level files by _finish
                self.temp[CODES_FILE] = _temp_path(folder / CODES_FILE)
            if n > 0:
                shape = (n, *meta.grid_shape)
                self.codes = np.lib.format.open_memmap(self.temp[CODES_FILE], "w+", CODES_DTYPE, shape)
                self.labels = np.lib.format.open_memmap(self.temp[LABELS_FILE], "w+", LABELS_DTYPE, (n,))
                reserve_space(self.temp[CODES_FILE])  # before any page is written: a full disk is ENOSPC, not SIGBUS
                reserve_space(self.temp[LABELS_FILE])
                self.labels[:] = -1
            else:  # numpy cannot memory-map an empty file; an empty split is saved as plain .npy files
                self.codes = np.zeros((0, *meta.grid_shape), CODES_DTYPE)
                self.labels = np.zeros((0,), LABELS_DTYPE)
        except BaseException:
            self.__dict__.pop("codes", None)
            self.__dict__.pop("labels", None)
            self._remove_temp()
            if self.made_folder is not None:  # no CodesWriter lists this split: its folder goes here (if empty)
                with contextlib.suppress(OSError):
                    self.made_folder.rmdir()
            raise
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
    ``.*.tmp`` files behind: harmless, delete them at will). Commits into one directory take turns (flock),
    and one without ``overwrite`` that finds a meta.json written meanwhile (another extraction into the
    same --out) is refused, replacing nothing. An earlier stage1.ckpt of another stage 1 is kept (`_keep_copy`).
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
        # what this writer creates, deepest first: an aborted extraction into a new --out leaves no empty skeleton
        # (its train/val/test folders made a later train_stage2 ask for an --overwrite nothing needed)
        self.made = [p for p in [self.out_dir, *self.out_dir.parents] if not p.exists()]
        try:
            check_writable_dir(self.out_dir)  # now, not after encoding everything
        except OutputError as e:
            raise CodesError(str(e)) from None
        if (self.out_dir / META_FILE).exists() and not overwrite:
            raise CodesError(
                f"{self.out_dir} already holds extracted codes; pass --overwrite to replace them "
                "or choose another --out"
            )
        self.meta, self.overwrite = meta, overwrite
        self.splits: dict[str, SplitWriter] = {}
        self.stage1_temp: Path | None = None  # the stage-1 copy until commit
        self.kept_copy: Path | None = None  # where commit kept an earlier stage-1 copy of another stage 1
        self.committed = False

    def copy_stage1(self, ckpt: str | Path) -> None:
        """Keep a byte copy of the stage-1 checkpoint as STAGE1_COPY (moved into place at commit), checked
        against the hash the meta recorded: one that changed during extraction (a run still writing its
        last.ckpt) is refused rather than paired with codes another model made."""
        self.stage1_temp = _temp_path(self.out_dir / STAGE1_COPY)
        with self._full_disk():
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
        with self._full_disk(_split_bytes(n, self.meta)):  # the split's own temp files are gone by then
            self.splits[split] = SplitWriter(self.out_dir / split, split, n, self.meta)
        return self.splits[split]

    @contextlib.contextmanager
    def _full_disk(self, more: int = 0) -> Iterator[None]:
        """A full disk (or quota) inside becomes one CodesError naming --out: what this writer's files take in all
        (its splits, `more`, the stage-1 copy) against what would be free without them."""
        try:
            yield
        except OSError as e:
            if not no_space(e):
                raise
            ours = [p for w in self.splits.values() for p in w.temp.values()] + [self.stage1_temp or Path()]
            need = more + sum(_split_bytes(w.n, self.meta) for w in self.splits.values())
            copy = os.path.getsize(self.meta.stage1_ckpt) if os.path.isfile(self.meta.stage1_ckpt) else 0
            need, copy = (need + copy, 0) if self.stage1_temp else (need, copy)  # copy_stage1 comes last
            free = shutil.disk_usage(self.out_dir).free + sum(os.stat(p).st_blocks * 512 for p in ours if p.is_file())
            raise CodesError(
                f"--out {self.out_dir}: no space left on device: the new codes need {size_text(need)} there"
                + f" (and {size_text(copy)} more for the copy of the stage-1 checkpoint)" * bool(copy)
                + f" but {size_text(free)} is free"
                + " (the codes there now stay until the new ones are complete)" * (self.out_dir / META_FILE).exists()
                + "; free some space or choose another --out"
            ) from e

    def commit(self) -> CodesMeta:
        """Move every array into place, then write meta.json (with `counts` filled in). Returns the meta."""
        if self.committed:
            raise CodesError(f"{self.out_dir}: already committed")
        with folder_turn(self.out_dir):
            if (self.out_dir / META_FILE).exists() and not self.overwrite:
                raise CodesError(f"--out {self.out_dir}: codes were written there while this ran (another "
                                 "process?); nothing was replaced; pass --overwrite to replace them, or choose "
                                 "another --out")  # fmt: skip
            return self._commit()

    def _commit(self) -> CodesMeta:
        if self.stage1_temp is not None:
            self._keep_copy()  # first: its refusal leaves the directory as it was
        with self._full_disk():  # several levels: np.save of the level files, plain writes
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
        sha = self.meta.stage1_sha256
        for kept in (self.out_dir / name for name in kept_copy_names(sha) if self.stage1_temp is not None):
            # codes of an earlier stage 1 again (A, B, then A): the copy of A _keep_copy made is now a twin of
            # stage1.ckpt (where check_stage1 looks first, and which _keep_copy keeps again when it is replaced)
            if kept.is_file() and not kept.is_symlink() and sha256_file(kept) == sha:
                kept.unlink()
                print(f"removed {kept}: the same stage 1 as {self.out_dir / STAGE1_COPY} now", flush=True)
        return self.meta

    def _keep_copy(self) -> None:
        """Before the new STAGE1_COPY replaces one of another stage 1, keep that under its hash's name (a link):
        it may be the last copy of the stage 1 that the priors trained on the earlier codes, and their .vqz
        files, decode with (its run resumed since), and `common.codes.check_stage1` finds it there."""
        old = self.out_dir / STAGE1_COPY
        if old.is_symlink() or not old.is_file():  # a link: replacing it leaves the file it points to
            return
        digest = sha256_file(old)
        if digest == self.meta.stage1_sha256:
            return
        for name in kept_copy_names(digest):
            kept = self.out_dir / name
            if kept.is_file() and not kept.is_symlink() and sha256_file(kept) == digest:
                return  # kept already (the directory held these codes before)
            if not os.path.lexists(kept):
                break
        else:
            raise CodesError(f"{old} is of another stage 1, and the names it would be kept under are taken by other "
                             f"files ({kept}); move them away and extract again")  # fmt: skip
        try:
            os.link(old, kept)  # stage1.ckpt stays in place until the new one replaces it
        except OSError:  # no hard links here (some FUSE and SMB mounts); we hold the commit turn
            os.rename(old, kept)
        self.kept_copy = kept
        print(f"kept the earlier {old} (another stage 1, sha256 {digest[:12]}...) as {kept}: priors trained on the "
              "codes it replaces, and their .vqz files, still decode with it", flush=True)  # fmt: skip

    def abort(self) -> None:
        """Remove the temporary files; the directory is left as it was before this writer."""
        for writer in self.splits.values():
            writer.__dict__.pop("codes", None)
            writer.__dict__.pop("labels", None)
            writer._remove_temp()
        if self.stage1_temp is not None:
            self.stage1_temp.unlink(missing_ok=True)
        made = [w.made_folder for w in self.splits.values() if w.made_folder is not None] + self.made
        for folder in made:
            with contextlib.suppress(OSError):  # only if empty: something else may have been put there meanwhile
                folder.rmdir()

    def __enter__(self) -> CodesWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.committed:
            self.abort()
