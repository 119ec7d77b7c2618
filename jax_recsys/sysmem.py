"""How much memory this process may use: the machine's RAM, or less where a cgroup
limits it (a container, a Slurm job, a systemd unit; stdlib only).

A process past its cgroup's limit is killed by the OOM killer without a message, so
the checks that refuse work too big for memory (the world generator, the embedding
benchmark) compare with the smaller of the two.
"""

from __future__ import annotations

import os

# Where the cgroup file systems are mounted, each with the file that holds a cgroup's
# memory limit: v2, then v1's memory controller. "max" (v2) or a value near 2**63 (v1's
# "no limit") means no limit.
CGROUP_MOUNTS = (
    ("/sys/fs/cgroup", "memory.max"),
    ("/sys/fs/cgroup/memory", "memory.limit_in_bytes"),
)
# This process's cgroup in each hierarchy ("0::/path" for v2, "N:memory:/path" for v1).
PROC_CGROUP = "/proc/self/cgroup"
_NO_LIMIT = 2**62  # v1 writes 9223372036854771712 (the largest page count) for none


def physical_memory() -> int | None:
    """Bytes of RAM of this machine, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _own_cgroups() -> tuple[str, str]:
    """This process's cgroup paths (v2, v1 memory), "/" where not said."""
    v2 = v1 = "/"
    try:
        with open(PROC_CGROUP) as f:
            text = f.read()
    except OSError:
        return v2, v1
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            v2 = parts[2]
        elif "memory" in parts[1].split(","):
            v1 = parts[2]
    return v2, v1


def _read_limit(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    try:
        value = int(text)  # "max": no limit
    except ValueError:
        return None
    return value if 0 < value < _NO_LIMIT else None


def cgroup_limit() -> tuple[int, str] | None:
    """The memory limit of this process's cgroup and the file that sets it.

    The limit that counts is the smallest on the way from the process's own cgroup up
    to the root of the mount (a limit on a parent, as a Slurm job or a systemd slice
    sets, holds for its children). In a container the mount's root is the container's
    cgroup; a cgroup of /proc/self/cgroup that is not under the mount is not read.

    Returns:
      (bytes, limit file), or None where no file of ``CGROUP_MOUNTS`` sets a limit.
    """
    best = None
    own_v2, own_v1 = _own_cgroups()
    for root, name in CGROUP_MOUNTS:
        own = own_v2 if name == "memory.max" else own_v1
        d = os.path.normpath(os.path.join(root, own.lstrip("/")))
        if not d.startswith(root + os.sep):
            d = root
        dirs = [d]
        while d != root:
            d = os.path.dirname(d)
            dirs.append(d)
        for d in dirs:
            path = os.path.join(d, name)
            limit = _read_limit(path)
            if limit is not None and (best is None or limit < best[0]):
                best = (limit, path)
    return best


def memory_limit() -> tuple[int, str] | None:
    """The most memory this process can use: the smaller of RAM and the cgroup limit.

    Returns:
      (bytes, what sets it, as words for a message: "this machine has 62.5 GiB of RAM"
      or "the cgroup memory limit (/sys/fs/cgroup/memory.max) is 2.0 GiB"), or None
      where neither is known.
    """
    ram, cg = physical_memory(), cgroup_limit()
    if cg is not None and (ram is None or cg[0] < ram):
        return cg[0], f"the cgroup memory limit ({cg[1]}) is {cg[0] / 2**30:.1f} GiB"
    if ram is not None:
        return ram, f"this machine has {ram / 2**30:.1f} GiB of RAM"
    return None
