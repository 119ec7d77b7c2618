"""Unary-looking round trips over long-lived gRPC bidi streams (client side).

A unary gRPC call pays for a new HTTP/2 stream, headers and trailers every
time; a request/response pair on a stream that stays open does not (on this
project's 2-core box: 0.25 vs 0.39 ms for an 8 KB request and a 40 KB answer
on loopback, ``launch.bench_serving``). ``StreamPool`` keeps such streams to
one address and lends each to one caller at a time, so a caller sees a plain
``call(payload, deadline) -> bytes``:

* deadlines: a stream has none of its own; a ``DeadlineWatchdog`` thread
  cancels a stream whose round trip outlives its deadline (it wakes about once
  per deadline, not per call) and the caller gets DEADLINE_EXCEEDED;
* broken streams (the server restarted, or stopped and ended its streams)
  are dropped; a round trip that fails on a stream that had already answered
  is tried once more on a fresh one, so a restart between calls is invisible;
* a server that refuses a stream (at its ``max_streams``, or one without the
  method) gets unary calls instead (``StreamRefused``) for ``refuse_s``.

Errors are ``grpc.RpcError`` with ``code()`` and ``details()``, as a unary
call raises. A caller that no longer wants an answer (another replica gave it
first: hedged requests, ``serving.client``) calls ``abandon()`` on what
``send`` returned; the waiting side then raises ``Abandoned`` at once and the
stream is closed (a new one replaces it on the next call). Imports gRPC and
the standard library only.
"""

from __future__ import annotations

import logging
import math
import numbers
import queue
import threading
import time

import grpc

log = logging.getLogger(__name__)

# The watchdog sleeps at most this long at a time (a far deadline is waited for in
# steps): Condition.wait refuses a timeout over threading.TIMEOUT_MAX (~292 years).
MAX_WAIT_S = 3600.0
# After an unexpected error in its loop the watchdog pauses this long (so an error
# that repeats does not spin a core) and goes on; it logs at most one per minute.
_ERROR_PAUSE_S = 0.01
_ERROR_LOG_EVERY_S = 60.0

# A fresh stream answered with one of these: the server does not take streams
# (now). The caller falls back to unary calls.
_REFUSED = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNIMPLEMENTED)
# A stream that had answered before and then failed with one of these broke
# while idle (server restarted or stopped, or the watchdog cancelled it late):
# the request is tried once more on a fresh stream. Any other status is the
# server's answer to this request.
_BROKEN = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


class StreamError(grpc.RpcError):
    """A failed round trip on a stream, shaped like a unary call's error."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class StreamRefused(Exception):
    """The server does not take a stream now: make this call unary."""


class Abandoned(Exception):
    """The caller abandoned this round trip (``Pending.abandon``) before its answer."""


class _Stream:
    """One open bidi call; ``roundtrip`` sends one request and waits for its answer."""

    def __init__(self, multicallable):
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        # gRPC's own thread reads the requests as they are put (None ends them).
        self._responses = multicallable(iter(self._requests.get, None))
        self.answered = 0  # round trips this stream completed
        self.expired = False  # cancelled by the watchdog
        self.abandoned = False  # cancelled by the caller (Pending.abandon)

    def send(self, payload: bytes) -> None:
        self._requests.put(payload)

    def receive(self) -> bytes:
        return next(self._responses)

    def expire(self) -> None:
        self.expired = True
        self.cancel()

    def cancel(self) -> None:
        self._responses.cancel()

    def close(self) -> None:
        self._requests.put(None)
        self._responses.cancel()


class DeadlineWatchdog:
    """A timer thread: cancels streams whose round trip outlives its deadline, and
    runs ``serving.client``'s hedge timers.

    It calls ``expire()`` of whatever is armed once its time has come (a stream:
    cancel it). ``arm`` notifies the thread only when the new deadline is earlier
    than the one it sleeps towards, so with a constant time budget the thread wakes
    about once per budget, not once per call. One can serve many stream pools.

    The thread must outlive anything armed on it (a dead watchdog would silently
    keep every later deadline): a far deadline is slept towards in steps of at most
    ``MAX_WAIT_S``, an ``expire()`` that raises is ignored, and any other error in
    its loop is logged and the loop goes on.
    """

    def __init__(self, name: str = "stream-deadlines"):
        self._cond = threading.Condition()
        self._armed: dict[object, float] = {}  # anything with expire() -> when
        self._wake_at = math.inf
        self._closed = False
        self._errors = 0  # unexpected errors in the loop (logged, survived)
        self._logged_at = -math.inf
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def arm(self, stream, deadline: float) -> None:
        """Calls ``stream.expire()`` (from this thread) at ``deadline`` unless disarmed.

        Args:
          stream: anything with ``expire()``; arming it again replaces its deadline.
          deadline: a ``time.monotonic()`` time; ``math.inf``: never (disarms it).

        Raises:
          ValueError: ``deadline`` is not a number, or NaN (it would be due never and
            always); nothing is armed then.
        """
        if not (type(deadline) is float or isinstance(deadline, numbers.Real)) or (
                deadline != deadline):  # not a number, or NaN (type() first: every send)
            raise ValueError(f"deadline must be a time.monotonic() time, got {deadline!r}")
        with self._cond:
            if deadline == math.inf:
                self._armed.pop(stream, None)
                return
            self._armed[stream] = deadline
            if deadline < self._wake_at:
                self._wake_at = deadline
                self._cond.notify()

    def disarm(self, stream) -> None:
        with self._cond:
            self._armed.pop(stream, None)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    @property
    def alive(self) -> bool:
        """The thread runs (until ``close``)."""
        return self._thread.is_alive()

    @property
    def errors(self) -> int:
        """Unexpected errors its loop survived (each logged, at most one a minute)."""
        return self._errors

    def _run(self) -> None:
        while True:
            try:
                if not self._step():
                    return
            except Exception:  # noqa: BLE001 (a dead watchdog disables every deadline)
                self._errors += 1
                now = time.monotonic()
                if now - self._logged_at >= _ERROR_LOG_EVERY_S:
                    self._logged_at = now
                    log.exception("deadline watchdog: unexpected error (%d so far); "
                                  "it goes on", self._errors)
                time.sleep(_ERROR_PAUSE_S)

    def _step(self) -> bool:
        """Expires what is due, or sleeps until the next deadline (or a notify);
        False once closed."""
        with self._cond:
            if self._closed:
                return False
            now = time.monotonic()
            due = [s for s, d in self._armed.items() if d <= now]
            for s in due:
                del self._armed[s]
            self._wake_at = min(self._armed.values(), default=math.inf)
            if not due:
                self._cond.wait(
                    None if self._wake_at == math.inf
                    else min(self._wake_at - now, MAX_WAIT_S))
                return True
        for s in due:  # outside the lock: cancel takes gRPC's locks
            try:
                s.expire()
            except Exception:  # noqa: BLE001 (a failing timer must not stop the others)
                pass
        return True


class Pending:
    """A request sent on a stream: call it once to wait for the answer (``StreamPool.send``)."""

    __slots__ = ("_pool", "stream", "payload", "deadline", "abandoned", "finished")

    def __init__(self, pool: StreamPool, stream: _Stream, payload: bytes, deadline: float):
        self._pool, self.stream, self.payload, self.deadline = pool, stream, payload, deadline
        self.abandoned = False
        self.finished = False  # answered, and its stream handed back (set under the pool lock)

    def __call__(self) -> bytes:
        return self._pool._receive(self)

    def abandon(self) -> None:
        """Gives up on the answer: the waiting call raises ``Abandoned`` (unless the
        answer is in already) and the stream is closed instead of reused. Does nothing
        once the answer has been read (the stream may serve another call by then)."""
        with self._pool._lock:
            if self.finished:
                return
            self.abandoned = True
            stream = self.stream
            stream.abandoned = True
        stream.cancel()  # outside the lock: takes gRPC's locks


class StreamPool:
    """Open streams of one method at one address, each lent to one caller at a time.

    Args:
      channel: the channel to the server.
      method: full method name of a stream-stream method answering one response
        per request, in order.
      watchdog: enforces the deadlines (the owner closes it).
      refuse_s: after the server refused a stream, how long ``call`` raises
        ``StreamRefused`` at once before trying a stream again.
    """

    def __init__(
        self,
        channel: grpc.Channel,
        method: str,
        *,
        watchdog: DeadlineWatchdog,
        refuse_s: float = 1.0,
    ):
        self._multicallable = channel.stream_stream(method)
        self._lock = threading.Lock()
        self._free: list[_Stream] = []
        self._all: set[_Stream] = set()
        self._refuse_s = refuse_s
        self._refused_until = 0.0
        self._closed = False
        self._watchdog = watchdog

    @property
    def open_streams(self) -> int:
        """Streams open now (lent or free)."""
        with self._lock:
            return len(self._all)

    @property
    def free_streams(self) -> int:
        """Open streams not lent to a caller now."""
        with self._lock:
            return len(self._free)

    def call(self, payload: bytes, deadline: float) -> bytes:
        """One round trip: sends ``payload``, returns the answer (``send(...)()``).

        Args:
          payload: the serialized request.
          deadline: ``time.monotonic()`` by which the answer must be in.

        Returns:
          The serialized response.

        Raises:
          StreamRefused: the server takes no stream now; make a unary call.
          ValueError: ``deadline`` is not finite.
          grpc.RpcError: the round trip failed (``code()``, ``details()``):
            the server's status, DEADLINE_EXCEEDED, UNAVAILABLE, ...
        """
        return self.send(payload, deadline)()

    def send(self, payload: bytes, deadline: float) -> Pending:
        """Sends ``payload`` now; calling the returned ``Pending`` waits for the answer.

        Sending to several servers first and then waiting for each answer in
        turn fans a request out from one thread. Call the returned object
        exactly once; it raises what ``call`` raises, or ``Abandoned`` after its
        ``abandon()``.

        Raises:
          StreamRefused: the server refused a stream a moment ago (see ``refuse_s``).
          ValueError: ``deadline`` is not finite (a round trip without one could
            wait forever on a stalled server).
        """
        if not math.isfinite(deadline):
            raise ValueError(f"deadline must be a finite time.monotonic() time, got {deadline!r}")
        if time.monotonic() < self._refused_until:
            raise StreamRefused()
        stream = self._take()
        self._watchdog.arm(stream, deadline)
        stream.send(payload)
        return Pending(self, stream, payload, deadline)

    def _receive(self, pending: Pending) -> bytes:
        stream, payload, deadline = pending.stream, pending.payload, pending.deadline
        while True:
            fresh = stream.answered == 0
            try:
                out = stream.receive()
            except (grpc.RpcError, StopIteration) as e:
                self._watchdog.disarm(stream)
                self._drop(stream)
                if pending.abandoned:
                    raise Abandoned() from None
                now = time.monotonic()
                if stream.expired and now >= deadline:
                    raise StreamError(
                        grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded on a stream"
                    ) from None
                if isinstance(e, StopIteration):  # the server ended the stream (stopping)
                    e = StreamError(grpc.StatusCode.UNAVAILABLE, "the server ended the stream")
                code = e.code()
                if fresh and code in _REFUSED:
                    self._refused_until = now + self._refuse_s
                    raise StreamRefused() from None
                if fresh or code not in _BROKEN or now >= deadline or self._closed:
                    raise e from None
                stream = self._take(fresh_only=True)  # it broke while idle: once more
                with self._lock:  # abandon() reads pending.stream under this lock
                    abandoned = pending.abandoned
                    if not abandoned:
                        pending.stream = stream
                if abandoned:  # abandoned meanwhile: abandon() saw the old stream
                    self._drop(stream)
                    raise Abandoned() from None
                self._watchdog.arm(stream, deadline)
                stream.send(payload)
                continue
            self._watchdog.disarm(stream)
            stream.answered += 1
            with self._lock:
                pending.finished = True  # a later abandon() must not cancel a reused stream
                if not self._closed and not stream.expired and not stream.abandoned:
                    self._free.append(stream)
                    return out
                self._all.discard(stream)
            stream.close()  # closed pool, or cancelled by the watchdog as it answered
            return out

    def _take(self, fresh_only: bool = False) -> _Stream:
        with self._lock:
            if self._closed:
                raise StreamError(grpc.StatusCode.CANCELLED, "the client was closed")
            if self._free and not fresh_only:
                return self._free.pop()
            stream = _Stream(self._multicallable)
            self._all.add(stream)
            return stream

    def _drop(self, stream: _Stream) -> None:
        with self._lock:
            self._all.discard(stream)
        stream.close()

    def close(self) -> None:
        """Ends every stream (callers mid-call get an error)."""
        with self._lock:
            self._closed = True
            streams = list(self._all)
            self._all.clear()
            self._free.clear()
        for s in streams:
            s.close()
