"""The console scripts. Each imports its command's module only when called, inside a guard, so that Ctrl-C while
torch and the rest still import (the first 1-3 s of every command) ends in one line and exit code 130, as it
does once the command runs, instead of Python's traceback from the middle of an import; SIGTERM there is one
line and exit code 143 too.

The commands' own modules stay the entry points (thin `main(args=None)` leaves; `python -m tools.sample` works
as before); this file only names them, and imports none of them at its top.
"""

from __future__ import annotations

import functools
import importlib
import signal
import sys

EXIT_INTERRUPTED = 130  # common.cli's; not imported from there, which would import torch before the guard
EXIT_TERMINATED = 143  # 128 + SIGTERM, likewise

COMMANDS = {  # console script -> "module:function" (the command's main)
    "train_stage1": "stage1_vqvae.train:main",
    "extract_codes": "stage1_vqvae.extract:main",
    "train_stage2": "stage2_prior.train:main",
    "sample": "tools.sample:main",
    "evaluate": "tools.evaluate:main",
    "train_feature_net": "tools.train_feature_net:main",
    "train_anomaly_net": "tools.train_anomaly_net:main",
    "compress": "tools.compress:main_compress",
    "decompress": "tools.compress:main_decompress",
    "score_anomalies": "tools.anomaly:main",
    "serve": "tools.serve:main",
}


class _Terminated(Exception):
    """SIGTERM while the command imports."""


def _terminated(signum: int, frame: object) -> None:
    raise _Terminated


def launch(name: str) -> None:
    """Import the command `name` and run it with the process's arguments."""
    module, function = COMMANDS[name].split(":")
    before = signal.getsignal(signal.SIGTERM)
    if before is signal.SIG_DFL:  # (an ignored SIGTERM stays ignored); the commands install their own once they run
        signal.signal(signal.SIGTERM, _terminated)
    try:
        main = getattr(importlib.import_module(module), function)
    except KeyboardInterrupt:  # nothing is written before the command runs: there is nothing to clean up
        print(f"\n{name}: interrupted (Ctrl-C)", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
    except _Terminated:  # a silent kill (exit -15) before; as the commands say it once they run
        print(f"{name}: stopped by SIGTERM", file=sys.stderr)
        raise SystemExit(EXIT_TERMINATED) from None
    finally:
        signal.signal(signal.SIGTERM, before)
    main()


# One callable a console script (pyproject.toml's [project.scripts] names each)
train_stage1 = functools.partial(launch, "train_stage1")
extract_codes = functools.partial(launch, "extract_codes")
train_stage2 = functools.partial(launch, "train_stage2")
sample = functools.partial(launch, "sample")
evaluate = functools.partial(launch, "evaluate")
train_feature_net = functools.partial(launch, "train_feature_net")
train_anomaly_net = functools.partial(launch, "train_anomaly_net")
compress = functools.partial(launch, "compress")
decompress = functools.partial(launch, "decompress")
score_anomalies = functools.partial(launch, "score_anomalies")
serve = functools.partial(launch, "serve")
