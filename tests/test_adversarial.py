"""The opt-in adversarial loss of stage 1 (stage1_vqvae/discriminator.py): off changes nothing; each player's loss
trains that player alone in the one backward; the adaptive weight is taming's; training with it trains the
discriminator, resumes bit for bit (bf16-mixed too), and leaves a checkpoint the weights-only commands read."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import crashed_and_resumed_equals_straight
from test_stage1 import fit_args, fit_in_subprocess, train_losses

from common import precision
from stage1_vqvae.discriminator import PatchDiscriminator, adaptive_weight, adversarial_losses, hinge_d_loss
from stage1_vqvae.extract import main as extract_codes
from stage1_vqvae.model import VQModel, load_stage1
from stage1_vqvae.train import main as train_stage1
from stage2_prior.train import main as train_stage2
from tools.sample import main as sample

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
NET = dict(width=16, res_blocks=1, res_width=8, downsample=4, code_dim=4, codebook_size=16)
ADV = ["--model.adversarial_weight", "0.5", "--model.adversarial_start", "2", "--model.discriminator_width", "8"]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    monkeypatch.delenv("VQGEN_RUN_DIR", raising=False)  # each fit picks its own run folder
    monkeypatch.delenv("LOCAL_RANK", raising=False)


def vqvae(**kwargs):
    from stage1_vqvae.vqvae import VQVAE

    torch.manual_seed(0)
    return VQVAE(3, 16, **NET, **kwargs)


def images(n: int = 4) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1


def step(model, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """One training_step outside a Trainer (global step 0): (the loss, everything it logged)."""
    logged: dict[str, float] = {}
    model.log_dict = lambda metrics, **kw: logged.update({k: float(v) for k, v in metrics.items()})
    return model.training_step((batch, None), 0), logged


def test_off_builds_no_discriminator_and_the_loss_is_the_vq_vaes():
    off, on = vqvae(), vqvae(adversarial_weight=0.1)
    assert off.discriminator is None and not any(k.startswith("discriminator") for k in off.state_dict())
    assert off.state_dict().keys() == VQModel(3, 16, **NET).state_dict().keys()
    # the discriminator is made last: the network draws the same initial weights either way
    for name, value in off.state_dict().items():
        assert torch.equal(value, on.state_dict()[name]), name
    torch.manual_seed(0)
    plain = VQModel(3, 16, **NET)
    torch.manual_seed(1)  # the codebook's k-means initialisation draws from it
    recon, qs = plain(images())
    torch.manual_seed(1)
    loss, logged = step(off, images())
    assert torch.equal(loss, F.mse_loss(recon, images()) + sum(q.loss for q in qs))  # recon + commitment only
    assert not any(k.startswith("train/adv") for k in logged)


def test_the_generator_loss_trains_only_the_network_and_the_discriminator_loss_only_the_discriminator():
    model = vqvae(adversarial_weight=0.1)
    recon, _ = model(images())
    g_loss, d_loss, _, _ = adversarial_losses(model.discriminator, images(), recon)
    disc, net = list(model.discriminator.parameters()), [p for n, p in model.named_parameters()
                                                         if not n.startswith("discriminator.")]  # fmt: skip
    g_grads = torch.autograd.grad(g_loss, disc + net, retain_graph=True, allow_unused=True)
    assert all(g is None for g in g_grads[: len(disc)])  # D's parameters: not even in the graph
    for reached in (model.decoder.head.weight, next(model.encoder.parameters())):  # through recon and the codes
        assert g_grads[len(disc) + next(i for i, p in enumerate(net) if p is reached)].abs().sum() > 0
    d_grads = torch.autograd.grad(d_loss, disc + net, allow_unused=True)
    # every D parameter is reached (the last bias's gradient is 0 while every hinge is active: -1/2 + 1/2)
    assert all(g is not None for g in d_grads[: len(disc)]) and all(g.abs().sum() > 0 for g in d_grads[: len(disc) - 1])
    assert all(g is None for g in d_grads[len(disc):])  # the encoder, decoder, codebook: untouched


def test_one_backward_gives_the_discriminator_exactly_its_hinge_loss_gradient():
    """In training_step's single backward (the network's losses + lambda * g_loss + d_loss), the discriminator's
    gradients are those of d_loss alone: nothing of the generator's term leaks into it."""
    model = vqvae(adversarial_weight=1.0, adversarial_start=0)
    seen = []
    model.decoder.register_forward_hook(lambda mod, inp, out: seen.append(out))
    loss, logged = step(model, images())
    loss.backward()
    logits_real, logits_fake = model.discriminator(torch.cat([images(), seen[0].detach()])).chunk(2)
    alone = torch.autograd.grad(hinge_d_loss(logits_real, logits_fake), list(model.discriminator.parameters()))
    for p, g in zip(model.discriminator.parameters(), alone):
        torch.testing.assert_close(p.grad, g, rtol=1e-6, atol=1e-9)
    assert logged["train/adv_lambda"] > 0 and set(logged) >= {"train/adv_g", "train/adv_d", "train/logits_real",
                                                              "train/logits_fake"}  # fmt: skip


def test_before_adversarial_start_the_discriminator_gets_zero_gradients_and_nothing_is_logged():
    model = vqvae(adversarial_weight=1.0, adversarial_start=1)  # outside a Trainer the global step is 0
    loss, logged = step(model, images())
    loss.backward()
    assert all(p.grad is not None and not p.grad.any() for p in model.discriminator.parameters())  # DDP: used
    assert not any(k.startswith("train/adv") for k in logged)


def test_with_levels_the_discriminator_judges_the_decoded_images():
    from stage1_vqvae.vqvae import VQVAE

    torch.manual_seed(0)
    levels = [{"name": "bottom", "downsample": 2}, {"name": "top", "downsample": 4}]
    model = VQVAE(3, 16, **{**NET, "levels": levels}, adversarial_weight=0.1, adversarial_start=0)
    loss, logged = step(model, images())
    loss.backward()
    assert torch.isfinite(loss) and logged["train/adv_lambda"] > 0
    assert all(p.grad is not None for p in model.discriminator.parameters())
    assert next(model.level_encoders.parameters()).grad.abs().sum() > 0  # the top level's encoder trains too


@pytest.mark.parametrize("bf16", [False, True])
def test_the_adaptive_weight_is_tamings_ratio_of_gradient_norms(bf16):
    model = vqvae(adversarial_weight=1.0)
    with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        recon, _ = model(images())
        recon_loss = F.mse_loss(recon.float(), images())
        g_loss, _, _, _ = adversarial_losses(model.discriminator, images(), recon)
        weight = adaptive_weight(recon_loss, g_loss, model.decoder.head.weight)
    last = model.decoder.head.weight
    assert last.grad is None and not weight.requires_grad and weight.dtype == torch.float32
    recon_loss.backward(retain_graph=True)  # by hand: the two gradients through .grad, one after the other
    by_recon = last.grad.norm().item()
    last.grad = None
    g_loss.backward(retain_graph=True)
    expected = by_recon / (last.grad.norm().item() + 1e-4)
    assert weight.item() == pytest.approx(expected, rel=1e-5)
    # a generator loss that barely moves the last layer: clamped at 1e4, not infinite
    assert adaptive_weight(1e6 * recon_loss, 1e-12 * g_loss, last).item() == 1e4


@pytest.mark.parametrize("size,side", [(16, 2), (28, 5), (32, 6), (64, 6)])
def test_the_patch_map_of_each_image_size(size, side):
    logits = PatchDiscriminator(3, size, 8)(torch.zeros(2, 3, size, size))
    assert logits.shape == (2, 1, side, side)


def metric_rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def adversarial_run(shapes_folder, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("adversarial") / "runs"
    train_stage1(fit_args(shapes_folder, root, 16, *ADV))
    return root / "version_0"


def weights(run: Path, discriminator: bool) -> dict[str, torch.Tensor]:
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("discriminator.") == discriminator}


@pytest.fixture(scope="module")
def before_start_runs(shapes_folder, tmp_path_factory) -> dict[str, Path]:
    """The same 4 steps with the option off, and on with an adversarial_start it never reaches."""
    root = tmp_path_factory.mktemp("before_start")
    train_stage1(fit_args(shapes_folder, root / "off", 4))
    train_stage1(fit_args(shapes_folder, root / "on", 4, *ADV, "--model.adversarial_start", "100"))
    return {"off": root / "off" / "version_0", "on": root / "on" / "version_0"}


def test_until_adversarial_start_a_run_trains_exactly_as_with_it_off(before_start_runs):
    """The discriminator draws its initial weights on a fork of the RNG and gets zero gradients until its start:
    the network's weights and losses are those of the run without it, bit for bit."""
    off, on = (weights(before_start_runs[k], discriminator=False) for k in ("off", "on"))
    assert off.keys() == on.keys() and all(torch.equal(off[k], on[k]) for k in off)
    assert train_losses(before_start_runs["off"]) == train_losses(before_start_runs["on"])
    assert not weights(before_start_runs["off"], discriminator=True)


def test_training_with_it_trains_the_discriminator_from_adversarial_start(adversarial_run, before_start_runs):
    rows = [r for r in metric_rows(adversarial_run) if r.get("train/adv_d")]
    assert [int(r["step"]) for r in rows] == list(range(2, 16))  # logged from adversarial_start on
    d = [float(r["train/adv_d"]) for r in rows]
    assert sum(d[-4:]) < sum(d[:4])  # the hinge loss falls as D learns to tell the two apart
    assert all(float(r["train/adv_lambda"]) > 0 for r in rows)
    # stopped before adversarial_start, the discriminator is still the initial one (zero gradients, no weight
    # decay), which the trained one differs from in every weight
    initial, trained = weights(before_start_runs["on"], True), weights(adversarial_run, True)
    assert initial.keys() == trained.keys() and len(initial) > 0
    assert all(not torch.equal(initial[k], trained[k]) for k in initial if k.endswith(".weight"))


def test_an_adversarial_checkpoint_is_read_weights_only_by_extract_and_sample(adversarial_run, tmp_path):
    stage1 = adversarial_run / "checkpoints" / "last.ckpt"
    assert any(k.startswith("discriminator.") for k in torch.load(stage1, weights_only=True)["state_dict"])
    model, _ = load_stage1(stage1)
    assert type(model) is VQModel and not any(k.startswith("discriminator") for k in model.state_dict())
    extract_codes(["--ckpt", str(stage1), "--out", str(tmp_path / "codes")])
    train_stage2(["fit", "--config", str(CONFIGS / "stage2/tiny.yaml"), "--data.codes_dir", str(tmp_path / "codes"),
                  "--trainer.default_root_dir", str(tmp_path / "s2"), "--data.batch_size", "8",
                  "--trainer.max_steps", "2", "--sample_every_n_epochs", "0"])  # fmt: skip
    prior = next((tmp_path / "s2" / "latest" / "checkpoints").glob("*.ckpt"))
    sample(["--prior", str(prior), "--n", "2", "--out", str(tmp_path / "grid.png")])
    assert (tmp_path / "grid.png").stat().st_size > 0


def test_an_adversarial_bf16_run_resumed_mid_epoch_equals_an_uninterrupted_one(shapes_folder, tmp_path, monkeypatch):
    """Crashed at step 4 (after adversarial_start 2: both players, the adaptive weight and the optimiser's
    discriminator state are in the checkpoint) and resumed: the same weights bit for bit, under bf16-mixed."""
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda *a: True)

    def fit(root: Path, *extra: str) -> None:
        train_stage1(fit_args(shapes_folder, root, 12, *ADV, "--trainer.val_check_interval", "3", "--cpu_bf16",
                              "true", *extra))  # fmt: skip

    crashed_and_resumed_equals_straight(fit, tmp_path)


@pytest.mark.slow
def test_ddp_trains_both_phases_without_find_unused_parameters(shapes_folder, tmp_path):
    """Two DDP ranks (Lightning's "ddp": find_unused_parameters=False, which fails the step after one where a
    parameter got no gradient): steps before adversarial_start (zero gradients for D) and after it both train."""
    ddp = ("--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
           "--data.batch_size", "4", "--model.adversarial_start", "3")  # fmt: skip
    code, out = fit_in_subprocess(fit_args(shapes_folder, tmp_path / "runs", 6, *ADV, *ddp), tmp_path)
    assert code == 0, out[-20000:]
    rows = [r for r in metric_rows(tmp_path / "runs" / "version_0") if r.get("train/adv_d")]
    assert [int(r["step"]) for r in rows] == [3, 4, 5]
