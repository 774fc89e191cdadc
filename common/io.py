"""Atomic writes and output checks: nothing is half-written, and nothing is replaced that the user did not name.

Every file a command writes goes to a temporary name beside its final one and is renamed into place, so a
kill leaves either the old file or the new one. `check_output` runs before any long work: it refuses an
existing output without ``--overwrite``, a directory where a file is wanted (or the reverse), a parent path
that is a file, and a folder we cannot write into. An output it accepted without ``--overwrite`` is also
never replaced at the end: the final step links the new file in (which fails if the name exists) instead
of renaming over it, so two commands started with the same ``--out`` cannot both succeed, one silently
replacing the other (`OutputClash`). Standard library only.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

try:
    import fcntl
except ImportError:  # not on Windows: no turns there
    fcntl = None  # type: ignore[assignment]

DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # no space, over quota, over the file-size limit


class OutputError(OSError):
    """An output path is unusable or would replace something the user did not name; the message says what to do."""


class OutputClash(OutputError):
    """An output that did not exist when it was checked appeared before this command wrote it (another process
    writing the same --out): nothing was replaced."""


# Outputs check_output / check_output_dir accepted without --overwrite (absolute path -> the flag that named
# it): the atomic writers below commit them without replacing, so a file that appears meanwhile survives.
# Module state, so that every command gets this without passing its --overwrite on to each writer.
_no_replace: dict[str, str] = {}


def _key(path: str | Path) -> str:
    return os.path.abspath(path)


def _note_checked(path: str | Path, overwrite: bool, flag: str) -> None:
    if overwrite:
        _no_replace.pop(_key(path), None)
    else:
        _no_replace[_key(path)] = flag


def _may_replace(dest: Path, replace: bool | None) -> bool:
    return _key(dest) not in _no_replace if replace is None else replace


def _clash(dest: Path, shown: Path | None = None) -> OutputClash:
    flag = _no_replace.get(_key(shown or dest), "--out")
    where = f"{flag} {shown}: {dest}" if shown is not None else f"{flag} {dest}"
    return OutputClash(f"{where} appeared while this ran (another process?); nothing was replaced; pass --overwrite "
                       f"to replace it, or choose another {flag}")  # fmt: skip


def _place(tmp: str | Path, dest: Path, replace: bool, shown: Path | None = None, keep_tmp: bool = False) -> None:
    """Rename `tmp` to `dest`; unless `replace`, never over an existing `dest` (OutputClash): a hard link is
    made (which fails if the name exists, atomically) and `tmp` removed (kept with `keep_tmp`). File systems
    without hard links (some FUSE and SMB mounts) get a check and a rename: a small window, as before."""
    if replace:
        os.replace(tmp, dest)
        return
    try:
        os.link(tmp, dest)
    except FileExistsError:
        raise _clash(dest, shown) from None
    except OSError:  # no hard links here
        if os.path.lexists(dest):
            raise _clash(dest, shown) from None
        os.replace(tmp, dest)
        return
    if not keep_tmp:
        os.remove(tmp)


def reserve_space(file: int | Path) -> None:
    """Give the file (an open fd, or a path) its disk blocks now, for its whole size. A file filled through a
    memory map is otherwise sparse, and a disk that fills before every page is written kills the process with
    SIGBUS (no message, temp files left); reserved, a full disk is an OSError (ENOSPC) here, before any work.
    Where the file system cannot reserve (EOPNOTSUPP, EINVAL; no posix_fallocate on macOS) it stays sparse."""
    if not hasattr(os, "posix_fallocate"):
        return
    fd = file if isinstance(file, int) else os.open(file, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
    finally:
        if not isinstance(file, int):
            os.close(fd)


def no_space(e: OSError) -> bool:
    """Whether `e` says the disk is full (or the user's quota, or the file-size limit, reached)."""
    return e.errno in DISK_FULL


def lock_folder(folder: Path, wait: bool = True) -> int | None:
    """An exclusive flock on `folder` itself: the open descriptor that holds it (closing it drops the lock, and so
    does the process's end, however it ends), or None where no lock can be taken (no fcntl, a file system without
    locks, a folder that cannot be opened), and the caller goes on unlocked. `wait` False: BlockingIOError at once
    if another process holds it."""
    if fcntl is None:
        return None
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        raise
    except OSError:  # ENOLCK, EOPNOTSUPP: a network mount that takes no lock on a folder
        os.close(fd)
        return None
    return fd


@contextmanager
def folder_turn(folder: Path) -> Iterator[None]:
    """Hold the lock on `folder` (lock_folder, waiting for it), so that commits into one folder (a codes directory)
    never interleave."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = lock_folder(folder)
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # drops the lock


@contextmanager
def atomic_file(dest: str | Path, mode: str = "wb", replace: bool | None = None,
                placed: list[Path] | None = None) -> Iterator[BinaryIO]:  # fmt: skip
    """A temp file beside `dest`, moved into place only if the block succeeds: never a half-written file. Its
    name is unique (mkstemp), so processes sharing the folder (nodes of one job) never write the same one.
    `mode` "w+b": also readable (a memory map of it, common.image_cache). `replace`: whether a `dest` that
    exists by then is replaced (else OutputClash); None: unless check_output accepted `dest` without
    --overwrite. `placed`: a list `dest` is appended to once it is in place (to undo a group of outputs)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files
        _place(tmp, dest, _may_replace(dest, replace))
        _no_replace.pop(_key(dest), None)  # ours now: a second write in this process may replace it
        if placed is not None:
            placed.append(dest)
    except OSError as e:  # a write's own error names no file ("[Errno 28] No space left on device"): name it
        if not no_space(e) or e.filename is not None or isinstance(e, OutputError):
            raise
        full = OutputError(f"cannot write {dest} ({e.strerror}); free some space there, or write it elsewhere")
        full.errno = e.errno  # still a full disk to callers that look (run_callbacks; strerror would change str())
        raise full from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_atomic(dest: str | Path, data: bytes, replace: bool | None = None) -> None:
    with atomic_file(dest, replace=replace) as f:
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
    if path.exists() and not path.is_file():  # the rename would replace the node itself: as root, /dev/null
        raise OutputError(f"{flag} {path} is not a regular file (a device, FIFO or socket), which a command never "
                          f"replaces (not even with --overwrite); give a file name")  # fmt: skip
    check_not_an_input(path, inputs or {}, flag)
    _check_parent(path, flag)
    if path.exists() and not overwrite:
        raise OutputError(f"{flag} {path} already exists; pass --overwrite to replace it, or choose another {flag}")
    _note_checked(path, overwrite, flag)
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
    _note_checked(path, overwrite, flag)
    return path


@contextmanager
def staging_dir(dest: str | Path, replace: bool | None = None) -> Iterator[Path]:
    """A hidden temporary folder beside `dest` to write into. On success its files move into `dest` (created
    if missing: then the whole folder is renamed into place), sub-folders too: one `dest` lacks moves whole,
    one it has gets the files merged in (a folder cannot replace one that holds files); on failure it is
    removed. A kill leaves only the hidden ``.<name>.*.tmp`` folder, never a `dest` that looks complete.
    `replace` (None: unless check_output_dir accepted `dest` without --overwrite): whether files that appear
    in `dest` meanwhile are replaced; if not, such a file is an OutputClash and none of ours stays in `dest`."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp"))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700 folders
        replace = _may_replace(dest, replace)
        if replace and not dest.exists():
            os.replace(tmp, dest)
        elif replace:
            _move_into(tmp, dest)
        elif not _rename_new_dir(tmp, dest):
            _link_into(tmp, dest, dest)
        _no_replace.pop(_key(dest), None)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)  # only the folder this function created


def _rename_new_dir(src: Path, dest: Path) -> bool:
    """Rename the folder `src` to `dest` if `dest` is missing (or an empty folder: nothing is lost); False if
    `dest` is a folder with files by then (rename refuses to replace it), to be merged into."""
    if dest.exists():
        return False
    try:
        os.rename(src, dest)
        return True
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST) and dest.is_dir():  # it appeared meanwhile, with files
            return False
        if dest.exists() or os.path.islink(dest):
            raise _clash(dest) from None
        raise


def _link_into(src: Path, dest: Path, shown: Path) -> None:
    """Merge `src` into the folder `dest` without replacing any file there: every file is linked in (its source
    kept until all are), so a name that appeared meanwhile stops the merge and takes back what it had added."""
    added: list[Path] = []  # files and folders this merge created in `dest`, in order
    try:
        for f in sorted(src.rglob("*")):
            target = dest / f.relative_to(src)
            if f.is_dir() and not f.is_symlink():
                if not target.is_dir():
                    try:
                        target.mkdir()
                    except FileExistsError:
                        raise _clash(target, shown) from None
                    added.append(target)
            else:
                _place(f, target, replace=False, shown=shown, keep_tmp=True)
                added.append(target)
    except OutputClash:
        for path in reversed(added):  # names we created a moment ago: nobody else's
            with contextlib.suppress(OSError):  # a folder another process has put files in stays
                path.rmdir() if path.is_dir() and not path.is_symlink() else path.unlink()
        raise


def _move_into(src: Path, dest: Path) -> None:
    """Move everything in `src` into the existing folder `dest`: files and new sub-folders by rename, the files of
    sub-folders `dest` already has merged into them."""
    for f in sorted(src.iterdir()):
        if f.is_dir() and (dest / f.name).is_dir():
            _move_into(f, dest / f.name)
        else:
            os.replace(f, dest / f.name)
