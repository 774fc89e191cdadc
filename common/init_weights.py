"""`fit --init_weights CKPT`: a new run that starts from a checkpoint's weights (fine-tuning on other data, adding
stage 1's adversarial loss to a trained VQ-VAE, a longer prior), with a new optimiser, schedule and step 0
(taming-transformers' ``ckpt_path``/``ignore_keys``; `--ckpt_path` instead resumes a run: weights, optimiser, step).

The checkpoint is read weights-only (common.checkpoint) and must hold the network this config builds, tensor for
tensor; only the modules a run may add or drop (TRAINING_ONLY: stage 1's discriminator) may differ.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from common.checkpoint import read_checkpoint
from common.cli import UserError
from common.resume_checks import OPTIMISER_HPARAMS

TRAINING_ONLY = ("discriminator.",)  # modules a run adds or drops without changing the network (state-dict prefixes)
NOT_SHAPES = ("adversarial_", "discriminator_", "label_dropout", "dropout")  # settings that change no tensor
FLAG = "--init_weights"


def _differences(saved: dict[str, Any], own: dict[str, Any]) -> list[str]:
    """How the checkpoint's weights do not fit the model's, beyond TRAINING_ONLY modules: shapes, missing, extra."""
    skip = lambda key: key.startswith(TRAINING_ONLY)  # noqa: E731
    shapes = [f"{k} {tuple(saved[k].shape)} in the checkpoint, {tuple(v.shape)} here" for k, v in own.items()
              if k in saved and tuple(getattr(saved[k], "shape", ())) != tuple(v.shape)]  # fmt: skip
    missing = [f"{k} not in the checkpoint" for k in own if k not in saved and not skip(k)]
    extra = [f"{k} only in the checkpoint" for k in saved if k not in own and not skip(k)]
    return shapes + missing + extra


def load_initial_weights(model: nn.Module, path: str, kind: str | None) -> str:
    """Copy the weights (and buffers: a VQ codebook and its EMA state, so no k-means re-initialisation) of the
    checkpoint at `path` into `model`; UserError naming the hyperparameters that differ (or the first tensor that
    does not fit) when it holds another network. Returns the line that says what was loaded."""
    ckpt = read_checkpoint(path, FLAG, want=kind)
    saved, own = ckpt["state_dict"], model.state_dict()
    if differences := _differences(saved, own):
        hparams = ckpt.get("hyper_parameters", {})
        changed = [f"{k} {hparams[k]} (this config: {v})" for k, v in getattr(model, "hparams", {}).items()
                   if k in hparams and hparams[k] != v and k not in OPTIMISER_HPARAMS and not k.startswith(NOT_SHAPES)]
        what = (f"it has {', '.join(changed[:4])}; " if changed else "") + differences[0]
        raise UserError(f"{FLAG} {path} holds another network than this config builds ({what}); pass the same "
                        "--model sizes as its run (its config.yaml beside its checkpoints)")  # fmt: skip
    model.load_state_dict({k: v for k, v in saved.items() if k in own}, strict=False)
    new = sorted({k.split(".")[0] for k in own if k not in saved})
    dropped = sorted({k.split(".")[0] for k in saved if k not in own})
    return (f"started from the weights of {path} (its step {int(ckpt.get('global_step', 0)):,}), with a new "
            "optimiser, schedule and step 0" + (f"; new: {', '.join(new)}" if new else "")
            + (f"; not used: {', '.join(dropped)}" if dropped else ""))  # fmt: skip
