"""One process trains in a run folder at a time: the process that chooses a run (rank 0) holds an exclusive
``flock`` on the run folder itself until its command ends.

Without it, two fits given the same ``--log.name`` at the same moment both found the folder empty and trained
into it (one run's config.yaml beside the other's checkpoints, their metrics interleaved), and a job submitted
twice resumed the same run twice with ``--ckpt_path last``. The kernel drops the lock when its process ends,
however it ends (a crash, SIGKILL, a preempted node), so a requeued SLURM job or a rerun after a crash finds it
free. The folder is locked, not a file in it: a lock file made a new run's folder look used (the CSV logger
warned that it would delete its files). File systems without locks (some network mounts) go on unlocked.
"""

from __future__ import annotations

import os
from pathlib import Path

from common.cli import UserError
from common.io import lock_folder

_held: dict[Path, int] = {}  # run folder -> the open descriptor of it whose lock this process holds


def lock_run(folder: Path, flag: str) -> None:
    """Take the run folder's lock for this process, or UserError naming `flag` if another process holds it."""
    folder = Path(folder).resolve()
    if folder in _held:
        return
    try:
        fd = lock_folder(folder, wait=False)  # None: no lock here, or the folder is gone (its first file says so)
    except BlockingIOError:
        raise UserError(f"{flag}: {folder} is being trained by another process (a fit started before this one, or "
                        "the same job submitted twice); wait for it to end or stop it, or choose another "
                        "--log.name") from None  # fmt: skip
    if fd is not None:
        _held[folder] = fd


def release_run(folder: Path | None = None) -> None:
    """Let go of the lock this process holds on `folder`, or (None) of every run folder it holds: what a command
    ends with, whether it chose its run or failed on the way (a notebook's next command must find it free)."""
    for held in [Path(folder).resolve()] if folder is not None else list(_held):
        if (fd := _held.pop(held, None)) is not None:
            os.close(fd)  # closing the descriptor drops its flock
