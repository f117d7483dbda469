"""Retry policy: exponential backoff with jitter under a total time deadline: the one retry mechanism.

The storage retry layer (:mod:`cloudbk.storage.retry`) retries transient errors with :meth:`RetryPolicy.call`;
the index's compare-and-swap retries lost races with :meth:`RetryPolicy.retry`, and a backup waits for its WAL
with :meth:`RetryPolicy.poll`, with the same backoff and the same last-attempt rule.

Every attempt runs under a :class:`~cloudbk.storage.deadline.Deadline`: the enclosing one (a whole call, or a
stream's retry budget) when there is one, else one of ``deadline`` seconds for this operation. The drivers
read it through the context (:func:`cloudbk.storage.deadline.request_timeout`), so no wait of an attempt
outlasts it. When the next backoff would overrun the deadline, the policy sleeps only what leaves one last
attempt as long as the previous one took (its fair share) and makes that attempt, instead of giving up early.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TypeVar

from cloudbk.errors import TransientError
from cloudbk.storage.deadline import (
    STALL_FLOOR,
    STALL_WINDOW,
    Deadline,
    Watch,
    backstop,
    enclosing_deadline,
    watching,
)

T = TypeVar("T")
E = TypeVar("E", bound=Exception)

#: The least time worth making an attempt in: below it, the policy gives up rather than try once more.
MIN_ATTEMPT = 0.1


@dataclass
class RetryPolicy:
    """Exponential backoff with jitter, bounded by a total time ``deadline`` in seconds."""

    deadline: float = 60.0
    initial_delay: float = 0.05
    max_delay: float = 5.0
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)
    #: stall detection of streamed reads (see cloudbk.storage.deadline); tests shorten the window
    stall_floor: float = STALL_FLOOR
    stall_window: float = STALL_WINDOW

    def new_deadline(self, running: bool = True) -> Deadline:
        return Deadline(self.deadline, clock=self.clock, running=running)

    def call(
        self,
        fn: Callable[[], T],
        what: str,
        deadline: Deadline | None = None,
        watch: Watch | None = None,
        transfer: bool = False,
    ) -> T:
        """Run ``fn``; on ``TransientError`` wait and run it again until the deadline has passed.

        The deadline is ``deadline``, else the enclosing one, else a new one of ``self.deadline`` seconds. The
        attempts run under ``watch`` (a stream's stall watch, which consults the deadline), else the deadline.
        A ``transfer`` (uploading a part's bytes) is not cut by the backstop timer: over a slow link an attempt
        may outlast the deadline, which bounds the time spent retrying it (a whole call's backstop still holds).
        """
        budget = deadline or enclosing_deadline()
        if budget is None:
            if self.deadline <= 0:
                return fn()  # no retries, and no deadline to impose on the driver's timeouts
            budget = self.new_deadline()
        with watching(watch or budget), backstop(budget) if not transfer else nullcontext():
            return self._attempts(fn, budget, (TransientError,), _still_failing(what))

    def retry(
        self,
        fn: Callable[[], T],
        retry_on: tuple[type[E], ...],
        give_up: Callable[[E, int, float], Exception],
    ) -> T:
        """Run ``fn`` again while it raises one of ``retry_on`` (a lost compare-and-swap race), with the same
        backoff, until the deadline: the enclosing one (a whole call), else ``self.deadline`` seconds.

        Then ``give_up(last error, attempts, seconds)`` is raised, chained to the last error. Unlike
        :meth:`call` this sets no watch: the storage operations inside ``fn`` keep their own deadlines.
        """
        return self._attempts(fn, enclosing_deadline() or self.new_deadline(), retry_on, give_up)

    def poll(self, ready: Callable[[], bool], give_up: Callable[[int, float], Exception]) -> None:
        """Call ``ready`` with backoff until it returns True; at the deadline raise ``give_up(attempts, seconds)``."""

        def attempt() -> None:
            if not ready():
                raise _NotReady

        self.retry(attempt, (_NotReady,), lambda exc, attempts, seconds: give_up(attempts, seconds))

    def _attempts(
        self,
        fn: Callable[[], T],
        budget: Deadline,
        retry_on: tuple[type[E], ...],
        give_up: Callable[[E, int, float], Exception],
    ) -> T:
        delay = self.initial_delay
        attempts = 0
        start = self.clock()
        last = False
        while True:
            attempts += 1
            began = self.clock()
            try:
                return fn()
            except retry_on as exc:
                remaining = budget.remaining()
                if last or remaining < MIN_ATTEMPT:
                    raise give_up(exc, attempts, self.clock() - start) from exc
                pause = delay * random.uniform(0.5, 1.0)
                share = max(self.clock() - began, MIN_ATTEMPT)  # what one more attempt may need
                if pause > remaining - share:
                    pause, last = max(0.0, remaining - share), True
                self.sleep(pause)
                delay = min(delay * 2, self.max_delay)


class _NotReady(Exception):
    """A polled condition is not met yet (internal to :meth:`RetryPolicy.poll`)."""


def _still_failing(what: str) -> Callable[[TransientError, int, float], Exception]:
    def give_up(exc: TransientError, attempts: int, seconds: float) -> Exception:
        return TransientError(
            f"{what}: storage still failing after {attempts} attempts in {seconds:.1f}s: {exc.message}",
            key=exc.key,
            hint="check that the storage endpoint is reachable and healthy; the retry deadline is set by "
            "--retry-deadline / CLOUDBK_RETRY_DEADLINE",
        )

    return give_up


NO_RETRY = RetryPolicy(deadline=0.0)
