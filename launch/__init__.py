"""Entry points: ``python -m launch.NAME``. Their shared plumbing is ``launch/common.py``.

`server_starting` (and the constants both use) is here, not there, because the servers
call it before their own imports and without common's multi-process flags; it uses the
standard library only (this package is imported first by ``python -m launch.NAME`` anyway).
"""

from __future__ import annotations

import os
import signal
import sys
import time
import traceback

TRACEBACK_ENV = "JAX_RECSYS_TRACEBACK"  # set (not "0"): full tracebacks of errors
INTERRUPTED_EXIT = 130  # 128 + SIGINT, what a shell reports for a Ctrl-C'd command


def traceback_env_set() -> bool:
    """Whether ``TRACEBACK_ENV`` asks for full tracebacks."""
    return os.environ.get(TRACEBACK_ENV, "").strip() not in ("", "0")


class SignalFlag:
    """A flag that a signal handler sets: ``set``/``is_set``/``clear``/``wait`` as a
    ``threading.Event``'s, without its lock.

    A handler runs in the main thread between two bytecodes of whatever that thread
    was doing. An Event's ``set()`` in a handler takes the Event's lock, and when the
    signal lands while the main thread holds that lock (inside its own
    ``event.wait(0.2)`` poll, or ``clear()``), the handler waits for itself forever and
    the server hangs (tests/test_signal_flag.py makes that happen). Here ``set`` is one
    attribute store, and ``wait`` sleeps in short steps (a signal ends no sleep early:
    PEP 475), so a handler never waits and the waiter sees the flag within a step.
    """

    _STEP_S = 0.02

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def clear(self) -> None:
        self._set = False

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: float) -> bool:
        """Waits up to ``timeout`` seconds for the flag; returns it."""
        end = time.monotonic() + timeout
        while not self._set:
            left = end - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(left, self._STEP_S))
        return True


# A SIGHUP (swap) that came while a server started; see `server_starting`.
HANGUP_PENDING = SignalFlag()


def server_starting(name: str) -> None:
    """A server's signal handling until it serves and sets its own handlers (a graceful
    stop on Ctrl-C, a swap on SIGHUP); its start-up (imports, artifact checks, JIT
    compiles) takes seconds, 40 s on a GPU host.

    - Ctrl-C (SIGINT) ends the process at once: one ``NAME: interrupted`` line on
      stderr and exit status 130, as ``launch.common.run`` ends the other entry
      points (it was a KeyboardInterrupt traceback). ``os._exit``: nothing is left to
      save, and the interpreter's teardown can crash after an interrupted XLA
      compilation. ``JAX_RECSYS_TRACEBACK=1`` prints where it was interrupted.
    - SIGHUP is a pending swap (``HANGUP_PENDING``), done once the server serves: its
      default ended the process at once with no word (status 129), so a rollout that
      HUPs every server killed one still starting.

    Each only where the signal is as a process gets it by default: SIGINT with Python's
    default handler (not ignored, as in a non-interactive shell's background job),
    SIGHUP not ignored (``nohup``).
    """
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:

        def interrupted(signum, frame) -> None:
            signal.signal(signal.SIGINT, signal.SIG_DFL)  # a second Ctrl-C ends it at once
            if traceback_env_set():
                traceback.print_stack(frame)
            sys.stderr.flush()
            os.write(2, f"{name}: interrupted\n".encode())
            os._exit(INTERRUPTED_EXIT)

        signal.signal(signal.SIGINT, interrupted)
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        signal.signal(signal.SIGHUP, lambda *_: HANGUP_PENDING.set())
