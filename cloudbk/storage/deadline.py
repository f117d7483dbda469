"""Operation deadlines: one time budget per storage operation, consulted by every wait inside it.

A *watch* is what the code that blocks asks before it blocks and tells after it got bytes:

- ``timeout(default)``: how long the next wait (a connect, one socket read, a backoff sleep) may last;
- ``progress(nbytes)``: bytes arrived; raises a :class:`~cloudbk.errors.TransientError` when time is up.

The current watch lives in a context variable, so the retry layer, the drivers and their response bodies
consult the same object without passing it through the SDKs. Two kinds exist:

- :class:`Deadline`, a time budget. For a *whole call* (a WAL command, :func:`whole_call`) one deadline bounds
  every storage operation of the call: connects, each socket read, each backoff sleep get at most the time
  remaining, and a response that trickles is cut when the time is up. Outside a whole call, the retry layer
  gives each operation its own deadline, bounding the time spent retrying it.
- :class:`StallWatch`, for a long stream (a base backup tar): the transfer may take hours, so the deadline
  bounds only the time spent retrying; the stream counts as *stalled* when, over ``window`` seconds spent
  waiting for it, fewer than ``floor * window`` bytes arrived, and is then aborted and re-opened at its offset
  by the retry layer. Its budget runs from the failure until the stream has shown the floor throughput again,
  and is the same budget across all resumes of the stream.

Socket timeouts alone cannot bound a trickling server (every read returns a byte before the timeout), and a
buffered ``read(n)`` blocks until ``n`` bytes arrive. So response bodies are read through :class:`WatchedBody`:
one socket read per call (``read1``), its timeout set from the watch, progress reported after it. What no
per-wait timeout can bound (response *headers* that trickle, a name lookup) is cut in the main thread by a
backstop timer (SIGALRM) set ``BACKSTOP_GRACE`` seconds after the deadline, for a whole call and for each
operation's retries; in worker threads only the per-wait timeouts apply.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from types import FrameType
from typing import Any, Protocol

from cloudbk.errors import TransientError

#: A stream is stalled when it brings fewer than STALL_FLOOR bytes per second over STALL_WINDOW seconds of
#: waiting for it. 64 KiB/s is far below any link a base backup runs over, and 30 s rides out a server's
#: pause (a garbage collection, a failover) without declaring a healthy stream dead.
STALL_FLOOR = 64 * 1024
STALL_WINDOW = 30.0
#: The shortest timeout handed to a wait: a wait of zero would mean "block forever" to some APIs.
MIN_TIMEOUT = 0.05
#: Seconds after a whole call's deadline at which the backstop timer interrupts a wait nothing else bounds.
BACKSTOP_GRACE = 1.0

_HINT = "check that the storage endpoint is reachable and healthy; the deadline is set by --retry-deadline / "
_HINT += "CLOUDBK_RETRY_DEADLINE"


class DeadlineExceeded(TransientError):
    """The operation's time budget ran out while waiting for the storage."""


class Stalled(TransientError):
    """A stream brought less than the throughput floor for the stall window; it is re-opened at its offset."""


class Watch(Protocol):
    def timeout(self, default: float) -> float:
        """Seconds the next wait may last, at most ``default``."""

    def progress(self, nbytes: int) -> None:
        """``nbytes`` arrived (0: none, a check before a wait); raise a ``TransientError`` if time is up."""


class Deadline:
    """A time budget of ``seconds`` that runs while ``running`` (a stream's budget runs only while retrying).

    A budget of 0 (``--retry-deadline 0``) never runs: one attempt, no retries, and the waits keep their
    default timeouts, rather than failing before anything was tried.
    """

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic, running: bool = True) -> None:
        self.seconds = seconds
        self.clock = clock
        self._spent = 0.0
        self._since: float | None = clock() if running and seconds > 0 else None

    @property
    def running(self) -> bool:
        return self._since is not None

    def run(self) -> None:
        if self._since is None and self.seconds > 0:
            self._since = self.clock()

    def pause(self) -> None:
        if self._since is not None:
            self._spent += self.clock() - self._since
            self._since = None

    def remaining(self) -> float:
        spent = self._spent + (self.clock() - self._since if self._since is not None else 0.0)
        return self.seconds - spent

    def timeout(self, default: float) -> float:
        if not self.running:
            return default
        return max(MIN_TIMEOUT, min(default, self.remaining()))

    def check(self, what: str | None = None) -> None:
        if self.running and self.remaining() <= 0:
            about = f" to {what}" if what else ""
            raise DeadlineExceeded(
                f"no complete answer from the storage{about} within the {self.seconds:g}s deadline", hint=_HINT
            )

    def progress(self, nbytes: int) -> None:
        self.check()


class StallWatch:
    """A stream's watch: raises :class:`Stalled` below ``floor`` bytes/s over ``window`` seconds of waiting.

    Only time spent inside reads counts (a slow consumer is not a stalled server). ``budget`` is the stream's
    retry budget: the retry layer runs it when the stream fails; it pauses once a window's worth of bytes
    (``floor * window``) has arrived.
    """

    def __init__(
        self, budget: Deadline, floor: float = STALL_FLOOR, window: float = STALL_WINDOW, key: str | None = None
    ) -> None:
        self.budget = budget
        self.floor = floor
        self.window = window
        self.key = key
        self._waited = 0.0
        self._bytes = 0
        self._mark: float | None = None

    def restart(self) -> None:
        """A fresh window (the stream is being re-opened)."""
        self._waited, self._bytes = 0.0, 0
        if self._mark is not None:
            self._mark = self.budget.clock()

    @contextmanager
    def reading(self) -> Iterator[None]:
        """Time inside the block counts as waiting for the stream."""
        self._mark = self.budget.clock()
        token = _current.set(self)
        try:
            yield
        finally:
            _current.reset(token)
            self._account()
            self._mark = None

    def _account(self) -> None:
        if self._mark is not None:
            now = self.budget.clock()
            self._waited += now - self._mark
            self._mark = now

    def timeout(self, default: float) -> float:
        return max(MIN_TIMEOUT, min(default, self.window - self._waited, self.budget.timeout(default)))

    def progress(self, nbytes: int) -> None:
        self._account()
        self._bytes += nbytes
        if self._bytes >= self.floor * self.window:
            self._waited, self._bytes = 0.0, 0
            self.budget.pause()  # healthy again: time from here on is transfer, not retrying
            return
        if self._waited >= self.window:
            raise Stalled(
                f"read of {self.key or 'a stream'} stalled: {self._bytes} bytes in {self._waited:.1f}s, below the "
                f"floor of {self.floor:g} bytes/s",
                key=self.key,
                hint="re-opened at its offset until the retry deadline; " + _HINT,
            )
        self.budget.check(f"the read of {self.key}" if self.key else None)


_current: ContextVar[Watch | None] = ContextVar("cloudbk_storage_watch", default=None)


def current() -> Watch | None:
    return _current.get()


def enclosing_deadline() -> Deadline | None:
    """The deadline of the operation (or whole call) we are inside, if any."""
    watch = _current.get()
    return watch if isinstance(watch, Deadline) else None


@contextmanager
def watching(watch: Watch) -> Iterator[None]:
    token = _current.set(watch)
    try:
        yield
    finally:
        _current.reset(token)


def request_timeout(default: float) -> float:
    """The timeout for one wait of a request: ``default``, or less when a watch says so.

    Raises the watch's error instead when its time is already up: no wait is started that could only fail.
    """
    watch = _current.get()
    if watch is None:
        return default
    watch.progress(0)
    return watch.timeout(default)


@contextmanager
def whole_call(seconds: float) -> Iterator[Deadline]:
    """Bound every storage operation inside the block by one deadline (an enclosing whole call wins)."""
    outer = enclosing_deadline()
    if outer is not None:
        yield outer
        return
    deadline = Deadline(seconds)
    with watching(deadline), backstop(deadline):
        yield deadline


@contextmanager
def backstop(deadline: Deadline) -> Iterator[None]:
    """Interrupt the main thread ``BACKSTOP_GRACE`` after the deadline: the bound for waits no timeout covers.

    Only in the main thread (signals are delivered there) and for a running deadline. A timer already set (an
    enclosing call's, or someone else's, e.g. a test runner's) is kept if it fires first, else replaced
    for the duration and restored, with its remaining time, afterwards.
    """
    usable = threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
    ours = max(deadline.remaining(), 0.0) + BACKSTOP_GRACE
    theirs, interval = signal.getitimer(signal.ITIMER_REAL) if usable else (0.0, 0.0)
    if not usable or not deadline.running or 0 < theirs <= ours:
        yield  # per-wait timeouts only, or a timer that fires first anyway
        return

    def expire(signum: int, frame: FrameType | None) -> None:
        raise DeadlineExceeded(
            f"storage call still waiting {BACKSTOP_GRACE:g}s after its {deadline.seconds:g}s deadline", hint=_HINT
        )

    started = time.monotonic()
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, ours)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if theirs > 0:  # give the other timer back what it had left
            signal.setitimer(signal.ITIMER_REAL, max(theirs - (time.monotonic() - started), 0.001), interval)


class WatchedBody:
    """A urllib3 response body read one socket read at a time, each wait bounded by the current watch.

    Wraps the ``urllib3.HTTPResponse`` an SDK streams from (botocore's ``StreamingBody``, a ``requests``
    response's ``raw``, azure-core's transport response) and stands in for it: ``read(n)`` returns what one
    socket read brings (``read1``) instead of blocking until ``n`` bytes arrived, after setting the socket's
    timeout from the watch; the watch is told of the bytes and may end the read. ``readinto`` fills its buffer
    as before, one watched socket read at a time. Other attributes pass through.
    """

    def __init__(self, raw: Any, default_timeout: float) -> None:
        self._raw = raw
        self._default = default_timeout

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)

    def _wait_limit(self) -> None:
        timeout = request_timeout(self._default)  # raises if the watch's time is already up
        connection = getattr(self._raw, "connection", None)
        sock = getattr(connection, "sock", None)
        if sock is not None:
            sock.settimeout(timeout)

    def read(self, amt: int | None = None, decode_content: bool | None = None, **kwargs: Any) -> bytes:
        if amt is None or amt < 0:
            return b"".join(iter(lambda: self.read(1024 * 1024, decode_content), b""))
        if amt == 0:
            return b""
        self._wait_limit()
        watch = _current.get()
        try:
            data = bytes(self._raw.read1(amt, decode_content=decode_content))
        except Exception:
            if watch is not None:
                watch.progress(0)  # our time is up: say so, rather than let an SDK retry the read on its own
            raise
        if watch is not None and data:
            watch.progress(len(data))
        return data

    def read1(self, amt: int | None = None, decode_content: bool | None = None) -> bytes:
        return self.read(amt if amt is not None and amt > 0 else 1024 * 1024, decode_content)

    def readinto(self, buffer: Any) -> int:
        """Fill ``buffer`` (short only at the end of the body), consulting the watch after each socket read."""
        view = memoryview(buffer).cast("B")
        filled = 0
        while filled < len(view):
            data = self.read(len(view) - filled)
            if not data:
                break
            view[filled : filled + len(data)] = data
            filled += len(data)
        return filled

    def stream(self, amt: int | None = 2**16, decode_content: bool | None = None) -> Iterator[bytes]:
        while True:
            data = self.read(amt or 2**16, decode_content)
            if not data:
                return
            yield data
