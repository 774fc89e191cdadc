"""`fit --init_weights CKPT`: a new run from a checkpoint's weights (fine-tuning, adding the adversarial loss), with
a new optimiser and step 0; another network is one line naming what differs; a resume ignores it, and says so."""

from __future__ import annotations

import pytest
import torch
from conftest import user_error
from test_stage1 import fit_args

from stage1_vqvae.train import main as train_stage1


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """Each fit picks its own run folder, as a fresh process would."""
    monkeypatch.delenv("VQGEN_RUN_DIR", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)


def weights(path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


def test_a_run_starts_from_the_weights_with_a_new_optimiser_and_step(shapes_folder, tmp_path, capsys):
    root = tmp_path / "runs"
    train_stage1(fit_args(shapes_folder, root, 6))
    start = root / "version_0" / "checkpoints" / "last.ckpt"
    capsys.readouterr()
    # a learning rate of ~0 keeps the network where it started: it must be the checkpoint's, not a new draw
    train_stage1(fit_args(shapes_folder, root, 2, "--init_weights", str(start), "--model.lr", "1e-12",
                          "--model.adversarial_weight", "0.1", "--model.adversarial_start", "1"))  # fmt: skip
    err = capsys.readouterr().err
    assert f"started from the weights of {start} (its step 6), with a new optimiser, schedule and step 0; new: " \
        "discriminator" in err, err  # fmt: skip
    after = torch.load(root / "version_1" / "checkpoints" / "last.ckpt", weights_only=True)
    assert after["global_step"] == 2  # step 0 again, not 6 + 2
    before = weights(start)
    net = [k for k in before if k.startswith(("encoder.", "decoder."))]  # the codebook moves by EMA, not by lr
    assert net and all(torch.allclose(after["state_dict"][k], before[k], atol=1e-6) for k in net)
    assert any(k.startswith("discriminator.") for k in after["state_dict"])
    # and back: the adversarial run's weights start a plain run (its discriminator not used)
    capsys.readouterr()
    adversarial = root / "version_1" / "checkpoints" / "last.ckpt"
    train_stage1(fit_args(shapes_folder, root, 2, "--init_weights", str(adversarial)))
    assert "; not used: discriminator" in capsys.readouterr().err


def test_another_network_or_subcommand_is_one_line_and_a_resume_ignores_it(shapes_folder, tmp_path, capsys):
    root = tmp_path / "runs"
    train_stage1(fit_args(shapes_folder, root, 2))
    start = root / "version_0" / "checkpoints" / "last.ckpt"
    err = user_error(train_stage1, fit_args(shapes_folder, root, 2, "--init_weights", str(start),
                                            "--model.width", "48"), capsys)  # fmt: skip
    assert f"--init_weights {start} holds another network than this config builds (it has width 32 (this config: " \
        "48); encoder." in err and "pass the same --model sizes as its run" in err, err  # fmt: skip
    assert sorted(p.name for p in root.iterdir()) == ["latest", "version_0"]  # the refused run left no folder
    err = user_error(train_stage1, ["test", *fit_args(shapes_folder, root, 2)[1:], "--init_weights", str(start)],
                     capsys)  # fmt: skip
    assert "--init_weights starts a new training run (fit); test takes --ckpt_path" in err, err
    err = user_error(train_stage1, fit_args(shapes_folder, root, 2, "--init_weights", str(tmp_path / "none.ckpt")),
                     capsys)  # fmt: skip
    assert f"--init_weights {tmp_path / 'none.ckpt'}" in err, err
    capsys.readouterr()
    train_stage1(fit_args(shapes_folder, root, 4, "--ckpt_path", "last", "--init_weights", str(start)))
    err = capsys.readouterr().err
    assert f"--init_weights {start} not used: the run resumes from" in err, err
    assert torch.load(start, weights_only=True)["global_step"] == 4  # resumed from step 2, in place


def test_a_resume_does_not_need_the_file_and_odd_values_are_refused(shapes_folder, tmp_path, capsys):
    """The run's config.yaml records --init_weights: resuming with it after the file went (a scratch folder
    cleaned) failed on the missing file it would not use. An empty value ("$INIT" unset) trained from scratch
    silently; a URL was misquoted as a path. A discriminator of another width is a new one, not an error."""
    root = tmp_path / "runs"
    train_stage1(fit_args(shapes_folder, root, 2, "--model.adversarial_weight", "0.1", "--model.adversarial_start",
                          "0"))  # fmt: skip
    start = tmp_path / "start.ckpt"
    (root / "version_0" / "checkpoints" / "last.ckpt").rename(start)
    capsys.readouterr()
    train_stage1(fit_args(shapes_folder, root, 2, "--init_weights", str(start), "--model.adversarial_weight", "0.1",
                          "--model.discriminator_width", "16"))  # fmt: skip
    assert "; new: discriminator" in capsys.readouterr().err
    config = root / "version_1" / "config.yaml"
    assert f"init_weights: {start}" in config.read_text()
    start.unlink()
    train_stage1(["fit", "--config", str(config), "--ckpt_path", "last", "--trainer.max_steps", "4"])
    assert "not used: the run resumes from" in capsys.readouterr().err
    for value, said in [("", "--init_weights is empty; pass a checkpoint (.ckpt), or leave the flag out"),
                        ("https://example.com/x.ckpt", "--init_weights https://example.com/x.ckpt: a local checkpoint "
                                                       "file is needed")]:  # fmt: skip
        err = user_error(train_stage1, fit_args(shapes_folder, root, 2, "--init_weights", value), capsys)
        assert said in err, err
