"""Retry policy: exponential backoff with jitter under a total time deadline (used by storage.retry)."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from cloudbk.errors import TransientError

T = TypeVar("T")


@dataclass
class RetryPolicy:
    """Exponential backoff with jitter, bounded by a total time ``deadline`` in seconds."""

    deadline: float = 60.0
    initial_delay: float = 0.05
    max_delay: float = 5.0
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)

    def call(self, fn: Callable[[], T], what: str) -> T:
        """Run ``fn``; on ``TransientError`` wait and run it again until ``deadline`` seconds have passed."""
        start = self.clock()
        delay = self.initial_delay
        attempts = 0
        while True:
            attempts += 1
            try:
                return fn()
            except TransientError as exc:
                elapsed = self.clock() - start
                if elapsed + delay > self.deadline:
                    raise TransientError(
                        f"{what}: storage still failing after {attempts} attempts in {elapsed:.1f}s: {exc.message}",
                        key=exc.key,
                        hint="check that the storage endpoint is reachable and healthy; the retry deadline is "
                        "set by --retry-deadline / CLOUDBK_RETRY_DEADLINE",
                    ) from exc
                self.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, self.max_delay)


NO_RETRY = RetryPolicy(deadline=0.0)
