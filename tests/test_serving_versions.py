"""VersionSet: snapshots that requests hold, swap windows, retirement, release."""

import threading
import time

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
