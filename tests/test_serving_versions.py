"""VersionSet: snapshots that requests hold, swap windows, retirement, release."""

import threading
import time

import pytest

from serving.versions import VersionSet


def test_swap_keeps_outgoing_version_until_retired_and_snapshots_never_change():
    dropped = []
    vs = VersionSet("a", "A", name="t", on_drop=dropped.append)
    held = vs.snapshot  # a request in flight on "a"
    assert vs.swap("b", "B", window_s=60.0)
    assert (vs.current, vs.ids) == ("b", ["a", "b"])
    assert (held.current, held.versions) == ("a", {"a": "A"})  # untouched by the swap
    # A third version drops the one that was neither current nor outgoing.
    assert vs.swap("c", "C", window_s=60.0)
    assert vs.ids == ["b", "c"] and dropped == ["A"]
    assert not vs.retire("c")  # the current version cannot be retired
    assert not vs.retire("zzz")
    assert vs.retire("b") and vs.ids == ["c"] and dropped == ["A", "B"]
    assert vs.close() == ["C"]


def test_swap_to_the_current_version_changes_nothing():
    dropped = []
    vs = VersionSet("a", "A", name="t", on_drop=dropped.append)
    assert not vs.swap("a", "A2", window_s=0.0)
    assert vs.snapshot.versions == {"a": "A"} and dropped == []


def test_outgoing_version_is_retired_after_the_window():
    retired = threading.Event()
    vs = VersionSet("a", "A", name="t", on_drop=lambda v: retired.set())
    vs.swap("b", "B", window_s=0.05)
    assert retired.wait(5.0)
    assert vs.ids == ["b"]


def test_close_cancels_pending_retirements():
    dropped = []
    vs = VersionSet("a", "A", name="t", on_drop=dropped.append)
    vs.swap("b", "B", window_s=0.2)
    assert sorted(vs.close()) == ["A", "B"]
    time.sleep(0.4)
    assert dropped == [] and vs.ids == ["a", "b"]


def test_a_rollback_and_roll_forward_keep_the_latest_window():
    """swap b, back to a, forward to b: the first window's timer must not retire a
    early (a's window starts at the last swap); replaced values are released."""
    dropped, timers = [], []
    vs = VersionSet("a", "A", name="t", on_drop=dropped.append)
    vs.later = lambda delay, fn, *args: timers.append((fn, args))  # fired by hand below
    vs.swap("b", "B", window_s=1.0)
    vs.swap("a", "A2", window_s=1.0)  # rollback: a reloaded, b kept for pinned requests
    vs.swap("b", "B2", window_s=1.0)  # roll forward again
    assert dropped == ["A", "B"]  # the values the reloads replaced
    assert vs.snapshot.versions == {"a": "A2", "b": "B2"}
    first, second, third = timers
    assert first[0](*first[1]) is False and vs.ids == ["a", "b"]  # voided by the later swaps
    assert second[0](*second[1]) is False  # b is current
    assert third[0](*third[1]) is True and vs.ids == ["b"] and dropped == ["A", "B", "A2"]


def test_a_window_or_delay_that_no_timer_can_wait_is_refused_and_changes_nothing():
    """inf (a Timer's OverflowError: the old version was never retired), nan, negative."""
    vs = VersionSet("a", "A", name="t")
    for bad in (float("inf"), float("nan"), -1.0, 1e10):
        with pytest.raises(ValueError, match="window_s must be a finite number of seconds"):
            vs.swap("b", "B", window_s=bad)
        assert (vs.current, vs.ids) == ("a", ["a"])
        with pytest.raises(ValueError, match="delay_s must be a finite number of seconds"):
            vs.later(bad, lambda: None)
    assert vs._timers == []
