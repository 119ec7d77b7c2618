"""Test setup: 8 simulated CPU devices and one XLA compilation cache for the run, set
before JAX is imported anywhere."""

import atexit
import contextlib
import logging
import os
import shutil
import signal
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent XLA compilation cache for the whole run, shared by this process, the
# pytest-xdist workers (they inherit this environment) and every child process the
# tests start (`python -m launch.X`). Tests build their jitted functions afresh (a new
# train step per training run), so the same programs compile again and again, in a
# worker and in each child; a repeat now loads from the cache. Small programs too: a
# ranker's eager initialisation compiles ~26 of them, 7.8 s in a new process, 1.7 s from
# the cache. Entries are keyed by the program, the XLA flags and the devices, so a
# cached program is the one that would have been compiled. A run given
# JAX_COMPILATION_CACHE_DIR uses and keeps that folder; this one goes when the run ends.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _XLA_CACHE = tempfile.mkdtemp(prefix="jax_recsys_tests_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    # A size limit makes JAX lock the folder (filelock, a test dependency) around every
    # read and write: without it an entry is written in place, and a worker reading it
    # while another writes it gets a cut-short file ("Error reading persistent
    # compilation cache entry" on stderr, where tests assert one-line errors).
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))
    atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)

# Many tests send Ctrl-C (SIGINT) to entry points they start and check what happens. A
# run started where SIGINT is ignored (a background job of a non-interactive shell:
# `(make test &)`, `nohup ... &`) passes the ignore on to every child process, which
# then never sees those signals (its start-up keeps an ignored SIGINT ignored, by
# design): a dozen such tests failed at their timeouts. Python's own handler here makes
# the children start as from a terminal (exec resets a handled signal to its default).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)


@pytest.fixture(autouse=True)
def _absl_logger_level():
    """Restores the "absl" logger's level after each test: absl sets it (WARNING) when
    its --verbosity flag is reset (``flags.FLAGS.unparse_flags()``), and a later test in
    the same worker then saw no INFO record logged through absl (Orbax's)."""
    logger = logging.getLogger("absl")
    level = logger.level
    yield
    logger.setLevel(level)


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
