"""Shared plumbing for launch scripts: multi-process flags, workdir, metrics files.

Every trainer entry point calls `setup(workdir)` first thing in `main`: it joins a
multi-process run when one is configured (flags below, or JAX_COORDINATOR_ADDRESS /
JAX_NUM_PROCESSES / JAX_PROCESS_ID), creates the workdir and returns the resolved
settings. Only process 0 writes reports (`write_json`).
"""

from __future__ import annotations

import json
import os
import pathlib

from absl import flags, logging

from jax_recsys import distributed

_COORD = flags.DEFINE_string(
    "coordinator_address", "", "host:port of process 0 for multi-process runs "
    "(default: $JAX_COORDINATOR_ADDRESS; empty = single process)."
)
_NPROC = flags.DEFINE_integer(
    "num_processes", 0, "Number of processes (default: $JAX_NUM_PROCESSES or 1)."
)
_PID = flags.DEFINE_integer(
    "process_id", -1, "This process's index (default: $JAX_PROCESS_ID or 0)."
)


def setup(workdir: str | None) -> distributed.DistributedConfig:
    """Joins the multi-process runtime (if configured) and creates `workdir`."""
    cfg = distributed.initialize(
        distributed.DistributedConfig(
            coordinator_address=_COORD.value,
            num_processes=_NPROC.value,
            process_id=_PID.value,
        )
    )
    if workdir:
        pathlib.Path(workdir).mkdir(parents=True, exist_ok=True)
    if cfg.num_processes > 1:
        logging.info("process %d of %d", cfg.process_id, cfg.num_processes)
    return cfg


def write_json(path: str | os.PathLike, obj) -> None:
    """Writes JSON atomically, on process 0 only."""
    if not distributed.is_chief():
        return
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_default) + "\n")
    os.replace(tmp, path)


def _default(x):
    try:
        import numpy as np

        if isinstance(x, np.generic):
            return x.item()
        if isinstance(x, np.ndarray):
            return x.tolist()
    except ImportError:  # pragma: no cover
        pass
    return str(x)
