"""A shuffled training order that a checkpoint can pick up in the middle of an epoch (torch only).

`ResumableShuffle` draws each epoch's permutation exactly as torch's `RandomSampler` does (one int64 from
torch's global RNG seeds a generator, then `randperm`), so runs keep the order they always had; it also
remembers that seed, and the data module counts the batches it hands to training
(`ResumableTraining.on_before_batch_transfer`: prefetched batches are not counted). `ResumableLoader`
gives Lightning `state_dict` / `load_state_dict`, so every checkpoint holds (seed, batches trained) and a
run resumed from a mid-epoch checkpoint replays that epoch's permutation from the first batch it had not
trained on, without a draw: it sees the batches the uninterrupted run would have seen.

Only for one process: under DDP, Lightning's DistributedSampler shuffles (seed + epoch) as before.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class ResumableShuffle(Sampler[int]):
    """A random permutation of range(n) per pass, resumable at a batch boundary (batches of batch_size)."""

    def __init__(self, n: int, batch_size: int) -> None:
        self.n, self.batch_size = n, batch_size
        self.seed: int | None = None  # the current pass's permutation
        self.batches = 0  # batches of the current pass handed to training (the data module counts them)
        self.epoch_batches: float = n // batch_size  # batches an epoch trains (fewer with limit_train_batches)
        self._resume: tuple[int, int] | None = None

    def __len__(self) -> int:
        return self.n  # a whole epoch, also when resuming: Lightning counts the batches already done

    def __iter__(self) -> Iterator[int]:
        if self._resume is not None:
            (seed, batches), self._resume = self._resume, None
        else:  # RandomSampler's draw, so the order is the one a plain shuffled DataLoader gives
            seed, batches = int(torch.empty((), dtype=torch.int64).random_().item()), 0
        self.seed, self.batches = seed, batches
        generator = torch.Generator()
        generator.manual_seed(seed)
        yield from torch.randperm(self.n, generator=generator)[batches * self.batch_size :].tolist()

    def state(self) -> dict[str, int | None]:
        return {"seed": self.seed, "batches": self.batches, "epoch_batches": self.epoch_batches, "n": self.n,
                "batch_size": self.batch_size}  # fmt: skip

    def resume(self, state: dict[str, Any]) -> None:
        """Make the next pass continue the one `state` describes. Nothing to continue (no pass begun, the
        pass finished, or another data set size or batch size): the next pass draws a new permutation."""
        seed, batches = state.get("seed"), int(state.get("batches", 0))
        same_data = state.get("n") == self.n and state.get("batch_size") == self.batch_size
        unfinished = batches < state.get("epoch_batches", self.n // self.batch_size)
        if seed is not None and same_data and 0 < batches and unfinished and (batches + 1) * self.batch_size <= self.n:
            self._resume = (int(seed), batches)


class ResumableLoader(DataLoader):
    """A DataLoader over a ResumableShuffle whose position Lightning saves in checkpoints and restores."""

    def state_dict(self) -> dict[str, int | None]:
        return self.sampler.state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.resume(state)


def resumable_loader(dataset: Dataset, batch_size: int, **kwargs: Any) -> ResumableLoader:
    """A shuffled loader of whole batches (drop_last) that resumes mid-epoch; kwargs go to DataLoader."""
    sampler = ResumableShuffle(len(dataset), batch_size)
    return ResumableLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, **kwargs)


class ResumableTraining:
    """Mixin for a LightningDataModule whose train_dataloader() may return a ResumableLoader: counts the
    training batches as Lightning moves them to the device, the point where a batch is trained on."""

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.training:
            loader = trainer.train_dataloader
            if isinstance(loader, ResumableLoader):
                loader.sampler.batches += 1
                loader.sampler.epoch_batches = trainer.num_training_batches
        return batch


def one_process(trainer: Any) -> bool:
    """True without a Trainer or under a single-device strategy: where the order is ours to keep. Under DDP
    Lightning puts its DistributedSampler in (and would wrap a sampler of ours, shuffling nothing)."""
    if trainer is None:
        return True
    from pytorch_lightning.strategies import SingleDeviceStrategy  # a Trainer exists: Lightning is loaded

    return isinstance(trainer.strategy, SingleDeviceStrategy)
