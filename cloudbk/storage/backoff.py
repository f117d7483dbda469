"""Retry policy: exponential backoff with jitter under a total time deadline (used by storage.retry).

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
            return self._attempts(fn, what, budget)

    def _attempts(self, fn: Callable[[], T], what: str, budget: Deadline) -> T:
        delay = self.initial_delay
        attempts = 0
        start = self.clock()
        last = False
        while True:
            attempts += 1
            began = self.clock()
            try:
                return fn()
            except TransientError as exc:
                remaining = budget.remaining()
                if last or remaining < MIN_ATTEMPT:
                    raise TransientError(
                        f"{what}: storage still failing after {attempts} attempts in {self.clock() - start:.1f}s: "
                        f"{exc.message}",
                        key=exc.key,
                        hint="check that the storage endpoint is reachable and healthy; the retry deadline is "
                        "set by --retry-deadline / CLOUDBK_RETRY_DEADLINE",
                    ) from exc
                pause = delay * random.uniform(0.5, 1.0)
                share = max(self.clock() - began, MIN_ATTEMPT)  # what one more attempt may need
                if pause > remaining - share:
                    pause, last = max(0.0, remaining - share), True
                self.sleep(pause)
                delay = min(delay * 2, self.max_delay)


NO_RETRY = RetryPolicy(deadline=0.0)
