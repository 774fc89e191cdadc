"""GatedPixelCNN's incremental decoding (row and column caches, see stage2_prior/pixelcnn.py): every step
equals the full forward, and the sampler, CFG and GraphedSampler draw the same codes as the full forward."""

from __future__ import annotations

import pytest
import torch

from stage2_prior.cuda_graphs import GraphedSampler
from stage2_prior.pixelcnn import GatedPixelCNN
from stage2_prior.sampling import sample_codes

K, NUM_CLASSES = 8, 3
NETS = [  # (grid, kernel_size, n_layer, num_classes)
    ((3, 4), 3, 1, NUM_CLASSES),
    ((3, 4), 5, 2, 0),
    ((4, 4), 3, 3, 0),
    ((4, 4), 5, 3, NUM_CLASSES),
    ((4, 3), 5, 2, NUM_CLASSES),  # narrower than the kernel: padded columns on both sides
]


def make_net(grid, kernel_size, n_layer, num_classes, seed=0) -> GatedPixelCNN:
    torch.manual_seed(seed)
    net = GatedPixelCNN(K, grid, num_classes, n_layer=n_layer, channels=8, kernel_size=kernel_size).eval()
    with torch.no_grad():  # class biases of std 0.02 hardly matter: make conditioning visible
        for layer in net.layers:
            layer.v_cond.weight.normal_()
            layer.h_cond.weight.normal_()
    return net


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def labels_for(net: GatedPixelCNN, n: int) -> torch.Tensor | None:
    return torch.arange(n) % net.num_classes if net.num_classes else None


@pytest.mark.parametrize("cfg", NETS)
def test_every_step_equals_full_forward(cfg):
    net = make_net(*cfg)
    n, T = 3, net.seq_len
    codes = torch.randint(0, K, (n, *net.grid_shape), generator=seeded(1))
    labels = labels_for(net, n)
    with torch.no_grad():
        full = net(codes, labels).flatten(2)  # (n, K, T)
        flat = codes.view(n, T)
        with net.decoding(n, labels):
            for t in range(T):
                known = flat.clone()
                known[:, t:] = 0  # the sampler's buffer at step t: only positions < t are filled
                torch.testing.assert_close(net.step_logits(known, t), full[:, :, t], atol=1e-5, rtol=0)


OPTS = [{}, {"temperature": 0.7}, {"top_k": 3}, {"top_p": 0.8, "temperature": 1.3}, {"cfg_scale": 2.0}]


@pytest.mark.parametrize(
    ("cfg", "opts"), [(cfg, opts) for cfg in NETS for opts in OPTS if cfg[3] or "cfg_scale" not in opts]
)
def test_cached_codes_equal_full_forward_codes(cfg, opts):
    """use_cache=False runs the full forward over the whole grid at every step."""
    net = make_net(*cfg)
    n = 6
    labels = labels_for(net, n)
    for seed in range(3):
        fast = sample_codes(net, n, labels, generator=seeded(seed), **opts)
        slow = sample_codes(net, n, labels, generator=seeded(seed), use_cache=False, **opts)
        assert torch.equal(fast, slow), f"seed {seed}"


@pytest.mark.parametrize("cfg", [NETS[0], NETS[3]])
def test_graphed_sampler_equals_sample_codes(cfg):
    net = make_net(*cfg)
    labels = labels_for(net, 5)
    with GraphedSampler(net, labels, 5, temperature=0.9, top_k=5) as sampler:
        first = sampler.sample(seeded(4))
        again = sampler.sample(seeded(4))  # the caches are rebuilt by the steps of each run
    want = sample_codes(net, 5, labels, temperature=0.9, top_k=5, generator=seeded(4))
    assert torch.equal(first, want) and torch.equal(again, want)


def test_begin_twice_with_another_n_and_end_releases():
    net = make_net(*NETS[3])
    codes = torch.randint(0, K, (4, *net.grid_shape), generator=seeded(2))
    with torch.no_grad():
        net.begin(2, torch.tensor([0, 1]))
        net.step_logits(codes[:2].reshape(2, -1), 0)
        net.begin(4, torch.tensor([2, 0, 1, 2]))  # no end() between: the caches are reallocated for 4
        full = net(codes, torch.tensor([2, 0, 1, 2])).flatten(2)
        for t in range(net.seq_len):
            torch.testing.assert_close(net.step_logits(codes.view(4, -1), t), full[:, :, t], atol=1e-5, rtol=0)
        with pytest.raises(ValueError, match="begin"):
            net.step_logits(codes[:2].reshape(2, -1), 0)
        net.end()
    assert net.step_labels is None and net.v_in is None and net.h_src is None and net.v_link is None
    with pytest.raises(RuntimeError, match="begin"):
        net.step_logits(codes.view(4, -1), 0)


def test_state_dict_unchanged_by_decoding():
    net = make_net(*NETS[1])
    keys = list(net.state_dict())
    with torch.no_grad(), net.decoding(2, None):
        net.step_logits(torch.zeros(2, net.seq_len, dtype=torch.long), 0)
        assert list(net.state_dict()) == keys  # the caches are not buffers: checkpoints keep loading
    assert not any(k.startswith(("v_in", "v_link", "h_src")) for k in keys)
