"""The push-ahead worker: archive what PostgreSQL will ask for next, so its calls find a marker and return at once.

One detached worker per (data directory, settings identity), started by a synchronous ``wal-push``
(:func:`ensure_worker`) under the rules of :mod:`cloudbk.background`. It loops:

1. Read ``pg_wal/archive_status/*.ready`` in PostgreSQL's order (``.history`` first, then oldest first) and
   hand up to ``--push-ahead`` files at once to threads, each pushed by exactly the synchronous rules
   (:func:`cloudbk.wal.push.stage_wal`: create-only, checksum in the header, identical duplicate = success,
   different content or a foreign system identifier refused). Unlike a synchronous push, which streams a file
   twice (hash, then compress and hash again), the worker reads each file into memory once and hashes that
   buffer once, at most one file per CPU at a time; the uploads themselves run ``--push-ahead`` at once.
2. List the stored files in the index with **one** compare-and-swap per batch: when nothing else is in
   flight, or at least :data:`BATCH_SECONDS` after the previous one while uploads keep finishing.
3. Only after that compare-and-swap succeeded, write one marker per file (:mod:`cloudbk.wal.marker`).
   A file whose push or index update failed gets a ``.failed`` note instead: PostgreSQL's call for it then
   pushes it synchronously and reports the error itself. It is retried after :data:`RETRY_FAILED_SECONDS`.
4. Exit after :data:`IDLE_EXIT_SECONDS` with nothing to do, and always with status 0.

It never renames ``.ready``/``.done`` files (PostgreSQL owns them) and removes its notes for files PostgreSQL
no longer has ``.ready``.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

from cloudbk import background
from cloudbk.config import Settings
from cloudbk.errors import CloudbkError, ConflictError
from cloudbk.repo.index import Index, load_index, update_index
from cloudbk.storage.base import Storage
from cloudbk.wal import marker
from cloudbk.wal.push import Staged, index_change, stage_wal

log = logging.getLogger("cloudbk.wal.ahead")

IDLE_EXIT_SECONDS = 5.0
BATCH_SECONDS = 1.0
RETRY_FAILED_SECONDS = 10.0
POLL_SECONDS = 0.02
PRUNE_SECONDS = 1.0
READY = ".ready"
# the flags a worker is given: those that choose the repository (the identity) and how it is written
WORKER_FLAGS = ("config", "repo", "server", "endpoint_url", "compression", "retry_deadline", "push_ahead")


def pg_order(names: Sequence[str]) -> list[str]:
    """PostgreSQL's archiving order: timeline history files first, then by name (oldest first)."""
    return sorted(names, key=lambda n: (not n.endswith(".history"), n))


@dataclass
class Taken:
    """A file the worker is pushing: its stat before hashing is what its marker will vouch for."""

    name: str
    file_id: str


class Worker:
    def __init__(
        self, storage: Storage, settings_repo: str, server: str, compression: str, wal_dir: str, sdir: str,
        ident: Mapping[str, str], window: int,
    ) -> None:  # fmt: skip
        self.storage, self.repo, self.server, self.compression = storage, settings_repo, server, compression
        self.wal_dir, self.sdir, self.ident, self.window = wal_dir, sdir, dict(ident), window
        self.status_dir = os.path.join(wal_dir, "archive_status")
        self.index: Index | None = None
        self.inflight: dict[Future[Staged], Taken] = {}
        self.staged: list[tuple[Staged, Taken]] = []
        self.failed_at: dict[str, float] = {}
        self.vouched: set[str] = set()  # names with a marker written, while PostgreSQL still has them .ready
        self.last_batch = 0.0
        # files held in memory at once (read once, hashed once: cloudbk.wal.push.read_whole), one per CPU
        self.buffers = threading.BoundedSemaphore(max(1, os.cpu_count() or 1))

    def _note(self, name: str, suffix: str) -> str:
        return os.path.join(self.sdir, name + suffix)

    def ready(self) -> list[str]:
        try:
            names = [e.name[: -len(READY)] for e in os.scandir(self.status_dir) if e.name.endswith(READY)]
        except FileNotFoundError:
            return []
        return pg_order(names)

    def prune(self, ready: set[str]) -> None:
        """Remove notes for files PostgreSQL no longer asks for (archived by a synchronous call, or recycled)."""
        busy = {t.name for t in self.inflight.values()} | {t.name for _, t in self.staged}
        for entry in os.scandir(self.sdir):
            name, dot, suffix = entry.name.rpartition(".")
            ours = dot and "." + suffix in (marker.OK, marker.FAILED, marker.BUSY)
            if ours and name not in ready and name not in busy:
                marker.remove(entry.path)
                self.failed_at.pop(name, None)
        self.vouched &= ready

    def take(self, pool: ThreadPoolExecutor, ready: list[str]) -> bool:
        """Start pushes for the next ready files; whether any ready file still waits for the worker."""
        now = time.monotonic()
        taken = {t.name for t in self.inflight.values()} | {t.name for _, t in self.staged}
        waiting = False
        for name in ready:
            if name in taken or name in self.vouched:
                continue
            if os.path.exists(self._note(name, marker.OK)):  # an earlier worker's marker, not yet used
                self.vouched.add(name)
                continue
            if now - self.failed_at.get(name, -RETRY_FAILED_SECONDS) < RETRY_FAILED_SECONDS:
                continue
            if len(self.inflight) >= self.window:
                waiting = True
                break
            path = os.path.join(self.wal_dir, name)
            try:
                file_id = marker.file_identity(os.stat(path))
            except FileNotFoundError:
                continue  # archived and recycled meanwhile, or a .ready without its file: not ours to wait for
            waiting = True
            marker.remove(self._note(name, marker.FAILED))
            marker.write_atomically(self._note(name, marker.BUSY), "")
            future = pool.submit(stage_wal, self.storage, self.server, path, self.compression, self.index, self.buffers)
            self.inflight[future] = Taken(name, file_id)
        return waiting

    def fail(self, name: str, message: str) -> None:
        log.error("%s: not archived ahead (PostgreSQL's next call for it pushes it itself): %s", name, message)
        marker.write_atomically(self._note(name, marker.FAILED), message + "\n")
        marker.remove(self._note(name, marker.BUSY))
        self.failed_at[name] = time.monotonic()

    def collect(self, timeout: float) -> None:
        done, _ = wait(list(self.inflight), timeout=timeout, return_when=FIRST_COMPLETED)
        for future in done:
            taken = self.inflight.pop(future)
            try:
                self.staged.append((future.result(), taken))
            except CloudbkError as exc:
                self.fail(taken.name, str(exc))
            except Exception as exc:
                log.exception("%s: unexpected error", taken.name)
                self.fail(taken.name, f"unexpected error: {exc!r}")

    def commit(self) -> None:
        """One compare-and-swap listing every staged file; then their markers."""
        batch, self.staged = self.staged, []
        self.last_batch = time.monotonic()
        try:
            self.index = update_index(self.storage, self.server, index_change([s for s, _ in batch]))
        except ConflictError:
            if len(batch) > 1:  # one file refused (another cluster's): list the others one by one
                for item in batch:
                    self.staged = [item]
                    self.commit()
                return
            self.fail(batch[0][1].name, str(sys.exc_info()[1]))
            return
        except CloudbkError as exc:
            for _, taken in batch:
                self.fail(taken.name, f"stored, but the index update failed: {exc}")
            return
        log.info("indexed %d file(s) in one update", len(batch))
        for staged, taken in batch:
            self.vouch(staged, taken)

    def vouch(self, staged: Staged, taken: Taken) -> None:
        path = os.path.join(self.wal_dir, taken.name)
        try:
            now_id = marker.file_identity(os.stat(path))
        except FileNotFoundError:
            now_id = None
        if now_id != taken.file_id:
            self.fail(taken.name, f"{path} changed while it was archived; the call for it pushes it again")
            return
        header = staged.local.segment_header
        sysid = str(header.system_identifier) if header is not None else ""
        text = marker.format_marker(
            taken.name, self.ident, self.repo, self.server, sysid, taken.file_id, staged.local.sha256
        )
        marker.write_atomically(self._note(taken.name, marker.OK), text)
        marker.remove(self._note(taken.name, marker.BUSY))
        self.vouched.add(taken.name)

    def run(self) -> None:
        try:
            self.index = load_index(self.storage, self.server)
        except CloudbkError as exc:
            log.warning("cannot read the index yet (%s); the first batch reads it again", exc)
        idle_since = last_prune = time.monotonic()
        with ThreadPoolExecutor(self.window, thread_name_prefix="push-ahead") as pool:
            while True:
                ready = self.ready()
                if time.monotonic() - last_prune >= PRUNE_SECONDS:
                    self.prune(set(ready))
                    last_prune = time.monotonic()
                waiting = self.take(pool, ready)
                if self.inflight:
                    self.collect(self._wait_time())
                else:
                    time.sleep(POLL_SECONDS)
                if self.staged and (not self.inflight or time.monotonic() - self.last_batch >= BATCH_SECONDS):
                    self.commit()
                now = time.monotonic()
                if waiting or self.inflight or self.staged:
                    idle_since = now
                elif now - idle_since >= IDLE_EXIT_SECONDS:
                    return

    def _wait_time(self) -> float:
        """How long to wait for an upload to finish: briefly while the window has room (new .ready files), else
        until one finishes or the next index update is due."""
        if len(self.inflight) < self.window:
            return POLL_SECONDS
        if self.staged:
            return max(POLL_SECONDS, self.last_batch + BATCH_SECONDS - time.monotonic())
        return BATCH_SECONDS


# -- starting and running the worker ---------------------------------------------------------------------


def ensure_worker(path: str, flags: Mapping[str, object], settings: Settings) -> bool:
    """Make sure a push-ahead worker runs for the data directory of WAL file ``path`` and these settings;
    whether this call started one.

    Called by a synchronous ``wal-push`` before it pushes. Does nothing when push-ahead is off, when ``path``
    is not in a ``pg_wal`` directory PostgreSQL archives from, or when the postmaster is PID 1 (then it warns
    once per data directory: a worker that dies by a signal would make PostgreSQL restart every session).
    """
    if settings.push_ahead <= 0:
        return False
    wal_dir = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(os.path.join(wal_dir, "archive_status")):
        return False
    ident = marker.identity(flags, settings.environ)
    sdir = marker.state_dir(wal_dir, ident)
    if not background.make_state_dir(sdir, "push-ahead", log):
        return False
    if background.off_for_pid1(os.path.dirname(wal_dir), os.path.dirname(sdir), "push-ahead", log):
        return False
    if background.is_running(sdir):
        return False
    argv = [sys.executable, "-P", "-c", "from cloudbk.wal.ahead import main; main()", wal_dir]
    argv += [f"--{k.replace('_', '-')}={flags[k]}" for k in WORKER_FLAGS if flags.get(k) is not None]
    pid = background.spawn_detached(argv, sdir, dict(settings.environ))
    log.debug("started push-ahead worker %d for %s", pid, sdir)
    return True


def _flags(words: Sequence[str]) -> dict[str, str]:
    flags: dict[str, str] = {}
    for word in words:
        option, _, value = word.partition("=")
        name = option.removeprefix("--").replace("-", "_")
        if name in WORKER_FLAGS:
            flags[name] = value
    return flags


def _claim_first(wal_dir: str, sdir: str, window: int) -> None:
    """Mark the first files busy at once: the call that started us waits for them instead of pushing one
    itself while we import the SDK (they are taken for real by the first :meth:`Worker.take`)."""
    ready = [
        e.name[: -len(READY)] for e in os.scandir(os.path.join(wal_dir, "archive_status")) if e.name.endswith(READY)
    ]
    for name in pg_order(ready)[:window]:
        if not os.path.exists(os.path.join(sdir, name + marker.OK)):
            marker.write_atomically(os.path.join(sdir, name + marker.BUSY), "")


def _serve(wal_dir: str, flags: dict[str, str]) -> None:
    from cloudbk.cli.common import open_repo
    from cloudbk.config import resolve

    ident = marker.identity(flags, os.environ)
    sdir = marker.state_dir(wal_dir, ident)
    if background.acquire(sdir) is None:
        return  # another worker has it
    settings = resolve(flags)
    _claim_first(wal_dir, sdir, max(1, settings.push_ahead))
    log.info("push-ahead worker %d started for %s (%s, server %s)", os.getpid(), wal_dir, settings.repo,
             settings.server)  # fmt: skip
    storage = open_repo(settings)
    try:
        worker = Worker(
            storage, settings.require_repo(), settings.server, settings.compression, wal_dir, sdir, ident,
            max(1, settings.push_ahead),
        )  # fmt: skip
        worker.run()
    finally:
        storage.close()
    log.info("push-ahead worker %d: idle, exiting", os.getpid())


def main() -> None:
    """The worker process (``python -c 'from cloudbk.wal.ahead import main; main()' WAL_DIR --flag=value ...``).

    Always exits 0 (:func:`cloudbk.background.run_worker`): an error is logged, and PostgreSQL's next call for the
    file pushes it itself and reports."""
    background.run_worker("push-ahead", lambda: _serve(sys.argv[1], _flags(sys.argv[2:])))
