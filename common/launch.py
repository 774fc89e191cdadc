"""Where a run lives: its folder under ``<root>`` and the checkpoint it resumes, the same for all its processes.

* a new run claims ``<root>/version_N`` (the next free N) or ``<root>/NAME`` (``--log.name``); a NAME that
  already holds a run is refused, so a second run never overwrites the first;
* ``--ckpt_path last`` continues ``<root>/latest`` (or ``<root>/NAME``) in place from its last.ckpt;
* ``last.ckpt`` is read weights-only first (common.checkpoint, as common.runs does for a ``--ckpt_path``
  file): a file that is not a checkpoint of this stage, or a pickle that could run code, is refused.

Lightning's own DDP launcher re-runs the script for ranks 1.. after rank 0 has chosen, so those children
find the folder in the environment (``VQGEN_RUN_DIR``). torchrun, SLURM's srun, LSF and MPI start every
rank at once with nothing chosen yet: there the default process group is initialised first, from
Lightning's own cluster-environment detection, rank 0 chooses and broadcasts its choice. Lightning's DDP
strategy then finds the group initialised and uses it (``_init_dist_connection`` returns early when
``torch.distributed.is_initialized()``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning_fabric.plugins.environments import (
    ClusterEnvironment,
    LSFEnvironment,
    MPIEnvironment,
    SLURMEnvironment,
    TorchElasticEnvironment,
)
from lightning_fabric.utilities.exceptions import MisconfigurationException

from common.checkpoint import read_checkpoint
from common.cli import UserError, one_line
from common.run_lock import lock_run, release_run

RUN_ENV = "VQGEN_RUN_DIR"  # set by rank 0; inherited by the processes Lightning's launcher starts
SLURM_RECORD = "slurm_job.json"  # in a run folder made inside a SLURM batch job: its job and config
LIGHTNING_CKPT_NAMES = ("last", "best", "hpc", "registry")  # ckpt_path values Lightning resolves itself


@dataclass
class Run:
    """One fit's folder and what it starts from."""

    dir: Path
    ckpt_path: str | None = None  # passed to Trainer.fit ("last" resolved to a file)
    resume_step: int | None = None  # global_step of last.ckpt when continuing `dir` in place
    created: bool = False  # claimed by this call: removed again if the fit fails before training starts
    parents_created: list[Path] = field(default_factory=list)  # folders above `dir` made for it, deepest first
    note: str | None = None  # what rank 0 says of the choice (a restarted SLURM job's run, a run from a file)


def next_version(root: Path) -> str:
    taken = [int(m.group(1)) for p in root.glob("version_*") if (m := re.fullmatch(r"version_(\d+)", p.name))]
    return f"version_{max(taken, default=-1) + 1}"


def point_latest(root: Path, run_dir: Path) -> None:
    """Atomically make <root>/latest a relative symlink to run_dir."""
    tmp = root / f".latest.{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(run_dir.name)
    os.replace(tmp, root / "latest")


def _claim_version(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    while True:
        folder = root / next_version(root)
        try:
            folder.mkdir()  # atomic: two runs started at once cannot both get version_N
            return folder
        except FileExistsError:
            continue


def _claim_name(root: Path, name: str) -> tuple[Path, bool]:
    """(root/name, whether this call created it): an existing empty folder is used but never removed."""
    if name in ("latest", ".", "..") or "/" in name or os.sep in name or name.startswith(".latest"):
        raise UserError(f"--log.name {name!r}: a run name is one folder name, not 'latest', '.', '..' or a path")
    folder = root / name
    if folder.is_dir() and any(folder.iterdir()):
        lock_run(folder, f"--log.name {name}")  # a run training there now is named as such (the advice below
        release_run(folder)  # is for a run that has ended)
        if (folder / "checkpoints" / "last.ckpt").is_file():
            fix = f"pass --ckpt_path last (with --log.name {name}) to resume it"
        else:
            # no process trains there (the lock above): a run stopped before its first checkpoint, or a user's files
            fix = f"it holds no checkpoint to resume and no run trains there now; delete {folder} to start over"
        raise UserError(f"--log.name {name}: {folder} already holds a run; {fix}, or choose another --log.name")
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    return folder, created


def config_fingerprint(cfg: Any) -> str:
    """The command's settings as one string (SHA-256 of their JSON), --ckpt_path left out: the same command run
    again (a SLURM job started again) gives the same; another fit's settings another (common.launch)."""
    settings = {k: v for k, v in cfg.clone().as_dict().items() if k != "ckpt_path"}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def choose_run(root: Path, name: str | None, ckpt_path: str | None, kind: str | None, config: str = "") -> Run:
    """Rank 0's choice (``kind``: "stage1" or "prior", what last.ckpt must hold; ``config``: a fingerprint of the
    command's settings, see slurm_restarted_run); UserError for a fix. A --ckpt_path file (a new run starting
    from it) was checked when the arguments were parsed."""
    if (folder := slurm_restarted_run(root, name, config)) is not None:
        last, job = folder / "checkpoints" / "last.ckpt", slurm_job()
        said = f"SLURM job {job} started again (restart {os.environ['SLURM_RESTART_COUNT']})"
        if last.is_file():
            step = int(read_checkpoint(last, str(last), want=kind).get("global_step", 0))
            lock_run(folder, f"SLURM job {job}")  # last: a failure before it would leave it held in this process
            return Run(folder.resolve(), str(last.resolve()), step,
                       note=f"{said}: continuing {folder.resolve()} from its last.ckpt (step {step})")  # fmt: skip
        # stopped before its first checkpoint: what its first start left there (logs of steps that are gone) is
        # this command's own, made in this job; it starts over in the same folder (a --log.name stays usable)
        lock_run(folder, f"SLURM job {job}")
        for entry in folder.iterdir():
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        return Run(folder.resolve(), ckpt_path, note=f"{said}: {folder} has no checkpoint; starting it over there")
    if ckpt_path == "last":
        folder = root / name if name else root / "latest"
        last = folder / "checkpoints" / "last.ckpt"
        if not last.is_file():
            stopped = name and folder.is_dir() and any(folder.iterdir())  # a run stopped before its first one
            if stopped:  # or one training there now, before its first checkpoint: named as such, never "delete"
                lock_run(folder, "--ckpt_path last")
                release_run(folder)
            raise UserError(  # "train without --ckpt_path" alone went in a circle there: that is refused as in use
                f"--ckpt_path last: no checkpoint at {last}; "
                + (f"its run stopped before its first one: delete {folder}, then train without --ckpt_path, "
                   if stopped else "train first (without --ckpt_path), ")
                + "or pass --ckpt_path PATH/TO.ckpt"
            )  # fmt: skip
        step = read_checkpoint(last, "--ckpt_path last", want=kind).get("global_step", 0)
        lock_run(folder, "--ckpt_path last")  # a job submitted twice: the second would train the run again
        return Run(folder.resolve(), str(last.resolve()), int(step))
    missing = [p.resolve() for p in [root, *root.parents] if not p.exists()]  # deepest first
    try:
        folder, created = _claim_name(root, name) if name else (_claim_version(root), True)
    except OSError as e:  # a file where a folder goes, no permission, a read-only file system: name the flag
        raise UserError(f"--trainer.default_root_dir {root}: cannot make a run folder there ({e.strerror or e}: "
                        f"{e.filename or root}); choose a folder you can write") from None  # fmt: skip
    # Two fits with one --log.name started together both found its folder empty: the one that locks it first
    # trains, the other is refused here (and leaves the folder alone: no Run, nothing to discard).
    lock_run(folder, f"--log.name {name}" if name else "--trainer.default_root_dir")
    note = None
    if ckpt_path and ckpt_path not in LIGHTNING_CKPT_NAMES:  # a file: its run's folder is left as it is
        note = (f"a new run in {folder.resolve()}, starting from the weights and step of --ckpt_path {ckpt_path} "
                "(--ckpt_path last goes on in the run's own folder instead)")  # fmt: skip
    return Run(folder.resolve(), ckpt_path, created=created, parents_created=missing if created else [], note=note)


# --------------------------------------------------------------------------------- SLURM: requeue and restart
def slurm_job() -> str | None:
    """The SLURM batch job this process runs in ("1234", an array's task "1234_5"); None outside one and in an
    interactive allocation (job name bash or interactive, as Lightning's SLURMEnvironment reads it)."""
    if not os.environ.get("SLURM_JOB_ID") or os.environ.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return None
    if (array := os.environ.get("SLURM_ARRAY_JOB_ID")) and (task := os.environ.get("SLURM_ARRAY_TASK_ID")):
        return f"{array}_{task}"
    return os.environ["SLURM_JOB_ID"]


def requeue_slurm_job(job: str) -> str:
    """``scontrol requeue JOB``: "" when done, else why not (one line)."""
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        return one_line(e)
    return "" if done.returncode == 0 else one_line(done.stderr.strip() or f"scontrol exited with {done.returncode}")


def write_slurm_record(run_dir: Path, config: str) -> None:
    """Inside a SLURM batch job, note in the run folder the job and the command's settings (once it trains: a run
    that fails before that leaves no folder), for the job's next start (slurm_restarted_run)."""
    if (job := slurm_job()) is not None:
        (run_dir / SLURM_RECORD).write_text(json.dumps({"job": job, "config": config}) + "\n")


def slurm_restarted_run(root: Path, name: str | None, config: str) -> Path | None:
    """In a SLURM job started again (requeued after its warning signal, preemption or a node failure: the batch
    script runs again from its top), the run folder this same command trained in at the job's earlier start:
    its record names this job and the same settings (a job's script may run several fits, e.g. a sweep, into
    the same root). The newest, should the command have run twice."""
    if int(os.environ.get("SLURM_RESTART_COUNT") or 0) < 1 or (job := slurm_job()) is None or not root.is_dir():
        return None
    folders = [root / name] if name else [p for p in root.iterdir() if p.is_dir() and not p.is_symlink()]
    found = []
    for folder in folders:
        try:
            record = json.loads((folder / SLURM_RECORD).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and record.get("job") == job and record.get("config") == config:
            found.append(((folder / SLURM_RECORD).stat().st_mtime, folder))
    return max(found)[1] if found else None


def evaluation_checkpoint(subcommand: str, ckpt: str | None, root: Path, name: str | None, kind: str | None) -> str:
    """validate/test: the checkpoint to evaluate. Without one Lightning would evaluate untrained weights;
    "last" and "best" name the files of the latest run under `root` (or of --log.name)."""
    if ckpt is None:
        raise UserError(f"{subcommand} needs --ckpt_path: a checkpoint file, or last / best (the latest run's "
                        f"under {root}); without one it would {subcommand} untrained weights")  # fmt: skip
    if ckpt in ("last", "best"):
        path = root / (name or "latest") / "checkpoints" / f"{ckpt}.ckpt"
        if not path.is_file():
            raise UserError(f"--ckpt_path {ckpt}: no checkpoint at {path}; train first, or pass a file")
        read_checkpoint(path, f"--ckpt_path {ckpt}", want=kind)
        return str(path.resolve())
    return ckpt


MACHINE_WORDS = re.compile(r"accelerator|gpu|cuda|devices|strategy|precision|backend|mps|tpu", re.IGNORECASE)


def machine_error(e: Exception, flags: str, note: str = "") -> UserError | None:
    """A Lightning MisconfigurationException about what this machine cannot run (a GPU setting without a GPU,
    more devices than it has), or its TypeError for a device count it cannot parse (`--devices -1` on a CPU), as a
    one-line UserError naming `flags`; None for any other exception."""
    device_count = isinstance(e, TypeError) and "`devices`" in str(e)
    if not device_count and (not isinstance(e, MisconfigurationException) or not MACHINE_WORDS.search(str(e))):
        return None
    return UserError(f"{e} (check {flags}: this machine has {torch.cuda.device_count()} CUDA GPU(s){note})")


def join_run(ckpt_path: str | None) -> Run:
    """The run a process started by Lightning's launcher joins: the folder rank 0 put in the environment."""
    folder = Path(os.environ[RUN_ENV])
    return Run(folder, str(folder / "checkpoints" / "last.ckpt") if ckpt_path == "last" else ckpt_path)


# --------------------------------------------------------------------------------- external launchers
def check_launcher_devices(trainer: dict[str, Any]) -> None:
    """Under torchrun, srun, ... the launcher's world size must be what --trainer.devices x num_nodes says: with
    the configs' devices: 1 each process trained alone on all the data, into the same run folder, and exited 0."""
    env = external_launcher()
    if env is None or os.environ.get(RUN_ENV):
        return
    try:
        devices, nodes = int(trainer.get("devices")), int(trainer.get("num_nodes") or 1)
    except (TypeError, ValueError):  # "auto", a list of device ids: Lightning's own checks apply
        return
    if devices * nodes != env.world_size():
        raise UserError(f"{type(env).__name__.removesuffix('Environment')} started {env.world_size()} processes, but "
                        f"--trainer.devices {devices} x --trainer.num_nodes {nodes} is {devices * nodes}: each would "
                        f"train alone into one run folder; pass --trainer.devices {env.world_size() // nodes}")


def external_launcher() -> ClusterEnvironment | None:
    """The cluster environment that started several ranks at once, or None (one process, or Lightning's
    own launcher). Same order of detection as Lightning's accelerator connector."""
    for env_type in (TorchElasticEnvironment, SLURMEnvironment, LSFEnvironment, MPIEnvironment):
        if env_type.detect():
            env = env_type()
            return env if env.world_size() > 1 else None
    return None


def rank_zero_by_environment() -> bool:
    """Whether this process is global rank 0 as its launcher's environment says (before Lightning knows)."""
    if lightning_child():
        return False
    return (os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0") == "0"


def lightning_child() -> bool:
    """A process Lightning's launcher started for rank 1.. : rank 0's choice is in the environment."""
    return os.environ.get("LOCAL_RANK", "0") != "0" and bool(os.environ.get(RUN_ENV))


def init_process_group(env: ClusterEnvironment) -> None:
    """The default process group Lightning would create, created now: gloo for CPU tensors (and for the
    broadcast of the run), NCCL for CUDA tensors when there is a GPU."""
    if dist.is_initialized():
        return
    os.environ["MASTER_ADDR"] = env.main_address
    os.environ["MASTER_PORT"] = str(env.main_port)
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, rank=env.global_rank(), world_size=env.world_size())


def on_rank_zero(choose: Callable[[], Run]) -> tuple[Run, bool] | None:
    """(choose() of global rank 0, whether this is rank 0) on every rank of an externally launched run;
    None when this process is not part of one (it then chooses alone). A failure on rank 0 is raised on
    every rank, so no rank waits for a folder that never comes."""
    env = external_launcher()
    if env is None or os.environ.get(RUN_ENV):
        return None
    init_process_group(env)
    rank0 = dist.get_rank() == 0
    payload: list[Any] = [None]
    error: Exception | None = None
    if rank0:
        try:
            payload[0] = ("ok", choose())
        except Exception as e:  # whatever it is, the other ranks must hear of it; re-raised here below
            error, payload[0] = e, ("error", str(e))
    dist.broadcast_object_list(payload, src=0)
    if error is not None:
        raise error
    status, value = payload[0]
    if status == "error":
        raise UserError(value)
    return value, rank0
