"""sysmem: the memory a process may use, RAM or a container's smaller cgroup limit.

The world generator's use of it is tested in test_world.py.
"""

import subprocess
import sys

from jax_recsys import sysmem


def test_cgroup_limit_reads_v2_then_v1_and_knows_no_limit(tmp_path, monkeypatch):
    v2, v1 = tmp_path / "memory.max", tmp_path / "memory.limit_in_bytes"
    monkeypatch.setattr(sysmem, "CGROUP_LIMIT_FILES", (str(v2), str(v1)))
    assert sysmem.cgroup_limit() is None  # no file: not in a cgroup that says
    v1.write_text("9223372036854771712\n")  # v1's "no limit"
    assert sysmem.cgroup_limit() is None
    v1.write_text("1073741824\n")
    assert sysmem.cgroup_limit() == (2**30, str(v1))
    v2.write_text("max\n")  # v2 exists and says no limit: v1's file is not read
    assert sysmem.cgroup_limit() is None
    v2.write_text("536870912\n")
    assert sysmem.cgroup_limit() == (2**29, str(v2))
    v2.write_text("garbage\n")  # unreadable as a number: the next file counts
    assert sysmem.cgroup_limit() == (2**30, str(v1))


def test_memory_limit_is_the_smaller_of_ram_and_the_cgroup_limit(tmp_path, monkeypatch):
    f = tmp_path / "memory.max"
    monkeypatch.setattr(sysmem, "CGROUP_LIMIT_FILES", (str(f),))
    monkeypatch.setattr(sysmem, "physical_memory", lambda: 8 * 2**30)
    assert sysmem.memory_limit() == (8 * 2**30, "this machine has 8.0 GiB of RAM")
    f.write_text(f"{16 * 2**30}\n")  # above RAM: RAM is what counts
    assert sysmem.memory_limit() == (8 * 2**30, "this machine has 8.0 GiB of RAM")
    f.write_text(f"{3 * 2**29}\n")
    assert sysmem.memory_limit() == (
        3 * 2**29, f"the container's memory limit ({f}) is 1.5 GiB")
    monkeypatch.setattr(sysmem, "physical_memory", lambda: None)
    assert sysmem.memory_limit()[0] == 3 * 2**29
    f.unlink()
    assert sysmem.memory_limit() is None


_BENCH_AVAILABLE = """
import sys
from jax_recsys import sysmem
sysmem.CGROUP_LIMIT_FILES = (sys.argv[1],)
from launch import bench_embedding
print(bench_embedding._mem_available_bytes())
"""


def test_bench_embedding_skips_against_the_container_limit_too(tmp_path):
    # A table that fit in MemAvailable (the host's) but not in the container's cgroup
    # limit was run and killed by the OOM killer instead of reported as skipped.
    f = tmp_path / "memory.max"

    def available() -> int:
        out = subprocess.run([sys.executable, "-c", _BENCH_AVAILABLE, str(f)],
                             capture_output=True, text=True, check=True).stdout
        return int(out)

    meminfo = available()  # no limit file: MemAvailable, as before
    assert meminfo > 2**20
    f.write_text(f"{2**20}\n")
    assert available() == 2**20
    f.write_text("max\n")
    assert available() > 2**20
