"""The adaptive hedge delay: a high quantile of a shard's recent answer times.

``EmbeddingClient(hedge_after_s="auto")`` keeps one ``HedgeDelay`` per shard
with replicas. Every shard request that gets an answer records how long it took,
as the client's hedge timer sees it: from the moment the caller starts waiting
for that shard (when the timer starts, ``serving.client._Race``) to the first
answer, whichever replica gave it. The delay is the ``quantile`` of the last
``window`` of those times, at least ``floor_s``; it is recomputed every
``every`` answers (a partial sort of a copy of the ring buffer, ``_quantile``),
and there is none (no hedging) until ``warmup`` answers are in.

What a hedged race records: the time to its first answer, i.e. the hedge delay
plus the hedge's round trip when the hedge won. That is a lower bound on how
slow the replica asked first was (its try is abandoned, its real time is never
known), and it is enough: a race is hedged only when it is slower than the
current delay, and every such race is recorded above the delay, so the number of
samples above the delay, which is what moves the quantile, is exact. A replica
that stalls on more than ``1 - quantile`` of the requests raises the delay (up to
about its stalls' length, if they keep coming), one that stalls less often does
not. Recording the winning hedge's own round trip instead would hide the tail
(hedged races would look fast) and keep the delay below the real p99 however
many requests are late.

Imports NumPy only (the client imports no JAX).
"""

from __future__ import annotations

import math
import numbers
import threading

import numpy as np

QUANTILE = 0.99
FLOOR_S = 0.001
WINDOW = 1000
EVERY = 64
WARMUP = 100


class HedgeDelay:
    """A sliding-window quantile of answer times, thread-safe.

    Args:
      quantile: in (0, 1): the delay is this quantile of the window (linear
        interpolation, as ``np.quantile``'s default).
      floor_s: the delay is never below this (seconds, >= 0).
      window: answers kept (a ring buffer: the last ``window``).
      every: answers between two recomputations.
      warmup: answers needed before there is a delay (1 <= warmup <= window);
        the first one is computed at the ``warmup``-th answer, the next ones at
        ``warmup + every``, ``warmup + 2 * every``, ...
    """

    def __init__(
        self,
        *,
        quantile: float = QUANTILE,
        floor_s: float = FLOOR_S,
        window: int = WINDOW,
        every: int = EVERY,
        warmup: int = WARMUP,
    ):
        check(quantile, floor_s)
        if not (1 <= warmup <= window and every >= 1):
            raise ValueError(
                f"need 1 <= warmup <= window and every >= 1, got warmup={warmup}, "
                f"window={window}, every={every}"
            )
        self.quantile, self.floor_s = float(quantile), float(floor_s)
        self._window, self._every, self._warmup = int(window), int(every), int(warmup)
        self._buf = np.zeros(self._window, np.float64)
        self._lock = threading.Lock()
        self._n = 0  # answers recorded, ever
        self._at = 0  # _n when the current delay was computed
        self._delay: float | None = None

    @property
    def delay_s(self) -> float | None:
        """The current delay (seconds), or None while warming up."""
        return self._delay

    @property
    def samples(self) -> int:
        """Answers recorded so far."""
        return self._n

    def window(self) -> np.ndarray:
        """float64 [min(samples, window)]: the answer times kept, in buffer order."""
        with self._lock:
            return self._buf[: min(self._n, self._window)].copy()

    def record(self, seconds: float) -> None:
        """Adds one answer time; every ``every`` answers, recomputes the delay."""
        with self._lock:
            n = self._n
            self._buf[n % self._window] = seconds
            self._n = n = n + 1
            if n < self._warmup or (n - self._warmup) % self._every:
                return
            kept = self._buf[: min(n, self._window)].copy()
        # Outside the lock: the other threads keep recording meanwhile.
        delay = max(_quantile(kept, self.quantile), self.floor_s)
        with self._lock:
            if n > self._at:  # a slower thread must not overwrite a newer delay
                self._at, self._delay = n, delay


def _quantile(x: np.ndarray, q: float) -> float:
    """``np.quantile(x, q)`` (linear interpolation) by a partial sort of ``x`` (in place).

    Not ``np.quantile`` itself: its first call in a process takes ~7 ms (20-30 ms on
    a busy 2-core box), and it would come in the thread of a lookup (the one that
    records the ``warmup``-th answer). This takes ~5 us for 1,000 values.
    """
    h = q * (x.size - 1)
    lo = math.floor(h)
    hi = min(lo + 1, x.size - 1)
    x.partition([lo, hi])
    return float(x[lo] + (h - lo) * (x[hi] - x[lo]))


def is_number(x) -> bool:
    """A real number, not a bool (``True`` would pass as 1: a 1 s hedge floor)."""
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))


def check(quantile: float, floor_s: float, adaptive: bool = True) -> None:
    """Raises ValueError unless ``0 < quantile < 1`` and ``floor_s`` is finite and >= 0,
    and (not ``adaptive``: a fixed delay, which uses neither) both are the defaults."""
    if not (is_number(quantile) and 0 < quantile < 1):
        raise ValueError(f"hedge_quantile must be in (0, 1), got {quantile!r}")
    if not (is_number(floor_s) and math.isfinite(floor_s) and floor_s >= 0):
        raise ValueError(f"hedge_min_s must be a finite number >= 0, got {floor_s!r}")
    if not adaptive and (quantile, floor_s) != (QUANTILE, FLOOR_S):
        raise ValueError(f"hedge_quantile and hedge_min_s need hedge_after_s='auto' (a fixed "
                         f"delay uses neither), got {quantile!r} and {floor_s!r}")
