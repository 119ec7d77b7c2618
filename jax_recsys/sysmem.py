"""How much memory this process may use: the machine's RAM, or less where a container's
cgroup limits it (stdlib only).

A process past its cgroup's limit is killed by the OOM killer without a message, so
the checks that refuse work too big for memory (the world generator, the embedding
benchmark) compare with the smaller of the two.
"""

from __future__ import annotations

import os

# The memory limit of this process's cgroup as a container sees it: v2, then v1.
# "max" (v2) or a value near 2**63 (v1's "no limit") means no limit.
CGROUP_LIMIT_FILES = (
    "/sys/fs/cgroup/memory.max",
    "/sys/fs/cgroup/memory/memory.limit_in_bytes",
)
_NO_LIMIT = 2**62  # v1 writes 9223372036854771712 (the largest page count) for none


def physical_memory() -> int | None:
    """Bytes of RAM of this machine, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def cgroup_limit() -> tuple[int, str] | None:
    """The memory limit of this process's cgroup and the file that sets it.

    Returns:
      (bytes, path) from the first readable file of ``CGROUP_LIMIT_FILES``, or None
      where none is readable or it sets no limit.
    """
    for path in CGROUP_LIMIT_FILES:
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text == "max":
            return None
        try:
            value = int(text)
        except ValueError:
            continue
        return (value, path) if 0 < value < _NO_LIMIT else None
    return None


def memory_limit() -> tuple[int, str] | None:
    """The most memory this process can use: the smaller of RAM and the cgroup limit.

    Returns:
      (bytes, what sets it, as words for a message: "this machine has 62.5 GiB of RAM"
      or "the container's memory limit (/sys/fs/cgroup/memory.max) is 2.0 GiB"), or
      None where neither is known.
    """
    ram, cg = physical_memory(), cgroup_limit()
    if cg is not None and (ram is None or cg[0] < ram):
        return cg[0], f"the container's memory limit ({cg[1]}) is {cg[0] / 2**30:.1f} GiB"
    if ram is not None:
        return ram, f"this machine has {ram / 2**30:.1f} GiB of RAM"
    return None
