"""Reading checkpoints a user passes, safely: `torch.load(weights_only=True)` and nothing else.

A checkpoint is a dict of tensors and plain values; torch's weights-only unpickler refuses any other
object, so a crafted file cannot run code. Whatever the problem (missing, truncated, text, a pickle of
arbitrary objects, the wrong stage), the `CheckpointError` names the flag and the file and says what to pass.
A file is opened once (`open_checkpoint`) and both loaded and hashed through that open file, so what a `.vqz`
or a codes directory records is the hash of the weights that were used, even if a run still training replaces
the file meanwhile (every writer here renames a new file into place; the open one keeps the old). Inside
`keep_loaded` (a training command) the checkpoint read last is kept for the next read of the same file and for
Lightning's restore (`take_loaded`): a resume read it once for each check, then Lightning again.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import pickle
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Any, BinaryIO

import torch

from common.cli import UserError, one_line

# State-dict prefixes of modules only training uses (stage 1's adversarial discriminator): not the network's, so a
# weights-only loader drops them and --init_weights lets them differ
TRAINING_ONLY_PREFIXES = ("discriminator.",)

STAGE1_KEYS = {"in_channels", "image_size", "codebook_size"}  # hyperparameters only a VQVAE checkpoint has


class CheckpointError(UserError, ValueError):
    """A checkpoint file is unusable; the message says why and what to pass instead."""


def kind_of(ckpt: dict) -> str | None:
    """"stage1", "prior" or None, from a checkpoint's hyperparameters."""
    hp = ckpt.get("hyper_parameters") or {}
    if STAGE1_KEYS <= set(hp):
        return "stage1"
    if "kind" in hp and "codebook_size" in hp:
        return "prior"
    return None


NAMES = {"stage1": "a stage-1 (VQ-VAE) checkpoint", "prior": "a stage-2 prior checkpoint", None: "a checkpoint"}


class CheckpointFile(os.PathLike):
    """A checkpoint file opened once: its path, the open file and (when asked, read through that file) its
    SHA-256. It goes wherever a checkpoint's path goes (`read_checkpoint`, so `load_stage1` and `load_prior`
    too; printed, it is the path), and the weights are loaded through the same open file: hashing the path again
    later could name a checkpoint that a run still training wrote after the weights were loaded. Neither holds
    the file's bytes in memory beside the weights (reading them whole first doubled the peak of a large prior)."""

    def __init__(self, path: Path, handle: BinaryIO) -> None:
        self.path, self.handle = path, handle

    def __del__(self) -> None:
        self.handle.close()

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    @cached_property
    def sha256(self) -> str:
        """Hex, as common.codes.sha256_file gives for the file (read in chunks through the open file)."""
        digest = hashlib.sha256()
        self.handle.seek(0)
        for chunk in iter(lambda: self.handle.read(1 << 20), b""):
            digest.update(chunk)
        return digest.hexdigest()


def open_checkpoint(path: str | Path, flag: str, want: str | None = None) -> CheckpointFile:
    """The file at `path` (given as `flag`), opened; `want` ("stage1", "prior") only names it in errors."""
    path = Path(path)
    if not path.exists():
        if path.name == "best.ckpt" and (path.parent / "last.ckpt").is_file():  # a run that never validated
            raise CheckpointError(f"{flag} {path}: no such file: that run wrote no best.ckpt (no validation ran, "
                                  f"e.g. it ended first); pass {path.parent / 'last.ckpt'}")  # fmt: skip
        raise CheckpointError(f"{flag} {path}: no such file; pass {NAMES[want]} (.ckpt)")
    if not path.is_file():
        raise CheckpointError(f"{flag} {path} is a directory; pass {NAMES[want]} (.ckpt file)")
    try:
        return CheckpointFile(path, open(path, "rb"))  # noqa: SIM115 - open while the CheckpointFile lives
    except OSError as e:  # unreadable, or gone since the check above
        raise CheckpointError(f"{flag} {path}: cannot read it ({e.strerror or e}); pass {NAMES[want]}") from None


def read_checkpoint(path: str | Path | CheckpointFile, flag: str, want: str | None = None) -> dict[str, Any]:
    """The checkpoint at `path` (given as `flag`) as a dict, loaded weights-only on the CPU (through the open file
    of a `CheckpointFile`).

    `want` ("stage1" or "prior") also checks which stage wrote it, and says so when it is the other one.
    """
    opened_here = not isinstance(path, CheckpointFile)
    source = open_checkpoint(path, flag, want) if opened_here else path
    try:
        key = _identity(os.fstat(source.handle.fileno()))
        if _kept.get("key") == key:  # read already by this command (keep_loaded), and unchanged since
            return _check_kind(_kept["checkpoint"], source.path, flag, want)
        _kept.clear()  # one checkpoint at a time: an earlier one is not held while this one loads
        ckpt = _load(source, source.path, flag, want)
        if _keeping:
            _kept.update(key=key, checkpoint=ckpt)
        return _check_kind(ckpt, source.path, flag, want)
    finally:
        if opened_here:  # closed now (a caller's CheckpointFile stays open for its hash)
            source.handle.close()


# While a training command runs (common.runs): the checkpoint read last, with the identity of its file
_kept: dict[str, Any] = {}
_keeping = False


def _identity(st: os.stat_result) -> tuple[int, ...]:
    """The same file, unchanged: a run that renames a new last.ckpt into place gives another inode; ctime too, since
    an in-place copy of a same-size checkpoint can keep its mtime (`cp -p`) but not its ctime (utime cannot set it)."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


@contextmanager
def keep_loaded() -> Iterator[None]:
    """Within: `read_checkpoint` loads a file once, however often it is asked (a resume's run choice, its checks),
    and `take_loaded` hands that checkpoint on to Lightning's restore. After it, nothing is kept."""
    global _keeping
    _keeping = True
    try:
        yield
    finally:
        forget_loaded()


def take_loaded(path: str | Path) -> dict[str, Any] | None:
    """The checkpoint `read_checkpoint` kept for the file at `path` if that file is unchanged, else None; either way
    nothing is kept from now on (not while training, nor what the command reads after it, e.g. a stage 1 to sample)."""
    try:
        key = _identity(os.stat(path))
    except OSError:
        key = None
    ckpt = _kept.get("checkpoint") if _kept.get("key") == key else None
    forget_loaded()
    return ckpt


def forget_loaded() -> None:
    """Keep nothing from now on (for a restore that reads the file itself: a user's CheckpointIO)."""
    global _keeping
    _keeping = False
    _kept.clear()


def _load(source: CheckpointFile, path: Path, flag: str, want: str | None) -> dict[str, Any]:
    try:
        with warnings.catch_warnings():
            # a raw pickle (not torch's zip format) makes torch warn about its pickle protocol, in two lines, before
            # the one-line error below that says what to pass: nothing torch warns of here is the user's to fix
            warnings.simplefilter("ignore")
            source.handle.seek(0)
            ckpt = torch.load(source.handle, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found:  # torch's weights-only unpickler met an object it does not allow
            raise CheckpointError(
                f"{flag} {path} holds a Python object ({found.group(1)}) beyond tensors and plain values; it is not "
                f"loaded (it could run code). Pass {NAMES[want]} written by vqgen"
            ) from None
        raise CheckpointError(
            f"{flag} {path} is not a PyTorch checkpoint (unreadable pickle); pass {NAMES[want]}"
        ) from None
    except Exception as e:  # torch raises many types for a file that is not a checkpoint (truncated, text, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"{flag} {path} is not a PyTorch checkpoint ({type(e).__name__}: {first}); "
                              f"pass {NAMES[want]}") from None  # fmt: skip
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(f"{flag} {path} is not a Lightning checkpoint (no state_dict); pass {NAMES[want]}")
    return ckpt


def _check_kind(ckpt: dict[str, Any], path: Path, flag: str, want: str | None) -> dict[str, Any]:
    kind = kind_of(ckpt)
    if want is not None and kind != want:
        hint = {"stage1": " (it is a stage-1 VQ-VAE checkpoint: pass it as --vqvae or --ckpt of extract_codes)",
                "prior": " (it is a stage-2 prior checkpoint: pass it as --prior)"}.get(kind, "")  # fmt: skip
        raise CheckpointError(f"{flag} {path} is not {NAMES[want]}{hint}")
    return ckpt


def constructor_args(cls: type, hparams: dict[str, Any]) -> dict[str, Any]:
    """The saved hyperparameters `cls.__init__` takes (LightningCLI adds keys such as _class_path)."""
    params = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in hparams.items() if k in params and k != "self"}


MAX_REASON = 400  # characters of a rebuild error kept in its one line


def rebuild_reason(e: Exception) -> str:
    """Why a checkpoint's network could not be rebuilt, on one line. load_state_dict's message is a heading
    ("Error(s) in loading state_dict for Transformer:") and a line per problem, each listing every key: only the
    heading was kept, which named none; now each kind of problem with its count and first key, and the first
    size mismatch with its shapes."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if len(lines) < 2 or not lines[0].startswith("Error(s) in loading state_dict"):
        text = one_line(e)
        return text if len(text) <= MAX_REASON else text[: MAX_REASON - 4] + " ..."
    parts, mismatched = [], [line for line in lines[1:] if line.startswith("size mismatch for")]
    for line in lines[1:]:
        if (found := re.match(r"(Missing|Unexpected) key\(s\) in state_dict: (.*)", line)):
            keys = re.findall(r'"([^"]+)"', found[2])
            parts.append(f"{len(keys)} {found[1].lower()} weight(s), e.g. {keys[0] if keys else '?'}")
    if mismatched:
        more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
        parts.append(mismatched[0].rstrip(".") + more)
    return f"{lines[0]} {'; '.join(parts)}"
