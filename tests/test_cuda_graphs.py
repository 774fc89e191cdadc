"""GraphedSampler's step path gives sample_codes' codes (off CUDA it runs the same steps without graphs)."""

from __future__ import annotations

import pytest
import torch
from conftest import small_prior

from stage2_prior.build import PRIORS
from stage2_prior.cuda_graphs import GraphedSampler
from stage2_prior.sampling import sample_codes


def make(kind: str) -> torch.nn.Module:
    return small_prior(kind, 16, (3, 4), 3).eval()


@pytest.mark.parametrize("kind", list(PRIORS))  # a new prior kind too, without editing this file
@pytest.mark.parametrize("opts", [{}, {"temperature": 0.8, "top_k": 5, "top_p": 0.9}])
@pytest.mark.parametrize("conditional", [True, False])
def test_graphed_steps_equal_sample_codes(kind, opts, conditional):
    net = make(kind)
    labels = torch.tensor([0, 1, 2, 1, 0]) if conditional else None
    with GraphedSampler(net, labels, 5, **opts) as sampler:
        got = sampler.sample(torch.Generator().manual_seed(7))
    assert net.step_labels is None  # close() released the decoding state
    want = sample_codes(net, 5, labels, generator=torch.Generator().manual_seed(7), **opts)
    assert got.shape == (5, 3, 4)
    assert torch.equal(got, want)
