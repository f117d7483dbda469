"""The prefetcher: download what PostgreSQL's restore_command will ask for next, so its calls find it on disk.

One detached process per (data directory, settings identity), under the rules of :mod:`cloudbk.background`
(lock file with PID, idle exit, always exit 0, none when the postmaster is PID 1). Started by a
``cloudbk-wal-fetch`` call in archive recovery or standby mode (:func:`before_fetch`, or the hit path), and
by ``cloudbk restore`` while it extracts the base backup (:func:`start_for_restore`). It loops:

1. Read ``want`` (the name PostgreSQL asked for last) and list the ``--prefetch`` segments after it along the
   target timeline's history (:mod:`cloudbk.wal.prefetchpath`).
2. Download those not spooled yet, in threads, each into a temporary file: decompressed, size and SHA-256
   checked against the object's header (:func:`cloudbk.repo.objects.read_object`: the object's header must name
   the requested file, so a ``.partial`` is never taken for a full name), fsynced, vouched for, renamed to its
   name (:mod:`cloudbk.wal.spool`). At most ``--prefetch`` segments are on disk or in flight at once.
3. Stop at the first segment the archive does not have (and look again a little later); never decide "end of
   WAL", never write anything a call could read as "absent": a miss or failure here only means the call
   fetches the file itself, and its answer is the one PostgreSQL gets.
4. Remove entries PostgreSQL has moved past; remove the whole spool and exit once the server runs outside
   recovery; exit after :data:`IDLE_EXIT_SECONDS` with nothing to do.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import uuid
from collections.abc import Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from cloudbk import background
from cloudbk.config import DEFAULT_PREFETCH, Settings
from cloudbk.errors import CloudbkError, IntegrityError, NotFound
from cloudbk.localfs import fsync_dir
from cloudbk.pg.walnames import (
    DEFAULT_SEGMENT_SIZE,
    HISTORY,
    SEGMENT,
    HistoryEntry,
    history_name,
    parse_history,
    parse_wal_name,
    segment_name,
)
from cloudbk.repo import layout
from cloudbk.repo.objects import WAL, read_object
from cloudbk.storage.base import Storage
from cloudbk.wal import marker, spool
from cloudbk.wal.prefetchpath import CURRENT, LATEST, TimelinePath, ahead, target_timeline_setting, timeline_path

log = logging.getLogger("cloudbk.wal.prefetch")

IDLE_EXIT_SECONDS = 5.0
REFRESH_SECONDS = 5.0  # how often a 'latest' target looks for a newer timeline
ABSENT_RETRY_SECONDS = 2.0  # how soon a segment the archive did not have is asked for again
ERROR_RETRY_SECONDS = 3.0
POLL_SECONDS = 0.02
MAX_TIMELINE_PROBES = 16
WORKER_ONLY = ("sysid", "timeline", "segment_size", "owner", "restoring")


@dataclass
class Downloaded:
    name: str
    sha256: str
    size: int


@dataclass
class Position:
    """Where PostgreSQL is: the segment it asked for last, and the timeline it asked for it on."""

    segno: int
    timeline: int


@dataclass
class Prefetcher:
    storage: Storage
    server: str
    datadir: str
    sdir: str
    gen: dict[str, str]
    window: int
    segment_size: int
    timeline_setting: str
    restoring: bool = False
    path: TimelinePath | None = None
    path_at: float = -REFRESH_SECONDS
    inflight: dict[Future[Downloaded], str] = field(default_factory=dict)
    absent: int | None = None  # the first segment the archive did not have
    retry_at: dict[str, float] = field(default_factory=dict)
    last_position: Position | None = None

    # -- the spool on disk ----------------------------------------------------------------------------------

    def entries(self) -> set[str]:
        return {n for n in os.listdir(self.sdir) if spool.is_segment_name(n)}

    def purge(self) -> None:
        """At start (we hold the lock, so no other prefetcher runs): remove what a killed one left half done,
        and every entry that is not a vouched-for entry of the current generation."""
        for name in os.listdir(self.sdir):
            path = os.path.join(self.sdir, name)
            half_done = ".tmp" in name or name.endswith(spool.BUSY)  # ours, and notes a killed call left
            if half_done or (name.endswith(spool.OK) and not os.path.exists(path[: -len(spool.OK)])):
                marker.remove(path)
        for name in self.entries():
            fields = spool.voucher_fields(marker.read_text(os.path.join(self.sdir, name + spool.OK)))
            try:
                st = os.stat(os.path.join(self.sdir, name))
            except FileNotFoundError:
                continue
            if not spool.vouches(fields, name, self.gen, st):
                log.info("%s: removed from the spool (not a verified entry of this recovery)", name)
                spool.drop(self.sdir, name)

    def outside_recovery(self) -> bool:
        if not os.path.isdir(self.datadir):
            return True
        if self.restoring and not os.path.exists(os.path.join(self.datadir, "global", "pg_control")):
            return False  # restore still extracting: recovery.signal comes just before pg_control
        return not spool.in_recovery(self.datadir)

    def position(self) -> Position | None:
        """From ``want``; a history file or other name asked for leaves the last segment's position."""
        text = marker.read_text(os.path.join(self.sdir, spool.WANT))
        try:
            wal = parse_wal_name(text.strip()) if text else None
        except CloudbkError:
            wal = None
        if wal is not None and wal.kind == HISTORY and self.path is not None and wal.timeline > self.path.target:
            self.path_at = -REFRESH_SECONDS  # PostgreSQL looks for a newer timeline: so do we
        if wal is not None and wal.kind == SEGMENT:
            self.last_position = Position(wal.segno(self.segment_size), wal.timeline)
        return self.last_position

    # -- the timeline path ----------------------------------------------------------------------------------

    def _history(self, timeline: int) -> list[HistoryEntry]:
        name = history_name(timeline)
        chunks: list[bytes] = []
        read_object(self.storage, layout.wal_key(self.server, name), WAL, name, chunks.append)
        return parse_history(b"".join(chunks).decode("utf-8", "replace"))

    def _target(self, position: Position) -> int:
        setting = self.timeline_setting
        if setting.isdigit():
            return int(setting)
        if setting == CURRENT:
            return self.path.target if self.path is not None else position.timeline
        target = max(position.timeline, self.path.target if self.path is not None else 1)
        for _ in range(MAX_TIMELINE_PROBES):
            if not self.storage.exists(layout.wal_key(self.server, history_name(target + 1))):
                break
            target += 1
        return target

    def refresh_path(self, position: Position) -> None:
        """Learn the target timeline and its history (again, every few seconds for 'latest', or when
        PostgreSQL asks for a segment on a timeline the path does not give it)."""
        now = time.monotonic()
        stale = self.path is None or self.path.timeline_for(position.segno) != position.timeline
        due = now - self.path_at >= REFRESH_SECONDS and (self.timeline_setting == LATEST or stale)
        if not due:
            return
        self.path_at = now
        try:
            target = self._target(position)
            history = self._history(target) if target > 1 else []
        except CloudbkError as exc:
            log.warning("cannot read the timeline history yet (%s); nothing is prefetched until it can", exc)
            return
        path = timeline_path(target, history, self.segment_size)
        if path != self.path:
            spans = " -> ".join(f"{t} from segment {s:X}" for t, s in path.spans)
            log.info("following timeline %d (%s)", target, spans)
        self.path = path

    # -- downloading ----------------------------------------------------------------------------------------

    def wanted(self, position: Position) -> list[str]:
        """The next segments along the path; never past the first one the archive did not have."""
        if self.path is None:
            return []
        stop = None
        if self.absent is not None:
            if self.absent < position.segno:
                self.absent = None  # it arrived: PostgreSQL has moved past it
            else:
                stop = self.absent + 1  # asked for again after ABSENT_RETRY_SECONDS (retry_at), not beyond it
        return ahead(self.path, position.segno, self.window, self.segment_size, stop)

    def evict(self, position: Position, wanted: list[str], entries: set[str]) -> set[str]:
        keep = set(wanted) | {n for n in entries if parse_wal_name(n).segno(self.segment_size) == position.segno}
        for name in entries - keep:
            spool.drop(self.sdir, name)
        return entries & keep

    def start(self, pool: ThreadPoolExecutor, wanted: list[str], entries: set[str]) -> bool:
        """Start downloads of wanted names not spooled yet (within the window); whether it started any. A name
        that failed waits for its retry time; a full window waits for PostgreSQL: neither keeps us alive."""
        busy = set(self.inflight.values())
        now = time.monotonic()
        started = False
        for name in wanted:
            if name in entries or name in busy or now < self.retry_at.get(name, 0.0):
                continue
            if len(entries) + len(self.inflight) >= self.window:
                break
            self.inflight[pool.submit(self.download, name)] = name
            started = True
        return started

    def download(self, name: str) -> Downloaded:
        """One verified entry: see the module docstring. Nothing under ``name`` is visible before the rename."""
        entry = os.path.join(self.sdir, name)
        tmp = os.path.join(self.sdir, f".{name}{spool.TMP_INFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}")
        marker.write_atomically(entry + spool.BUSY, "")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            try:

                def write(chunk: bytes) -> None:
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view) :]

                stored = read_object(self.storage, layout.wal_key(self.server, name), WAL, name, write)
                os.fsync(fd)
            finally:
                os.close(fd)
            st = os.stat(tmp)
            voucher = spool.format_voucher(name, stored.size, stored.sha256, marker.file_identity(st), self.gen)
            marker.write_atomically(entry + spool.OK, voucher)
            os.rename(tmp, entry)
            fsync_dir(self.sdir)
        finally:
            marker.remove(tmp)
            marker.remove(entry + spool.BUSY)
        return Downloaded(name, stored.sha256, stored.size)

    def collect(self) -> int:
        """Collect finished downloads; how many entries arrived."""
        done, _ = wait(list(self.inflight), timeout=POLL_SECONDS, return_when=FIRST_COMPLETED)
        arrived = 0
        for future in done:
            name = self.inflight.pop(future)
            try:
                result = future.result()
                arrived += 1
                log.debug("%s: spooled (sha256 %s)", name, result.sha256[:16])
            except NotFound:
                segno = parse_wal_name(name).segno(self.segment_size)
                if self.absent != segno:
                    log.info("%s is not in the archive (yet): prefetching stops there", name)
                if self.absent is None or segno < self.absent:
                    self.absent = segno
                self.retry_at[name] = time.monotonic() + ABSENT_RETRY_SECONDS
            except IntegrityError as exc:
                self.retry_at[name] = time.monotonic() + 10 * ERROR_RETRY_SECONDS
                log.error("%s: not spooled: %s (PostgreSQL's call for it fetches it itself and reports)", name, exc)
            except (CloudbkError, OSError) as exc:
                self.retry_at[name] = time.monotonic() + ERROR_RETRY_SECONDS
                log.warning("%s: not spooled yet: %s", name, exc)
            except Exception as exc:
                self.retry_at[name] = time.monotonic() + ERROR_RETRY_SECONDS
                log.exception("%s: unexpected error: %r", name, exc)
        return arrived

    def run(self) -> None:
        """The loop of the module docstring. Idle means: PostgreSQL has not moved and no download has come
        in for :data:`IDLE_EXIT_SECONDS` (retries of absent or failing segments do not count)."""
        self.purge()
        idle_since = time.monotonic()
        last: Position | None = None
        with ThreadPoolExecutor(self.window, thread_name_prefix="prefetch") as pool:
            while True:
                if self.outside_recovery():
                    self.remove_spool()
                    return
                position = self.position()
                if position is not None:
                    self.refresh_path(position)
                    wanted = self.wanted(position)
                    self.start(pool, wanted, self.evict(position, wanted, self.entries()))
                if self.inflight:
                    arrived = self.collect()
                else:
                    arrived = 0
                    time.sleep(POLL_SECONDS)
                now = time.monotonic()
                if arrived or position != last:
                    idle_since, last = now, position
                if not self.inflight and now - idle_since >= IDLE_EXIT_SECONDS:
                    return

    def remove_spool(self) -> None:
        import shutil

        log.info("the server runs outside recovery: removing the prefetch spool %s", self.sdir)
        for future in list(self.inflight):
            future.cancel()
        shutil.rmtree(self.sdir, ignore_errors=True)
        try:
            os.rmdir(os.path.dirname(self.sdir))
        except OSError:
            pass


# -- starting the prefetcher -----------------------------------------------------------------------------


def before_fetch(name: str, dest: str, flags: Mapping[str, object], settings: Settings) -> str | None:
    """What a full ``wal-fetch`` call does before it fetches: serve ``name`` from the spool (its SHA-256), or make
    sure the prefetcher runs and return None. Outside recovery it removes a stale spool instead."""
    datadir = spool.data_directory(dest)
    if datadir is None:
        return None
    if not spool.in_recovery(datadir):
        spool.clean(datadir)
        return None
    if settings.prefetch <= 0:
        return None
    ident = marker.identity(flags, settings.environ)
    sdir = spool.spool_dir(datadir, ident)
    if not background.make_state_dir(sdir, "prefetch", log):
        return None
    spool.note_wanted(sdir, name)
    sha256 = spool.serve(name, dest, flags, settings.environ)
    if background.off_for_pid1(datadir, os.path.dirname(sdir), "prefetch", log):
        return sha256
    pid = spool.start_prefetcher(datadir, sdir, flags, settings.environ)
    if pid is not None:
        log.debug("started prefetcher %d for %s", pid, sdir)
    return sha256


def start_for_restore(
    dest: str, owner: tuple[int, int] | None, flags: Mapping[str, object], settings: Settings, first: str,
    timeline: int, sysid: str, segment_size: int,
) -> int | None:  # fmt: skip
    """Start filling the spool of the data directory ``restore`` is extracting into, from segment ``first`` on
    (``pg_wal`` is made now, so the spool can fill before the tar reaches it). Its PID, or None when prefetch is
    off, or PID 1 is a PostgreSQL server (it would reap the prefetcher)."""
    if settings.prefetch <= 0 or background.pid1_is_postgres():
        return None
    if os.geteuid() == 0 and owner is None:
        return None  # files for root: the server could not take the entries
    wal = parse_wal_name(first)
    before = wal.segno(segment_size) - 1
    if before < 0:
        return None
    sdir = spool.spool_dir(dest, marker.identity(flags, settings.environ))
    made = [os.path.join(dest, "pg_wal"), os.path.join(dest, "pg_wal", spool.STATE_DIR), sdir]
    for path in made:
        os.makedirs(path, mode=0o700, exist_ok=True)
    spool.note_wanted(sdir, segment_name(wal.timeline, before, segment_size))
    extra = [f"--sysid={sysid}", f"--timeline={timeline}", f"--segment-size={segment_size}", "--restoring=1"]
    if owner is not None and os.geteuid() == 0:
        for path in [*made, os.path.join(sdir, spool.WANT)]:
            os.chown(path, *owner)
        log_file = os.path.join(sdir, background.LOG_FILE)
        open(log_file, "a").close()
        os.chown(log_file, *owner)
        extra.append(f"--owner={owner[0]}:{owner[1]}")
    return spool.start_prefetcher(dest, sdir, flags, settings.environ, tuple(extra))


def _flags(words: list[str]) -> dict[str, str]:
    known = (*spool.WORKER_FLAGS, *WORKER_ONLY)
    flags: dict[str, str] = {}
    for word in words:
        option, _, value = word.partition("=")
        name = option.removeprefix("--").replace("-", "_")
        if name in known:
            flags[name] = value
    return flags


def _serve(datadir: str, flags: dict[str, str]) -> None:
    from cloudbk.cli.common import open_repo
    from cloudbk.config import resolve

    if flags.get("owner") and os.geteuid() == 0:
        uid, gid = (int(v) for v in flags["owner"].split(":"))
        os.setgid(gid)
        os.setuid(uid)
    identity_flags = {k: v for k, v in flags.items() if k not in WORKER_ONLY}
    ident = marker.identity(identity_flags, os.environ)
    sdir = spool.spool_dir(datadir, ident)
    if background.acquire(sdir) is None:
        return  # another prefetcher has it
    gen = spool.generation(datadir, ident, flags.get("sysid"))
    if gen is None:
        log.warning("no system identifier in %s/global/pg_control: nothing is prefetched", datadir)
        return
    settings = resolve(identity_flags)
    storage = open_repo(settings)
    try:
        segment_size = int(flags.get("segment_size") or 0) or _segment_size(storage, settings.server)
        timeline = flags.get("timeline") or target_timeline_setting(datadir)
        log.info("prefetcher %d started for %s (server %s, %d segments ahead, timeline %s)", os.getpid(), datadir,
                 settings.server, settings.prefetch or DEFAULT_PREFETCH, timeline)  # fmt: skip
        worker = Prefetcher(
            storage, settings.server, datadir, sdir, gen, max(1, settings.prefetch), segment_size, timeline,
            restoring=bool(flags.get("restoring")),
        )  # fmt: skip
        worker.run()
    finally:
        storage.close()
    log.info("prefetcher %d: idle, exiting", os.getpid())


def _segment_size(storage: Storage, server: str) -> int:
    from cloudbk.repo.index import load_index

    try:
        return load_index(storage, server).wal_segment_size or DEFAULT_SEGMENT_SIZE
    except CloudbkError:
        return DEFAULT_SEGMENT_SIZE


def main() -> None:
    """The prefetcher process (``python -c 'from cloudbk.wal.prefetch import main; main()' DATADIR --flag=...``).

    Always exits 0 (:func:`cloudbk.background.run_worker`): PostgreSQL's calls fetch for themselves."""
    background.run_worker("prefetch", lambda: _serve(sys.argv[1], _flags(sys.argv[2:])))
