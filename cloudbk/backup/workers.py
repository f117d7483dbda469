"""The worker pool backup-push and restore share: ``jobs`` volumes in flight, the first failure stops them all.

Each item runs in its own worker thread (the work is file I/O, hashing, zstd and network, which release the
GIL). When one fails, ``cancel`` is set: items not started are dropped, and running ones stop at their next
chunk (their byte callbacks raise :class:`Cancelled`, see :func:`checked`). The error raised is the first
real one, never a cancellation it caused.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


class Cancelled(Exception):
    """Another volume of the same backup or restore failed; this one stops."""


def checked(cancel: threading.Event, on_bytes: Callable[[int], None]) -> Callable[[int], None]:
    """``on_bytes``, raising :class:`Cancelled` once ``cancel`` is set."""

    def advance(n: int) -> None:
        if cancel.is_set():
            raise Cancelled("cancelled: another volume failed")
        on_bytes(n)

    return advance


def run_parallel(work: Callable[[T], R], items: Sequence[T], jobs: int, cancel: threading.Event, name: str) -> list[R]:
    """``work(item)`` for every item, ``jobs`` at a time; the results in the order of ``items``."""

    def guarded(item: T) -> R:
        if cancel.is_set():  # an item not started when another failed
            raise Cancelled("cancelled: another volume failed")
        try:
            return work(item)
        except BaseException:
            cancel.set()  # stop the others soon: the operation has failed
            raise

    with cf.ThreadPoolExecutor(max_workers=max(1, jobs), thread_name_prefix=f"cloudbk-{name}") as pool:
        futures = [pool.submit(guarded, item) for item in items]
        try:
            return [fut.result() for fut in futures]
        except BaseException as failure:
            cancel.set()
            for fut in futures:
                fut.cancel()
            cf.wait(futures)
            if isinstance(failure, Cancelled):  # report the item that failed first, not a cancellation
                for fut in futures:
                    error = None if fut.cancelled() else fut.exception()
                    if error is not None and not isinstance(error, Cancelled):
                        raise error from None
            raise
