"""Entry points: ``python -m launch.NAME``. Their shared plumbing is ``launch/common.py``.

`exit_on_interrupt` (and the constants both use) is here, not there, because the servers call it before their own
imports and without common's multi-process flags; it uses the standard library only
(this package is imported first by ``python -m launch.NAME`` anyway).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import traceback

TRACEBACK_ENV = "JAX_RECSYS_TRACEBACK"  # set (not "0"): full tracebacks of errors
INTERRUPTED_EXIT = 130  # 128 + SIGINT, what a shell reports for a Ctrl-C'd command


def traceback_env_set() -> bool:
    """Whether ``TRACEBACK_ENV`` asks for full tracebacks."""
    return os.environ.get(TRACEBACK_ENV, "").strip() not in ("", "0")


def exit_on_interrupt(name: str) -> None:
    """Makes Ctrl-C (SIGINT) end this process at once: one ``NAME: interrupted`` line on
    stderr and exit status 130, as ``launch.common.run`` ends the other entry points.

    For a server's start-up (imports, artifact checks, JIT compiles: 40 s on a GPU
    host), which used to end in a KeyboardInterrupt traceback; once serving, the server
    sets its own handler (a graceful stop). ``os._exit``: nothing is left to save, and
    the interpreter's teardown can crash after an interrupted XLA compilation. Does
    nothing where SIGINT is not Python's default (e.g. ignored, as in a non-interactive
    shell's background job). ``JAX_RECSYS_TRACEBACK=1`` prints where it was interrupted.
    """
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return

    def interrupted(signum, frame) -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # a second Ctrl-C ends it at once
        if traceback_env_set():
            traceback.print_stack(frame)
        sys.stderr.flush()
        os.write(2, f"{name}: interrupted\n".encode())
        os._exit(INTERRUPTED_EXIT)

    signal.signal(signal.SIGINT, interrupted)


# SIGHUP (swap) while a server starts; see `hold_hangup`.
HANGUP_PENDING = threading.Event()


def hold_hangup() -> None:
    """Makes SIGHUP during a server's start-up a pending swap (``HANGUP_PENDING``).

    A server swaps artifacts on SIGHUP once serving; before its handler was set, the
    signal's default ended it at once with no word (status 129): a rollout that
    HUPs every server killed one still starting (a ranker's start is 40 s on a GPU
    host). The server swaps once it serves, and sets the event from its own handler.
    Does nothing where SIGHUP is ignored (``nohup``) until then.
    """
    if signal.getsignal(signal.SIGHUP) is signal.SIG_IGN:
        return
    signal.signal(signal.SIGHUP, lambda *_: HANGUP_PENDING.set())
