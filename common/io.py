"""Atomic writes and output checks: nothing is half-written, and nothing is replaced that the user did not name.

Every file a command writes goes to a temporary name beside its final one and is renamed into place, so a
kill leaves either the old file or the new one. `check_output` runs before any long work: it refuses an
existing output without ``--overwrite``, a directory where a file is wanted (or the reverse), a parent path
that is a file, and a folder we cannot write into. Standard library only.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


class OutputError(OSError):
    """An output path is unusable or would replace something the user did not name; the message says what to do."""


@contextmanager
def atomic_file(dest: str | Path, mode: str = "wb") -> Iterator[BinaryIO]:
    """A temp file beside `dest`, moved into place only if the block succeeds: never a half-written file. Its
    name is unique (mkstemp), so processes sharing the folder (nodes of one job) never write the same one.
    `mode` "w+b": also readable (a memory map of it, common.image_cache)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_atomic(dest: str | Path, data: bytes) -> None:
    with atomic_file(dest) as f:
        f.write(data)


def check_named(path: str | Path, flag: str = "--out", what: str = "file name") -> None:
    """OutputError for an empty or blank `path` (a str: Path("") is "."): it would write into the working folder
    (`--out ""` filled it with a codes directory or decoded images). Call it with what the user typed."""
    if isinstance(path, str) and not path.strip():
        raise OutputError(f"{flag} {path!r}: give a {what}")


def check_writable_dir(path: str | Path, flag: str = "--out") -> None:
    """`path` is, or can be created as, a directory we can write into (checked before any long work)."""
    check_named(path, flag, "directory")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{flag} {path} is a file; give a directory")
    _check_parent(path / "x", flag, shown=path)  # a file inside it; the messages name the folder as typed


def _check_parent(path: Path, flag: str, shown: Path | None = None) -> None:
    """The nearest existing ancestor of `path` must be a directory we can create a file in (tried for real:
    permission bits say nothing for root or a read-only file system). `shown`: the path the messages name."""
    parent, path = path.parent, shown or path
    while not parent.exists():
        if parent.is_symlink():  # a dangling link: mkdir would fail later
            raise OutputError(f"{flag} {path}: {parent} is a broken symbolic link; choose another {flag}")
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{flag} {path}: {parent} is a file, not a directory; choose another {flag}")
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".vqgen-write-check.")
    except OSError as e:
        raise OutputError(f"{flag} {path}: cannot write into {parent} ({e.strerror}); choose another {flag}") from None
    os.close(fd)
    os.remove(probe)  # the file this function just created


def check_output(path: str | Path, overwrite: bool, flag: str = "--out",
                 inputs: dict[str, str | Path | list | None] | None = None) -> Path:  # fmt: skip
    """A file the command will write: refuse a directory, an unwritable place, one of the command's `inputs`
    ({flag: path or paths}; even with --overwrite: the command would replace what it reads), or an existing
    file without --overwrite. Returns the path."""
    check_named(path, flag, "file name")
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{flag} {path} is a directory; give a file name")
    check_not_an_input(path, inputs or {}, flag)
    _check_parent(path, flag)
    if path.exists() and not overwrite:
        raise OutputError(f"{flag} {path} already exists; pass --overwrite to replace it, or choose another {flag}")
    return path


def check_not_an_input(path: Path, inputs: dict[str, str | Path | list | None], flag: str = "--out") -> None:
    """OutputError if the existing file `path` is one of the command's `inputs` ({what: path or paths}; a folder's
    files as a list: `common.codes.codes_files`, the images of a folder): it would replace what the command or
    the pipeline reads, so even --overwrite does not allow it."""
    if not path.exists():
        return
    for name, given in inputs.items():
        for p in given if isinstance(given, list) else [given]:
            if p is not None and Path(p).is_file() and os.path.samefile(path, p):
                raise OutputError(f"{flag} {path} is also {name}: a command never writes over its own input "
                                  f"(not even with --overwrite); choose another {flag}")  # fmt: skip


def check_output_dir(path: str | Path, names: list[str], overwrite: bool, flag: str = "--out") -> Path:
    """A directory the command will fill with `names`: refuse a file, an unwritable place, or (without
    --overwrite) a directory that already holds one of `names`."""
    check_writable_dir(path, flag)  # as typed: it refuses "" (which Path() would make ".")
    path = Path(path)
    if path.is_dir() and not overwrite:
        existing = [n for n in names if (path / n).exists()]
        if existing:
            more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
            raise OutputError(f"{path / existing[0]} already exists{more}; pass --overwrite to replace, "
                              f"or choose another {flag}")  # fmt: skip
    return path


@contextmanager
def staging_dir(dest: str | Path) -> Iterator[Path]:
    """A hidden temporary folder beside `dest` to write into. On success its files move into `dest` (created
    if missing: then the whole folder is renamed into place), sub-folders too: one `dest` lacks moves whole,
    one it has gets the files merged in (a folder cannot replace one that holds files); on failure it is
    removed. A kill leaves only the hidden ``.<name>.*.tmp`` folder, never a `dest` that looks complete."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp"))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700 folders
        if not dest.exists():
            os.replace(tmp, dest)
        else:
            _move_into(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)  # only the folder this function created


def _move_into(src: Path, dest: Path) -> None:
    """Move everything in `src` into the existing folder `dest`: files and new sub-folders by rename, the files of
    sub-folders `dest` already has merged into them."""
    for f in sorted(src.iterdir()):
        if f.is_dir() and (dest / f.name).is_dir():
            _move_into(f, dest / f.name)
        else:
            os.replace(f, dest / f.name)
