"""One process trains in a run folder at a time: the process that chooses a run (rank 0) holds an exclusive
``flock`` on ``<run>/.lock`` until its command ends.

Without it, two fits given the same ``--log.name`` at the same moment both found the folder empty and trained
into it (one run's config.yaml beside the other's checkpoints, their metrics interleaved), and a job submitted
twice resumed the same run twice with ``--ckpt_path last``. The kernel drops the lock when its process ends,
however it ends (a crash, SIGKILL, a preempted node), so a requeued SLURM job or a rerun after a crash finds it
free; a stale lock file means nothing. File systems without locks (some network mounts) go on unlocked.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from common.cli import UserError

try:
    import fcntl
except ImportError:  # not on Windows: no lock there
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"  # inside the run folder; not a sign that the folder holds a run (common.launch)
_held: dict[Path, int] = {}  # run folder -> the open file whose lock this process holds


def lock_run(folder: Path, flag: str) -> None:
    """Take the run folder's lock for this process, or UserError naming `flag` if another process holds it."""
    folder = Path(folder).resolve()
    if fcntl is None or folder in _held:
        return
    try:
        fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:  # a folder we cannot write: the run fails on its first file with its own message
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 200).decode(errors="replace").split()
        os.close(fd)
        who = f" (pid {holder[0]} on {holder[1]})" if len(holder) >= 2 else ""
        raise UserError(f"{flag}: {folder} is being trained by another process{who}; wait for it to end or stop "
                        "it, or choose another --log.name") from None  # fmt: skip
    except OSError:  # no locks here (ENOLCK, EOPNOTSUPP)
        os.close(fd)
        return
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
    _held[folder] = fd


def release_run(folder: Path | None) -> None:
    """Let go of the lock this process holds on `folder` (nothing if it holds none)."""
    if folder is not None and (fd := _held.pop(Path(folder).resolve(), None)) is not None:
        os.close(fd)  # closing the file drops its flock
