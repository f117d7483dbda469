"""What every command shares: opening the repository with the command's retry deadline, SIGTERM handling,
and the wrapper that turns an unexpected exception into an error naming what was being done."""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from cloudbk.config import WAL_RETRY_DEADLINE, Settings
from cloudbk.errors import CloudbkError, Terminated
from cloudbk.storage.base import Storage

log = logging.getLogger("cloudbk")

#: commands that run for minutes (backup-push, restore, reindex) ride out a few minutes of storage trouble
LONG_RETRY_DEADLINE = 300.0


def open_repo(settings: Settings, deadline: float = WAL_RETRY_DEADLINE) -> Storage:
    """The configured repository; ``deadline`` is the retry deadline unless ``--retry-deadline`` sets one."""
    from cloudbk.storage.registry import open_storage

    return open_storage(settings.require_repo(), settings.storage_options(deadline))


@contextmanager
def terminate_on_sigterm() -> Iterator[None]:
    """Within the block SIGTERM raises :class:`Terminated`; ``cli.main`` then dies of SIGTERM itself.

    PostgreSQL tells a restore_command killed by SIGTERM (a fast shutdown) from one that failed, so after
    cleaning up the process must still end *by the signal*, not with an exit code.
    """

    def handler(signum: int, frame: FrameType | None) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def unexpected_errors(action: str, subject: str) -> Iterator[None]:
    """Let cloudbk's own errors through; raise any other exception as a :class:`CloudbkError` saying
    ``unexpected error while <action> <subject>`` (the traceback goes to the debug log)."""
    try:
        yield
    except CloudbkError:
        raise
    except Exception as exc:
        log.debug("unexpected error", exc_info=True)
        raise CloudbkError(f"unexpected error while {action} {subject}: {exc!r}", key=subject) from exc
