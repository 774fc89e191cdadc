"""A shuffled training order that a checkpoint can pick up in the middle of an epoch (torch only).

`ResumableShuffle` draws each epoch's permutation exactly as torch's `RandomSampler` does (one int64 from
torch's global RNG seeds a generator, then `randperm`), so runs keep the order they always had; it also
remembers that seed, and the data module counts the batches it hands to training
(`ResumableTraining.on_before_batch_transfer`: prefetched batches are not counted). `ResumableLoader`
gives Lightning `state_dict` / `load_state_dict`, so every checkpoint holds (seed, batches trained) and a
run resumed from a mid-epoch checkpoint replays that epoch's permutation from the first batch it had not
trained on, without a draw: it sees the batches the uninterrupted run would have seen.

Under DDP (any strategy with several processes) `DistributedResumableShuffle` is Lightning's own
DistributedSampler (the same seed, `PL_GLOBAL_SEED`, and epoch, so the same shards in the same order) with
the same resume: every rank trains the same number of batches, so rank 0's count is every rank's.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler


def batches_to_skip(state: dict[str, Any], n: int, batch_size: int) -> int:
    """How many batches of an unfinished pass over n indices `state` records as trained; 0 when there is
    nothing to continue (none trained, the epoch done, or another data set size or batch size)."""
    batches = int(state.get("batches", 0))
    same_data = state.get("n") == n and state.get("batch_size") == batch_size
    unfinished = batches < state.get("epoch_batches", n // batch_size) and (batches + 1) * batch_size <= n
    return batches if same_data and unfinished else 0


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
        batches = batches_to_skip(state, self.n, self.batch_size)
        if state.get("seed") is not None and batches:
            self._resume = (int(state["seed"]), batches)


class DistributedResumableShuffle(DistributedSampler):
    """This rank's shard of a seed + epoch permutation (DistributedSampler), resumable at a batch boundary."""

    def __init__(self, dataset: Dataset, batch_size: int, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.batch_size, self.batches = batch_size, 0
        self.epoch_batches: float = self.num_samples // batch_size
        self._resume: tuple[int, int] | None = None

    def __iter__(self) -> Iterator[int]:
        resume, self._resume = self._resume, None
        if resume is not None:  # Lightning builds a resumed run's first iterator before it calls set_epoch
            self.epoch = resume[0]
        shard = list(super().__iter__())  # (num_samples,) this rank's indices for self.epoch
        self.batches = resume[1] if resume is not None else 0
        yield from shard[self.batches * self.batch_size :]

    def state(self) -> dict[str, int | float]:
        return {"epoch": self.epoch, "batches": self.batches, "epoch_batches": self.epoch_batches,
                "n": self.num_samples, "batch_size": self.batch_size}  # fmt: skip

    def resume(self, state: dict[str, Any]) -> None:
        """As ResumableShuffle.resume, for this rank's shard of the epoch `state` names."""
        batches = batches_to_skip(state, self.num_samples, self.batch_size)
        if "epoch" in state and batches:
            self._resume = (int(state["epoch"]), batches)


class ResumableLoader(DataLoader):
    """A DataLoader over a ResumableShuffle whose position Lightning saves in checkpoints and restores.
    Lightning may rebuild it around a sampler of its own (`--trainer.overfit_batches`: a sequential one);
    then there is no position to keep."""

    @property
    def resumable_sampler(self) -> ResumableShuffle | DistributedResumableShuffle | None:
        return self.sampler if isinstance(self.sampler, (ResumableShuffle, DistributedResumableShuffle)) else None

    def state_dict(self) -> dict[str, Any]:
        return self.resumable_sampler.state() if self.resumable_sampler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.resumable_sampler is not None:
            self.resumable_sampler.resume(state)


def resumable_loader(dataset: Dataset, batch_size: int, shard: dict[str, int] | None = None,
                     **kwargs: Any) -> ResumableLoader:  # fmt: skip
    """A shuffled loader of whole batches (drop_last) that resumes mid-epoch; kwargs go to DataLoader.
    shard: None for one process, else the Trainer's `distributed_sampler_kwargs` (num_replicas, rank)."""
    if shard is None:
        sampler: Sampler = ResumableShuffle(len(dataset), batch_size)
    else:  # the seed Lightning gives its own DistributedSampler
        sampler = DistributedResumableShuffle(dataset, batch_size, seed=int(os.getenv("PL_GLOBAL_SEED", 0)), **shard)
    return ResumableLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, **kwargs)


class ResumableTraining:
    """Mixin for a LightningDataModule whose train_dataloader() may return a ResumableLoader: counts the
    training batches as Lightning moves them to the device, the point where a batch is trained on."""

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.training:
            loader = trainer.train_dataloader
            if isinstance(loader, ResumableLoader) and loader.resumable_sampler is not None:
                loader.resumable_sampler.batches += 1
                loader.resumable_sampler.epoch_batches = trainer.num_training_batches
        return batch


def shard_of(trainer: Any) -> dict[str, int] | None:
    """What resumable_loader needs to know of a Trainer: None for one process (no Trainer, one device),
    else this rank's place (the kwargs Lightning would give its DistributedSampler)."""
    return None if trainer is None else trainer.distributed_sampler_kwargs
