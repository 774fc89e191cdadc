"""Invariants of the stage-2 priors (Transformer, GatedPixelCNN) on tiny grids: shapes, exact causality,
no blind spot, class conditioning, KV cache == full forward, fewer rows == first rows, and learning."""

import pytest
import torch
import torch.nn.functional as F
from conftest import small_prior

from stage2_prior import decoding
from stage2_prior.build import PRIORS
from stage2_prior.pixelcnn import PIXELCNN_SIZES, GatedPixelCNN
from stage2_prior.transformer import TRANSFORMER_SIZES, Transformer

K, GRID, NUM_CLASSES = 8, (3, 4), 5  # non-square grid to catch row/column mix-ups
T = GRID[0] * GRID[1]


def make_prior(kind: str, num_classes: int = NUM_CLASSES):
    deeper = {"n_layer": 4} if kind == "pixelcnn" else {}  # its receptive field covers the 3x4 grid
    return small_prior(kind, K, GRID, num_classes, **deeper).eval()


KINDS = list(PRIORS)  # a new prior kind gets these invariants without editing this file


def random_codes(batch: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, K, (batch, *GRID), generator=g)


def test_named_sizes_build():
    for sizes, cls in ((TRANSFORMER_SIZES, Transformer), (PIXELCNN_SIZES, GatedPixelCNN)):
        assert set(sizes) == {"tiny", "small", "base"}
        prior = cls(K, GRID, NUM_CLASSES, **sizes["tiny"])
        assert (prior.codebook_size, prior.grid_shape, prior.num_classes) == (K, GRID, NUM_CLASSES)
        assert prior.null_label == NUM_CLASSES


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("num_classes", [0, NUM_CLASSES])
def test_output_shape(kind, num_classes):
    prior = make_prior(kind, num_classes)
    labels = torch.tensor([0, 3]) if num_classes else None
    logits = prior(random_codes(), labels)
    assert logits.shape == (2, K, *GRID) and logits.dtype == torch.float32


@pytest.mark.parametrize("kind", KINDS)
def test_causality_exact(kind):
    """Logits at raster positions 0..t depend only on codes at positions < t: changing the codes at
    positions >= t leaves them bit-for-bit unchanged."""
    prior = make_prior(kind)
    codes, labels = random_codes(), torch.tensor([1, 4])
    with torch.no_grad():
        ref = prior(codes, labels).flatten(2)  # (B, K, T)
        for t in [0, 1, 3, 4, 6, T - 1]:
            changed = codes.clone().view(2, T)
            changed[:, t:] = (changed[:, t:] + 1 + torch.randint(0, K - 1, changed[:, t:].shape)) % K
            out = prior(changed.view(2, *GRID), labels).flatten(2)
            assert torch.equal(out[:, :, : t + 1], ref[:, :, : t + 1]), f"position {t} sees the future"
            if t < T - 1:
                assert not torch.equal(out[:, :, t + 1], ref[:, :, t + 1])  # and it does see the past


def code_input_grads(prior, codes: torch.Tensor, t: int) -> torch.Tensor:
    """Norm of d(logits at raster position t) / d(embedding of each code), shape (T,)."""
    captured = {}
    emb = prior.tok_emb if isinstance(prior, Transformer) else prior.embed

    def hook(module, args, out):
        captured["x"] = out.detach().requires_grad_()
        return captured["x"]

    handle = emb.register_forward_hook(hook)
    try:
        logits = prior(codes).flatten(2)  # (1, K, T)
        logits[0, :, t].sum().backward()
    finally:
        handle.remove()
    grad = captured["x"].grad[0].reshape(-1, captured["x"].shape[-1]).norm(dim=-1)
    if isinstance(prior, Transformer):  # inputs are c_0..c_{T-2}; c_{T-1} is never an input
        grad = torch.cat([grad, grad.new_zeros(1)])
    return grad  # (T,)


@pytest.mark.parametrize("kind", KINDS)
def test_receptive_field_has_no_blind_spot(kind):
    prior = make_prior(kind)
    codes = random_codes(batch=1)
    for t in range(T):
        grad = code_input_grads(prior, codes, t)
        blind = (grad[:t] == 0).nonzero().flatten().tolist()
        assert not blind, f"position {t} is blind to positions {blind}"
        assert (grad[t:] == 0).all(), f"position {t} sees the future"


@pytest.mark.parametrize("kind", KINDS)
def test_class_conditioning_changes_logits(kind):
    prior = make_prior(kind)
    codes = random_codes(batch=1).expand(3, *GRID)
    with torch.no_grad():
        logits = prior(codes, torch.tensor([0, 2, NUM_CLASSES]))
        null = prior(codes[:1], None)
    assert not torch.allclose(logits[0], logits[1])
    assert not torch.allclose(logits[0], logits[2])
    # labels=None is the null class (last row); batch sizes differ, so allow conv rounding
    torch.testing.assert_close(logits[2], null[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_step_decoding_matches_full_forward(kind):
    """The decoding interface (begin / step_logits / end) gives the full forward's logits at every position."""
    prior = make_prior(kind)
    codes, labels = random_codes(), torch.tensor([2, 0])
    with torch.no_grad():
        full = prior(codes, labels).flatten(2)  # (B, K, T)
        flat = codes.view(2, T).clone()
        with prior.decoding(2, labels):
            for t in range(T):
                later = flat.clone()
                later[:, t:] = 0  # what the sampler's buffer holds at step t: only positions < t are known
                torch.testing.assert_close(prior.step_logits(later, t), full[:, :, t], atol=1e-5, rtol=0)
    assert prior.step_labels is None
    with pytest.raises(RuntimeError, match="begin"):
        prior.step_logits(flat, 0)


@pytest.mark.parametrize("kind", KINDS)
def test_fewer_rows_equal_first_rows(kind):
    prior = make_prior(kind)
    codes, labels = random_codes(), torch.tensor([2, 0])
    forward_rows = getattr(prior, "forward_rows", prior.forward)
    with torch.no_grad():
        full = prior(codes, labels)
        for h in range(1, GRID[0]):
            torch.testing.assert_close(forward_rows(codes[:, :h], labels), full[:, :, :h], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="grid_shape"):
        prior(torch.zeros(1, GRID[0] + 1, GRID[1], dtype=torch.long))


@pytest.mark.parametrize("kind", KINDS)
def test_training_steps_lower_loss(kind):
    prior = make_prior(kind).train()
    codes, labels = random_codes(batch=4), torch.tensor([0, 1, 2, 3])
    opt = torch.optim.Adam(prior.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = F.cross_entropy(prior(codes, labels), codes)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


def test_unlabelled_codes_use_the_null_class():
    """-1 means "unlabelled" in the codes format: such rows go to the prior's null class, never into
    nn.Embedding as -1 (an IndexError)."""
    from stage2_prior.prior import Prior

    prior = Prior(16, GRID, NUM_CLASSES, "transformer", "tiny").eval()
    labels = torch.tensor([-1, 0, -1, 2])
    assert prior.net.labels_or_null(labels, 4, "cpu").tolist() == [NUM_CLASSES, 0, NUM_CLASSES, 2]
    codes = torch.randint(0, 16, (4, *GRID))
    with torch.no_grad():
        torch.testing.assert_close(prior(codes, labels)[[0, 2]], prior(codes[[0, 2]], None), atol=1e-6, rtol=0)
    assert Prior(16, GRID, 0, "pixelcnn", "tiny").net_labels(torch.tensor([-1, 3])) is None  # unconditional


@pytest.mark.parametrize("kind", KINDS)
def test_code_bits_in_passes_equal_one_forward(kind, monkeypatch):
    """code_bits scores long sequences a few maps a forward (TOKENS_PER_PASS); any split gives the same bits."""
    prior, codes = make_prior(kind), random_codes(5)
    labels = torch.tensor([0, 1, 2, 3, 4])
    whole = decoding.code_bits(prior, codes, labels)
    assert whole.shape == codes.shape and bool((whole > 0).all())
    monkeypatch.setattr(decoding, "TOKENS_PER_PASS", 2 * T)
    assert decoding.maps_per_pass(GRID, 5) == 2 and decoding.maps_per_pass(GRID, 1) == 1
    torch.testing.assert_close(decoding.code_bits(prior, codes, labels), whole)
    torch.testing.assert_close(decoding.code_bits(prior, codes, None)[:1], decoding.code_bits(prior, codes[:1], None))
    monkeypatch.setattr(decoding, "TOKENS_PER_PASS", 1)  # under one map: still one map a forward
    assert decoding.maps_per_pass(GRID, 5) == 1


@pytest.mark.parametrize("kind", KINDS)
def test_state_bytes_are_what_begin_allocates(kind):
    """The tools check state_bytes against free memory before drawing (tools.drawing.check_decoding_fits):
    it must count every cache begin() makes, exactly."""
    prior = make_prior(kind)
    prior.begin(3, torch.tensor([0, 1, 2]))
    caches = [t for v in vars(prior).values() for t in (v if isinstance(v, list) else [v]) if torch.is_tensor(t)]
    caches += [t for m in prior.modules() if hasattr(m, "k_cache") for t in (m.k_cache, m.v_cache)]
    made = sum(t.numel() * t.element_size() for t in caches if t is not prior.step_labels)
    pos_table = getattr(prior, "_pos_table", None)  # (T, C): the same for any n, not a per-sequence cache
    made -= 0 if pos_table is None else pos_table.numel() * pos_table.element_size()
    assert made == prior.state_bytes(3) > 0
    assert prior.state_bytes(6) == 2 * prior.state_bytes(3)
    prior.end()
