"""Multi-process settings: flags and environment variables resolved, bad ones refused."""

import pytest

from jax_recsys import distributed


@pytest.fixture
def env(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_settings_come_from_the_flags_then_the_environment(env):
    cfg = distributed.DistributedConfig().resolved()
    assert (cfg.coordinator_address, cfg.num_processes, cfg.process_id) == ("", 1, 0)
    env.setenv("JAX_COORDINATOR_ADDRESS", "h:1")
    env.setenv("JAX_NUM_PROCESSES", "3")
    env.setenv("JAX_PROCESS_ID", "2")
    cfg = distributed.DistributedConfig().resolved()
    assert (cfg.coordinator_address, cfg.num_processes, cfg.process_id) == ("h:1", 3, 2)
    cfg = distributed.DistributedConfig(num_processes=2, process_id=1).resolved()
    assert (cfg.num_processes, cfg.process_id) == (2, 1)


def test_several_processes_need_their_index(env):
    """Without --process_id or JAX_PROCESS_ID every process took index 0: the
    coordinator aborted them all (SIGABRT with a C++ stack trace)."""
    with pytest.raises(ValueError, match=r"2 processes need each process's index "
                                         r"\(--process_id or JAX_PROCESS_ID\)"):
        distributed.DistributedConfig(coordinator_address="h:1", num_processes=2).resolved()
    # -1 is 'unset'; other negatives were read as unset too, so index 0
    with pytest.raises(ValueError, match=r"process_id must be in \[0, 2\), got -2"):
        distributed.DistributedConfig(coordinator_address="h:1", num_processes=2,
                                      process_id=-2).resolved()


def test_environment_that_is_not_a_number_is_named(env):
    env.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES must be an integer, got 'two'"):
        distributed.DistributedConfig().resolved()
