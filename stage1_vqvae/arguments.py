"""The stage-1 network's arguments, checked before any module is built: each bad value is a ValueError naming
its --model flag (a zero width or codebook otherwise failed inside training, a codebook over 65,536 only when
extract_codes wrote the codes). Plain Python; :class:`stage1_vqvae.model.VQModel` calls these first.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from common.codes import MAX_CODEBOOK_SIZE

DEFAULT_LEVEL = "codes"  # the name of the only level of a one-level model (and of version-1 codes)
DOWNSAMPLES = (2, 4, 8, 16)  # what networks.Encoder halves by (stride-2 steps)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)  # numpy's integers too


def check_codebook_size(flag: str, size: Any) -> None:
    """ValueError unless `size` codes fit the codes format (uint16): checked here, not when extract_codes
    writes the codes after a whole training run."""
    if not _is_int(size) or not 1 <= size <= MAX_CODEBOOK_SIZE:
        raise ValueError(f"{flag} must be an integer in 1..{MAX_CODEBOOK_SIZE} (codes are stored as uint16), "
                         f"got {size!r}")  # fmt: skip


def check_fsq_levels(flag: str, levels: Any) -> None:
    """ValueError unless `levels` (None: FSQ's default) are integers >= 2 whose product fits the codes format."""
    if levels is None:
        return
    if not isinstance(levels, (list, tuple)) or not levels or not all(_is_int(v) and v >= 2 for v in levels):
        raise ValueError(f"{flag} must be a list of integers >= 2 (e.g. [8, 5, 5, 5]), got {levels!r}")
    if (k := math.prod(levels)) > MAX_CODEBOOK_SIZE:
        raise ValueError(f"{flag} {list(levels)} make {k} codes, more than the {MAX_CODEBOOK_SIZE} the codes format "
                         "(uint16) holds; use fewer or smaller levels")  # fmt: skip


def check_arguments(width: int, res_blocks: int, res_width: int, downsample: int, code_dim: int, quantizer: str,
                    codebook_size: int, beta: float, decay: float, restart_threshold: float, lookup_dim: int | None,
                    fsq_levels: list[int] | None, levels: list[dict] | None) -> None:  # fmt: skip
    """ValueError naming the --model flag of the first value no network can be built (or trained) with. Before
    any module is made: a zero width or codebook otherwise fails inside training, a code_dim of 0 in the
    codebook's init, a codebook_size over 65,536 only when extract_codes writes the codes."""
    for flag, value, least in [("width", width, 1), ("res_blocks", res_blocks, 0), ("res_width", res_width, 1),
                               ("code_dim", code_dim, 1)]:  # fmt: skip
        if not _is_int(value) or value < least:
            raise ValueError(f"--model.{flag} must be an integer >= {least}, got {value!r}")
    if not levels and downsample not in DOWNSAMPLES:  # with levels, level_specs checks theirs
        raise ValueError(f"--model.downsample must be 2, 4, 8 or 16, got {downsample!r}")
    if quantizer not in ("vq", "fsq"):
        raise ValueError(f"--model.quantizer must be 'vq' or 'fsq', got {quantizer!r}")
    check_codebook_size("--model.codebook_size", codebook_size)
    check_fsq_levels("--model.fsq_levels", fsq_levels)
    if lookup_dim is not None and (not _is_int(lookup_dim) or lookup_dim < 1):
        raise ValueError(f"--model.lookup_dim must be an integer >= 1 (or null: no projection), got {lookup_dim!r}")
    if not 0 <= beta < math.inf:  # NaN and .inf (YAML's) too
        raise ValueError(f"--model.beta must be a finite number >= 0, got {beta}")
    if not 0 <= decay < 1:
        raise ValueError(f"--model.decay must be in [0, 1), got {decay}")
    if not 0 <= restart_threshold < math.inf:
        raise ValueError(f"--model.restart_threshold must be a finite number >= 0 (0: no restarts), got "
                         f"{restart_threshold}")  # fmt: skip


def level_specs(levels: list[dict] | None, downsample: int, codebook_size: int,
                fsq_levels: list[int] | None) -> list[dict]:  # fmt: skip
    """The levels, bottom (finest) first, each {name, downsample, codebook_size, fsq_levels}, checked.

    ``levels=None`` is one level from the flat arguments (every one-level config and checkpoint)."""
    if not levels:
        return [{"name": DEFAULT_LEVEL, "downsample": downsample, "codebook_size": codebook_size,
                 "fsq_levels": fsq_levels}]  # fmt: skip
    specs, known = [], {"name", "downsample", "codebook_size", "fsq_levels"}
    for i, raw in enumerate(levels):
        if not isinstance(raw, dict) or "downsample" not in raw or set(raw) - known:
            raise ValueError(f"--model.levels[{i}] must be a mapping with downsample (and name, codebook_size, "
                             f"fsq_levels), got {raw!r}")  # fmt: skip
        if "codebook_size" in raw:
            check_codebook_size(f"--model.levels[{i}].codebook_size", raw["codebook_size"])
        check_fsq_levels(f"--model.levels[{i}].fsq_levels", raw.get("fsq_levels"))
        if not _is_int(raw["downsample"]):  # int() made 2.9 a 2, and "x" a message that named no flag
            raise ValueError(f"--model.levels[{i}].downsample must be 2, 4, 8 or 16, got {raw['downsample']!r}")
        spec = {"name": str(raw.get("name", f"level{i}")), "downsample": int(raw["downsample"]),
                "codebook_size": int(raw.get("codebook_size", codebook_size)),
                "fsq_levels": raw.get("fsq_levels", fsq_levels)}  # fmt: skip
        if not spec["name"].isidentifier():
            raise ValueError(f"--model.levels[{i}].name must be a plain identifier, got {spec['name']!r}")
        specs.append(spec)
    specs.sort(key=lambda s: s["downsample"])
    names = [s["name"] for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"--model.levels: names must differ, got {names}")
    # every level's downsample is one the networks can build (2-16), checked first: a 0 divided below
    for spec in specs:
        if spec["downsample"] not in DOWNSAMPLES:
            raise ValueError(f"--model.levels: level {spec['name']}'s downsample must be 2, 4, 8 or 16, "
                             f"got {spec['downsample']}")  # fmt: skip
    for below, above in zip(specs, specs[1:]):
        ratio = above["downsample"] // below["downsample"]
        if above["downsample"] != ratio * below["downsample"] or ratio not in DOWNSAMPLES:
            raise ValueError(f"--model.levels: each level's downsample must be 2, 4, 8 or 16 times the one below, "
                             f"got {below['downsample']} then {above['downsample']}")  # fmt: skip
    return specs
