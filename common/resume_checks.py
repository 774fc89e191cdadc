"""What a --ckpt_path of a training command (a resume, test or validate) must match besides its data: the network
this config builds, and, for an image folder, the file list the checkpoint's splits were drawn from."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from common.checkpoint import read_checkpoint
from common.cli import UserError
from common.launch import LIGHTNING_CKPT_NAMES

OPTIMISER_HPARAMS = ("lr", "weight_decay", "warmup_steps", "cosine", "channels_last")  # no weight's shape


def state_mismatch(saved: dict[str, Any], model: dict[str, Any]) -> str | None:
    """The first way a checkpoint's state dict does not load into the model's (strictly, as Lightning loads it):
    a tensor of another shape, or a tensor only one of them has; None when it loads."""
    for key, value in model.items():
        if key not in saved:
            return f"{key} not in the checkpoint"
        if tuple(getattr(saved[key], "shape", ())) != tuple(getattr(value, "shape", ())):
            return f"{key} {tuple(saved[key].shape)} in the checkpoint, {tuple(value.shape)} here"
    extra = [key for key in saved if key not in model]
    return f"{extra[0]} only in the checkpoint" if extra else None


def changed_hparams(saved: dict[str, Any], model: nn.Module, skip: tuple[str, ...] = ()) -> list[str]:
    """"name saved (this config: now)" for each of the model's hyperparameters the checkpoint's `saved` ones differ
    in, the optimiser's settings and names starting with a `skip` prefix aside (they change no tensor)."""
    return [f"{k} {_short(saved[k])} (this config: {_short(v)})" for k, v in getattr(model, "hparams", {}).items()
            if k in saved and saved[k] != v and k not in OPTIMISER_HPARAMS and not k.startswith(skip)]


def check_network_fits(ckpt: str, checkpoint: dict[str, Any], model: nn.Module) -> None:
    """UserError naming the hyperparameters that differ (or the first tensor that does not fit) when the checkpoint's
    weights do not load into `model`: Lightning's load_state_dict traceback came after the run's files were
    written (a Transformer config resuming a masked prior's run in the same root, another codebook size)."""
    if (mismatch := state_mismatch(checkpoint.get("state_dict", {}), model.state_dict())) is None:
        return
    changed = changed_hparams(checkpoint.get("hyper_parameters", {}), model)
    raise UserError(f"--ckpt_path {ckpt} holds another network than this config builds "
                    f"({', '.join(changed[:4]) if changed else mismatch}); pass its run's config (config.yaml beside "
                    "its checkpoints), or drop --ckpt_path for a new run")  # fmt: skip


def check_checkpoint_fits(ckpt: str, kind: str | None, model: nn.Module, linked: Callable[[dict], dict],
                          advice: str) -> None:  # fmt: skip
    """UserError when the checkpoint was trained on other data (what `linked` takes from hyperparameters: image
    size and channels, the codes) or with another network than `model`, before anything is written."""
    checkpoint = read_checkpoint(ckpt, "--ckpt_path", want=kind)
    saved, now = linked(checkpoint.get("hyper_parameters", {})), linked(dict(getattr(model, "hparams", {})))
    differ = [f"{k} {saved[k]} (this config: {now[k]})" for k in saved if k in now and saved[k] != now[k]]
    if differ:
        raise UserError(f"--ckpt_path {ckpt} was trained with {', '.join(differ)}: a resume or a test needs the data "
                        f"it was trained on; {advice}")  # fmt: skip
    check_network_fits(ckpt, checkpoint, model)


def folder_of_checkpoint(cfg: Any, kind: str | None) -> None:
    """An image folder's splits are a permutation of its file list: a resume, test or validate from a checkpoint
    is given the list the checkpoint's splits came from (`--data.folder_key`), so that common.splits warns, as the
    other commands do, when the test split may now hold images it trained on."""
    data, ckpt = cfg.get("data"), cfg.get("ckpt_path")
    if data is None or data.get("dataset") != "image_folder" or data.get("folder_key") or not ckpt:
        return
    if ckpt not in LIGHTNING_CKPT_NAMES and Path(ckpt).is_file():
        saved = read_checkpoint(ckpt, "--ckpt_path", want=kind)
        data["folder_key"] = (saved.get("datamodule_hyper_parameters") or {}).get("folder_key")


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def checkpoint_model_config(subcommand: str, ckpt: str | None, kind: str) -> dict[str, Any] | None:
    """What LightningCLI's `_parse_ckpt_path` merges into the config from a --ckpt_path file (its saved model
    hyperparameters, under the subcommand), read through `read_checkpoint`: Lightning's own torch.load read the file
    a second time (once kept by common.checkpoint.keep_loaded, a resume reads it once). None: nothing to merge."""
    if not ckpt or ckpt in LIGHTNING_CKPT_NAMES or not Path(ckpt).is_file():
        return None
    hparams = dict(read_checkpoint(ckpt, "--ckpt_path", want=kind).get("hyper_parameters") or {})
    hparams.pop("_instantiator", None)  # a copy: the kept checkpoint goes to Lightning's restore unchanged
    if not hparams:
        return None
    if "_class_path" in hparams:
        hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
    return {subcommand: {"model": hparams}}
