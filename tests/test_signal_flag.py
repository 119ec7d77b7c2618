"""launch.SignalFlag: what the servers' signal handlers set (stop, swap)."""

from __future__ import annotations

import subprocess
import sys

import launch
from tests import mp_util

# A handler runs in the main thread between two bytecodes of whatever that thread was
# doing. This runs the SIGHUP handler's `HANGUP_PENDING.set()` at every line of the
# flag's own `wait()`, as a signal landing there would: with a threading.Event (which it
# was) the handler lands inside `with self._cond:` and waits for its own lock forever: a
# server's SIGTERM or SIGHUP arriving at that moment would hang it.
_HANDLER_INSIDE_WAIT = r"""
import sys
import launch

flag = launch.HANGUP_PENDING

def tracer(frame, event, arg):
    if event == "line" and frame.f_code.co_name == "wait":
        flag.set()  # the handler, between two lines of the main thread's wait()
    return tracer

sys.settrace(tracer)
seen = flag.wait(5.0)
sys.settrace(None)
print(seen, flush=True)
"""


def test_a_handler_that_lands_inside_the_flags_wait_does_not_hang():
    proc = subprocess.run([sys.executable, "-c", _HANDLER_INSIDE_WAIT], cwd=mp_util.REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == "True\n"


def test_signal_flag_set_clear_wait():
    flag = launch.SignalFlag()
    assert not flag.is_set()
    assert flag.wait(0.01) is False
    flag.set()
    assert flag.is_set() and flag.wait(0.0) is True and flag.wait(10.0) is True
    flag.clear()
    assert not flag.is_set() and flag.wait(0.01) is False
