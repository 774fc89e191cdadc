"""Which prior networks exist and how one is built: from a config, or from a checkpoint (torch only).

``PRIORS`` maps a kind to its :class:`stage2_prior.decoding.CodePrior` class (a new prior: one new file and
its line here), ``MASKED_PRIORS`` the masked-token priors (:mod:`stage2_prior.maskgit`: no likelihood, their own
sampler); ``build_network`` applies a named size and the given overrides. :func:`load_prior` rebuilds
the plain network from a Prior checkpoint, read weights-only, without importing Lightning (the model
commands start fast); the LightningModule (:mod:`stage2_prior.prior`) builds its network the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common.checkpoint import CheckpointError, constructor_args, read_checkpoint, rebuild_reason
from stage2_prior.decoding import CodePrior
from stage2_prior.maskgit import MaskedPrior
from stage2_prior.pixelcnn import GatedPixelCNN
from stage2_prior.transformer import Transformer

PRIORS: dict[str, type[CodePrior]] = {"transformer": Transformer, "pixelcnn": GatedPixelCNN}
# Priors without an exact likelihood or step decoding (their own sampler): `sample` takes them, the codec
# and the anomaly scores refuse them (`require_likelihood`).
MASKED_PRIORS: dict[str, type[MaskedPrior]] = {"maskgit": MaskedPrior}
OVERRIDES = ("n_layer", "n_head", "n_embd", "channels", "dropout")  # Prior arguments that resize a network


def build_network(kind: str, size: str, codebook_size: int, grid_shape: tuple[int, int], num_classes: int,
                  overrides: dict) -> CodePrior | MaskedPrior:  # fmt: skip
    """`size`'s kwargs, then the overrides that are given (not None) and that this kind of network takes."""
    kinds = {**PRIORS, **MASKED_PRIORS}
    if kind not in kinds:
        raise ValueError(f"model.kind must be one of {', '.join(kinds)}, got {kind!r}")
    cls = kinds[kind]
    if size not in cls.sizes:
        raise ValueError(f"model.size for {kind} must be one of {', '.join(cls.sizes)}, got {size!r}")
    given = constructor_args(cls, {k: v for k, v in overrides.items() if v is not None})
    return cls(codebook_size, tuple(grid_shape), num_classes, **{**cls.sizes[size], **given})


def check_levels(kind: str, levels: list[dict]) -> None:
    """Codes of several levels (VQ-VAE-2) are one sequence, top level first, for a sequence prior: refuse
    what cannot model them well or at all."""
    if len(levels) < 2:
        return
    if kind == "pixelcnn":
        raise ValueError("model.kind pixelcnn models one 2-D grid, but these codes have levels "
                         f"{', '.join(lv['name'] for lv in levels)}; use kind transformer (or maskgit)")  # fmt: skip
    sizes = {lv["codebook_size"] for lv in levels}
    if len(sizes) > 1:
        raise ValueError(f"the codes' levels have codebook sizes {sorted(sizes)}; a prior over all levels needs "
                         "one: train stage 1 with the same codebook_size on every level")  # fmt: skip


def load_prior(path: str | Path, flag: str = "--prior") -> tuple[CodePrior | MaskedPrior, dict[str, Any]]:
    """(the prior network rebuilt from a Prior checkpoint, read weights-only, on the CPU in eval mode; the
    checkpoint's hyperparameters, among them ``codes_meta``: the codes it was trained on)."""
    ckpt = read_checkpoint(path, flag, want="prior")
    hp = dict(ckpt["hyper_parameters"])
    try:
        net = build_network(hp.get("kind", "transformer"), hp.get("size", "small"), hp["codebook_size"],
                            hp["grid_shape"], hp["num_classes"], {k: hp.get(k) for k in OVERRIDES})  # fmt: skip
        state = {k[len("net.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
        net.load_state_dict(state)
    except (TypeError, ValueError, RuntimeError, KeyError) as e:  # missing hparams, shapes that do not fit
        raise CheckpointError(f"{flag} {path}: cannot rebuild the prior from it ({rebuild_reason(e)})") from None
    return net.eval(), hp


def require_likelihood(prior: CodePrior | MaskedPrior, path: str | Path, command: str, flag: str = "--prior") -> None:
    """CheckpointError (one line) unless `prior` is autoregressive: only those give exact likelihoods."""
    if not isinstance(prior, CodePrior):
        kind = next((k for k, cls in MASKED_PRIORS.items() if isinstance(prior, cls)), type(prior).__name__)
        raise CheckpointError(f"{flag} {path} is a {kind} prior, which has no exact likelihood; {command} takes "
                              f"{' or '.join(PRIORS)} priors")  # fmt: skip
