"""The one loader of trained models for every tool: checkpoints read weights-only, checked against each other.

    models = load_models("prior.ckpt", vqvae_path=None, device="auto")  # a GPU if there is one
    models.prior, models.vqvae                  # the plain networks (CodePrior, VQModel), eval mode, on the device
    models.codes_meta                           # the codes the prior was trained on
    models.prior_sha256, models.stage1_sha256   # what a .vqz records: the hashes of the bytes the weights came from

The stage-1 checkpoint is the one the prior's codes metadata names (it must still have the SHA-256 it had
at extraction) unless ``--vqvae`` is given; either way it must be the checkpoint the prior's codes came
from (`common.codes.check_matches`). Nothing is unpickled beyond tensors and plain values
(:mod:`common.checkpoint`), and nothing here imports Lightning, torchmetrics or wandb: a command that
samples or compresses starts in about the time torch takes to import.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from functools import cached_property
from pathlib import Path

import torch

from common.checkpoint import CheckpointError, CheckpointFile, open_checkpoint
from common.cli import resolve_device
from common.codes import CodesMeta, check_matches, check_stage1, sha256_file
from stage1_vqvae.model import VQModel, load_stage1
from stage2_prior.build import load_prior
from stage2_prior.decoding import CodePrior

CODES_META_FIELDS = {f.name for f in fields(CodesMeta)}  # a prior's codes_meta may hold more (class_counts)

__all__ = ["Models", "load_models", "load_prior", "load_stage1", "prior_facts"]


def prior_facts(prior: CodePrior, codes_meta: dict | None) -> dict:
    """What a prior must agree on with its codes and stage 1 (for `check_matches`)."""
    return {"codebook_size": prior.codebook_size, "grid_shape": prior.grid_shape,
            "num_classes": prior.num_classes, "stage1_sha256": (codes_meta or {}).get("stage1_sha256")}  # fmt: skip


class Models:
    """A prior network and its stage 1, on one device, with their checkpoints' paths, the SHA-256 of the bytes
    their weights were loaded from, and the prior's codes."""

    def __init__(self, prior: CodePrior, vqvae: VQModel, prior_path: Path, vqvae_path: Path, device: torch.device,
                 codes_meta: dict | None = None, stage1_data: dict | None = None,
                 files: tuple[CheckpointFile, CheckpointFile] | None = None) -> None:  # fmt: skip
        self.prior, self.vqvae = prior.to(device).eval(), vqvae.to(device).eval()
        self.prior_path, self.vqvae_path, self.device = prior_path, vqvae_path, device
        self.codes_meta = codes_meta or {}
        self.stage1_data = stage1_data or {}  # the data options stage 1 was trained with (its checkpoint's)
        self._files = files  # the files the weights were loaded through, kept open for their hashes

    # Hashed through the files the weights were loaded from, never by path later: a prior still training replaces
    # its last.ckpt, and a .vqz that named the new file's hash could be decoded by no checkpoint at all. Only when
    # asked (compress, the page's codec): sampling does not read a large prior twice.
    @cached_property
    def prior_sha256(self) -> str:
        return self._files[0].sha256 if self._files else sha256_file(self.prior_path)

    @cached_property
    def stage1_sha256(self) -> str:
        return self._files[1].sha256 if self._files else sha256_file(self.vqvae_path)

    @property
    def image_size(self) -> int:
        return self.vqvae.image_size

    @property
    def channels(self) -> int:
        return self.vqvae.in_channels

    @property
    def class_counts(self) -> list[int] | None:
        """The training split's count of each class (priors trained since 2026-11-29; None before, or unlabelled)."""
        counts = self.codes_meta.get("class_counts")
        return [int(c) for c in counts] if counts and len(counts) == self.prior.num_classes else None

    def stage1_splits(self, **options):
        """`ImageSplits` of the data stage 1 was trained on, at stage 1's image size and channels (its checkpoint
        keeps the data options but leaves the size to the model: emoji trained at 32 px, not the default 64);
        `options` replace any of them. Imported here: the commands that never read data do not pay for it."""
        from common.splits import ImageSplits, data_options

        return ImageSplits(**{**data_options(self.stage1_data), "image_size": self.image_size,
                              "channels": self.channels, **options})  # fmt: skip

    @property
    def class_names(self) -> list[str]:
        """The prior's classes by name (from the codes it was trained on; ids where those have none)."""
        k, names = self.prior.num_classes, list(self.codes_meta.get("class_names") or [])[: self.prior.num_classes]
        return names + [str(i) for i in range(len(names), k)]


def stage1_path_of(meta: dict, prior_path: str | Path, sha256: Callable[[str | Path], str] = sha256_file) -> Path:
    """The stage-1 checkpoint the prior's codes metadata names, or the copy in its codes directory, verified by
    SHA-256 (`sha256`: as in common.codes.check_stage1)."""
    if not meta.get("stage1_ckpt"):
        raise CheckpointError(f"--prior {prior_path} names no stage-1 checkpoint; pass --vqvae PATH")
    try:
        codes_meta = CodesMeta(**{k: v for k, v in meta.items() if k in CODES_META_FIELDS})  # not class_counts
    except TypeError as e:
        raise CheckpointError(
            f"--prior {prior_path}: its codes metadata is incomplete ({e}); pass --vqvae PATH"
        ) from None
    # the checkpoint the codes name, else their directory's copy of it: where training ran, or as typed there
    # from the current directory or any folder above the prior (a moved project, run from anywhere); CodesError
    # if none is as it was
    dirs, typed = [meta.get("codes_dir_resolved"), meta.get("codes_dir")], meta.get("codes_dir")
    if typed and not Path(typed).is_absolute():
        dirs += [parent / typed for parent in Path(prior_path).resolve().parents]
    return Path(check_stage1(codes_meta, codes_dirs=[d for d in dirs if d], sha256=sha256))


def load_models(prior_path: str | Path, vqvae_path: str | Path | None = None,
                device: torch.device | str = "cpu") -> Models:  # fmt: skip
    """The prior and the stage 1 that decodes its codes, checked to fit each other, on `device` ("auto": a GPU if
    there is one)."""
    device = resolve_device(device, "device") if isinstance(device, str) else torch.device(device)
    prior_file = open_checkpoint(prior_path, "--prior", "prior")  # opened once: weights and hash of one version
    prior, hparams = load_prior(prior_file)
    meta = hparams.get("codes_meta") or {}
    opened: dict[str, CheckpointFile] = {}
    flag = "--vqvae" if vqvae_path else "the stage 1 the prior's codes name,"  # in errors: the user gave none

    def hash_open(candidate: str | Path) -> str:  # each candidate stage 1 hashed through a file kept open
        opened[str(candidate)] = open_checkpoint(candidate, flag, "stage1")
        return opened[str(candidate)].sha256

    path = Path(vqvae_path) if vqvae_path else stage1_path_of(meta, prior_path, hash_open)
    # the weights come from the file hashed (it was read twice: a stage 1 of 100 MB cost 0.1 s more a command);
    # check_matches below compares that hash with the one the codes recorded
    stage1_file = opened.get(str(path)) or open_checkpoint(path, flag, "stage1")
    vqvae, stage1_data = load_stage1(stage1_file, flag)
    models = Models(prior, vqvae, Path(prior_path), path, device, meta, stage1_data, (prior_file, stage1_file))
    facts = prior_facts(prior, meta)
    target = {"codebook_size": vqvae.codebook_size, "grid_shape": vqvae.grid_shape,
              "stage1_sha256": models.stage1_sha256 if facts["stage1_sha256"] else None}  # fmt: skip
    check_matches(facts, target, f"--vqvae {path}",
                  "pass the stage-1 checkpoint whose codes the prior was trained on")  # fmt: skip
    return models
