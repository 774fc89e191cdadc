"""A user error in a multi-process launch (Lightning's DDP launcher, torchrun) is one line for the whole launch,
not one a rank, and every rank still exits 2; a rank whose error is its own still says it. Two real processes on
CPU (gloo), a few seconds."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# A command whose body fails with a user error, the same on every rank or (own) naming the rank; with
# "group", after the default process group is made, as a DDP rank's data or config check fails.
RANK_FAILS = """
import os, sys
from common import cli
if sys.argv[1] == "group":
    import torch.distributed as dist
    dist.init_process_group("gloo")
own = f" of rank {os.environ['RANK']}" if sys.argv[2] == "own" else ""
if sys.argv[2] == "late" and os.environ["RANK"] != "0":  # rank 0, which hosts the group's store, fails first
    import time
    time.sleep(0.5)
message = f"--data.batch_size 2000 is more than the train split{own}"
def fail(args):
    raise cli.UserError(message)
cli.run_command("probe", fail, [])
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ranks(tmp_path: Path, how: str) -> list[subprocess.CompletedProcess]:
    """Two ranks started as Lightning's launcher starts them: the same MASTER_ADDR/PORT, RANK 0 and 1."""
    script = tmp_path / "rank_fails.py"
    script.write_text(RANK_FAILS)
    port, env = free_port(), {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), "group", how], stderr=subprocess.PIPE, text=True,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
             for r in (0, 1)]  # fmt: skip
    return [subprocess.CompletedProcess(p.args, p.wait(timeout=120), None, p.stderr.read()) for p in procs]


@pytest.mark.slow
def test_the_same_error_on_every_rank_is_said_once_and_each_exits_2(tmp_path):
    done = ranks(tmp_path, "same")
    assert [d.returncode for d in done] == [2, 2]
    assert "".join(d.stderr for d in done) == "probe: error: --data.batch_size 2000 is more than the train split\n"


@pytest.mark.slow
def test_a_rank_that_fails_after_rank_0_still_reads_its_line(tmp_path):
    """Rank 0 hosts the process group's store and its exit took the store along: a rank failing 0.5 s later printed
    c10d's connection errors and the line again. Rank 0 now waits (at most 1 s) until the others have read it."""
    done = ranks(tmp_path, "late")
    assert [d.returncode for d in done] == [2, 2]
    assert "".join(d.stderr for d in done) == "probe: error: --data.batch_size 2000 is more than the train split\n"


def test_torchruns_variables_left_in_a_shell_change_nothing(tmp_path):
    """A single process with torchrun's variables and no torchrun behind them (a notebook, a shell inside a job):
    one line at once (it spent 9-13 s in c10d's retries and printed 43 lines of its C++ stack first)."""
    script = tmp_path / "rank_fails.py"
    script.write_text(RANK_FAILS)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TORCHELASTIC_USE_AGENT_STORE": "True",
           "TORCHELASTIC_RUN_ID": "gone", "WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}  # fmt: skip
    t0 = time.perf_counter()
    run = subprocess.run([sys.executable, str(script), "none", "same"], env=env, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert run.returncode == 2 and run.stderr == "probe: error: --data.batch_size 2000 is more than the train split\n"
    assert time.perf_counter() - t0 < 5, "it waited for a store"


@pytest.mark.slow
def test_an_error_of_one_rank_is_said_by_that_rank(tmp_path):
    done = ranks(tmp_path, "own")
    assert [d.returncode for d in done] == [2, 2]
    assert [d.stderr.splitlines() for d in done] == [
        [f"probe: error: --data.batch_size 2000 is more than the train split of rank {r}"] for r in (0, 1)
    ]


@pytest.mark.slow
def test_under_torchrun_an_error_before_any_process_group_is_said_once(tmp_path):
    """torchrun's ranks share its store from the start: a bad flag, seen by every rank at once, is one line."""
    script = tmp_path / "rank_fails.py"
    script.write_text(RANK_FAILS)
    torchrun = Path(sys.executable).parent / "torchrun"
    run = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", str(script), "none", "same"],
                         env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}, capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    ours = [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("probe:")]
    assert ours == ["probe: error: --data.batch_size 2000 is more than the train split"], run.stderr
    assert "exitcode  : 2" in run.stderr  # the first rank to end ended with 2 (torchrun then stops the others)
