"""DataLoader plumbing shared by both stages: a split held as one uint8 tensor, fetched a batch per indexing
op (`UInt8ImageDataset`) or as row numbers (`SplitIndices`), and the loader options (whole batches, workers
that ignore Ctrl-C, a timeout for a hung worker). Torch only.
"""

from __future__ import annotations

import platform
import signal
import sys
import warnings
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from common.images import from_uint8

# A loader worker that sends nothing for this long is hung, not slow: every batch is one index operation on
# data in memory (milliseconds). The DataLoader then raises instead of waiting for good (see loader_options).
WORKER_TIMEOUT_S = 600.0
WORKER_TIMEOUT_MESSAGE = "DataLoader timed out"  # the start of PyTorch's error for it


class UInt8ImageDataset(Dataset):
    """One split as a uint8 tensor; `__getitems__` lets the DataLoader fetch a batch in one indexing op."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images, self.labels = images, labels  # (N, C, H, W) uint8, (N,) long

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return from_uint8(self.images[index]), self.labels[index]

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long)
        return from_uint8(self.images[index]), self.labels[index]


MAX_WORKERS = 64  # --data.num_workers: far beyond what in-memory data can use (100,000 hung starting them)


def already_batched(batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    return batch  # module-level so worker processes can pickle it


def loader_options(workers: int, persistent: bool, shard: dict[str, int] | None = None) -> dict[str, Any]:
    """DataLoader arguments shared by both stages' loaders: whole batches (`already_batched`) and, with
    `workers` worker processes, workers that ignore a terminal's Ctrl-C and outlive an epoch when `persistent`,
    and a fetch that raises after WORKER_TIMEOUT_S of silence (a hung worker ends the run; it resumes from
    `last.ckpt`). `shard`: a DDP rank's place (common.shuffle.shard_of); its forks of workers can hang before
    Python 3.12."""
    options: dict[str, Any] = dict(num_workers=workers, collate_fn=already_batched)
    if workers:
        options.update(persistent_workers=persistent, worker_init_fn=worker_ignores_ctrl_c, timeout=WORKER_TIMEOUT_S)
        if shard is not None and shard.get("num_replicas", 1) > 1 and sys.version_info < (3, 12):
            warnings.warn(
                f"--data.num_workers {workers} under DDP on Python {platform.python_version()}: a worker's fork can "
                "hang for good (CPython gh-112275, fixed in 3.12); the data is in memory, so --data.num_workers 0 "
                "loses nothing", stacklevel=2)  # fmt: skip
    return options


def worker_ignores_ctrl_c(worker_id: int) -> None:
    """A loader worker's init: a terminal's Ctrl-C reaches every process of the job, and a worker it stopped
    made the training's next fetch crash before the step could be saved (common.interrupt); the main process
    ends its workers itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class SplitIndices(Dataset):
    """Row numbers of one split, fetched a batch at a time: (split name, indices (B,) long). The images
    stay where they are (on the training device) and are gathered after the indices arrive there."""

    def __init__(self, split: str, n: int) -> None:
        self.split, self.n = split, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[str, Tensor]:
        return self.split, torch.tensor([index])

    def __getitems__(self, indices: list[int]) -> tuple[str, Tensor]:
        return self.split, torch.as_tensor(indices, dtype=torch.long)


def worker_timeout_hint(e: Exception) -> str:
    """What a hung loader worker means and what to do: the DataLoader's timeout error, explained."""
    known = " (Python < 3.12: CPython gh-112275's deadlock of a fork taken while another thread held a lock)"
    return (f"{e}: a loader worker sent nothing for that long, so it hung{known if sys.version_info < (3, 12) else ''}"
            "; the data is in memory, so run the same command with --data.num_workers 0 and --ckpt_path last "
            "to go on from the last checkpoint")
