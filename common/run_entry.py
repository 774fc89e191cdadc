"""How a training command (`train_stage1`, `train_stage2`) starts and ends: :func:`train_main` runs a
:class:`common.runs.VQGenCLI` and turns what stops it into one line (a user error: ``<prog>: error: <message>``
and exit code 2, once for all ranks; a signal: what was saved and what to run next), and :class:`OneLineParser`
gives parse errors the same form."""

from __future__ import annotations

import os
import re
import sys
from typing import TYPE_CHECKING, NoReturn

from pytorch_lightning.cli import LightningArgumentParser

from common.cli import (
    EXIT_USER_ERROR,
    IMPORT_PATHS_ENV,
    UserError,
    allowed_import_paths,
    one_line,
    restrict_import_paths,
    say_error_once,
)  # fmt: skip
from common.interrupt import Interrupted, Stopped, requeue_note, requeue_words
from common.launch import rank_zero_by_environment
from common.logging import quiet_lightning
from common.malloc import keep_freed_memory

if TYPE_CHECKING:
    from common.runs import VQGenCLI

PEER_GONE = ("Connection closed by peer", "Connection reset by peer")  # gloo's words when another rank has exited


class OneLineParser(LightningArgumentParser):
    """LightningCLI's parser with parse errors as one line and exit code 2 (common.cli's format)."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:  # jsonargparse trying alternatives: it catches this itself
            super().error(message, ex)
        prog = (getattr(ex, "subcommand_parser", None) or self).prog.replace(" [options]", "")
        if denied := re.search(r"Importing '([\w.]+)' is not allowed", message):  # common.cli.restrict_import_paths
            key = re.match(r'Parser key "([\w.]+)"', message)
            message = (f"{key.group(1) + ': ' if key else ''}class_path {denied.group(1)} is refused: a config may "
                       f"name classes of {', '.join(allowed_import_paths())} only (no other package's code runs from "
                       f"a config file); to use your own, export {IMPORT_PATHS_ENV}=PACKAGE[,PACKAGE]")  # fmt: skip
        say_error_once(f"{prog.split()[0]}: error: {one_line(message)} (see {prog} --help)")  # torchrun: once
        raise SystemExit(EXIT_USER_ERROR)


def train_main(prog: str, cli: type[VQGenCLI], model: type, datamodule: type, args: list[str] | None) -> None:
    """Run a training CLI; a user error is one line ``<prog>: error: <message>`` on stderr and exit code 2."""
    quiet_lightning()
    keep_freed_memory()
    restrict_import_paths()
    try:
        cli(model, datamodule, args=args, seed_everything_default=0, parser_kwargs={"prog": prog})
    except UserError as e:
        say_error_once(f"{prog}: error: {one_line(e)}")  # once for all of a multi-process launch's ranks
        raise SystemExit(EXIT_USER_ERROR) from None
    except Interrupted as e:  # every rank, once the step is saved: the first says so
        if e.rank0:
            print(f"{prog}: {e}; {e.next_step}", file=sys.stderr, flush=True)
        raise SystemExit(e.exit_code) from None
    except Stopped as e:  # a signal outside the training loop, or a second Ctrl-C: nothing more to save
        if rank_zero_by_environment():
            print(f"{prog}: {e}{requeue_words(requeue_note(e.signum, True))}", file=sys.stderr, flush=True)
        raise SystemExit(e.exit_code) from None
    except RuntimeError as e:
        # (the run's folder variable is gone by now, so rank_zero_by_environment cannot tell Lightning's children)
        rank = os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or os.environ.get("LOCAL_RANK") or "0"
        if rank == "0" or not (said := [words for words in PEER_GONE if words in str(e)]):
            raise
        # another rank ended first (an error of its own, said above it): gloo's "Connection closed by peer"
        # traceback here only hid that line
        print(f"{prog}: rank {rank} stopped: another process of this launch ended first (its error is above; "
              f"gloo: {said[0].lower()})", file=sys.stderr, flush=True)  # fmt: skip
        raise SystemExit(1) from None
    except ModuleNotFoundError as e:  # an environment without LightningCLI's extras (e.g. installed --no-deps)
        if "jsonargparse" not in str(e) and e.name not in ("jsonargparse", "docstring_parser", "typeshed_client"):
            raise
        print(f"{prog}: error: the training commands read their configs with jsonargparse[signatures], which this "
              f"environment lacks ({one_line(e)}); install it: pip install 'jsonargparse[signatures]>=4.27.7' "
              "(or `make setup`)", file=sys.stderr)  # fmt: skip
        raise SystemExit(EXIT_USER_ERROR) from None
