"""The one CLI shell of the non-Lightning commands (extract_codes, sample, evaluate, compress, decompress,
score_anomalies, train_feature_net): one parser style, one --overwrite and --device, one exit path.

    def main(args: list[str] | None = None) -> None:
        run_command("sample", _run, args)        # _run(args) -> message printed on success

A user error (a bad flag, a missing or unusable file, an output that already exists) is one line,
``<prog>: error: <message>``, and exit code 2, never a traceback: everything a command raises as a
`UserError`, `ValueError` or `OSError` is reported so, and so is running out of memory (naming the option
that sets the batch). Parse errors take the same path. In a multi-process launch (DDP, torchrun) the line is
printed once, not once a rank (`say_error_once`), and every rank exits 2. Imports torch
(for devices) and jsonargparse (for ``--data.*`` options built from a class signature) only.
"""

from __future__ import annotations

import contextlib
import netrc
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any, NoReturn

import torch
from jsonargparse import ArgumentParser, set_parsing_settings

from common.malloc import keep_freed_memory

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C: `make` stops too


EXIT_TERMINATED = 128 + signal.SIGTERM  # 143, what a shell reports for a command `kill` or `timeout` stopped


class CommandInterrupted(Exception):
    """Ctrl-C inside `ctrl_c_raises_interrupted` (or SIGTERM inside run_command: `signum`): not a KeyboardInterrupt,
    which Lightning's loops catch themselves (they print their own line and exit with 1); run_command reports
    them alike."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def sigterm_raises_interrupted() -> Iterator[None]:
    """Inside the block, SIGTERM (kill, timeout, a scheduler's limit, docker stop) raises CommandInterrupted, so
    the commands' `finally` blocks remove their temporary files as after Ctrl-C; its default action ended the
    process at once, leaving hidden temporary files as large as the outputs (an image cache: the data set).
    Only from the main thread, and only where SIGTERM has its default action (a caller's handler is kept)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def stopped(signum: int, frame: Any) -> None:
        raise CommandInterrupted(signum)

    previous = signal.signal(signal.SIGTERM, stopped)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def ctrl_c_reaches_us() -> bool:
    """Whether this code may handle Ctrl-C: only the main thread can set a SIGINT handler, and a job that a
    shell started in the background ignores SIGINT (no Ctrl-C reaches it; leave it so)."""
    main_thread = threading.current_thread() is threading.main_thread()
    return main_thread and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN


@contextlib.contextmanager
def ctrl_c_raises_interrupted() -> Iterator[None]:
    """Inside the block, Ctrl-C raises CommandInterrupted (when `ctrl_c_reaches_us`)."""
    if not ctrl_c_reaches_us():
        yield
        return

    def interrupted(signum: int, frame: Any) -> None:
        raise CommandInterrupted

    previous = signal.signal(signal.SIGINT, interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class UserError(Exception):
    """Something the user can fix; the message names the argument or file and what to do."""


def one_line(message: str) -> str:
    return " ".join(str(message).split())


def out_of_memory(e: BaseException) -> str | None:
    """"out of memory (what the failed allocation asked for)", for a message that goes on with its remedy, or
    None if `e` is not one: torch.OutOfMemoryError (CUDA, MPS, XPU: its first sentences, the size tried and
    what the card has free) or the CPU allocator's RuntimeError (a request the host cannot map). A batch too
    large for the machine, not a bug."""
    if not isinstance(e, RuntimeError):
        return None
    text = one_line(e)
    if (cpu := re.search(r"DefaultCPUAllocator: can't allocate memory: you tried to allocate (\d+) bytes", text)):
        return f"out of memory (the host could not allocate {int(cpu[1]) / 2**30:,.1f} GiB)"
    if not isinstance(e, torch.OutOfMemoryError):
        return None
    if "OutOfMemoryError: " in text:  # re-raised from a DataLoader worker: its traceback, then the message
        text = text.rsplit("OutOfMemoryError: ", 1)[1]
    # "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which 1.25 GiB
    # is free. Including non-PyTorch memory, ..." (then allocator advice and a link): the first three sentences
    return f"out of memory ({' '.join(re.split(r'(?<=[.]) ', text)[:3]).rstrip('.')})"


class Parser(ArgumentParser):
    """jsonargparse's parser with errors as one line and exit code 2."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        say_error_once(f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)")
        raise SystemExit(EXIT_USER_ERROR)


# What a `class_path` in a config file or on the command line may name (trainer.callbacks, logger, plugins, ...):
# Lightning's classes and ours. jsonargparse imports any other path before it checks the class, so a config file
# someone hands you could otherwise run the import-time code of any installed module, and build any class that
# fits the slot with its arguments. Your own callbacks: name their packages in IMPORT_PATHS_ENV (the
# environment is yours, a config file cannot set it).
ALLOWED_IMPORT_PATHS = ["pytorch_lightning", "lightning", "lightning_fabric", "torchmetrics", "common", "stage1_vqvae",
                        "stage2_prior", "tools"]  # fmt: skip
IMPORT_PATHS_ENV = "VQGEN_IMPORT_PATHS"  # comma-separated, e.g. mylab.callbacks


def allowed_import_paths() -> list[str]:
    extra = [p.strip() for p in os.environ.get(IMPORT_PATHS_ENV, "").split(",") if p.strip()]
    return ALLOWED_IMPORT_PATHS + extra


def restrict_import_paths() -> None:
    """Deny every import path a parsed value names except allowed_import_paths() (jsonargparse's own policy,
    process-wide); a denied one is a user error naming the path."""
    try:
        set_parsing_settings(import_path_denylist=["*"], import_path_allowlist=allowed_import_paths())
    except ValueError as e:  # a malformed entry of the variable
        raise UserError(f"{IMPORT_PATHS_ENV}: {e}") from None


def make_parser(prog: str, doc: str | None) -> Parser:
    """A parser whose description is the first paragraph of a module docstring."""
    restrict_import_paths()
    return Parser(prog=prog, description=(doc or "").split("\n\n")[0].strip(), exit_on_error=True)


def add_overwrite(p: ArgumentParser, what: str = "existing output files") -> None:
    p.add_argument("--overwrite", action="store_true", help=f"replace {what}")


def add_device(p: ArgumentParser) -> None:
    p.add_argument("--device", type=str, default="auto", help="auto (a GPU if there is one), cpu, cuda, cuda:1")


def resolve_device(spec: str, flag: str = "--device") -> torch.device:
    """auto -> cuda if available else cpu; anything else must name a device this machine has."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise UserError(f"{flag} {spec!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise UserError(f"{flag} {spec}: only cpu and cuda devices are supported; use auto, cpu or cuda")
    if not torch.cuda.is_available():
        raise UserError(f"{flag} {spec}: no CUDA GPU is available on this machine; use --device cpu (or auto)")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"{flag} {spec}: this machine has {torch.cuda.device_count()} GPU(s); use cuda:0..")
    return device


def at_least(minimum: float, **flags: Any) -> None:
    """UserError unless every given flag value (None = not given) is >= minimum: at_least(1, batch_size=b)."""
    for name, value in flags.items():
        if value is not None and value < minimum:
            raise UserError(f"--{name} must be >= {minimum}, got {value}")


def check_seed(seed: int, flag: str = "--seed") -> None:
    """UserError unless torch can take `seed` (a 64-bit integer): 1e23 failed inside torch, naming no flag."""
    if not -(2**63) <= seed < 2**64:
        raise UserError(f"{flag} must be a 64-bit integer (-2**63 .. 2**64 - 1), got {seed}")


def parse_classes(text: str, class_names: list[str], flag: str = "--classes") -> list[int]:
    """"0,3,7" or "Sneaker,Bag" (names as the data set spells them, any case; ids and names may mix) -> class
    ids, in the order given, repeats dropped. UserError naming the flag, the bad entry and the choices."""
    lookup = {name.strip().casefold(): i for i, name in enumerate(class_names)}
    ids: list[int] = []
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        if entry.isdigit():  # a number is an id, even where a class is named like one (MNIST's "0".."9" agree)
            i = int(entry)
        elif entry.casefold() in lookup:
            i = lookup[entry.casefold()]
        else:
            names = ", ".join(f"{k} {n}" for k, n in enumerate(class_names))
            raise UserError(f"{flag}: no class named {entry!r}; give ids or names, comma-separated ({names})")
        if not 0 <= i < len(class_names):
            raise UserError(f"{flag}: unknown class id {i}; there are {len(class_names)} classes "
                            f"(0..{len(class_names) - 1})")  # fmt: skip
        if i not in ids:
            ids.append(i)
    if not ids:
        raise UserError(f"{flag} {text!r}: no class given; give ids or names, comma-separated")
    return ids


def wandb_offline_unless_logged_in() -> bool:
    """Make W&B log offline unless WANDB_MODE is set or credentials exist; True if this switched it offline."""
    if "WANDB_MODE" in os.environ or os.environ.get("WANDB_API_KEY"):
        return False
    try:
        if netrc.netrc(os.path.expanduser("~/.netrc")).authenticators("api.wandb.ai") is not None:
            return False
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        pass
    os.environ["WANDB_MODE"] = "offline"
    return True


RANK_ZERO_WAIT_S = 5.0  # how long another rank waits to hear that rank 0 reported the same error
ACK_WAIT_S = 1.0  # how long rank 0, which hosts the process group's store, waits for the others to have read it


def _listening(host: str, port: int) -> bool:
    """Whether something accepts connections there, within 0.5 s (a plain socket: c10d's client retried for seconds
    and printed its C++ stack when torchrun's variables were left in a shell with no torchrun behind them)."""
    import socket

    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _launch_store() -> tuple[Any, int, int, bool] | None:
    """(the key-value store all ranks of this multi-process launch share, this process's global rank, the number of
    ranks, whether rank 0 hosts it), or None in a single process: torchrun's own store (there from the start, before
    any process group: a bad flag is seen by every rank at once; its agent hosts it), else the default process
    group's (Lightning's DDP launcher, once the group is made; rank 0 hosts it)."""
    import torch.distributed as dist

    env = os.environ
    try:
        if (env.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and env.get("TORCHELASTIC_RUN_ID")
                and int(env.get("WORLD_SIZE", 1)) > 1 and _listening(env["MASTER_ADDR"], int(env["MASTER_PORT"]))):
            store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False,
                                  timeout=timedelta(seconds=RANK_ZERO_WAIT_S))  # fmt: skip
            return store, int(env["RANK"]), int(env["WORLD_SIZE"]), False
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return dist.distributed_c10d._get_default_store(), dist.get_rank(), dist.get_world_size(), True
    except Exception:  # no store to reach (a launcher gone, a variable missing): each rank speaks for itself
        return None
    return None


def say_error_once(line: str) -> None:
    """Print a user error's line on stderr once for all the processes of a multi-process launch (every rank of a
    DDP run checks the same config and data, and each printed the same line). Rank 0 prints it and puts it in the
    launch's store; another rank prints its own only when rank 0 said another line (at once: torchrun ends the
    other ranks as soon as one exits) or nothing within RANK_ZERO_WAIT_S (an error of its own, e.g. its GPU out of
    memory, or rank 0 gone), so no rank's error goes unsaid."""
    launch = _launch_store()
    if launch is not None:
        store, rank, world, rank0_hosts = launch
        # torchrun's store outlives a restart, and may serve another launch's commands: the key names both
        env = os.environ
        key = f"vqgen/user_error/{env.get('TORCHELASTIC_RUN_ID', '')}/{env.get('TORCHELASTIC_RESTART_COUNT', 0)}"
        if rank == 0:
            print(line, file=sys.stderr, flush=True)
            with contextlib.suppress(Exception):  # said; the others say their own if they cannot read it
                store.set(key, line)
                deadline = time.monotonic() + ACK_WAIT_S
                # its exit takes the process group's store with it: the others read the line first (or 1 s passes)
                while rank0_hosts and store.add(f"{key}/read", 0) < world - 1 and time.monotonic() < deadline:
                    time.sleep(0.01)
            return
        try:
            store.wait([key], timedelta(seconds=RANK_ZERO_WAIT_S))
            said = store.get(key).decode()
            store.add(f"{key}/read", 1)
            if said == line:
                return  # rank 0 said it
        except Exception:  # not said in time, or the store is gone: say it here
            pass
    print(line, file=sys.stderr, flush=True)


def run_command(prog: str, fn: Callable[[list[str] | None], str | None], args: list[str] | None,
                memory_flag: str | None = "--batch_size") -> None:  # fmt: skip
    """Run a command's body; print what it returns, or its user error as one line and exit 2 (Ctrl-C: 130).
    Running out of memory is one too, naming `memory_flag` (the option that sets how much is held at once)."""
    keep_freed_memory()
    try:
        with sigterm_raises_interrupted():
            message = fn(args)
    except (UserError, ValueError, OSError) as e:  # OSError: missing, existing, unwritable, read-only files
        say_error_once(f"{prog}: error: {one_line(e)}")
        raise SystemExit(EXIT_USER_ERROR) from None
    except (RuntimeError, MemoryError) as e:  # MemoryError: numpy's (an array too large for the host)
        if (what := out_of_memory(e) if isinstance(e, RuntimeError) else f"out of memory ({one_line(e)})") is None:
            raise
        remedy = f"pass a smaller {memory_flag}" if memory_flag else "free some memory, or use a larger machine"
        say_error_once(f"{prog}: error: {what}; {remedy}")
        raise SystemExit(EXIT_USER_ERROR) from None
    except (KeyboardInterrupt, CommandInterrupted) as e:  # outputs are written under temporary names: none is left
        if getattr(e, "signum", signal.SIGINT) == signal.SIGTERM:
            print(f"{prog}: stopped by SIGTERM", file=sys.stderr)
            raise SystemExit(EXIT_TERMINATED) from None
        print(f"\n{prog}: interrupted (Ctrl-C)", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
    if message:
        print(message, flush=True)
