"""Artifact versions served side by side: immutable snapshots, swap windows, retirement.

Shared by the embedding shard server and the ranker service. A request reads
``VersionSet.snapshot`` once and uses that object for its whole life, so a
swap or retirement (which replace the snapshot whole, never mutate it) cannot
change the version under a request in flight. After ``swap`` the outgoing
current version stays servable to requests that pin it for a window, then is
retired; at most the new and the outgoing current version are kept.

Imports the stdlib and ``serving.grpc_util`` only (the shard servers stay
NumPy/gRPC-only, never JAX).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from serving import grpc_util

log = logging.getLogger(__name__)

V = TypeVar("V")


@dataclasses.dataclass(frozen=True)
class Snapshot(Generic[V]):
    """What a request sees: the current version id and every servable version."""

    current: str
    versions: dict[str, V]


class VersionSet(Generic[V]):
    """The versions one process serves, swapped and retired without a pause.

    Args:
      version: id of the first version.
      value: what serving that version needs (tables, a fetcher, ...).
      name: prefix of the log lines ("shard 0", "ranker").
      on_drop: called with a version's value once it is no longer servable
        (to release what it holds); None: nothing to release.
    """

    def __init__(self, version: str, value: V, *, name: str,
                 on_drop: Callable[[V], None] | None = None):
        self._snapshot: Snapshot[V] = Snapshot(current=version, versions={version: value})
        self._lock = threading.Lock()
        self._timers: list[threading.Timer] = []
        # version -> the token of its one pending retirement: a timer retires a
        # version only if its token is still this one (a version made current
        # again, or given a later window, ignores the older timers).
        self._retiring: dict[str, object] = {}
        self._name = name
        self._on_drop = on_drop

    @property
    def snapshot(self) -> Snapshot[V]:
        """The current snapshot; read it once per request."""
        return self._snapshot

    @property
    def current(self) -> str:
        """The version served to requests that pin none."""
        return self._snapshot.current

    @property
    def ids(self) -> list[str]:
        """Every version servable now (two during a swap window)."""
        return list(self._snapshot.versions)

    def swap(self, version: str, value: V, *, window_s: float) -> bool:
        """Makes ``version`` current; the outgoing one stays servable ``window_s`` s.

        Args:
          version: the new version id.
          value: what serving it needs.
          window_s: seconds before the outgoing current version is retired
            (finite, >= 0, at most a day: ``grpc_util.check_seconds``).

        Returns:
          False (and nothing changes) when ``version`` is already current: the
          caller still owns ``value``.

        Raises:
          ValueError: a bad ``window_s`` (nothing changes).
        """
        grpc_util.check_seconds("window_s", window_s)
        with self._lock:
            old = self._snapshot
            if version == old.current:
                return False
            kept = {old.current: old.versions[old.current], version: value}
            # Versions leaving, and a held value of ``version`` that ``value`` replaces.
            dropped = [v for k, v in old.versions.items() if k not in kept or
                       (k == version and v is not value)]
            self._snapshot = Snapshot(current=version, versions=kept)
            self._retiring.pop(version, None)  # current again: its old timer is void
            token = self._retiring[old.current] = object()
        for value_d in dropped:
            self._drop(value_d)
        log.info("%s swapped %s -> %s (old kept %.1fs)", self._name, old.current, version,
                 window_s)
        self.later(window_s, self.retire, old.current, token)
        return True

    def retire(self, version: str, _token: object | None = None) -> bool:
        """Stops serving a non-current version (requests pinning it then fail).

        Args:
          version: the version to retire.
          _token: internal (a swap window's timer): retire only if no later swap
            made ``version`` current again or gave it a new window.

        Returns:
          True if it was dropped.
        """
        with self._lock:
            snap = self._snapshot
            if _token is not None and self._retiring.get(version) is not _token:
                return False
            if version == snap.current or version not in snap.versions:
                return False
            self._retiring.pop(version, None)
            value = snap.versions[version]
            self._snapshot = Snapshot(
                current=snap.current,
                versions={k: v for k, v in snap.versions.items() if k != version})
        self._drop(value)
        log.info("%s retired version %s", self._name, version)
        return True

    def later(self, delay_s: float, fn: Callable, *args) -> None:
        """Runs ``fn(*args)`` after ``delay_s`` on a daemon timer (cancelled by close).

        ValueError unless ``delay_s`` passes ``grpc_util.check_seconds`` (an
        infinite delay would kill the timer's thread and ``fn`` would never run).
        """
        grpc_util.check_seconds("delay_s", delay_s)
        t = threading.Timer(delay_s, fn, args=args)
        t.daemon = True
        t.start()
        with self._lock:
            self._timers = [x for x in self._timers if x.is_alive()] + [t]

    def close(self) -> list[V]:
        """Cancels pending retirements and timers.

        Returns:
          The values of the versions still held (for the caller to release).
        """
        with self._lock:
            timers, self._timers = self._timers, []
            values = list(self._snapshot.versions.values())
        for t in timers:
            t.cancel()
        return values

    def _drop(self, value: V) -> None:
        if self._on_drop is not None:
            self._on_drop(value)
