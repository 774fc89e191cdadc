"""Sampling: top-k / top-p filtering, argument checks, seed determinism, cached == naive codes for both
priors, completion keeps given codes, classifier-free guidance."""

import math

import pytest
import torch
from conftest import small_prior

from stage2_prior import sampling
from stage2_prior.build import PRIORS
from stage2_prior.sampling import filter_logits, guide, sample_codes

K, GRID, NUM_CLASSES = 8, (3, 4), 5
KINDS = list(PRIORS)  # a new prior kind is sampled by these tests without editing this file


def make_prior(kind: str, num_classes: int = NUM_CLASSES):
    return small_prior(kind, K, GRID, num_classes)


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def probs_logits(*probs: float) -> torch.Tensor:
    return torch.tensor([[math.log(p) if p > 0 else float("-inf") for p in probs]])


# --- filter_logits ---


def test_top_k_keeps_exactly_k():
    logits = torch.randn(6, 10, generator=seeded())
    for k in [1, 3, 10, 50]:
        out = filter_logits(logits, top_k=k)
        kept = out.isfinite()
        assert (kept.sum(-1) == min(k, 10)).all()
        assert torch.equal(out[kept], logits[kept])
        lowest_kept = logits[kept].view(6, -1).min(-1).values
        assert (lowest_kept >= logits.masked_fill(kept, -1e9).max(-1).values).all()
    ties = filter_logits(torch.zeros(2, 10), top_k=4)
    assert (ties.isfinite().sum(-1) == 4).all()


def test_top_p_known_distribution():
    logits = probs_logits(0.1, 0.5, 0.15, 0.25)  # sorted: 0.5, 0.25, 0.15, 0.1
    kept = lambda p: filter_logits(logits, top_p=p).isfinite()[0].tolist()  # noqa: E731
    assert kept(1e-6) == [False, True, False, False]  # tiny p: the argmax only
    assert kept(0.49) == [False, True, False, False]
    assert kept(0.6) == [False, True, False, True]
    assert kept(0.8) == [False, True, True, True]
    assert kept(0.95) == [True, True, True, True]
    assert kept(1.0) == [True, True, True, True]
    with_zero = probs_logits(0.5, 0.0, 0.5)
    assert filter_logits(with_zero, top_p=1.0).isfinite()[0].tolist() == [True, False, True]


def test_top_p_matches_reference():
    logits = torch.randn(20, 12, generator=seeded(3)) * 2
    for p in [0.05, 0.3, 0.5, 0.9]:
        kept = filter_logits(logits, top_p=p).isfinite()
        for row, keep_row in zip(logits.double().softmax(-1), kept):
            order = row.argsort(descending=True)
            m = int((row[order].cumsum(0) < p).sum()) + 1  # smallest prefix whose mass reaches p
            assert set(keep_row.nonzero().flatten().tolist()) == set(order[:m].tolist())


def test_top_k_then_top_p_on_renormalised_remainder():
    logits = probs_logits(0.4, 0.3, 0.2, 0.1)
    assert filter_logits(logits, top_p=0.5).isfinite().sum() == 2  # 0.4 < 0.5 -> two tokens
    both = filter_logits(logits, top_k=2, top_p=0.5)  # renormalised: 4/7 >= 0.5 -> one token
    assert both.isfinite()[0].tolist() == [True, False, False, False]


@pytest.mark.parametrize(
    ("kwargs", "name"), [(dict(top_k=0), "top_k"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p")]
)
def test_filter_bad_args(kwargs, name):
    with pytest.raises(ValueError, match=name):
        filter_logits(torch.zeros(1, 4), **kwargs)


# --- sample_codes ---


@pytest.mark.parametrize("kind", KINDS)
def test_seed_determinism_and_mode_restored(kind):
    prior = make_prior(kind).train()
    labels = torch.tensor([0, 4, 2])
    a = sample_codes(prior, 3, labels, top_k=5, generator=seeded(7))
    b = sample_codes(prior, 3, labels, top_k=5, generator=seeded(7))
    assert a.shape == (3, *GRID) and a.dtype == torch.long
    assert ((a >= 0) & (a < K)).all()
    assert torch.equal(a, b)
    assert prior.training  # restored


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_cached_equals_naive(kind, cfg_scale):
    prior = make_prior(kind)
    kw = dict(labels=torch.tensor([1, 3]), temperature=0.9, top_p=0.95, cfg_scale=cfg_scale)
    fast = sample_codes(prior, 2, generator=seeded(11), **kw)
    slow = sample_codes(prior, 2, generator=seeded(11), use_cache=False, **kw)
    assert torch.equal(fast, slow)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("use_cache", [True, False])
def test_completion_keeps_given_codes(kind, use_cache):
    prior = make_prior(kind)
    prime = torch.randint(0, K, (2, *GRID), generator=seeded(5))
    keep = torch.zeros(GRID, dtype=torch.bool)
    keep[0] = True  # the top row is given
    keep[2, 1] = True
    out = sample_codes(prior, 2, prime=prime, keep=keep, generator=seeded(1), use_cache=use_cache)
    assert torch.equal(out[:, keep], prime[:, keep])
    per_sample = torch.rand(2, *GRID, generator=seeded(2)) < 0.5
    out = sample_codes(prior, 2, prime=prime, keep=per_sample, generator=seeded(1), use_cache=use_cache)
    assert torch.equal(out[per_sample], prime[per_sample])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("schedule", ["constant", "linear"])
def test_cfg_changes_samples(kind, schedule):
    prior = make_prior(kind)
    for emb in [m for m in prior.modules() if isinstance(m, torch.nn.Embedding) and m.num_embeddings == 6]:
        torch.nn.init.normal_(emb.weight, std=1.0)  # classes that matter (the init is nearly uniform)
    labels = torch.tensor([0, 1, 2, 3])
    plain = sample_codes(prior, 4, labels, generator=seeded(3))
    guided = sample_codes(prior, 4, labels, cfg_scale=20.0, cfg_schedule=schedule, generator=seeded(3))
    assert guided.shape == plain.shape
    assert not torch.equal(plain, guided)


def test_guide_schedules():
    cond, uncond = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert torch.equal(guide(cond, uncond, 3.0, "constant", 0.0), torch.tensor([[6.0, -2.0]]))
    assert torch.equal(guide(cond, uncond, 3.0, "linear", 0.0), cond)  # nothing fixed yet: unguided
    assert torch.equal(guide(cond, uncond, 3.0, "linear", 0.5), torch.tensor([[4.0, -1.0]]))  # scale 2
    assert torch.equal(guide(cond, uncond, 3.0, "linear", 1.0), guide(cond, uncond, 3.0, "constant", 0.0))
    with pytest.raises(ValueError, match="cfg_schedule"):
        guide(cond, uncond, 3.0, "cosine", 0.5)


@pytest.mark.parametrize("kind", KINDS)
def test_linear_cfg_schedule_grows_over_the_grid(kind, monkeypatch):
    prior, labels, T = make_prior(kind), torch.tensor([0, 1, 2]), GRID[0] * GRID[1]
    done = []
    real = sampling.guide
    monkeypatch.setattr(sampling, "guide", lambda c, u, s, sched, d: done.append(d) or real(c, u, s, sched, d))
    linear = sample_codes(prior, 3, labels, cfg_scale=4.0, cfg_schedule="linear", generator=seeded(3))
    assert done == [(t + 1) / T for t in range(T)]  # the fraction drawn once each position is drawn
    assert torch.equal(linear, sample_codes(prior, 3, labels, cfg_scale=4.0, cfg_schedule="linear",
                                            generator=seeded(3), use_cache=False))  # fmt: skip
    with pytest.raises(ValueError, match="cfg_schedule"):
        sample_codes(prior, 3, labels, cfg_scale=4.0, cfg_schedule="Linear")


@pytest.mark.parametrize("kind", KINDS)
def test_temperature_end_schedules_the_temperature_over_the_raster_order(kind):
    """temperature_end None or equal to temperature is the constant temperature (the same codes); otherwise
    the first position is drawn at `temperature` and the last at `temperature_end`: nearly greedy at 1e-4
    (one code for every sample of a class) and nearly uniform at 1e4 (many)."""
    prior, labels = make_prior(kind), torch.zeros(64, dtype=torch.long)
    constant = sample_codes(prior, 64, labels, temperature=0.7, generator=seeded(3))
    same = sample_codes(prior, 64, labels, temperature=0.7, temperature_end=0.7, generator=seeded(3))
    assert torch.equal(constant, same)
    rising = sample_codes(prior, 64, labels, temperature=1e-4, temperature_end=1e4, generator=seeded(3)).flatten(1)
    falling = sample_codes(prior, 64, labels, temperature=1e4, temperature_end=1e-4, generator=seeded(3)).flatten(1)
    assert rising[:, 0].unique().numel() == 1 and rising[:, -1].unique().numel() >= 5
    assert falling[:, 0].unique().numel() >= 5


def test_unconditional_prior_samples():
    prior = make_prior("pixelcnn", num_classes=0)
    codes = sample_codes(prior, 2, generator=seeded(0))
    assert codes.shape == (2, *GRID)
    with pytest.raises(ValueError, match="unconditional"):
        sample_codes(prior, 2, torch.tensor([0, 0]))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(n=0), "n "),
        (dict(temperature=0.0), "temperature"),
        (dict(temperature_end=0.0), "temperature_end must be >= 1e-06"),
        (dict(labels=torch.tensor([1, 12])), r"unknown class id 12; this prior has 5 classes \(0..4\)"),
        (dict(labels=torch.tensor([-1, 0])), "unknown class id -1"),
        (dict(labels=torch.tensor([1])), "labels must"),
        (dict(prime=torch.zeros(2, 4, 3, dtype=torch.long), keep=torch.ones(4, 3).bool()), "prime"),
        (dict(prime=torch.zeros(2, *GRID, dtype=torch.long)), "keep"),
        (dict(top_k=0), "top_k"),
    ],
)
def test_sample_bad_args(kwargs, match):
    prior = make_prior("transformer")
    kwargs = dict(dict(n=2), **kwargs)
    with pytest.raises(ValueError, match=match):
        sample_codes(prior, **kwargs)


def test_class_rows_of_a_grid_are_padded_with_the_grids_white() -> None:
    """`sample`'s grid: one row per class (labels_in_turn), short rows padded with tiles of the padding's white,
    so an empty cell reads as empty on white-background data (emoji), not as a black failed sample."""
    from common.grids import make_grid
    from tools.drawing import labels_in_turn, rows_by_label

    labels, per_row = labels_in_turn([0, 1, 2], 8)  # 3, 3, 2 images: the last row one short
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2] and per_row == 3
    images = torch.full((8, 3, 4, 4), -1.0)  # black samples
    tiles = rows_by_label(images, labels, per_row)
    assert tiles.shape == (9, 3, 4, 4) and (tiles[:8] == -1).all() and (tiles[8] == 1).all()
    grid = make_grid(tiles, nrow=per_row, padding=1)  # (3 * 5 + 1, 3 * 5 + 1, 3)
    assert (grid[11:15, 11:15] == 255).all() and (grid[11:15, 6:10] == 0).all()


@pytest.mark.parametrize("kind", KINDS + ["maskgit"])
def test_on_step_reports_every_step_and_draws_nothing(kind):
    """The progress callback is told (step, count) after every step, raster positions or masked passes, and the
    codes equal a draw without it for the same seed (it takes no random draws)."""
    from stage2_prior.build import build_network
    from stage2_prior.masked_sampling import sample_masked

    torch.manual_seed(0)
    prior = build_network(kind, "tiny", K, GRID, NUM_CLASSES, {}) if kind == "maskgit" else make_prior(kind)
    sampler = sample_masked if kind == "maskgit" else sample_codes
    labels = torch.tensor([0, 3])
    quiet = sampler(prior, 2, labels, cfg_scale=2.0, generator=seeded(4))
    told = []
    codes = sampler(prior, 2, labels, cfg_scale=2.0, generator=seeded(4), on_step=lambda i, n: told.append((i, n)))
    count = 8 if kind == "maskgit" else GRID[0] * GRID[1]
    assert told == [(i, count) for i in range(1, count + 1)]
    assert torch.equal(codes, quiet)
