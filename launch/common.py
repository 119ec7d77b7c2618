"""Shared plumbing for launch scripts: multi-process flags, workdir, metrics files.

Every trainer entry point calls `setup(workdir)` first thing in `main`: it joins a
multi-process run when one is configured (flags below, or JAX_COORDINATOR_ADDRESS /
JAX_NUM_PROCESSES / JAX_PROCESS_ID), creates the workdir and returns the resolved
settings. Only process 0 writes reports (`write_json`).

Entry points start with `run(main)` instead of `app.run(main)`: a user mistake ends
with one `NAME: error: ...` line on stderr and exit status 1, not a traceback, and Ctrl-C
with one `NAME: interrupted (...)` line and exit status 130 (see `run`).
"""

from __future__ import annotations

import contextlib
import json
import logging as std_logging
import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING

from absl import app, flags, logging

from launch import (  # defined there: the servers use them before importing this module
    INTERRUPTED_EXIT,
    TRACEBACK_ENV,  # noqa: F401 (common.TRACEBACK_ENV, as before)
    traceback_env_set,
)

if TYPE_CHECKING:
    from jax_recsys import distributed

_COORD = flags.DEFINE_string(
    "coordinator_address", "", "host:port of process 0 for multi-process runs "
    "(default: $JAX_COORDINATOR_ADDRESS; empty = single process)."
)
_NPROC = flags.DEFINE_integer(
    "num_processes", 0, "Number of processes (default: $JAX_NUM_PROCESSES or 1)."
)
_PID = flags.DEFINE_integer(
    "process_id", -1,
    "This process's index (default: $JAX_PROCESS_ID; 0 for a single process, required with "
    "several)."
)


def setup(workdir: str | None) -> distributed.DistributedConfig:
    """Joins the multi-process runtime (if configured) and creates `workdir`."""
    from jax_recsys import distributed  # imports JAX: not at module load (see `run`)

    cfg = distributed.initialize(
        distributed.DistributedConfig(
            coordinator_address=_COORD.value,
            num_processes=_NPROC.value,
            process_id=_PID.value,
        )
    )
    if workdir:
        make_workdir(workdir)
    if cfg.num_processes > 1:
        logging.info("process %d of %d", cfg.process_id, cfg.num_processes)
    return cfg


def make_workdir(workdir: str | os.PathLike) -> None:
    """Creates ``workdir`` and refuses one that cannot be written: now, not when the first
    checkpoint or the final facet is written, hours later (no JAX: run_pipeline, whose
    stages run as children, calls it instead of `setup`)."""
    try:
        pathlib.Path(workdir).mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):  # was "[Errno 17] File exists: 'x'"
        raise NotADirectoryError(
            f"--workdir {workdir}: it or a folder above it exists and is not a folder: "
            "give a folder (new or existing)") from None
    if not os.access(workdir, os.W_OK | os.X_OK):
        raise PermissionError(f"{workdir}: cannot write there (a read-only file system or "
                              "no write permission): give a writable --workdir")


# What a user's input (flags, config, paths, data) can cause. ValueError covers
# DataError, ArtifactError and CodecError; OSError covers FileNotFoundError,
# FileExistsError, NotADirectoryError, IsADirectoryError and PermissionError.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)


def _want_traceback() -> bool:
    if traceback_env_set():
        return True
    try:
        return flags.FLAGS["verbosity"].present and flags.FLAGS["verbosity"].value >= 1
    except Exception:  # noqa: BLE001 (flags not parsed yet)
        return False


def _command(cmd) -> str:
    """A subprocess's command line, shortened to the module it runs when it is Python's."""
    args = [str(a) for a in cmd] if isinstance(cmd, list | tuple) else [str(cmd)]
    if len(args) > 2 and args[1] == "-m":  # [python, -m, launch.x, ...]
        args = args[2:]
    text = shlex.join(args)
    return text if len(text) <= 300 else text[:297] + "..."


def child_error_line(name: str, e: subprocess.CalledProcessError | subprocess.TimeoutExpired) -> str:
    """`NAME: error: ...` for a child process that failed or ran out of time; the child
    printed its own error (above), so no traceback of the parent's is needed."""
    if isinstance(e, subprocess.TimeoutExpired):
        what = f"timed out after {e.timeout:.4g} s"
    elif e.returncode < 0:
        what = f"was killed by signal {-e.returncode}"
    else:
        what = f"exited with status {e.returncode} (its error is above)"
    return f"{name}: error: the child process {what}: {_command(e.cmd)}"


def error_line(name: str, e: BaseException) -> str:
    """`NAME: error: <message>`; the exception's type is named unless ValueError/OSError."""
    msg = str(e) or type(e).__name__
    if not isinstance(e, USER_ERRORS):
        msg = f"{type(e).__name__}: {msg}"
    return f"{name}: error: {msg}"


def _config_key_error(e: BaseException) -> tuple[str, str]:
    """(key, hint) of ml_collections' error for a key a ConfigDict lacks: its message is
    "'key'", then "\nDid you mean ...?" (the hint) for a near miss, in a KeyError that
    an AttributeError may wrap."""
    inner = e
    while inner.args and isinstance(inner.args[0], BaseException):  # AttributeError(KeyError)
        inner = inner.args[0]
    key, _, hint = (str(inner.args[0]) if inner.args else str(inner)).partition("\n")
    return key.strip("\"'"), hint


def _missing_config_key(e: BaseException) -> str | None:
    """The key a ConfigDict lacked when `e` is ml_collections' error for reading it, else
    None (an AttributeError or KeyError of anything else is a bug: keep its traceback)."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None or not tb.tb_frame.f_code.co_filename.endswith(
            os.path.join("ml_collections", "config_dict", "config_dict.py")):
        return None
    return _config_key_error(e)[0]


def _last_line(text: str) -> str | None:
    """The last non-blank line of ``text``, stripped, or None: ml_collections' errors of a
    config file that did not load hold a whole traceback, whose last line says why."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else None


def _fail(line: str):
    if _want_traceback():
        traceback.print_exc()
    print(line, file=sys.stderr)
    sys.exit(1)


# What to tell a user who pressed Ctrl-C in a trainer that may or may not save
# checkpoints (see `checkpoint_resume_hint`).
RESUME = "rerun the same command to resume"


def checkpoint_resume_hint(config_flag) -> Callable[[], str]:
    """A `run(resume_hint=...)` for trainers: resuming needs config.train.checkpoint_every > 0.

    Args:
      config_flag: the script's ``--config`` flag holder.
    """
    def hint() -> str:
        if config_flag.value.train.get("checkpoint_every", 0) > 0:
            return f"{RESUME} from the newest checkpoint"
        return "a rerun starts over: config.train.checkpoint_every is 0"

    return hint


_JOIN_TIMEOUT_S = 30.0  # how long a Ctrl-C waits for background work before the shutdown


def _end_executors() -> None:
    """What concurrent.futures runs at the interpreter's exit: no new tasks; idle workers
    end, running tasks (queued ones too) are waited for."""
    from concurrent.futures import process as process_pool, thread as thread_pool

    for pool in (thread_pool, process_pool):
        hook = getattr(pool, "_python_exit", None)
        if hook is not None:
            hook()


def _join_threads(name: str, timeout_s: float | None = None) -> bool:
    """Waits, at most ``timeout_s`` in all, for background work, in a normal exit's order.

    First the running non-daemon threads other than the workers and managers of
    executors: an async checkpoint's writers still submit work to their pools. Then the
    executors' tasks (`_end_executors`, in a daemon thread: a normal exit would wait
    for a running task without limit). A thread or task still running after
    ``timeout_s`` (default ``_JOIN_TIMEOUT_S``) is given up on.

    Returns:
      True when nothing is left running.
    """
    from concurrent.futures import process as process_pool, thread as thread_pool

    timeout_s = _JOIN_TIMEOUT_S if timeout_s is None else timeout_s
    me = threading.current_thread()
    deadline = time.monotonic() + timeout_s
    said = False
    executors = None  # the thread running `_end_executors`, once the others are done
    while True:
        known = {*getattr(thread_pool, "_threads_queues", {}),
                 *getattr(process_pool, "_threads_wakeups", {})}
        busy = [t for t in threading.enumerate()
                if t is not me and not t.daemon and t not in known and t is not executors
                and t.is_alive()]
        if not busy:
            if executors is None:
                executors = threading.Thread(target=_end_executors, name="end executors",
                                             daemon=True)
                executors.start()
            busy = [executors] if executors.is_alive() else []
        left = deadline - time.monotonic()
        if not busy or left <= 0:
            return not busy
        if not said and left < timeout_s - 2.0:  # quick work ends without a word
            sys.stderr.write(f"{name}: waiting up to {timeout_s:.0f} s for background work "
                             "(e.g. a checkpoint being written); Ctrl-C again quits now\n")
            said = True
        busy[0].join(min(left, 0.5))


def _interrupted(name: str, resume_hint) -> None:
    """Ends the process after a Ctrl-C: one line on stderr, exit status 130.

    Background threads still running (e.g. an async checkpoint's finalisation) and
    executors' running tasks are waited for, as at a normal exit but at most
    `_JOIN_TIMEOUT_S` in all (`_join_threads`); then the process ends with
    `os._exit`, skipping the interpreter's teardown, which can crash ("Fatal Python
    error: Segmentation fault") when the interrupt came during an XLA compilation.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a second Ctrl-C ends it at once
    if _want_traceback():
        traceback.print_exc()
    try:
        hint = resume_hint() if callable(resume_hint) else resume_hint
    except Exception:  # noqa: BLE001 (e.g. interrupted before the flags were parsed)
        hint = None
    sys.stderr.write(f"{name}: interrupted" + (f" ({hint})" if hint else "") + "\n")  # one write
    # The line stays the last one: what Orbax's threads still finishing a checkpoint
    # warn about (the interrupted process's teardown) is left out; an error (that
    # checkpoint failed to write) is not.
    _NoLibraryInfo.level = std_logging.ERROR
    try:
        # What a normal exit runs first (executors' shutdown, then joining the
        # threads: both done by now); skipped when a thread or an executor's task
        # outlived the wait: it would hang here too.
        shutdown = getattr(threading, "_shutdown", None)
        if _join_threads(name) and shutdown is not None:
            shutdown()
        else:  # no shutdown: stop the child processes it would have (e.g. a process pool's)
            import multiprocessing

            for child in multiprocessing.active_children():
                child.terminate()
        logging.flush()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(INTERRUPTED_EXIT)


@contextlib.contextmanager
def flagfile_errors():
    """Around `config_flags.DEFINE_config_file`: a --flagfile that cannot be opened ends
    with one ``NAME: error: ...`` line. ml_collections reads the command line's flag files
    while it defines the flag, before `run` can catch anything, and absl's
    CantOpenFlagFileError was a traceback. (A wrapper function would make the flag
    this module's, not the script's.)"""
    try:
        yield
    except flags.CantOpenFlagFileError as e:
        message = str(e).removeprefix("ERROR:: ")
        _fail(f"{pathlib.Path(sys.argv[0]).stem or 'main'}: error: {message}")


# Set (not "0"): keep the INFO logs of Orbax and tensorstore (see `quiet_library_logs`).
LIBRARY_LOGS_ENV = "JAX_RECSYS_LIBRARY_LOGS"
# A source file of Orbax or tensorstore (their logs go through absl's handler).
_LIBRARY_FILE = re.compile(r"[/\\](orbax|tensorstore)[/\\]")


class _NoLibraryInfo(std_logging.Filter):
    """Drops the records below `level` (WARNING; ERROR once `_interrupted` said its line)
    that Orbax or tensorstore log."""

    level = std_logging.WARNING

    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= self.level or not _LIBRARY_FILE.search(record.pathname)


def quiet_library_logs() -> None:
    """Keeps Orbax's and tensorstore's INFO logs off the console, WARNING and above kept.

    An Orbax checkpoint save logs about 55 INFO lines (every save, every thread), which
    buried the trainers' own progress lines. A filter on absl's handler (Orbax logs with
    absl.logging), so this process's own INFO lines are printed as before. After a
    Ctrl-C's ``NAME: interrupted`` line, only their errors are printed. Does nothing
    when ``JAX_RECSYS_LIBRARY_LOGS`` is set (not "0").
    """
    if os.environ.get(LIBRARY_LOGS_ENV, "").strip() not in ("", "0"):
        return
    handler = logging.get_absl_handler()
    if not any(isinstance(f, _NoLibraryInfo) for f in handler.filters):
        handler.addFilter(_NoLibraryInfo())


def run(main: Callable, name: str | None = None, *, resume_hint=None) -> None:
    """`app.run(main)` that ends user mistakes with one line instead of a traceback.

    A ValueError (DataError, ArtifactError, ...) or OSError (FileNotFoundError,
    FileExistsError, NotADirectoryError, PermissionError, ...) raised by `main`, an
    unknown config key in a `--config.KEY=...` override (ml_collections raises
    AttributeError/KeyError while the flags are parsed) or a VALUE that does not parse
    as the key's type (`--config.train.num_epochs=1.5`), and a `--config=FILE[:ARG]` that
    does not load (no such file, or its get_config raised), print one line
    ``NAME: error: <message>`` on stderr and exit with status 1. The message names the
    exception type when it is not a ValueError/OSError. Every other exception (a bug)
    propagates with its traceback as usual; `sys.exit` codes (e.g. export_int4's 2 for a
    failed AUC gate) and absl's usage errors are left as they are. A child process run
    with ``check=True`` that fails (``CalledProcessError``) or times out
    (``TimeoutExpired``) ends the same way, naming the child's command: the child has
    printed its own error already.

    Ctrl-C (KeyboardInterrupt, wherever it lands) prints ``NAME: interrupted`` and, when
    given, `` (<resume_hint>)`` on stderr and exits with status 130 once background
    threads (e.g. a checkpoint being finalised) and executors' running tasks are done,
    or after ``_JOIN_TIMEOUT_S`` (30 s) in all; a second Ctrl-C ends the process at once.

    Full traceback of a caught error or interrupt: pass ``--verbosity=1`` or set the
    environment variable ``JAX_RECSYS_TRACEBACK=1``. Orbax's and tensorstore's INFO logs
    are left out (`quiet_library_logs`); ``JAX_RECSYS_LIBRARY_LOGS=1`` keeps them.

    Args:
      main: the absl main, `main(argv)`.
      name: NAME in the message (default: the script's file name, e.g. `generate_data`).
      resume_hint: what a rerun does after Ctrl-C (e.g. `RESUME`), or a function that
        says it when called (see `checkpoint_resume_hint`); None: nothing.
    """
    name = name or pathlib.Path(sys.argv[0]).stem or "main"
    quiet_library_logs()

    def load_error():
        """Ends with one line when a --config=FILE did not load (ml_collections defers
        the error to the flag's value)."""
        for flag_name in flags.FLAGS:
            value = flags.FLAGS[flag_name].value
            if type(value).__name__ == "_ErrorConfig":  # ml_collections defers a load error
                _fail(f"{name}: error: cannot load --{flag_name}: "
                      f"{_last_line(str(value._error)) or type(value._error).__name__}")

    def parse(argv):
        try:
            rest = flags.FLAGS(argv)
        except flags.Error as e:
            # --config=FILE[:ARG] whose get_config raised: ml_collections puts its whole
            # traceback in the message; its last line says what was wrong.
            flag, sep, trace = str(e).partition(": Error whilst parsing config file:")
            last = _last_line(trace)
            if sep and last:
                _fail(f"{name}: error: {flag.removeprefix('flag ')}: {last}")
            # --config.KEY=VALUE whose VALUE does not parse as KEY's type (absl: "flag
            # --config.train.num_epochs=1.5: invalid literal for int() ...").
            m = re.match(r"flag --(\w+)\.([^=\s]+)=", str(e))
            if m and m[1] in flags.FLAGS and e.__context__ is not None:
                inner = str(e.__context__)
                value = str(e)[m.end():].removesuffix(f": {inner}")
                _fail(f"{name}: error: bad value {value!r} for config key {m[2]!r} in a "
                      f"--{m[1]}.KEY=VALUE override: {inner}")
            return app.parse_flags_with_usage(argv)  # absl's own message and exit 1
        except (AttributeError, KeyError) as e:  # --config.NO_SUCH_KEY=...
            key, hint = _config_key_error(e)
            hint = f"; {hint[:1].lower()}{hint[1:]}" if hint.strip() else ""
            _fail(f"{name}: error: unknown config key {key!r} in a --config.KEY=VALUE "
                  f"override{hint} ({type(e).__name__})")
        except OSError as e:
            # A --config.KEY=VALUE override of a --config=FILE that did not load (e.g. a
            # relative configs/x.py run from another folder) raised ml_collections'
            # "Configuration is not available ..." with a traceback.
            if "earlier failure to load" not in str(e):
                raise
            files = [f for f in flags.FLAGS if type(flags.FLAGS[f]).__name__ == "_ConfigFlag"]
            _fail(f"{name}: error: cannot load --{files[0] if len(files) == 1 else 'config'}: "
                  f"{_last_line(str(e))}")
        load_error()
        return rest

    def wrapped(argv):
        try:
            return main(argv)
        except USER_ERRORS as e:
            _fail(error_line(name, e))
        except (AttributeError, KeyError) as e:
            key = _missing_config_key(e)
            if key is None:
                raise
            # Another entry point's config (configs/kg.py for train_ranker) was an
            # AttributeError traceback at the first key the script read.
            _fail(f"{name}: error: the config has no key {key!r}: is --config the config of "
                  f"{name}? (README: Entry points)")
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            _fail(child_error_line(name, e))

    try:
        app.run(wrapped, flags_parser=parse)
    except KeyboardInterrupt:  # outermost: every finally/with inside has run
        _interrupted(name, resume_hint)


# A line of absl's INFO or WARNING logging ("I1127 14:54:45.947905 ..."), and the
# one-line error of an entry point ("serve_ranker: cannot start: ...", "x: error: ...").
_LOG_NOISE = re.compile(r"^[IW]\d{4} \d\d:\d\d:\d\d")
_ERROR_LINE = re.compile(r"^[\w.]+: (error|cannot start): ")


def log_tail(path: str | os.PathLike, max_lines: int = 2) -> str:
    """What a child process's log says about why it stopped, as one line.

    Args:
      path: the log file (the child's stderr).
      max_lines: how many of the last lines to keep when it printed no error line.

    Returns:
      Its last `NAME: error: ...` or `NAME: cannot start: ...` line when there is one
      (see `run`); else its last `max_lines` lines that are neither INFO/WARNING
      logging nor JSON event lines (e.g. a traceback's last line), joined by " | ";
      "" when there are none or the log cannot be read.
    """
    try:
        text = pathlib.Path(path).read_text(errors="replace")
    except OSError:
        return ""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if _ERROR_LINE.match(ln)]
    if errors:
        return errors[-1]
    keep = [ln for ln in lines if not _LOG_NOISE.match(ln) and not ln.startswith("{")]
    return " | ".join(keep[-max_lines:])


def _world_settings(cfg) -> dict:
    """A WorldConfig as its dataset.json records it (JSON: tuples become lists)."""
    import dataclasses

    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _held_world(meta: dict, want: dict) -> str | None:
    """None when dataset.json `meta` records the world settings `want`, else what it holds."""
    from jax_recsys.data import world

    got = meta.get("world_config") if meta.get("generator") == world.GENERATOR else None
    if not isinstance(got, dict):
        return "a dataset that is not a generated world (its dataset.json has no world_config)"
    if got == want:
        return None
    for scale in ("smoke", "default", "large"):  # the scales of world.scale_config
        if got == _world_settings(world.scale_config(scale)):
            return f"the {scale!r} world"
    diff = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
    more = f" and {len(diff) - 3} more" if len(diff) > 3 else ""
    return (f"a world made with other settings ({meta.get('name')!r}; "
            f"{', '.join(diff[:3])}{more} differ)")


def dataset_path(cfg, workdir: str | os.PathLike, *, key: str = "data") -> str:
    """A trainer config's dataset folder: cfg.data.path, or the world of
    cfg.data.world_config in WORKDIR/world when the path is empty (`generated_world`).

    Args:
      cfg: a config with ``data.path`` and ``data.world_config``.
      workdir: the run's folder.
      key: where the data settings sit in the config, for messages.

    Raises:
      ValueError: both are empty (a config whose data has no generated world, such
        as KG triples, needs a path), or as `generated_world`.
    """
    if cfg.data.path:
        return cfg.data.path
    if not cfg.data.world_config:
        raise ValueError(f"set --config.{key}.path: this config has no generated world "
                         f"({key}.world_config is empty)")
    return generated_world(cfg.data.world_config, workdir, key=key)


def generated_world(scale: str, workdir: str | os.PathLike, *, key: str = "data") -> str:
    """WORKDIR/world: the synthetic world of `scale`, written there when it is not yet.

    What trainers use when their config's data path is empty. A world already in
    WORKDIR/world (from an earlier run in the same workdir) is reused only when its
    dataset.json records the settings `scale` gives; any other world, or a dataset
    that is not a generated world, is refused rather than used or overwritten. With
    several processes, process 0 writes the world and the others wait for it.

    Args:
      scale: "smoke", "default" or "large" (`jax_recsys.data.world.scale_config`).
      workdir: the run's folder.
      key: where the data settings sit in the config ("data", or "ranker.data" for
        run_ablation), for the message.

    Returns:
      The world folder's path.

    Raises:
      ValueError: `scale` is unknown, or WORKDIR/world holds another world.
    """
    import jax

    from jax_recsys.data import world

    cfg = world.scale_config(scale)
    out = pathlib.Path(workdir) / "world"
    meta_path = out / "dataset.json"
    if meta_path.exists():  # every process checks, so all of them refuse together
        held = _held_world(json.loads(meta_path.read_text()), _world_settings(cfg))
        if held is not None:
            raise ValueError(
                f"{out} holds {held}, but {key}.world_config asks for {scale!r}: remove "
                f"{out}, or give --config.{key}.path=DIR (a dataset folder)"
            )
    # Several processes have joined (`setup`) before they ask which one this is: asking
    # a single process starts JAX's backend (on a GPU, most of its memory), which
    # run_ablation's own process must not hold while its pretrainers, children, run.
    several = jax.distributed.is_initialized()
    if (not several or jax.process_index() == 0) and not meta_path.exists():
        logging.info("no %s.path: writing the %s world to %s", key, scale, out)
        world.generate_world(cfg, out)
    if several and jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("world written")  # the others wait for it
    return str(out)


def int_list(flag, *, minimum: int = 1, distinct: bool = False) -> list[int]:
    """A list flag of integers, checked (ValueError naming the flag): non-empty, each
    >= ``minimum``, and no value twice when ``distinct``."""
    try:
        got = [int(v) for v in flag.value]
    except ValueError:
        raise ValueError(f"--{flag.name} must list integers, got {flag.value}") from None
    if not got or min(got) < minimum or (distinct and len(set(got)) < len(got)):
        what = "distinct integers" if distinct else "integers"
        raise ValueError(f"--{flag.name} must list {what} >= {minimum}, got {flag.value}")
    return got


def write_json(path: str | os.PathLike, obj) -> None:
    """Writes JSON atomically, on process 0 only (asking JAX which process this is starts
    its backend: not for a process that runs no JAX, see `pipeline_stages.write_json`)."""
    from jax_recsys import distributed, fsutil

    if not distributed.is_chief():
        return
    fsutil.write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=_default)
                             + "\n")


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
