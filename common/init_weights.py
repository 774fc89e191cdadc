"""`fit --init_weights CKPT`: a new run that starts from a checkpoint's weights (fine-tuning on other data, adding
stage 1's adversarial loss to a trained VQ-VAE, a longer prior), with a new optimiser, schedule and step 0
(taming-transformers' ``ckpt_path``/``ignore_keys``; `--ckpt_path` instead resumes a run: weights, optimiser, step).

The checkpoint is read weights-only (common.checkpoint) and must hold the network this config builds, tensor for
tensor; only the modules a run may add or drop (TRAINING_ONLY_PREFIXES: stage 1's discriminator) may differ.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from common.checkpoint import TRAINING_ONLY_PREFIXES, read_checkpoint
from common.cli import UserError
from common.resume_checks import changed_hparams, state_mismatch

NOT_SHAPES = ("adversarial_", "discriminator_", "label_dropout", "dropout")  # settings that change no tensor
FLAG = "--init_weights"


def check_init_weights(path: str, subcommand: str, ckpt_path: str | None, kind: str | None) -> None:
    """At parse time: UserError for an --init_weights that cannot start a run (not fit, empty, a URL, not a checkpoint
    of this stage). A resume (--ckpt_path) does not use it, so its file is not needed then (a run's config.yaml
    records the flag, and the file may be gone by the time it is resumed)."""
    if subcommand != "fit":
        raise UserError(f"{FLAG} starts a new training run (fit); {subcommand} takes --ckpt_path")
    if not str(path).strip():  # "$INIT" unset in a job script: it trained from scratch without a word
        raise UserError(f"{FLAG} is empty; pass a checkpoint (.ckpt), or leave the flag out to start from scratch")
    if "://" in str(path):
        raise UserError(f"{FLAG} {path}: a local checkpoint file is needed; download it first")
    if ckpt_path is None:
        read_checkpoint(path, FLAG, want=kind)


def _fits(saved: dict[str, Any], own: dict[str, Any], key: str) -> bool:
    return key in saved and tuple(getattr(saved[key], "shape", ())) == tuple(own[key].shape)


def _network(state: dict[str, Any]) -> dict[str, Any]:
    """The state dict without the TRAINING_ONLY_PREFIXES modules (present or not, of any shape)."""
    return {k: v for k, v in state.items() if not k.startswith(TRAINING_ONLY_PREFIXES)}


def load_initial_weights(model: nn.Module, path: str, kind: str | None) -> str:
    """Copy the weights (and buffers: a VQ codebook and its EMA state, so no k-means re-initialisation) of the
    checkpoint at `path` into `model`; UserError naming the hyperparameters that differ (or the first tensor that
    does not fit) when it holds another network. Returns the line that says what was loaded."""
    ckpt = read_checkpoint(path, FLAG, want=kind)
    saved, own = ckpt["state_dict"], model.state_dict()
    if (mismatch := state_mismatch(_network(saved), _network(own))) is not None:
        changed = changed_hparams(ckpt.get("hyper_parameters", {}), model, NOT_SHAPES)
        what = (f"it has {', '.join(changed[:4])}; " if changed else "") + mismatch
        raise UserError(f"{FLAG} {path} holds another network than this config builds ({what}); pass the same "
                        "--model sizes as its run (its config.yaml beside its checkpoints)")  # fmt: skip
    model.load_state_dict({k: v for k, v in saved.items() if k in own and _fits(saved, own, k)}, strict=False)
    new = sorted({k.split(".")[0] for k in own if not _fits(saved, own, k)})  # a discriminator of another width too
    dropped = sorted({k.split(".")[0] for k in saved if k not in own})
    return (f"started from the weights of {path} (its step {int(ckpt.get('global_step', 0)):,}), with a new "
            "optimiser, schedule and step 0" + (f"; new: {', '.join(new)}" if new else "")
            + (f"; not used: {', '.join(dropped)}" if dropped else ""))  # fmt: skip
