"""How much memory this process can still take: the machine's free memory, or its cgroup's limit (a SLURM job,
a container, a systemd unit), whichever is lower.

/proc/meminfo's MemAvailable is the whole machine's: inside a SLURM job or a container limited to a few GiB on
a large host it reports the host's free memory, so a folder that cannot fit would be decoded until the kernel
killed the job without a word. The cgroup's headroom is its limit less what it uses, not counting the
inactive file cache (reclaimed before the limit bites; `docker stats` counts it the same way), over the
process's cgroup and every cgroup above it (a job's limit is often set on a parent). cgroup v2 (memory.max)
and v1 (memory.limit_in_bytes) are both read; anything unreadable is skipped.
"""

from __future__ import annotations

from pathlib import Path

UNLIMITED = 1 << 60  # cgroup v1 says "no limit" with a page-rounded 2**63 - 1
# (files in the cgroup's folder: limit, usage, the memory.stat line of reclaimable file cache) per version
V2 = ("memory.max", "memory.current", "inactive_file")
V1 = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")


def meminfo_available(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """Bytes the machine can still give a process (Linux MemAvailable), None where that is unknown."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _stat_value(folder: Path, key: str) -> int:
    try:
        for line in (folder / "memory.stat").read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _headroom(folder: Path, files: tuple[str, str, str]) -> int | None:
    """limit - (usage - inactive file cache) of one cgroup folder; None without a limit or the files."""
    try:
        limit = (folder / files[0]).read_text().strip()
        usage = int((folder / files[1]).read_text().strip())
    except (OSError, ValueError):
        return None
    if not limit.isdigit() or int(limit) >= UNLIMITED:  # v2's "max" is no limit too
        return None
    return max(0, int(limit) - max(0, usage - _stat_value(folder, files[2])))


def memory_cgroups(proc_cgroup: Path = Path("/proc/self/cgroup"), fs: Path = Path("/sys/fs/cgroup"),
                   ) -> list[tuple[Path, Path, tuple[str, str, str]]]:  # fmt: skip
    """(this process's cgroup folder, its hierarchy's mount, the version's files: V2 or V1) for each hierarchy
    that may hold a memory limit: v2 at `fs` or `fs`/unified, v1's memory controller at `fs`/memory."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":
            places = [(fs, V2), (fs / "unified", V2)]
        elif "memory" in controllers.split(","):
            places = [(fs / "memory", V1)]
        else:
            continue
        for mount, files in places:
            if files == V2 and not (mount / "cgroup.controllers").is_file():  # not a v2 hierarchy (v1's tmpfs)
                continue
            folder = mount / path.strip("/")
            # in a cgroup namespace the process's own cgroup is the mount's root
            found.append((folder if folder.is_dir() else mount, mount, files))
    return found


def cgroup_headroom(proc_cgroup: Path = Path("/proc/self/cgroup"), fs: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The least headroom over this process's memory cgroups and their parents, None where no limit is set or
    nothing can be read."""
    found: list[int] = []
    for folder, mount, files in memory_cgroups(proc_cgroup, fs):
        while True:
            if (room := _headroom(folder, files)) is not None:
                found.append(room)
            if folder == mount or mount not in folder.parents:
                break
            folder = folder.parent
    return min(found) if found else None


def available_memory() -> int | None:
    """Bytes this process can still take: the lower of MemAvailable and its cgroups' headroom; None if unknown."""
    known = [b for b in (meminfo_available(), cgroup_headroom()) if b is not None]
    return min(known) if known else None
