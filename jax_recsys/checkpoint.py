"""Checkpoints: Orbax training checkpoints (resharding on restore) and facet checkpoints.

Training checkpoints (`Checkpointer`) wrap `orbax.checkpoint.CheckpointManager`.
Each step folder holds up to three items:

  state  any pytree (embedding tables, sparse optimizer slots, dense params,
         optax state, step), written with `ocp.args.StandardSave`;
  meta   a JSON object (data-iterator position, config, RNG seeds, ...);
  vocab  vocabularies as plain arrays (int64 ids, or UTF-8 bytes + offsets for
         string ids; an empty int vocabulary as one pad id + its count): no pickle
         anywhere.

Restoring onto another mesh (8 -> 4 -> 1 devices, row-sharded -> replicated)
works by passing a target tree of `jax.ShapeDtypeStruct(shape, dtype,
sharding=NamedSharding(new_mesh, spec))`; `abstract_like` builds one. Orbax
reads each device's slice straight from the stored chunks.

A trainer resumes exactly by saving its `TrainState` as `state` and its
`BatchIterator.state()` (plus anything else that decides the next batch) as
`meta`, then on start-up: `step = ckpt.latest_step()`; if not None,
`state, meta = ckpt.restore(step, target=abstract_like(fresh_state, shardings))`
and `iterator.restore(meta["data"])`. Save typed PRNG keys as
`jax.random.key_data(key)` (plain uint32 arrays).

Facet checkpoints (`save_facet` / `load_facet`) hand pretrained tables to the
ranker: a folder with `facet.json`, `tables/<entity>.npy` (float32 [R, D]) and
`vocab/<entity>.npy` (raw ids in row order; `_<i>.npy` for an entity type that is
not a plain file name, e.g. `/people/person`: facet.json maps each type to its
files), written atomically and loaded with `np.load(mmap_mode="r", allow_pickle=False)`.

Dimension legend: R table rows, D embedding dim.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import inspect
import json
import logging
import os
import pathlib
import re
import shutil
import signal
import sys
import threading
import time
import uuid
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jax_recsys import fsutil

FACET_FORMAT_VERSION = 1
# tensorstore's error text (Orbax re-raises it as ValueError): "RESOURCE_EXHAUSTED: ...".
_TS_STATUS = re.compile(r"(RESOURCE_EXHAUSTED|PERMISSION_DENIED|DATA_LOSS|UNAVAILABLE|"
                        r"INTERNAL|UNKNOWN|ABORTED|DEADLINE_EXCEEDED): ")
# ... and its errors of a stored file that is missing, cut short or garbled.
_TS_READ_STATUS = re.compile(r"(FAILED_PRECONDITION|NOT_FOUND|DATA_LOSS|OUT_OF_RANGE|"
                             r"INVALID_ARGUMENT): ")
_FACET_JSON = "facet.json"


def _damaged(e: BaseException) -> bool:
    """Whether an error of Orbax's restore says a stored file is missing or unreadable."""
    return (isinstance(e, FileNotFoundError | json.JSONDecodeError)
            or (isinstance(e, KeyError) and "was not found in the checkpoint" in str(e))
            or bool(_TS_READ_STATUS.match(str(e))))


# ----------------------------------------------------------------------------- vocab codec


def _vocab_array(v) -> np.ndarray:
    """Raw ids as an int64 or unicode array (accepts Vocab-like objects)."""
    for attr in ("raw_ids", "ids"):
        if not isinstance(v, np.ndarray) and hasattr(v, attr):
            v = getattr(v, attr)
            break
    arr = np.asarray(v)
    if arr.dtype.kind == "O":
        if not all(isinstance(x, str) for x in arr.reshape(-1)):
            raise ValueError("vocabulary of Python objects must hold only str ids")
        arr = arr.astype(np.str_)
    if arr.ndim != 1:
        raise ValueError(f"vocabulary must be 1-D raw ids in row order, got shape {arr.shape}")
    if arr.dtype.kind in "iu":
        if arr.dtype.kind == "u" and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
            raise ValueError(
                f"vocabulary id {int(arr.max())} does not fit int64; map 64-bit unsigned "
                "ids into the signed range (or to strings) first"
            )
        return arr.astype(np.int64, copy=False)
    if arr.dtype.kind == "U":
        return arr
    raise ValueError(f"vocabulary ids must be integers or strings, got dtype {arr.dtype}")


def _encode_vocab(v) -> dict[str, np.ndarray]:
    arr = _vocab_array(v)
    if arr.dtype.kind != "U":
        if arr.size == 0:  # Orbax refuses zero-size arrays: one pad id and the count
            return {"ids_padded": np.zeros(1, np.int64), "count": np.zeros(1, np.int64)}
        return {"ids": arr}
    encoded = [s.encode("utf-8") for s in arr.tolist()]
    lengths = np.fromiter((len(b) for b in encoded), np.int64, len(encoded))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    # One trailing pad byte keeps the array non-empty (all-empty strings).
    data = np.frombuffer(b"".join(encoded) + b"\0", np.uint8).copy()
    return {"utf8": data, "offsets": offsets}


def _decode_vocab(enc: Mapping[str, Any]) -> np.ndarray:
    if "ids" in enc:
        return np.asarray(enc["ids"], np.int64)
    if "ids_padded" in enc:
        count = int(np.asarray(enc["count"]).reshape(-1)[0])
        return np.asarray(enc["ids_padded"], np.int64)[:count]
    data = np.asarray(enc["utf8"], np.uint8).tobytes()
    off = np.asarray(enc["offsets"], np.int64)
    return np.array([data[a:b].decode("utf-8") for a, b in zip(off[:-1], off[1:], strict=True)], np.str_)


# ----------------------------------------------------------------------------- Orbax


def abstract_like(tree, shardings=None):
    """Abstract restore target for `tree`, optionally placed on new shardings.

    Args:
      tree: pytree of jax.Array / np.ndarray / jax.ShapeDtypeStruct / scalars.
      shardings: None (jax.Array leaves keep their own sharding), one
        `jax.sharding.Sharding` for every array leaf (a NamedSharding whose
        spec does not fit a leaf, e.g. a scalar step or a dim the mesh does not
        divide, is replaced by the replicated P() on the same mesh for that
        leaf), or a pytree with the structure of `tree` holding a Sharding (or
        None) per leaf.

    Returns:
      Same structure; jax.Array / ShapeDtypeStruct leaves become
      `jax.ShapeDtypeStruct(shape, dtype, sharding=...)`. NumPy leaves without
      a sharding become ShapeDtypeStruct without sharding (restored as NumPy);
      Python scalars stay as they are (restored as scalars).
    """
    leaves, treedef = jax.tree.flatten(tree)
    if shardings is None or isinstance(shardings, jax.sharding.Sharding):
        per_leaf = [_fit(shardings, getattr(x, "shape", None)) for x in leaves]
    else:
        per_leaf = jax.tree.leaves(
            shardings, is_leaf=lambda x: x is None or isinstance(x, jax.sharding.Sharding)
        )
        if len(per_leaf) != len(leaves):
            raise ValueError(
                f"shardings has {len(per_leaf)} leaves but the tree has {len(leaves)}"
            )

    def one(x, s):
        if isinstance(x, (jax.Array, jax.ShapeDtypeStruct)):
            s = s if s is not None else getattr(x, "sharding", None)
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
        if isinstance(x, np.ndarray):
            if s is None:
                return jax.ShapeDtypeStruct(x.shape, x.dtype)
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
        return x

    return jax.tree.unflatten(treedef, [one(x, s) for x, s in zip(leaves, per_leaf, strict=True)])


def _fit(sharding, shape):
    """`sharding` if it can place an array of `shape`, else replicated on its mesh."""
    if not isinstance(sharding, jax.sharding.NamedSharding) or shape is None:
        return sharding
    try:
        sharding.check_compatible_aval(tuple(shape))
        for dim, axes in zip(shape, sharding.spec, strict=False):
            axes = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
            size = int(np.prod([sharding.mesh.shape[a] for a in axes]))
            if dim % size:
                raise ValueError(f"{dim} not divisible by {size}")
    except ValueError:
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    return sharding


@contextlib.contextmanager
def _ctrl_c_after():
    """Holds a Ctrl-C (SIGINT) back until the block is done, then raises it.

    Around the blocking part of an Orbax save: interrupted there, the save never
    started the thread that finishes it, and its step was lost although the launchers
    wait for a checkpoint being written before they exit. Only where SIGINT has Python's
    default handler, in the main thread.
    """
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    held = []
    signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if held:
        raise KeyboardInterrupt


def _quiet() -> bool:
    """Whether Orbax's noise is to be cut (JAX_RECSYS_TRACEBACK, as for the launchers'
    own errors, not set)."""
    return os.environ.get("JAX_RECSYS_TRACEBACK", "").strip() in ("", "0")


class _NoOrbaxTracebacks(logging.Filter):
    """Drops the tracebacks of Orbax's error logs, keeping their one-line message, and
    the logs of a Ctrl-C.

    A save that cannot write (e.g. a full disk) fails in several Orbax writer threads,
    each logging its traceback; `Checkpointer` raises the failure as one OSError line,
    and the launchers print that. A Ctrl-C while Orbax waits for a save being written
    (the next save, `wait`, `close`) was logged as an error, "Save Finalize thread
    (save_finalize) failed", although that save goes on (the launchers wait for it):
    dropped, the launchers' "interrupted" line says it. JAX_RECSYS_TRACEBACK=1 (as for
    the launchers' own errors) keeps them.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and f"{os.sep}orbax{os.sep}" in record.pathname and _quiet():
            if isinstance(record.exc_info[1], KeyboardInterrupt):
                return False
            record.exc_info = record.exc_text = None
        return True


def _quiet_orbax_errors() -> None:
    """Cuts what a failed save prints besides its one line (`_NoOrbaxTracebacks`,
    `_NoClosedLoopCallbacks`); once per process."""
    absl_logger = logging.getLogger("absl")  # Orbax logs with absl.logging
    if not any(isinstance(f, _NoOrbaxTracebacks) for f in absl_logger.filters):
        absl_logger.addFilter(_NoOrbaxTracebacks())
    if not isinstance(sys.unraisablehook, _NoClosedLoopCallbacks):
        sys.unraisablehook = _NoClosedLoopCallbacks(sys.unraisablehook)


class _NoClosedLoopCallbacks:
    """A `sys.unraisablehook` that drops tensorstore's calls into an event loop Orbax closed.

    A save that cannot write fails in its writer thread as soon as one tensorstore write
    fails: Orbax's `asyncio.gather` of the writes raises and the thread's event loop is
    closed while the other writes are still running. As each of them ends, tensorstore
    calls `loop.call_soon_threadsafe` on that closed loop and prints the RuntimeError
    ('Event loop is closed', a traceback each) as unraisable, around and after the one
    line `Checkpointer` raises. Nothing awaits those writes any more, so only that print
    is dropped; any other unraisable exception goes to the previous hook, and
    JAX_RECSYS_TRACEBACK=1 keeps them all.
    """

    def __init__(self, previous):
        self.previous = previous

    def __call__(self, unraisable) -> None:
        tb = unraisable.exc_traceback
        code = tb.tb_frame.f_code if tb is not None else None
        if (isinstance(unraisable.exc_value, RuntimeError)
                and str(unraisable.exc_value) == "Event loop is closed"
                and code is not None and code.co_name == "call_soon_threadsafe"
                and f"{os.sep}asyncio{os.sep}" in code.co_filename and _quiet()):
            return
        self.previous(unraisable)


def _end_stranded_threads() -> None:
    """Ends the threads of the newest save that wait for a step of it that failed.

    Orbax runs each part of an async save in a thread that first waits for the signals
    of the parts it needs (the step folder created, ...). A part that fails sends none,
    so when creating the step folder failed (no space or inode left, a folder that
    became read-only) the writers waited for it for 300 s (Orbax's coordination
    timeout), and the process, its one-line error printed, only exited then. Each
    such thread is cancelled (it then returns without running its part, or a part
    running stops) and given the signals it waits for. Best effort: the threads are
    Orbax internals (0.12), and on another version nothing changes.
    """
    try:
        from orbax.checkpoint._src.futures import future, synchronization

        op = synchronization.OperationIdGenerator.get_current_operation_id()
        stranded = [t for t in threading.enumerate()
                    if isinstance(t, future._SignalingThread) and t.is_alive()
                    and getattr(t, "_operation_id", None) == op]
    except (ImportError, AttributeError):  # pragma: no cover (another Orbax)
        return
    for t in stranded:
        with contextlib.suppress(RuntimeError):  # its event loop is closed already
            t.cancel()
        with contextlib.suppress(Exception):  # noqa: BLE001 (best effort, see above)
            future.set_signals(t._receive_signals, operation_id=op)
    deadline = time.monotonic() + 5.0
    for t in stranded:  # (their own join raises their exception)
        threading.Thread.join(t, max(0.0, deadline - time.monotonic()))
        if not t.is_alive():  # its part never ran: close it ("was never awaited" else)
            _close_unstarted(getattr(t, "_target", None))


def _close_unstarted(obj, depth: int = 0) -> None:
    """Closes the coroutines that `obj` (a function, through its closure, or a
    coroutine, through its arguments) holds and that never started."""
    if depth > 6:
        return
    if inspect.iscoroutine(obj):
        if inspect.getcoroutinestate(obj) == inspect.CORO_CREATED:
            for value in obj.cr_frame.f_locals.values():
                _close_unstarted(value, depth + 1)
            obj.close()
    elif isinstance(obj, list | tuple):
        for value in obj:
            _close_unstarted(value, depth + 1)
    elif inspect.isfunction(obj):
        for cell in obj.__closure__ or ():
            with contextlib.suppress(ValueError):  # an empty cell
                _close_unstarted(cell.cell_contents, depth + 1)


class Checkpointer:
    """Orbax `CheckpointManager` with `state` (pytree), `meta` (JSON) and `vocab` items.

    Args:
      directory: root folder; one sub-folder per saved step.
      keep: number of most recent checkpoints kept, >= 1 (None keeps all).
      save_interval_steps: `save` is a no-op unless step % interval == 0
        (or force=True, or no checkpoint exists yet); >= 1.
      async_save: write in a background thread; `save` returns once device
        arrays are copied to host, so the caller may donate them afterwards.
      trainer: the trainer that owns these checkpoints (one of `TRAINERS`), or None.
        Recorded in every saved meta as meta[TRAINER_KEY]; `restore` and `restore_meta`
        refuse a checkpoint of another trainer (`check_trainer`: a workdir shared by two
        launchers), naming both.

    Raises:
      PermissionError: `directory` is not writable (a read-only file system, no
        write permission): checked here, before any training, because an Orbax save
        that cannot write fails in its background threads (tracebacks, then a
        wait of minutes for threads that never get their signal).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        keep: int | None = 3,
        save_interval_steps: int = 1,
        async_save: bool = True,
        trainer: str | None = None,
    ):
        if trainer is not None and trainer not in TRAINERS:
            raise ValueError(f"Checkpointer: trainer must be one of {TRAINERS} or None, "
                             f"got {trainer!r}")
        self.trainer = trainer
        # Orbax takes keep=0 as "keep none": every save is deleted once written.
        for name, value, none_ok in (("keep", keep, True),
                                     ("save_interval_steps", save_interval_steps, False)):
            if not ((none_ok and value is None) or (
                    isinstance(value, int | np.integer) and not isinstance(value, bool)
                    and value >= 1)):
                raise ValueError(f"Checkpointer: {name} must be an int >= 1"
                                 f"{' or None' if none_ok else ''}, got {value!r}")
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=save_interval_steps,
            enable_async_checkpointing=async_save,
            create=True,
            # A run killed mid-save leaves a *.orbax-checkpoint-tmp-* folder; the
            # restarted run removes it and resumes from the last committed step.
            cleanup_tmp_directories=True,
        )
        # Before the manager, whose start-up starts background work. (A folder it has
        # to create fails there, with the OSError of its mkdir.)
        if self.directory.is_dir() and not os.access(self.directory, os.W_OK | os.X_OK):
            raise PermissionError(
                f"{self.directory}: cannot write checkpoints there (a read-only file system "
                "or no write permission): make it writable or use another workdir")
        _quiet_orbax_errors()
        self._mgr = ocp.CheckpointManager(self.directory, options=options)
        self._pending_step: int | None = None  # the newest save started
        self._reported = False  # a failed save was raised already

    def save(
        self,
        step: int,
        state,
        meta: dict | None = None,
        *,
        vocabs: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Saves `state` (pytree), `meta` (JSON dict) and `vocabs` at `step`.

        Args:
          step: the training step (checkpoint id).
          state: any pytree of arrays / scalars.
          meta: JSON-serialisable dict (e.g. {"data": iterator.state(), "config": ...}).
          vocabs: name -> raw ids in row order (int or str arrays), optional.
          force: save even if `step` is off the save interval.

        Returns:
          True if a checkpoint was started.

        Raises:
          OSError: this save, or the previous one still being written in the
            background, could not write (no space left, ...); `wait` and `close` raise
            it too, once.
        """
        meta = {} if meta is None else meta
        if self.trainer is not None:
            meta = {**meta, TRAINER_KEY: self.trainer}
        try:
            json.dumps(meta)
        except TypeError as e:
            raise ValueError(f"checkpoint meta must be JSON-serialisable: {e}") from None
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if vocabs:
            enc = {name: _encode_vocab(v) for name, v in vocabs.items()}
            items["vocab"] = ocp.args.StandardSave(enc)
        with self._writing():  # a failure of the previous (async) save surfaces here
            self._mgr.wait_until_finished()
        self._pending_step = int(step)
        with self._writing(), _ctrl_c_after():
            started = self._mgr.save(int(step), args=ocp.args.Composite(**items), force=force)
        return started

    def latest_step(self) -> int | None:
        """The newest finished checkpoint's step, or None."""
        return self._mgr.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of all kept checkpoints, ascending."""
        return sorted(self._mgr.all_steps())

    def _resolve(self, step: int | None) -> int:
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"{self.directory}: no checkpoint to restore")
        elif int(step) not in self._mgr.all_steps():
            raise FileNotFoundError(
                f"{self.directory}: no checkpoint at step {step}; have {self.all_steps()}"
            )
        return int(step)

    def restore(self, step: int | None = None, *, target=None) -> tuple[Any, dict]:
        """Restores `(state, meta)`.

        Args:
          step: which checkpoint; None = latest.
          target: abstract (or concrete) tree with the saved structure; its
            `jax.ShapeDtypeStruct.sharding`s place the restored arrays (another
            mesh, other PartitionSpecs). None restores the saved structure as
            nested dicts with the saved shardings (same devices only).

        Returns:
          (state, meta).

        Raises:
          ValueError: a restored leaf's shape or dtype differs from the target's
            (Orbax restores NumPy and unsharded targets in the saved shape, so a
            run whose model changed would otherwise silently resume the old one),
            or the checkpoint is another trainer's (`check_trainer`).
        """
        step = self._resolve(step)
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
        )
        with self._reading(step):
            out = self._mgr.restore(step, args=args)
        meta = self._of_trainer(step, dict(out["meta"] or {}))
        if target is not None:
            self._check_like_target(step, out["state"], target)
        return out["state"], meta

    def _of_trainer(self, step: int, meta: dict) -> dict:
        """`meta`, once `check_trainer` passed it (when this Checkpointer has a trainer)."""
        if self.trainer is not None:
            check_trainer(meta, self.trainer, f"{self.directory}/{step}")
        return meta

    def _check_like_target(self, step: int, state, target) -> None:
        """Raises ValueError naming the first leaf whose shape / dtype is not the target's."""
        where = f"{self.directory}/{step}"
        want = jax.tree.leaves_with_path(target)
        got = jax.tree.leaves_with_path(state)
        if len(want) != len(got):
            raise ValueError(
                f"checkpoint {where}: restored {len(got)} leaves but the target has "
                f"{len(want)}; the model or optimizer changed since it was saved: "
                "resume from a fresh workdir / checkpoint dir"
            )
        for (path, w), (_, g) in zip(want, got, strict=True):
            name = jax.tree_util.keystr(path)
            saved, expected = tuple(np.shape(g)), tuple(np.shape(w))
            if saved != expected:
                raise ValueError(
                    f"checkpoint {where}: leaf {name} has saved shape {saved} but this run "
                    f"expects {expected}; the model changed since the checkpoint was written: "
                    "train in a fresh workdir / checkpoint dir (or restore the old config)"
                )
            if (hasattr(w, "dtype") and hasattr(g, "dtype")
                    and np.dtype(w.dtype) != np.dtype(g.dtype)):
                raise ValueError(
                    f"checkpoint {where}: leaf {name} restored as {np.dtype(g.dtype)} but "
                    f"this run expects {np.dtype(w.dtype)}: train in a fresh workdir / "
                    "checkpoint dir"
                )

    def restore_meta(self, step: int | None = None) -> dict:
        """The JSON meta saved with `step` (None = latest), without reading any array.

        Trainers read it first: it says how the saved state was laid out, which
        decides the restore target. Raises ValueError for another trainer's checkpoint
        (`check_trainer`).
        """
        step = self._resolve(step)
        with self._reading(step):
            out = self._mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return self._of_trainer(step, dict(out["meta"] or {}))

    def restore_vocabs(self, step: int | None = None) -> dict[str, np.ndarray]:
        """Vocabularies saved with `step` (None = latest); {} if none were saved."""
        step = self._resolve(step)
        if not (self.directory / str(step) / "vocab").exists():
            return {}
        with self._reading(step):
            out = self._mgr.restore(step,
                                    args=ocp.args.Composite(vocab=ocp.args.StandardRestore()))
        return {name: _decode_vocab(enc) for name, enc in out["vocab"].items()}

    def wait(self) -> None:
        """Blocks until pending async saves are on disk."""
        with self._writing():
            self._mgr.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        reported = self._reported  # a failed save raised already: not again here
        try:
            with self._writing():
                try:
                    self._mgr.wait_until_finished()
                finally:
                    self._mgr.close()  # (it waits too, and raises the same failure)
        except OSError:
            if not reported:
                raise

    @contextlib.contextmanager
    def _reading(self, step: int):
        """Turns a step folder that cannot be read (a file missing or cut short: a copy or
        sync of the workdir that did not finish, a damaged disk; Orbax's own saves are
        atomic) into one ValueError naming it and the older step a rerun can resume from,
        instead of Orbax's traceback."""
        try:
            yield
        except Exception as e:  # noqa: BLE001 (only a damaged-checkpoint cause is turned)
            chain, x = [], e
            while x is not None and len(chain) < 16:
                chain.append(x)
                x = x.__cause__ or x.__context__
            hit = next((x for x in reversed(chain) if _damaged(x)), None)
            if hit is None:
                raise
            reason = str(hit.args[0] if isinstance(hit, KeyError) and hit.args else hit)
            reason = (reason.strip().splitlines() or [type(hit).__name__])[0]
            reason = reason if len(reason) <= 240 else reason[:237] + "..."
            older = [s for s in self.all_steps() if s < step]
            then = (f"delete that folder to resume from step {older[-1]}" if older
                    else "delete that folder (or use a fresh workdir) to start over")
            raise ValueError(f"{self.directory}/{step}: this checkpoint cannot be read, it is "
                             f"damaged or incomplete ({reason}); {then}") from e

    @contextlib.contextmanager
    def _writing(self):
        """Turns a save that failed to write (no space left, an I/O error; Orbax raises
        them from its writer threads, tensorstore's as a ValueError with a long status
        message) into one OSError naming the folder, the step and the step to resume.

        Any failure also ends the save's threads that still wait for it
        (`_end_stranded_threads`)."""
        try:
            yield
        except Exception as e:  # (not Ctrl-C: that save goes on, see __exit__)
            _end_stranded_threads()
            if not isinstance(e, OSError | ValueError):
                raise
            text = str(e)
            if not isinstance(e, OSError) and not _TS_STATUS.match(text):
                raise  # not a write error (e.g. a bad tree): as Orbax said it
            step, self._reported = self._pending_step, True
            full = getattr(e, "errno", None) == errno.ENOSPC or "os_error_code='28'" in text
            if full:
                try:
                    free = f"{shutil.disk_usage(self.directory).free / 2**20:.1f} MiB free"
                except OSError:
                    free = "free space unknown"
                why = f"no space left on the device ({free})"
            else:
                why = text if len(text) <= 300 else text[:297] + "..."
            latest = self._mgr.latest_step()
            raise OSError(
                f"{self.directory}: writing the checkpoint"
                + (f" of step {step}" if step is not None else "") + f" failed: {why}; "
                + ("free some space (or keep fewer checkpoints), then " if full else "")
                + ("rerun to start over" if latest is None
                   else f"rerun to resume from step {latest}")) from e

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        """Closes, waiting for a pending save, also when the block raised: the caller
        never gets the block's exception while a step folder is half written (a rerun
        in the same process would remove it as a killed save's leftover).

        A failure of that save is logged, not raised over the block's own exception.
        After a Ctrl-C it does not wait: `launch.common.run` waits for the save's
        threads, at most 30 s, and a second Ctrl-C quits at once. Elsewhere (a
        notebook, a library caller catching KeyboardInterrupt) call ``close()`` on
        this Checkpointer before opening its directory again in the same process: a
        new one removes the unfinished step folder as a killed save's leftover, and
        that save is lost.
        """
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            return
        if exc_type is None:
            self.close()
            return
        try:
            self.close()
        except Exception:  # noqa: BLE001 (the block's exception is the one to report)
            logging.warning("%s: closing the checkpoints after an error failed too",
                            self.directory, exc_info=True)


def check_settings(*, checkpoint_every: int, keep_checkpoints: int) -> None:
    """Checks a trainer's checkpoint settings, in the same words for every trainer.

    Args:
      checkpoint_every: steps between training checkpoints (0: none).
      keep_checkpoints: how many of the newest checkpoints are kept.

    Raises:
      ValueError: naming the setting that is out of range.
    """
    if checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be >= 0 (0: no checkpoints), got "
                         f"{checkpoint_every}")
    if keep_checkpoints < 1:  # (Orbax takes 0 as "keep none")
        raise ValueError(f"keep_checkpoints must be >= 1, got {keep_checkpoints}")


# The meta key naming the trainer that saved a checkpoint (`Checkpointer(trainer=...)`):
# the three launchers all use WORKDIR/checkpoints.
TRAINER_KEY = "trainer"
TRAINERS = ("pretrain_kg", "pretrain_contrastive", "train_ranker")
# Meta keys only one trainer saves with its checkpoints: who wrote a checkpoint saved
# before TRAINER_KEY was recorded.
_TRAINER_KEYS = (("train_ranker", "loss_curve"), ("pretrain_contrastive", "num_pairs"),
                 ("pretrain_kg", "num_train_triples"))


def trainer_of(meta: Mapping[str, Any]) -> str | None:
    """The launcher whose trainer saved a checkpoint with this `meta`: its TRAINER_KEY, or
    for a checkpoint saved without one, the trainer only whose meta has one of these keys;
    None when the meta does not say."""
    if isinstance(meta.get(TRAINER_KEY), str):
        return meta[TRAINER_KEY]
    for name, key in _TRAINER_KEYS:
        if key in meta:
            return name
    return None


def check_trainer(meta: Mapping[str, Any], trainer: str, where) -> None:
    """Raises ValueError when the checkpoint `where` was written by another trainer than
    `trainer` (a workdir shared by two launchers), before its settings are compared.
    A checkpoint whose meta does not say (`trainer_of` is None) passes."""
    saved_by = trainer_of(meta)
    if saved_by is not None and saved_by != trainer:
        raise ValueError(f"{where}: a {saved_by} checkpoint, not a {trainer} one (the "
                         f"workdir holds another trainer's checkpoints): give {trainer} "
                         "its own workdir")


# ----------------------------------------------------------------------------- facets


@dataclasses.dataclass(frozen=True)
class Facet:
    """A pretrained facet: entity tables and their vocabularies.

    Attributes:
      facet: facet name, e.g. "cl" (contrastive) or "kg" (knowledge graph).
      tables: entity type -> float32 [R, D] (read-only memmap).
      vocabs: entity type -> [R] raw ids in row order (int64 or str).
      metrics: the pretraining job's metrics (JSON).
    """

    facet: str
    tables: dict[str, np.ndarray]
    vocabs: dict[str, np.ndarray]
    metrics: dict


def _to_host(x) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def _fsync_path(path: pathlib.Path, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # pragma: no cover
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def save_facet(
    path: str | os.PathLike,
    *,
    facet: str,
    tables: Mapping[str, Any],
    vocabs: Mapping[str, Any],
    metrics: dict | None = None,
) -> pathlib.Path:
    """Writes a facet checkpoint atomically (replacing an existing one at `path`).

    In a multi-process run every process must call this (sharded tables are
    gathered collectively); only process 0 writes.

    Args:
      path: the facet folder.
      facet: facet name ("cl", "kg", ...).
      tables: entity type -> [R, D] table (np.ndarray or jax.Array).
      vocabs: entity type -> raw ids in row order (int or str array, or a
        Vocab-like object with `.raw_ids` / `.ids`); one per table.
      metrics: JSON-serialisable pretraining metrics.

    Returns:
      The facet folder.
    """
    path = pathlib.Path(path).absolute()
    if set(tables) != set(vocabs):
        raise ValueError(
            f"facet {facet!r}: tables {sorted(tables)} and vocabs {sorted(vocabs)} differ"
        )
    host_tables = {name: _to_host(t) for name, t in tables.items()}
    if jax.process_index() != 0:
        return path
    meta = {"format_version": FACET_FORMAT_VERSION, "facet": facet, "tables": {}, "metrics": metrics or {}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        (tmp / "tables").mkdir(parents=True)
        (tmp / "vocab").mkdir()
        stems = fsutil.file_stems(sorted(host_tables))
        for name in sorted(host_tables):
            t = host_tables[name]
            if t.ndim != 2:
                raise ValueError(f"facet {facet!r} table {name!r}: expected [R, D], got {t.shape}")
            v = _vocab_array(vocabs[name])
            if v.shape[0] != t.shape[0]:
                raise ValueError(
                    f"facet {facet!r} table {name!r}: {t.shape[0]} rows but vocab has {v.shape[0]} ids"
                )
            stem = stems[name]
            np.save(tmp / "tables" / f"{stem}.npy", t.astype(np.float32, copy=False), allow_pickle=False)
            np.save(tmp / "vocab" / f"{stem}.npy", v, allow_pickle=False)
            meta["tables"][name] = {
                "rows": int(t.shape[0]),
                "dim": int(t.shape[1]),
                "table": f"tables/{stem}.npy",
                "vocab": f"vocab/{stem}.npy",
            }
        (tmp / _FACET_JSON).write_text(json.dumps(meta, indent=2, sort_keys=True, default=_json_default) + "\n")
        for p in tmp.rglob("*"):
            _fsync_path(p, directory=p.is_dir())
        _fsync_path(tmp, directory=True)
        fsutil.swap_dir(tmp, path)
        _fsync_path(path.parent, directory=True)
    except OSError as e:  # numpy's "24000 requested and 4064 written" named no file
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(_facet_write_error(path, facet, host_tables, e)) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _facet_write_error(path: pathlib.Path, facet: str, tables: Mapping[str, np.ndarray],
                       e: OSError) -> str:
    """The message for a facet that could not be written: names the folder, and says
    when its disk has less room than the facet needs (tables + int64 ids, about)."""
    msg = f"{path}: could not write the {facet!r} facet ({e})"
    need = sum(t.shape[0] * (t.shape[1] * 4 + 8) for t in tables.values() if t.ndim == 2)
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        return msg
    if free < need:
        msg += (f": the disk is full ({free / 2**20:.1f} MiB free, the facet needs about "
                f"{need / 2**20:.1f} MiB); free some space or write it elsewhere")
    return msg


def _json_default(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def load_facet(path: str | os.PathLike, *, expected: str | None = None) -> Facet:
    """Loads a facet checkpoint written by `save_facet` (tables mmap'd read-only).

    Args:
      path: the facet folder.
      expected: the facet name it must hold ("cl", "kg"); None accepts any.

    Returns:
      Facet(facet, tables, vocabs, metrics).

    Raises:
      FileNotFoundError / ValueError: naming the missing or inconsistent file.
    """
    path = pathlib.Path(path)
    mpath = path / _FACET_JSON
    try:
        meta = json.loads(mpath.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{mpath}: missing; {path} is not a facet checkpoint") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{mpath}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{mpath}: not a facet description (a JSON object)")
    if meta.get("format_version") != FACET_FORMAT_VERSION:
        raise ValueError(f"{mpath}: unsupported format_version {meta.get('format_version')}")
    entries = meta.get("tables")
    fields = {"rows", "dim", "table", "vocab"}
    if not isinstance(meta.get("facet"), str) or not isinstance(entries, dict) or not all(
            isinstance(e, dict) and fields <= set(e) for e in entries.values()):
        raise ValueError(f"{mpath}: damaged: it must name the facet and give each table's "
                         f"{', '.join(sorted(fields))}")
    if expected is not None and meta.get("facet") != expected:
        raise ValueError(f"{path} is a {meta.get('facet')!r} facet checkpoint, but a "
                         f"{expected!r} facet was expected: check the facet path")
    tables, vocabs = {}, {}
    for name, e in entries.items():
        tpath, vpath = path / e["table"], path / e["vocab"]
        try:
            t = np.load(tpath, mmap_mode="r", allow_pickle=False)
            v = np.load(vpath, allow_pickle=False)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{err.filename}: missing (listed in {mpath})") from None
        except ValueError as err:
            raise ValueError(f"{tpath} or {vpath}: unreadable .npy ({err})") from None
        if t.shape != (e["rows"], e["dim"]):
            raise ValueError(f"{tpath}: shape {t.shape}, {mpath} says {(e['rows'], e['dim'])}")
        if v.shape != (e["rows"],):
            raise ValueError(f"{vpath}: shape {v.shape}, {mpath} says ({e['rows']},)")
        tables[name], vocabs[name] = t, v
    return Facet(facet=meta["facet"], tables=tables, vocabs=vocabs, metrics=meta.get("metrics") or {})
