"""The masked-token (MaskGIT-style) prior: network invariants (shapes, bidirectionality, masked values ignored),
the cosine mask schedule and loss, learning, the parallel sampler (exactly S passes, seeded, repair keeps the
kept codes, CFG), the weights-only round trip, and `train_stage2`/`sample`/`evaluate` end to end on tiny data."""

from __future__ import annotations

import csv
import math
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import user_error
from PIL import Image

from common.checkpoint import CheckpointError
from stage2_prior import decoding
from stage2_prior.build import MASKED_PRIORS, PRIORS, load_prior, require_likelihood
from stage2_prior.masked_sampling import sample_masked, still_masked
from stage2_prior.maskgit import MASKGIT_SIZES, MaskedPrior, cosine_mask_ratio, masked_token_loss, random_mask
from stage2_prior.transformer import Transformer
from tools.repair import cell_pixels, codes_to_redraw

K, GRID, NUM_CLASSES = 8, (3, 4), 5  # non-square grid to catch row/column mix-ups
T = GRID[0] * GRID[1]
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def make_prior(num_classes: int = NUM_CLASSES, grid=GRID) -> MaskedPrior:
    torch.manual_seed(0)
    return MaskedPrior(K, grid, num_classes, n_layer=2, n_head=2, n_embd=32).eval()


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_masked_temperature_end_schedules_the_temperature_over_the_steps():
    """None or an equal end is the constant temperature (the same codes); 1e-4 -> 1e4 makes the first step's
    draws (the most confident, fixed first) nearly greedy and the last step's nearly uniform, so the grids
    differ from the constant temperature's and from the reverse schedule's."""
    prior, labels = make_prior(), torch.zeros(32, dtype=torch.long)
    constant = sample_masked(prior, 32, labels, temperature=0.7, generator=seeded(3))
    assert torch.equal(constant, sample_masked(prior, 32, labels, temperature=0.7, temperature_end=0.7,
                                               generator=seeded(3)))  # fmt: skip
    rising = sample_masked(prior, 32, labels, temperature=1e-4, temperature_end=1e4, generator=seeded(3))
    falling = sample_masked(prior, 32, labels, temperature=1e4, temperature_end=1e-4, generator=seeded(3))
    assert not torch.equal(rising, falling) and not torch.equal(rising, constant)
    with pytest.raises(ValueError, match="temperature_end must be >= 1e-06"):
        sample_masked(prior, 2, None, temperature_end=-1.0)


def random_codes(batch: int = 2, seed: int = 1, grid=GRID) -> torch.Tensor:
    return torch.randint(0, K, (batch, *grid), generator=seeded(seed))


def count_passes(prior: MaskedPrior) -> list[int]:
    """The batch size of every network pass the sampler makes from now on (each is one `masked_logits`)."""
    calls: list[int] = []
    inner = prior.masked_logits

    def counted(codes, masked, labels=None):
        calls.append(codes.shape[0])
        return inner(codes, masked, labels)

    prior.masked_logits = counted
    return calls


# ------------------------------------------------------------------------------------------ network
def test_named_sizes_and_registration():
    assert set(MASKGIT_SIZES) == {"tiny", "small", "base"}
    assert MASKED_PRIORS["maskgit"] is MaskedPrior and "maskgit" not in PRIORS  # PRIORS: exact likelihoods only
    prior = MaskedPrior(K, GRID, NUM_CLASSES, **MASKGIT_SIZES["tiny"])
    assert (prior.codebook_size, prior.grid_shape, prior.num_classes, prior.null_label) == (K, GRID, 5, 5)
    assert prior.mask_token == K and prior.is_autoregressive is False


@pytest.mark.parametrize("num_classes", [0, NUM_CLASSES])
@pytest.mark.parametrize("grid", [GRID, (1, T)])  # (1, T): a flattened multi-level sequence works unchanged
def test_output_shape(num_classes, grid):
    prior = make_prior(num_classes, grid)
    codes = random_codes(grid=grid)
    labels = torch.tensor([0, 3]) if num_classes else None
    logits = prior(codes, torch.zeros_like(codes, dtype=torch.bool), labels)
    assert logits.shape == (2, K, *grid) and logits.dtype == torch.float32
    with pytest.raises(ValueError, match="must both be"):
        prior(codes[..., :1], torch.zeros_like(codes[..., :1], dtype=torch.bool))


def test_bidirectional():
    """The opposite of the Transformer's causality test: changing the LAST code changes the logits at the
    FIRST position (a causal prior's first position sees no codes at all)."""
    prior = make_prior()
    codes = random_codes(1)
    none = torch.zeros_like(codes, dtype=torch.bool)
    other = codes.clone()
    other[0, -1, -1] = (codes[0, -1, -1] + 1) % K
    a, b = prior(codes, none), prior(other, none)
    assert not torch.allclose(a[:, :, 0, 0], b[:, :, 0, 0])
    causal = Transformer(K, GRID, NUM_CLASSES, n_layer=2, n_head=2, n_embd=32).eval()
    assert torch.equal(causal(codes)[:, :, 0, 0], causal(other)[:, :, 0, 0])


def test_masked_logits_are_the_full_logits_at_the_masked_positions():
    prior = make_prior()
    codes, masked = random_codes(3), random_mask((3, *GRID), seeded(4))
    full = prior(codes, masked, torch.tensor([0, 1, 2])).permute(0, 2, 3, 1)  # (B, H, W, K)
    assert torch.allclose(prior.masked_logits(codes, masked, torch.tensor([0, 1, 2])), full[masked], atol=1e-6)


def test_masked_logits_in_passes_are_the_same_logits_in_the_same_order(monkeypatch):
    """Long sequences go a few maps a forward (decoding.TOKENS_PER_PASS: 1,280-code maps, 256 grids guided
    took 7.3 GB a step in one forward, 2.9 GB in passes); the sampler sees the same (M, K) rows."""
    prior, labels = make_prior(), torch.tensor([0, 1, 2, 3, 4])
    codes, masked = random_codes(5), random_mask((5, *GRID), seeded(4))
    whole = prior.masked_logits(codes, masked, labels)
    monkeypatch.setattr(decoding, "TOKENS_PER_PASS", 2 * GRID[0] * GRID[1])  # passes of 2, 2, 1 maps
    torch.testing.assert_close(prior.masked_logits(codes, masked, labels), whole)
    torch.testing.assert_close(prior.masked_logits(codes, masked, None)[: int(masked[0].sum())],
                               prior.masked_logits(codes[:1], masked[:1], None))  # fmt: skip


def test_masked_values_are_ignored_and_the_label_matters():
    prior = make_prior()
    codes = random_codes(1)
    masked = torch.zeros_like(codes, dtype=torch.bool)
    masked[0, 1, 2] = True
    other = codes.clone()
    other[0, 1, 2] = (codes[0, 1, 2] + 3) % K  # a different value under the mask
    assert torch.equal(prior(codes, masked), prior(other, masked))
    assert not torch.equal(prior(codes, masked), prior(codes, torch.zeros_like(masked)))
    assert not torch.equal(prior(codes, masked, torch.tensor([1])), prior(codes, masked, torch.tensor([2])))
    assert torch.equal(prior(codes, masked, torch.tensor([-1])), prior(codes, masked, None))  # -1 = null class


# ------------------------------------------------------------------------------------------ schedule and loss
def test_cosine_mask_schedule():
    assert cosine_mask_ratio(torch.tensor(0.0)) == 1.0 and abs(float(cosine_mask_ratio(torch.tensor(1.0)))) < 1e-6
    masked = random_mask((4000, *GRID), seeded(0))
    counts = masked.flatten(1).sum(1).float()
    assert counts.min() >= 1 and counts.max() == T
    # E[ceil(T cos(pi r / 2))] is a little above T * 2 / pi
    assert T * 2 / math.pi < counts.mean() < T * 2 / math.pi + 1
    assert torch.equal(masked, random_mask((4000, *GRID), seeded(0)))  # seeded
    assert not torch.equal(masked, random_mask((4000, *GRID), seeded(1)))


def test_loss_counts_masked_positions_only():
    codes = random_codes(2)
    masked = torch.zeros_like(codes, dtype=torch.bool)
    masked[0, 0, 0] = masked[1, 2, 3] = True
    logits = torch.randn(2, K, *GRID, generator=seeded(3))
    out = masked_token_loss(logits, codes, masked)
    changed = logits.clone()
    changed[:, :, 1] += 10 * torch.randn(2, K, GRID[1])  # row 1 holds no masked position
    assert torch.allclose(masked_token_loss(changed, codes, masked)["nll"], out["nll"])
    expected = torch.nn.functional.cross_entropy(logits.permute(0, 2, 3, 1)[masked], codes[masked])
    assert torch.allclose(out["nll"], expected) and int(out["count"]) == 2


def test_training_lowers_the_masked_loss():
    torch.manual_seed(0)
    prior = MaskedPrior(K, GRID, 2, n_layer=2, n_head=2, n_embd=32).train()
    base = torch.arange(T).reshape(GRID) % K  # two classes, each one fixed pattern: fully predictable
    codes = torch.stack([base, (K - 1 - base)]).repeat(8, 1, 1)  # (16, 3, 4)
    labels = torch.tensor([0, 1]).repeat(8)
    eval_mask = random_mask(codes.shape, seeded(9))

    def loss() -> float:
        with torch.no_grad():
            return float(masked_token_loss(prior(codes, eval_mask, labels), codes, eval_mask)["nll"])

    before = loss()
    opt = torch.optim.AdamW(prior.parameters(), lr=3e-3)
    for _ in range(60):
        masked = random_mask(codes.shape)
        opt.zero_grad()
        masked_token_loss(prior(codes, masked, labels), codes, masked)["nll"].backward()
        opt.step()
    assert loss() < 0.3 * before


# ------------------------------------------------------------------------------------------ sampler
@pytest.mark.parametrize("steps", [1, 4, 8])
def test_exactly_s_passes_all_filled_in_range_and_seeded(steps):
    prior = make_prior().train()
    calls = count_passes(prior)
    labels = torch.tensor([0, 4, 2])
    a = sample_masked(prior, 3, labels, steps=steps, generator=seeded(7))
    assert calls == [3] * steps
    assert a.shape == (3, *GRID) and a.dtype == torch.long and ((a >= 0) & (a < K)).all()
    assert torch.equal(a, sample_masked(prior, 3, labels, steps=steps, generator=seeded(7)))
    assert prior.training  # restored


def test_seeds_and_temperature_change_the_samples():
    prior = make_prior()
    a = sample_masked(prior, 4, generator=seeded(1))
    assert not torch.equal(a, sample_masked(prior, 4, generator=seeded(2)))
    # near-zero temperature and no confidence noise: every draw is the argmax, whatever the seed
    kw = dict(temperature=1e-4, choice_temperature=0.0)
    greedy = sample_masked(prior, 4, generator=seeded(1), **kw)
    assert torch.equal(greedy, sample_masked(prior, 4, generator=seeded(2), **kw))


def test_unmasking_schedule():
    n0 = torch.tensor([12, 49, 256, 3])
    now, seen = n0.clone(), []
    for step in range(8):
        nxt = still_masked(n0, now, step, 8)
        assert ((nxt < now) | (now == 0)).all() and (nxt >= 0).all()  # at least one fixed per step
        seen.append(nxt)
        now = nxt
    assert (now == 0).all()
    assert seen[3].tolist() == [8, 34, 181, 0]  # floor(n0 * cos(pi/2 * 4/8)), capped by the step before


def test_repair_keeps_the_kept_codes_exactly():
    prior = make_prior()
    prime = random_codes(2, seed=5)
    keep = torch.zeros(GRID, dtype=torch.bool)
    keep[0] = True
    keep[2, 1] = True
    out = sample_masked(prior, 2, prime=prime, keep=keep, generator=seeded(1))
    assert torch.equal(out[:, keep], prime[:, keep]) and ((out >= 0) & (out < K)).all()
    per_sample = torch.rand(2, *GRID, generator=seeded(2)) < 0.5
    out = sample_masked(prior, 2, prime=prime, keep=per_sample, generator=seeded(1))
    assert torch.equal(out[per_sample], prime[per_sample])
    calls = count_passes(prior)
    everything = sample_masked(prior, 2, prime=prime, keep=torch.ones(GRID, dtype=torch.bool), generator=seeded(1))
    assert torch.equal(everything, prime) and calls == []  # nothing to draw: no pass
    one_hole = keep | True
    one_hole[1, 1] = False
    sample_masked(prior, 2, prime=prime, keep=one_hole, generator=seeded(1))
    assert calls == [2]  # one masked code: fixed in the first pass


def test_cfg_runs_both_halves_in_one_pass_and_changes_samples():
    prior = make_prior()
    torch.nn.init.normal_(prior.class_emb.weight, std=1.0)  # classes that matter (the init is nearly uniform)
    calls = count_passes(prior)
    labels = torch.tensor([0, 1, 2, 3])
    plain = sample_masked(prior, 4, labels, generator=seeded(3))
    guided = sample_masked(prior, 4, labels, cfg_scale=20.0, generator=seeded(3))
    assert calls == [4] * 8 + [8] * 8  # guidance: 2n grids per pass, still 8 passes
    assert guided.shape == plain.shape and not torch.equal(plain, guided)
    top1 = sample_masked(prior, 4, labels, top_k=1, choice_temperature=0.0, generator=seeded(3))
    assert torch.equal(top1, sample_masked(prior, 4, labels, top_k=1, choice_temperature=0.0, generator=seeded(4)))


def test_linear_cfg_schedule_follows_the_fixed_fraction(monkeypatch):
    from stage2_prior import masked_sampling

    prior = make_prior()
    torch.nn.init.normal_(prior.class_emb.weight, std=1.0)
    done = []
    real = masked_sampling.guide
    monkeypatch.setattr(masked_sampling, "guide", lambda c, u, s, sched, d: done.append(d) or real(c, u, s, sched, d))
    labels = torch.tensor([0, 1])
    keep = torch.zeros(2, *GRID, dtype=torch.bool)
    keep[1, 0] = True  # the second grid starts with its top row (4 of 12 codes) fixed
    prime = random_codes()
    out = sample_masked(prior, 2, labels, cfg_scale=4.0, cfg_schedule="linear", prime=prime, keep=keep,
                        generator=seeded(3))  # fmt: skip
    assert torch.equal(out[keep], prime[keep]) and len(done) == 8
    for d in done:  # (M, 1): one value per masked position, that of its grid
        assert d.shape[1] == 1 and 0 < d.min() and d.max() <= 1
    # each grid's fraction: codes fixed after the step over all 12; grid 1 counts its kept row as fixed
    first = done[0][:, 0]
    assert torch.allclose(first[:12], torch.full((12,), 1 - 11 / 12))  # grid 0: floor(12 cos(pi/16)) = 11 left
    assert torch.allclose(first[12:], torch.full((8,), 1 - 7 / 12))  # grid 1: floor(8 cos(pi/16)) = 7 left
    assert torch.equal(done[-1], torch.ones_like(done[-1]))  # the last step: everything fixed, full scale


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(cfg_schedule="cosine", labels=torch.tensor([0, 1]), cfg_scale=2.0), "cfg_schedule"),
        (dict(steps=0), "steps"),
        (dict(choice_temperature=-1.0), "choice_temperature"),
        (dict(temperature=0.0), "temperature"),
        (dict(labels=torch.tensor([1, 12])), "unknown class id 12"),
        (dict(prime=torch.zeros(2, *GRID, dtype=torch.long)), "keep"),
        (dict(top_k=0), "top_k"),
    ],
)
def test_sampler_bad_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample_masked(make_prior(), **{"n": 2, **kwargs})


def test_pixel_holes_map_to_codes():
    hole = torch.zeros(16, 16, dtype=torch.bool)
    hole[5, 9] = True  # one pixel in cell (1, 2) of a 4x4 grid of 4-pixel cells
    redraw = codes_to_redraw(hole, (4, 4))
    assert redraw.sum() == 1 and redraw[1, 2]
    assert cell_pixels(redraw, 16).sum() == 16 and cell_pixels(redraw, 16)[4:8, 8:12].all()
    batch = torch.stack([hole, ~hole])
    assert codes_to_redraw(batch, (4, 4)).shape == (2, 4, 4) and codes_to_redraw(batch, (4, 4))[1].all()


# ------------------------------------------------------------------------------------------ checkpoints
def test_load_prior_round_trip_weights_only(tmp_path):
    import pytorch_lightning as pl

    from stage2_prior.prior import Prior

    torch.manual_seed(0)
    module = Prior(K, GRID, NUM_CLASSES, kind="maskgit", size="tiny", codes_meta={"image_size": 12, "channels": 1})
    assert module.monitor == ("val/masked_nll", "min")
    path = tmp_path / "maskgit.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": pl.__version__}, path)  # fmt: skip
    net, hparams = load_prior(path)
    assert isinstance(net, MaskedPrior) and not net.training and hparams["kind"] == "maskgit"
    codes, masked = random_codes(2), random_mask((2, *GRID), seeded(0))
    assert torch.equal(net(codes, masked), module.net.eval()(codes, masked))
    with pytest.raises(CheckpointError, match=r"is a maskgit prior, which has no exact likelihood; compress takes "
                                              r"transformer or pixelcnn priors"):  # fmt: skip
        require_likelihood(net, path, "compress")
    require_likelihood(Transformer(K, GRID, 0, n_layer=1, n_head=1, n_embd=8), path, "compress")  # no error


# ------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def maskgit_run(shapes_folder, tmp_path_factory) -> dict[str, Path]:
    """train_stage1 -> extract_codes -> train_stage2 --model.kind maskgit on the 16x16 shapes (two classes)."""
    from stage1_vqvae.extract import main as extract_main
    from stage1_vqvae.train import main as train_stage1
    from stage2_prior.train import main as train_stage2

    root = tmp_path_factory.mktemp("maskgit")
    train_stage1([
        "fit", "--config", str(CONFIGS / "stage1/tiny.yaml"), "--trainer.default_root_dir", str(root / "s1"),
        "--data.dataset", "image_folder", "--data.root", str(shapes_folder), "--data.image_size", "16",
        "--data.val_size", "8", "--data.test_size", "8", "--data.batch_size", "16",
    ])  # fmt: skip
    extract_main(["--ckpt", str(root / "s1/latest/checkpoints/last.ckpt"), "--out", str(root / "codes")])
    train_stage2([
        "fit", "--config", str(CONFIGS / "stage2/tiny.yaml"), "--data.codes_dir", str(root / "codes"),
        "--trainer.default_root_dir", str(root / "s2"), "--data.batch_size", "8", "--model.kind", "maskgit",
    ])  # fmt: skip
    return {"root": root, "codes": root / "codes", "run": root / "s2/latest",
            "prior": root / "s2/latest/checkpoints/best.ckpt"}  # fmt: skip


def test_train_stage2_logs_masked_metrics_and_a_sample_grid(maskgit_run):
    run = maskgit_run["run"]
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    val = [r for r in rows if r.get("val/masked_nll")]
    assert len(val) >= 2 and all(0 <= float(r["val/masked_accuracy"]) <= 1 for r in val)
    assert any(r.get("train/masked_nll") for r in rows) and not any(r.get("val/bits_per_code") for r in rows)
    assert any(r.get("test/masked_nll") for r in rows)
    assert list((run / "images").glob("samples_step*.png")) and (run / "samples.png").exists()
    net, _ = load_prior(maskgit_run["prior"])
    assert isinstance(net, MaskedPrior) and net.grid_shape == (4, 4)


def test_sample_end_to_end(maskgit_run, tmp_path, capsys):
    from tools.sample import main as sample_main

    args = ["--prior", str(maskgit_run["prior"]), "--per_class", "3", "--cfg_scale", "2", "--top_p", "0.9"]
    sample_main([*args, "--out", str(tmp_path / "a.png")])
    sample_main([*args, "--out", str(tmp_path / "b.png"), "--steps", "8"])  # 8 is the default
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    assert a["codes"].shape == (6, 4, 4) and a["images"].shape == (6, 1, 16, 16)
    assert np.array_equal(a["codes"], b["codes"]) and sorted(a["labels"].tolist()) == [0, 0, 0, 1, 1, 1]
    assert np.asarray(Image.open(tmp_path / "a.png")).shape[:2] == (2 + 2 * 34, 2 + 3 * 34)  # a row per class, x2
    sample_main([*args, "--out", str(tmp_path / "c.npz"), "--steps", "2"])
    assert not np.array_equal(np.load(tmp_path / "c.npz")["codes"], a["codes"])
    err = user_error(sample_main, [*args, "--out", str(tmp_path / "d.png"), "--steps", "0"], capsys)
    assert "--steps must be >= 1, got 0" in err


def test_the_masked_prior_benchmarks_run_on_trained_models(maskgit_run, shapes_folder, tmp_path):
    """benchmarks/maskgit_quality.py and maskgit_repair.py, whose figures the README quotes, on tiny models and
    an autoregressive prior of the same codes: every setting scored, the choice made on validation, repairs
    kept every kept code (the script asserts it), and the images are the test split stage 1 was trained with
    (8 of the 64 shapes; the folder's default split has 6), read from its checkpoint, not the defaults."""
    import json
    import subprocess
    import sys

    from stage2_prior.train import main as train_stage2
    from tools.train_feature_net import main as train_feature_net

    train_stage2(["fit", "--config", str(CONFIGS / "stage2/tiny.yaml"), "--data.codes_dir", str(maskgit_run["codes"]),
                  "--trainer.default_root_dir", str(tmp_path / "ar"), "--data.batch_size", "8"])  # fmt: skip
    features = tmp_path / "features.pt"
    train_feature_net(["--data.dataset", "image_folder", "--data.root", str(shapes_folder), "--data.image_size",
                       "16", "--data.val_size", "8", "--data.test_size", "8", "--data.batch_size", "16", "--steps", "5",
                       "--out", str(features)])
    both = ["--ar", str(tmp_path / "ar/latest/checkpoints/best.ckpt"), "--masked", str(maskgit_run["prior"]),
            "--features", str(features)]  # fmt: skip
    subprocess.run([sys.executable, "benchmarks/maskgit_quality.py", *both, "--codes", str(maskgit_run["codes"]),
                    "--n", "6", "--cfg_scale", "1", "2", "--train_steps", "1", "--json", str(tmp_path / "q.json")],
                   cwd=CONFIGS.parent, check=True, capture_output=True)  # fmt: skip
    q = json.loads((tmp_path / "q.json").read_text())
    names = ["ar_cfg1", "ar_cfg2", "masked_cfg1_ct64", "masked_cfg2_ct64"]
    assert all(q[f"{k}_fid_test"] >= 0 and q[f"{k}_fid_val"] >= 0 for k in names)
    for kind in ("ar", "masked"):
        best = q[f"best_on_val_{kind}"]
        assert q[f"{best}_fid_val"] == min(q[f"{k}_fid_val"] for k in names if k.startswith(kind))
    assert q["best_on_val_fid_ratio_masked_over_ar"] == round(q["best_on_val_masked_fid_test"]
                                                              / q["best_on_val_ar_fid_test"], 3)  # fmt: skip
    assert q["train_maps_per_s_ar"] > 0 and q["train_maps_per_s_masked"] > 0
    # class agreement (the feature net's top-1 = the class drawn) beside the FIDs, 6 samples: a multiple of 1/6
    assert 0 <= q["class_agreement_floor_test"] <= 1
    assert all(round(q[f"{k}_class_agreement"] * 6, 3) % 1 == 0 for k in names)
    assert q["best_on_val_ar_class_agreement"] == q[f"{q['best_on_val_ar']}_class_agreement"]
    subprocess.run([sys.executable, "benchmarks/maskgit_repair.py", *both, "--n", "100", "--batch_size", "4", "--json",
                    str(tmp_path / "r.json")], cwd=CONFIGS.parent, check=True, capture_output=True)
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["images"] == 8
    for hole in ("centre_square", "lower_half", "random_half_of_codes"):
        assert 0 < r[f"{hole}_codes_redrawn"] < 1
        for who in ("ar", "masked", "reconstruction"):
            assert math.isfinite(r[f"{hole}_{who}_psnr_hole_db"]) and math.isfinite(r[f"{hole}_{who}_psnr_seam_db"])


def test_repair_with_a_pixel_mask_keeps_the_other_codes(maskgit_run, shapes_folder, tmp_path):
    from tools.sample import main as sample_main

    prime = next(shapes_folder.rglob("*.png"))
    mask = np.full((16, 16), 255, np.uint8)
    mask[9:14, 2:6] = 0  # a 5x4-pixel hole: rows 9..13 touch code rows 2 and 3, columns 2..5 code columns 0 and 1
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "repair.png"
    sample_main(["--prior", str(maskgit_run["prior"]), "--prime", str(prime), "--mask", str(tmp_path / "mask.png"),
                 "--n", "4", "--out", str(out)])  # fmt: skip
    codes = np.load(out.with_suffix(".npz"))["codes"]
    redraw = np.zeros((4, 4), bool)
    redraw[2:4, 0:2] = True
    assert codes.shape == (4, 4, 4) and (codes[:, ~redraw] == codes[0, ~redraw]).all()  # kept: the prime's, exactly
    grid = np.asarray(Image.open(out))
    assert grid.shape[:2] == (2 + 34, 2 + 6 * 34)  # original | masked | 4 repairs, 16 px tiles at scale 2
    masked_tile = grid[2:34, 36:68]
    assert (masked_tile[18:32, 0:16] == 128).all()  # the redrawn cells (rows 8..15, cols 0..7 at scale 2) are grey


def test_repairs_towards_classes_with_guidance_one_row_each(maskgit_run, shapes_folder, tmp_path):
    """MaskGIT's class-conditional editing: --classes/--per_class with --prime redraw the hole towards each class
    (guided with --cfg_scale), one grid row per class, each row starting with the original and the masked image;
    the kept codes stay the prime's exactly. `sample` refused the classes with --prime (repairs were always
    unconditional). --choice_temperature reaches the sampler: another value draws other repairs."""
    from tools.sample import main as sample_main

    prime = next(shapes_folder.rglob("*.png"))
    mask = np.full((16, 16), 255, np.uint8)
    mask[8:16] = 0  # the lower half: code rows 2 and 3
    Image.fromarray(mask).save(tmp_path / "mask.png")

    def repair(out: Path, *extra: str) -> dict:
        sample_main(["--prior", str(maskgit_run["prior"]), "--prime", str(prime), "--mask", str(tmp_path / "mask.png"),
                     "--per_class", "3", "--cfg_scale", "3", "--out", str(out), *extra])  # fmt: skip
        return dict(np.load(out.with_suffix(".npz")))

    got = repair(tmp_path / "edit.png")
    assert got["labels"].tolist() == [0, 0, 0, 1, 1, 1]
    codes = got["codes"]
    assert codes.shape == (6, 4, 4) and (codes[:, :2] == codes[0, :2]).all()  # the top half kept exactly
    grid = np.asarray(Image.open(tmp_path / "edit.png"))
    assert grid.shape[:2] == (2 + 2 * 34, 2 + 5 * 34)  # two rows: original | masked | 3 repairs, 16 px at scale 2
    assert (grid[2:34, 2:34] == grid[36:68, 2:34]).all()  # each row starts with the original
    other = repair(tmp_path / "edit_t.png", "--choice_temperature", "0.5")["codes"]
    assert (other[:, :2] == codes[:, :2]).all() and not (other == codes).all()


def test_a_mask_hole_is_dark_or_transparent_and_an_empty_mask_is_refused(tmp_path):
    """The hole: darker than mid-grey, or more than half transparent (erased: read over white, as images are,
    it looked white and the repair redrew nothing). Light grey keeps. A mask marking nothing is refused."""
    from tools.repair import hole_from_mask_image

    grey = np.full((16, 16), 255, np.uint8)
    grey[0:4, 0:4], grey[8:12, 8:12] = 0, 200  # black: a hole; light grey: kept
    Image.fromarray(grey).save(tmp_path / "grey.png")
    hole = hole_from_mask_image(tmp_path / "grey.png", 16).numpy()
    want = np.zeros((16, 16), bool)
    want[0:4, 0:4] = True
    assert (hole == want).all()
    rgba = np.full((32, 32, 4), 255, np.uint8)  # white, opaque; twice the size: resized like the images
    rgba[16:32, 0:8, 3] = 0  # erased to transparency (still white underneath)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "erased.png")
    hole = hole_from_mask_image(tmp_path / "erased.png", 16).numpy()
    want = np.zeros((16, 16), bool)
    want[8:16, 0:4] = True
    assert (hole == want).all()
    strokes = np.zeros((16, 16, 4), np.uint8)  # black strokes on a transparent layer: only the strokes
    strokes[2:6, 2:6, 3] = 255
    Image.fromarray(strokes, "RGBA").save(tmp_path / "strokes.png")
    want = np.zeros((16, 16), bool)
    want[2:6, 2:6] = True
    assert (hole_from_mask_image(tmp_path / "strokes.png", 16).numpy() == want).all()
    Image.fromarray(np.full((16, 16), 230, np.uint8)).save(tmp_path / "white.png")
    with pytest.raises(ValueError, match=r"white.png marks no pixel to redraw: paint the hole black"):
        hole_from_mask_image(tmp_path / "white.png", 16)


def test_evaluate_prior_reports_the_masked_nll_as_not_a_likelihood(maskgit_run, capsys):
    from tools.evaluate import main as evaluate

    out = maskgit_run["root"] / "eval.json"
    evaluate(["prior", "--ckpt", str(maskgit_run["prior"]), "--codes", str(maskgit_run["codes"]), "--json", str(out)])
    text = capsys.readouterr().out
    assert "masked-token NLL" in text and "not a likelihood" in text
    import json

    result = json.loads(out.read_text())
    assert result["kind"] == "maskgit" and result["masked_nll_bits"] > 0 and "bits_per_code" not in result


@pytest.mark.parametrize("command", ["compress", "score_anomalies"])
def test_likelihood_commands_refuse_it(maskgit_run, tmp_path, shapes_folder, command, capsys):
    from tools.anomaly import main as score_anomalies
    from tools.compress import main_compress as compress

    main, out = {"compress": (compress, "x.vqz"), "score_anomalies": (score_anomalies, "x.csv")}[command]
    images = str(next(shapes_folder.rglob("*.png")))
    err = user_error(main, [images, "--prior", str(maskgit_run["prior"]), "--out", str(tmp_path / out)], capsys)
    assert f"is a maskgit prior, which has no exact likelihood; {command} takes transformer or pixelcnn priors" in err
    assert not (tmp_path / out).exists()


def test_codes_meta_is_kept(maskgit_run):
    from common.codes import read_meta

    _, hparams = load_prior(maskgit_run["prior"])
    assert hparams["codes_meta"]["stage1_sha256"] == asdict(read_meta(maskgit_run["codes"]))["stage1_sha256"]


def test_inverse_cdf_draws_follow_the_probabilities_and_skip_zeros():
    from stage2_prior.masked_sampling import draw

    probs = torch.tensor([[0.0, 0.5, 0.0, 0.25, 0.25, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]]).repeat(20000, 1)
    codes = draw(probs, seeded(0))[:, 0]
    first = torch.bincount(codes[0::2], minlength=6).float() / 20000
    assert torch.allclose(first, probs[0], atol=0.015) and (codes[1::2] == 5).all()
    assert torch.equal(codes, draw(probs, seeded(0))[:, 0])
