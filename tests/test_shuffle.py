"""common.shuffle: the training order a checkpoint can resume mid-epoch."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, DistributedSampler

from common.shuffle import DistributedResumableShuffle, ResumableShuffle, resumable_loader


def batches(loader) -> list[list[int]]:
    return [b.tolist() for b in loader]


def test_same_order_as_a_plain_shuffled_loader():
    """Runs keep the order they had before: the same draws from the global RNG, the same permutations."""
    data = torch.arange(50)
    torch.manual_seed(3)
    plain = [batches(DataLoader(data, batch_size=8, shuffle=True, drop_last=True)) for _ in range(3)]
    after_plain = torch.rand(1)
    torch.manual_seed(3)
    ours = [batches(resumable_loader(data, 8)) for _ in range(3)]
    assert ours == plain and len(ours[0]) == 6 and plain[0] != plain[1]
    assert torch.equal(torch.rand(1), after_plain)  # the global RNG is left where it was


def test_resume_replays_the_rest_of_the_epoch_without_a_draw():
    data = torch.arange(50)
    loader = resumable_loader(data, 8)
    it = iter(loader)
    first = [next(it).tolist() for _ in range(2)]
    loader.sampler.batches = 2  # the data module counts the batches trained on
    state = loader.state_dict()
    rest = [b.tolist() for b in it]
    resumed = resumable_loader(data, 8)
    resumed.load_state_dict(state)
    assert batches(resumed) == rest and len(first + rest) == 6
    assert resumed.sampler.seed == state["seed"] and resumed.sampler.batches == 2
    sampler = ResumableShuffle(50, 8)
    sampler.resume(state)
    rng = torch.get_rng_state()
    order = list(sampler)  # the permutation from the third batch on, the 2 left over by drop_last included
    assert order[:32] == sum(rest, []) and len(order) == 50 - 16 and not set(order) & set(sum(first, []))
    assert torch.equal(torch.get_rng_state(), rng)  # the resumed pass draws nothing from the global RNG
    assert batches(resumed) != rest  # the next epoch: a new permutation, whole again
    assert len(batches(resumed)) == 6


def test_states_that_cannot_resume_start_a_new_permutation():
    sampler = ResumableShuffle(50, 8)
    list(sampler)
    done = {**sampler.state(), "batches": 6}  # the epoch was finished
    limited = {**done, "batches": 3, "epoch_batches": 3}  # limit_train_batches=3 ended the epoch there
    for state in (done, limited, {**done, "batches": 2, "n": 49}, {**done, "batches": 2, "batch_size": 4},
                  {**done, "seed": None, "batches": 2}, {}):  # fmt: skip
        fresh = ResumableShuffle(50, 8)
        fresh.resume(state)
        order = list(fresh)
        assert len(order) == 50 and sorted(order) == list(range(50)) and fresh.batches == 0


def test_ddp_shards_are_lightnings_and_resume_in_their_epoch():
    data = torch.arange(50)
    for rank in (0, 1):
        ours = DistributedResumableShuffle(data, 8, num_replicas=2, rank=rank, seed=7)
        theirs = DistributedSampler(data, num_replicas=2, rank=rank, shuffle=True, seed=7)
        for epoch in (0, 3):
            ours.set_epoch(epoch)
            theirs.set_epoch(epoch)
            assert list(ours) == list(theirs)  # the shards Lightning's own sampler would give
    ours.batches = 2  # rank 1, epoch 3, two batches trained
    state = ours.state()
    resumed = DistributedResumableShuffle(data, 8, num_replicas=2, rank=1, seed=7)  # a new process: epoch 0
    resumed.resume(state)
    assert list(resumed) == list(theirs)[16:] and resumed.epoch == 3 and resumed.batches == 2
    assert len(list(resumed)) == 25  # the next pass is whole again
