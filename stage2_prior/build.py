"""Which prior networks exist and how one is built: from a config, or from a checkpoint (torch only).

``PRIORS`` maps a kind to its :class:`stage2_prior.decoding.CodePrior` class (a new prior: one new file and
its line here); ``build_network`` applies a named size and the given overrides. :func:`load_prior` rebuilds
the plain network from a Prior checkpoint, read weights-only, without importing Lightning (the model
commands start fast); the LightningModule (:mod:`stage2_prior.prior`) builds its network the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from common.checkpoint import CheckpointError, constructor_args, read_checkpoint
from stage2_prior.decoding import CodePrior
from stage2_prior.pixelcnn import GatedPixelCNN
from stage2_prior.transformer import Transformer

PRIORS: dict[str, type[CodePrior]] = {"transformer": Transformer, "pixelcnn": GatedPixelCNN}
OVERRIDES = ("n_layer", "n_head", "n_embd", "channels", "dropout")  # Prior arguments that resize a network


def build_network(kind: str, size: str, codebook_size: int, grid_shape: tuple[int, int], num_classes: int,
                  overrides: dict) -> CodePrior:  # fmt: skip
    """`size`'s kwargs, then the overrides that are given (not None) and that this kind of network takes."""
    if kind not in PRIORS:
        raise ValueError(f"model.kind must be one of {', '.join(PRIORS)}, got {kind!r}")
    cls = PRIORS[kind]
    if size not in cls.sizes:
        raise ValueError(f"model.size for {kind} must be one of {', '.join(cls.sizes)}, got {size!r}")
    given = constructor_args(cls, {k: v for k, v in overrides.items() if v is not None})
    return cls(codebook_size, tuple(grid_shape), num_classes, **{**cls.sizes[size], **given})


def load_prior(path: str | Path, flag: str = "--prior") -> tuple[CodePrior, dict[str, Any]]:
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
        raise CheckpointError(f"{flag} {path}: cannot rebuild the prior from it ({str(e).splitlines()[0]})") from None
    return net.eval(), hp
