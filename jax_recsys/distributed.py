"""Multi-process (multi-host) set-up: `jax.distributed` initialisation and global meshes.

Every trainer calls `initialize(DistributedConfig(...))` before it builds a mesh. With
one process (the default) this is a no-op, so the same code runs on a laptop, on one
GPU box, and on N hosts. Settings come from the launch flags or from the usual
environment variables:

  JAX_COORDINATOR_ADDRESS   host:port of process 0's coordinator
  JAX_NUM_PROCESSES         number of processes
  JAX_PROCESS_ID            this process's index, 0..N-1
  JAX_LOCAL_DEVICE_IDS      optional comma-separated local device ids

On CPU, cross-process collectives use gloo (`jax_cpu_collectives_implementation`).
Legend: B global batch, B_p per-process batch, S devices.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

_ENV_ADDR = "JAX_COORDINATOR_ADDRESS"
_ENV_NUM = "JAX_NUM_PROCESSES"
_ENV_ID = "JAX_PROCESS_ID"

_initialized = False


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistributedConfig:
    """How this process joins a multi-process run.

    Attributes:
      coordinator_address: "host:port" of the coordinator (process 0). Empty: read
        JAX_COORDINATOR_ADDRESS; still empty: single-process run.
      num_processes: total processes; 0 means read JAX_NUM_PROCESSES (default 1).
      process_id: this process's index; -1 means read JAX_PROCESS_ID (default 0
        for a single process; several processes must each be given theirs).
      initialization_timeout_s: how long to wait for all processes to join.
    """

    coordinator_address: str = ""
    num_processes: int = 0
    process_id: int = -1
    initialization_timeout_s: int = 120

    def resolved(self) -> DistributedConfig:
        """Fills unset fields from the environment."""
        addr = self.coordinator_address or os.environ.get(_ENV_ADDR, "")
        num = self.num_processes or _env_int(_ENV_NUM, 1)
        pid = self.process_id if self.process_id != -1 else _env_int(_ENV_ID, None)
        if num < 1:
            raise ValueError(f"num_processes must be >= 1, got {num}")
        if pid is None:
            # Defaulting to 0 made every process claim index 0: the coordinator aborted
            # them all (SIGABRT, a C++ stack) instead of starting the run.
            if num > 1:
                raise ValueError(
                    f"{num} processes need each process's index (--process_id or {_ENV_ID})"
                )
            pid = 0
        if not 0 <= pid < num:
            raise ValueError(f"process_id must be in [0, {num}), got {pid}")
        if num > 1 and not addr:
            raise ValueError(
                f"{num} processes need a coordinator address (--coordinator_address or {_ENV_ADDR})"
            )
        return dataclasses.replace(
            self, coordinator_address=addr, num_processes=num, process_id=pid
        )


def _env_int(name: str, default: int | None) -> int | None:
    """The integer in environment variable `name`, `default` if unset or empty."""
    raw = os.environ.get(name, "")
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None


def initialize(config: DistributedConfig | None = None) -> DistributedConfig:
    """Joins the multi-process runtime when more than one process is configured.

    Must run before any JAX computation. Safe to call twice.

    Args:
      config: settings; None reads everything from the environment.

    Returns:
      The resolved settings.
    """
    global _initialized
    cfg = (config or DistributedConfig()).resolved()
    if cfg.num_processes > 1 and not _initialized:
        logging.info(
            "jax.distributed.initialize(%s, num_processes=%d, process_id=%d)",
            cfg.coordinator_address,
            cfg.num_processes,
            cfg.process_id,
        )
        jax.distributed.initialize(
            coordinator_address=cfg.coordinator_address,
            num_processes=cfg.num_processes,
            process_id=cfg.process_id,
            initialization_timeout=cfg.initialization_timeout_s,
        )
        _initialized = True
    return cfg


def is_chief() -> bool:
    """True on the process that writes reports and metrics files (process 0)."""
    return jax.process_index() == 0


def global_mesh(axis: str = "data", devices=None) -> Mesh:
    """A 1-D mesh over every device of every process (Auto axis types).

    Args:
      axis: the mesh axis name shared by batch and table-row sharding.
      devices: optional explicit device list (tests use sub-meshes).

    Returns:
      The mesh.
    """
    devs = list(devices) if devices is not None else jax.devices()
    return Mesh(np.asarray(devs), (axis,), axis_types=(AxisType.Auto,))


def host_to_global(tree, mesh: Mesh, axis: str = "data"):
    """Assembles per-process batch slices into global arrays sharded on `axis`.

    Each process passes only its own rows (B_p = B / num_processes); leaves are split
    along their first dimension. With one process this is a sharded device_put.

    Args:
      tree: pytree of NumPy arrays, each [B_p, ...].
      mesh: the global mesh.
      axis: mesh axis the batch dimension is sharded over.

    Returns:
      The same pytree of global jax.Arrays, each [B, ...].
    """

    def put(x):
        x = np.asarray(x)
        spec = P(axis, *([None] * (x.ndim - 1))) if x.ndim else P()
        sharding = NamedSharding(mesh, spec)
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree_util.tree_map(put, tree)


def allgather_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """Returns metrics as Python floats; identical on every process for replicated values."""
    return {k: float(np.asarray(jax.device_get(v))) for k, v in metrics.items()}
