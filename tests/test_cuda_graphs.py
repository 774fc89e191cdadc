"""GraphedSampler's step path gives sample_codes' codes (off CUDA it runs the same steps without graphs)."""

from __future__ import annotations

import pytest
import torch

from stage2_prior.cuda_graphs import GraphedSampler
from stage2_prior.pixelcnn import GatedPixelCNN
from stage2_prior.sampling import sample_codes
from stage2_prior.transformer import Transformer


def make(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "transformer":
        return Transformer(16, (3, 4), num_classes=3, n_layer=2, n_head=2, n_embd=32).eval()
    return GatedPixelCNN(16, (3, 4), num_classes=3, n_layer=3, channels=16).eval()


@pytest.mark.parametrize("kind", ["transformer", "pixelcnn"])
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
