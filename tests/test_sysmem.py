"""sysmem: the memory a process may use, RAM or a smaller cgroup limit.

The world generator's use of it is tested in test_world.py.
"""

import pathlib
import subprocess
import sys

from jax_recsys import sysmem


def fake_cgroups(monkeypatch, tmp_path: pathlib.Path, proc: str = "0::/\n"):
    """Mount roots (v2, v1 memory) under ``tmp_path`` and /proc/self/cgroup ``proc``."""
    v2, v1 = tmp_path / "cgroup", tmp_path / "cgroup" / "memory"
    v1.mkdir(parents=True)
    (tmp_path / "proc_cgroup").write_text(proc)
    monkeypatch.setattr(sysmem, "CGROUP_MOUNTS", (
        (str(v2), "memory.max"), (str(v1), "memory.limit_in_bytes")))
    monkeypatch.setattr(sysmem, "PROC_CGROUP", str(tmp_path / "proc_cgroup"))
    return v2, v1


def test_cgroup_limit_reads_v2_and_v1_and_knows_no_limit(tmp_path, monkeypatch):
    v2, v1 = fake_cgroups(monkeypatch, tmp_path)
    assert sysmem.cgroup_limit() is None  # no file: no cgroup that says
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "no limit"
    assert sysmem.cgroup_limit() is None
    (v1 / "memory.limit_in_bytes").write_text("1073741824\n")
    assert sysmem.cgroup_limit() == (2**30, str(v1 / "memory.limit_in_bytes"))
    (v2 / "memory.max").write_text("max\n")
    assert sysmem.cgroup_limit() == (2**30, str(v1 / "memory.limit_in_bytes"))
    (v2 / "memory.max").write_text("536870912\n")  # the smaller counts
    assert sysmem.cgroup_limit() == (2**29, str(v2 / "memory.max"))
    (v2 / "memory.max").write_text("garbage\n")
    assert sysmem.cgroup_limit() == (2**30, str(v1 / "memory.limit_in_bytes"))


def test_cgroup_limit_of_the_process_own_cgroup_and_its_parents(tmp_path, monkeypatch):
    # Without a cgroup namespace (a Slurm job, a systemd unit, some containers) the
    # limit is on the process's own cgroup or a parent, not at the mount's root.
    v2, v1 = fake_cgroups(monkeypatch, tmp_path, proc=(
        "12:cpu,cpuacct:/x\n4:memory:/jobs/job_7\n0::/system.slice/slurm/job_7/step_0\n"))
    job = v2 / "system.slice" / "slurm" / "job_7"
    (job / "step_0").mkdir(parents=True)
    (job / "step_0" / "memory.max").write_text("max\n")
    (v2 / "memory.max").write_text("max\n")
    assert sysmem.cgroup_limit() is None
    (job / "memory.max").write_text(f"{3 * 2**30}\n")  # set on the job, a parent
    assert sysmem.cgroup_limit() == (3 * 2**30, str(job / "memory.max"))
    (job / "step_0" / "memory.max").write_text(f"{5 * 2**30}\n")  # the smaller counts
    assert sysmem.cgroup_limit() == (3 * 2**30, str(job / "memory.max"))
    (v1 / "jobs" / "job_7").mkdir(parents=True)
    (v1 / "jobs" / "job_7" / "memory.limit_in_bytes").write_text(f"{2**30}\n")
    assert sysmem.cgroup_limit() == (2**30, str(v1 / "jobs" / "job_7" / "memory.limit_in_bytes"))
    # A path that would leave the mount is not followed out of it.
    (tmp_path / "memory.max").write_text("1\n")
    monkeypatch.setattr(sysmem, "CGROUP_MOUNTS", ((str(v2), "memory.max"),))
    (tmp_path / "proc_cgroup").write_text("0::/..\n")
    assert sysmem.cgroup_limit() is None


def test_memory_limit_is_the_smaller_of_ram_and_the_cgroup_limit(tmp_path, monkeypatch):
    v2, _ = fake_cgroups(monkeypatch, tmp_path)
    f = v2 / "memory.max"
    monkeypatch.setattr(sysmem, "physical_memory", lambda: 8 * 2**30)
    assert sysmem.memory_limit() == (8 * 2**30, "this machine has 8.0 GiB of RAM")
    f.write_text(f"{16 * 2**30}\n")  # above RAM: RAM is what counts
    assert sysmem.memory_limit() == (8 * 2**30, "this machine has 8.0 GiB of RAM")
    f.write_text(f"{3 * 2**29}\n")
    assert sysmem.memory_limit() == (3 * 2**29, f"the cgroup memory limit ({f}) is 1.5 GiB")
    monkeypatch.setattr(sysmem, "physical_memory", lambda: None)
    assert sysmem.memory_limit()[0] == 3 * 2**29
    f.unlink()
    assert sysmem.memory_limit() is None


_BENCH_AVAILABLE = """
import sys
from jax_recsys import sysmem
sysmem.CGROUP_MOUNTS = ((sys.argv[1], "memory.max"),)
sysmem.PROC_CGROUP = sys.argv[2]
from launch import bench_embedding
print(bench_embedding._mem_available_bytes())
"""


def test_bench_embedding_skips_against_the_cgroup_limit_too(tmp_path):
    # A table that fit in MemAvailable (the host's) but not in the container's cgroup
    # limit was run and killed by the OOM killer instead of reported as skipped.
    f = tmp_path / "memory.max"
    (tmp_path / "proc_cgroup").write_text("0::/\n")

    def available() -> int:
        out = subprocess.run(
            [sys.executable, "-c", _BENCH_AVAILABLE, str(tmp_path), str(tmp_path / "proc_cgroup")],
            capture_output=True, text=True, check=True).stdout
        return int(out)

    assert available() > 2**20  # no limit file: MemAvailable, as before
    f.write_text(f"{2**20}\n")
    assert available() == 2**20
    f.write_text("max\n")
    assert available() > 2**20
