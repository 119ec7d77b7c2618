"""Test setup: 8 simulated CPU devices, set before JAX is imported anywhere."""

import contextlib
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)


@pytest.fixture(scope="session")
def devices():
    devs = jax.devices()
    assert len(devs) == 8, f"expected 8 simulated devices, got {len(devs)}"
    return devs


def pytest_collection_modifyitems(config, items):
    """Runs the longest tests first (end-to-end, then multi-process, then slow).

    With pytest-xdist (`make test`) this keeps one long test from starting last and
    setting the suite's wall time; the order of the other tests is unchanged.
    """

    def rank(item):
        if item.path.name == "test_pipeline.py":
            return 0
        if item.get_closest_marker("multiprocess"):
            return 1
        if item.get_closest_marker("slow"):
            return 2
        return 3

    items.sort(key=rank)  # stable: file order kept within each rank


@pytest.fixture
def dead_address():
    """Makes addresses where nobody listens (``mp_util.dead_address``), held until the
    test ends: a port found free and released could meanwhile be taken by another
    server (another test's, under xdist) and answer."""
    import mp_util

    with contextlib.ExitStack() as stack:
        yield lambda: stack.enter_context(mp_util.dead_address())


@pytest.fixture
def slow_checkpoint_finalize(monkeypatch):
    """Orbax's async save finishes (renames its tmp folder) 1 s late, as on a slow disk,
    so a test can see what a caller gets while a checkpoint is still being written."""
    import time

    import orbax.checkpoint as ocp

    finalize = ocp.CheckpointManager._finalize

    def slow_finalize(self, *args, **kwargs):
        time.sleep(1.0)
        return finalize(self, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "_finalize", slow_finalize)
    return monkeypatch


@pytest.fixture
def read_only_dir(tmp_path, monkeypatch):
    """A new folder that this process cannot write: mode 0o555, and where that does not
    stop this process (root), `os.access` answering for it as for a user."""
    d = tmp_path / "read_only"
    d.mkdir()
    d.chmod(0o555)
    if os.access(d, os.W_OK):
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, *a, **kw: (
            False if os.fspath(p) == os.fspath(d) and mode & os.W_OK
            else real(p, mode, *a, **kw)))
    yield d
    d.chmod(0o755)
