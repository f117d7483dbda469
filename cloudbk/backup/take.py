"""The ``backup-push`` use case: a non-exclusive base backup streamed to the repository.

Order of writes (data first, index after, manifest last — readers go the other way):
1. ``pg_backup_start``; one tar stream per tablespace (worker threads) and one for PGDATA (this thread),
   each read straight from disk -> tar -> compressor -> multipart upload, create-only;
2. ``global/pg_control`` read last, then ``pg_backup_stop``; its ``backup_label`` and ``tablespace_map``
   and then pg_control end the PGDATA tar (a tar cut short has no pg_control, so it cannot start a server);
3. wait, bounded, until the WAL from the begin to the end segment is in the archive (SPEC §3 rule 4);
   all along, a heartbeat object claims the backup's uploads (:mod:`cloudbk.repo.inflight`), so retention aborts
   only those of a backup-push that died;
4. the manifest, create-only: from here on the backup exists;
5. the index entry, by compare-and-swap.
If anything fails before step 4 the objects written so far are deleted (best effort; they are invisible
without a manifest anyway) and closing the session aborts the backup on the server.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

from cloudbk import __version__
from cloudbk.backup.tarstream import PipeSink, TarWriter
from cloudbk.errors import AlreadyExists, CloudbkError, ConflictError, OperationFailed, UsageError
from cloudbk.pg.conn import BackupStop, parse_backup_label, pg_control_system_identifier
from cloudbk.pg.datadir import (
    BACKUP_LABEL,
    PG_CONTROL,
    TABLESPACE_MAP,
    Entry,
    Tablespace,
    scan_data_directory,
    scan_tablespace,
)
from cloudbk.pg.walnames import lsn_segno, segment_name
from cloudbk.progress import NoProgress, Progress
from cloudbk.repo import layout
from cloudbk.repo.index import Index, load_index, update_index
from cloudbk.repo.inflight import Heartbeat
from cloudbk.repo.manifest import BASE_TAR, FileEntry, LinkEntry, Manifest, TarEntry, format_time
from cloudbk.repo.objects import TAR, create_object
from cloudbk.storage.backoff import RetryPolicy
from cloudbk.storage.base import CREATE_ONLY, Storage

log = logging.getLogger("cloudbk.backup")

DEFAULT_WAL_WAIT = 300.0  # seconds to wait for the end segment to reach the archive
EXTENSIONS = {"zstd": ".zst", "lz4": ".lz4", "gzip": ".gz", "none": ""}


class BackupSource(Protocol):
    """What a backup needs from the server (implemented by :class:`cloudbk.pg.conn.PgConnection`)."""

    version: int

    def system_identifier(self) -> str: ...
    def setting(self, name: str) -> str: ...
    def in_recovery(self) -> bool: ...
    def clock(self) -> datetime: ...
    def next_xid(self) -> int: ...
    def tablespaces(self) -> list[Tablespace]: ...
    def backup_start(self, label: str, fast: bool = True) -> int: ...
    def backup_stop(self) -> BackupStop: ...
    def archiver_status(self) -> str: ...


@dataclass
class BackupOptions:
    pgdata: str
    compression: str = "zstd"
    fast_checkpoint: bool = True
    wal_wait: float = DEFAULT_WAL_WAIT
    compress_threads: int = field(default_factory=lambda: os.cpu_count() or 1)


def new_backup_id(storage: Storage, server: str, now: datetime | None = None) -> str:
    """A time-sortable id, unused in the repository. Ids are names, never an order: see BackupSummary."""
    base = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    for n in range(1, 1000):
        candidate = base if n == 1 else f"{base}-{n}"
        if next(iter(storage.list(layout.backup_prefix(server, candidate))), None) is None:
            return candidate
    raise OperationFailed(f"no free backup id for {base}")  # pragma: no cover - 999 backups in one second


class _Cancelled(Exception):
    """Another stream of the same backup failed; this one stops."""


class _Counter:
    """Thread-safe byte counter feeding the progress reporter; also where streams notice a cancellation."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._lock = threading.Lock()
        self.total = 0
        self.cancel = threading.Event()

    def __call__(self, n: int) -> None:
        if self.cancel.is_set():
            raise _Cancelled("backup cancelled")
        with self._lock:
            self.total += n
        self._progress.advance(n)


class _TarUpload:
    """One tar stream being written: envelope header, then tar -> compressor -> object writer."""

    def __init__(
        self, storage: Storage, key: str, name: str, compression: str, threads: int, on_bytes: _Counter
    ) -> None:
        self.name = name
        self.key = key
        self.sink = create_object(storage, key, TAR, name, compression, threads=threads)
        # files are read and hashed in this thread; the stream is hashed, compressed and uploaded in another
        self.pipe = PipeSink(self.sink)
        self.tar = TarWriter(self.pipe, on_bytes)
        self.files: list[tuple[str, int, str]] = []
        self.links: list[LinkEntry] = []
        self.shrunk = 0

    def add(self, entry: Entry) -> None:
        if entry.target:  # a symbolic link, followed: recorded in the manifest, its content stored in its place
            kind = {"d": LinkEntry.DIR, "f": LinkEntry.FILE}.get(entry.kind, LinkEntry.DANGLING)
            self.links.append(LinkEntry(entry.rel, entry.target, kind))
        if entry.kind == "d":
            self.tar.add_dir(entry.rel, entry.mode, entry.mtime)
        elif entry.kind == "f":
            self.add_file(entry.rel, entry.path)

    def add_file(self, rel: str, path: str) -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            log.debug("%s vanished during the backup; WAL replay recreates it if it is needed", path)
            return
        except OSError as exc:
            raise OperationFailed(f"cannot read {path}: {exc.strerror}", key=path) from exc
        try:
            st = os.fstat(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            try:
                entry, short = self.tar.add_file(rel, fd, st.st_size, st.st_mode, st.st_mtime)
            except OSError as exc:
                raise OperationFailed(f"cannot read {path}: {exc.strerror}", key=path) from exc
        finally:
            os.close(fd)
        if short:
            self.shrunk += 1
            log.debug("%s shrank by %d bytes while it was copied; padded with zeros", path, short)
        self.files.append((entry.path, entry.size, entry.sha256))

    def add_bytes(self, rel: str, data: bytes) -> None:
        entry = self.tar.add_bytes(rel, data)
        self.files.append((entry.path, entry.size, entry.sha256))

    def finish(self, tablespace_oid: int | None) -> TarEntry:
        self.tar.close()
        self.pipe.close()
        stored = self.sink.commit()
        return TarEntry(
            name=self.name,
            tablespace_oid=tablespace_oid,
            size=stored.size,
            sha256=stored.sha256,
            stored_size=stored.stored_size,
            files=[FileEntry(p, s, h) for p, s, h in self.files],
            links=self.links,
        )

    def abort(self) -> None:
        self.pipe.abort()
        self.sink.abort()


def _stream_entries(upload: _TarUpload, entries: list[Entry]) -> None:
    for entry in entries:
        upload.add(entry)


def _check_pgdata(pgdata: str, system_identifier: str) -> None:
    control = os.path.join(pgdata, PG_CONTROL)
    if not os.path.isfile(os.path.join(pgdata, "PG_VERSION")) or not os.path.isfile(control):
        raise UsageError(
            f"{pgdata} is not a PostgreSQL data directory (no PG_VERSION or global/pg_control)",
            key=pgdata,
            hint="pass --pgdata (or PGDATA) naming the data directory of the server cloudbk connects to",
        )
    try:
        on_disk = pg_control_system_identifier(control)
    except PermissionError as exc:
        raise UsageError(
            f"cannot read {control}: permission denied", key=control, hint="run backup-push as the server's OS user"
        ) from exc
    if on_disk != system_identifier:
        raise UsageError(
            f"{pgdata} belongs to database system {on_disk}, "
            f"but the server cloudbk connected to is {system_identifier}",
            key=pgdata,
            hint="--pgdata and --dbname must name the same cluster",
        )


def wait_for_wal(
    storage: Storage,
    server: str,
    timeline: int,
    first: int,
    last: int,
    segment_size: int,
    timeout: float,
    diagnose: Callable[[], str] = lambda: "",
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Wait until segments ``first..last`` of ``timeline`` are archived: the index first, then a ``stat`` of
    the exact keys the index does not list yet (an index update may lag behind the object)."""
    missing = list(range(first, last + 1))

    def archived() -> bool:
        index = load_index(storage, server)
        missing[:] = [s for s in missing if not index.has_segment(timeline, s)]
        while missing and storage.exists(layout.wal_key(server, segment_name(timeline, missing[0], segment_size))):
            missing.pop(0)
        return not missing

    def give_up(attempts: int, seconds: float) -> Exception:
        name = segment_name(timeline, missing[0], segment_size)
        status = diagnose()
        return OperationFailed(
            f"WAL segment {name} was not archived within {timeout:.0f}s after the backup ended; "
            f"the backup is not complete" + (f" ({status})" if status else ""),
            key=layout.wal_key(server, name),
            hint="check archive_command (it must run cloudbk-wal-push with this --repo/--server) and the "
            "server log; pg_stat_archiver shows the last failure. --wal-wait sets how long to wait",
        )

    RetryPolicy(deadline=timeout, initial_delay=0.1, max_delay=2.0, sleep=sleep, clock=clock).poll(archived, give_up)


@dataclass(frozen=True)
class _Cluster:
    """What the preflight learned about the server, checked against the data directory and the repository."""

    pgdata: str
    system_identifier: str
    segment_size: int
    tablespaces: list[Tablespace]


def _preflight(storage: Storage, server: str, source: BackupSource, options: BackupOptions) -> _Cluster:
    """Refuse a backup that could not be restored or that belongs to another cluster, before anything is written."""
    pgdata = os.path.abspath(options.pgdata)
    system_identifier = source.system_identifier()
    _check_pgdata(pgdata, system_identifier)
    if source.setting("archive_mode") == "off":
        raise UsageError(
            "archive_mode is off: a base backup is only restorable with the WAL written during it",
            hint="set archive_mode = on and archive_command = 'cloudbk-wal-push %p' (with the repository "
            "settings) in postgresql.conf and restart the server",
        )
    if source.in_recovery():
        raise UsageError("the server is a standby; cloudbk takes base backups from the primary only")
    index = load_index(storage, server)
    if index.system_identifier not in (None, system_identifier):
        raise ConflictError(
            f"server {server!r} in the repository holds database system {index.system_identifier}, "
            f"not {system_identifier}",
            key=layout.index_key(server),
            hint="use another --server name for this cluster",
        )
    segment_size = int(source.setting("wal_segment_size"))
    tablespaces = source.tablespaces()
    for ts in tablespaces:
        if not os.path.isdir(ts.location):
            raise OperationFailed(f"tablespace {ts.name} directory {ts.location} is not readable here", key=ts.location)
    return _Cluster(pgdata, system_identifier, segment_size, tablespaces)


def _open_uploads(
    storage: Storage, server: str, backup_id: str, options: BackupOptions, oids: list[int], counter: _Counter,
    uploads: list[_TarUpload],
) -> None:  # fmt: skip
    """Open the PGDATA stream, then one per tablespace (``oids``), appending each to ``uploads`` as it opens."""
    ext = EXTENSIONS[options.compression]
    threads = max(1, options.compress_threads // (1 + len(oids)))
    for name in [f"{BASE_TAR}.tar{ext}", *(f"{oid}.tar{ext}" for oid in oids)]:
        key = layout.backup_object_key(server, backup_id, name)
        uploads.append(_TarUpload(storage, key, name, options.compression, threads, counter))


def _copy_files(
    pgdata: str, base: _TarUpload, base_entries: list[Entry], ts_uploads: dict[int, _TarUpload],
    ts_entries: dict[int, list[Entry]], cancel: threading.Event,
) -> tuple[bytes, dict[int, TarEntry]]:  # fmt: skip
    """Stream the tablespaces in worker threads and PGDATA here; return pg_control (read last) and the
    finished tablespace tars. The first stream to fail cancels the others, and its error is the one raised."""

    def stream_tablespace(oid: int) -> TarEntry:
        try:
            _stream_entries(ts_uploads[oid], ts_entries[oid])
            return ts_uploads[oid].finish(oid)
        except BaseException:
            cancel.set()  # stop the other streams soon: the backup has failed
            raise

    with cf.ThreadPoolExecutor(max_workers=max(1, len(ts_uploads)), thread_name_prefix="cloudbk-tblspc") as pool:
        futures = {oid: pool.submit(stream_tablespace, oid) for oid in ts_uploads}
        try:
            _stream_entries(base, base_entries)
            with open(os.path.join(pgdata, PG_CONTROL), "rb") as f:
                pg_control = f.read()
            return pg_control, {oid: fut.result() for oid, fut in futures.items()}
        except _Cancelled:
            cf.wait(futures.values())
            for fut in futures.values():  # report the stream that failed first, not the cancellation
                error = fut.exception()
                if error is not None and not isinstance(error, _Cancelled):
                    raise error from None
            raise
        except BaseException:
            cancel.set()
            raise


@dataclass(frozen=True)
class _WalRange:
    timeline: int
    begin_wal: str
    end_wal: str
    begin_seg: int
    end_seg: int
    label: dict[str, str]


def _wal_range(stop: BackupStop, begin_lsn: int, segment_size: int) -> _WalRange:
    """The timeline and the WAL segments the backup needs, from the backup_label pg_backup_stop returned."""
    label = parse_backup_label(stop.backup_label)
    try:
        begin_wal = label["START WAL LOCATION"].split("file ")[1].rstrip(")")
        timeline = int(label["START TIMELINE"])
    except (KeyError, IndexError, ValueError) as exc:
        raise OperationFailed(f"PostgreSQL returned a backup_label cloudbk cannot read: {exc!r}") from exc
    # the stop point ends the backup-end record: its segment is the one before it when it sits on a boundary
    end_seg = lsn_segno(stop.lsn - 1, segment_size)
    end_wal = segment_name(timeline, end_seg, segment_size)
    return _WalRange(timeline, begin_wal, end_wal, lsn_segno(begin_lsn, segment_size), end_seg, label)


def _write_manifest(storage: Storage, server: str, manifest: Manifest) -> None:
    """Store the manifest, create-only: from here on the backup exists."""
    key = layout.backup_manifest_key(server, manifest.id)
    try:
        storage.put_bytes(key, manifest.to_json(), CREATE_ONLY)
    except AlreadyExists as exc:
        raise ConflictError(
            f"backup {manifest.id} already has a manifest: another backup-push used the same id", key=key
        ) from exc


def _index_backup(storage: Storage, server: str, manifest: Manifest) -> None:
    """Add the stored backup to the index (compare-and-swap)."""
    summary = manifest.summary()

    def add(idx: Index) -> bool:
        if idx.system_identifier is None:
            idx.system_identifier = manifest.system_identifier
        if idx.wal_segment_size is None:
            idx.wal_segment_size = manifest.wal_segment_size
        if idx.backups.get(manifest.id) == summary:
            return False
        idx.backups[manifest.id] = summary
        return True

    try:
        update_index(storage, server, add)
    except CloudbkError as exc:
        raise OperationFailed(
            f"backup {manifest.id} is stored but the index could not be updated: {exc.message}",
            key=layout.index_key(server),
            hint="run `cloudbk reindex` to add it",
        ) from exc


def take_backup(
    storage: Storage, server: str, source: BackupSource, options: BackupOptions, progress: Progress | None = None
) -> Manifest:
    """Take one base backup; return its manifest (already stored and indexed). The steps are the module's."""
    progress = progress or NoProgress()
    cluster = _preflight(storage, server, source, options)
    tablespaces = cluster.tablespaces
    backup_id = new_backup_id(storage, server)
    uploads: list[_TarUpload] = []
    manifest_written = False
    heartbeat = Heartbeat(storage, server, backup_id)  # claims the uploads below until the backup ends
    heartbeat.start()
    try:
        begin_lsn = source.backup_start(f"cloudbk {backup_id}", options.fast_checkpoint)
        begin_time = source.clock()
        log.info("backup %s started at %s", backup_id, f"{begin_lsn >> 32:X}/{begin_lsn & 0xFFFFFFFF:X}")

        base_entries = scan_data_directory(cluster.pgdata)
        major = source.version // 10000
        ts_entries = {ts.oid: scan_tablespace(ts.location, f"PG_{major}_") for ts in tablespaces}
        total = sum(e.size for e in base_entries) + sum(e.size for es in ts_entries.values() for e in es)
        progress.start(f"backup {backup_id}", total)
        counter = _Counter(progress)
        _open_uploads(storage, server, backup_id, options, [ts.oid for ts in tablespaces], counter, uploads)
        base, ts_uploads = uploads[0], {ts.oid: up for ts, up in zip(tablespaces, uploads[1:], strict=True)}
        pg_control, ts_tars = _copy_files(cluster.pgdata, base, base_entries, ts_uploads, ts_entries, counter.cancel)

        stop = source.backup_stop()
        end_time = source.clock()
        next_xid = source.next_xid()
        base.add_bytes(BACKUP_LABEL, stop.backup_label.encode())
        if stop.tablespace_map:
            base.add_bytes(TABLESPACE_MAP, stop.tablespace_map.encode())
        base.add_bytes(PG_CONTROL, pg_control)
        base_tar = base.finish(None)
        progress.finish()

        wal = _wal_range(stop, begin_lsn, cluster.segment_size)
        shrunk = sum(u.shrunk for u in uploads)
        if shrunk:
            log.info("%d files shrank while they were copied (normal under load; WAL replay repairs them)", shrunk)
        progress.note(f"waiting for WAL {wal.begin_wal} .. {wal.end_wal} to be archived")
        wait_for_wal(storage, server, wal.timeline, wal.begin_seg, wal.end_seg, cluster.segment_size,
                     options.wal_wait, source.archiver_status)  # fmt: skip

        manifest = Manifest(
            id=backup_id, server=server, system_identifier=cluster.system_identifier, pg_version=source.version,
            timeline=wal.timeline, begin_lsn=begin_lsn, end_lsn=stop.lsn, begin_wal=wal.begin_wal,
            end_wal=wal.end_wal, begin_time=format_time(begin_time), end_time=format_time(end_time),
            wal_segment_size=cluster.segment_size, compression=options.compression, tablespaces=tablespaces,
            tars=[base_tar, *(ts_tars[ts.oid] for ts in tablespaces)], next_xid=next_xid,
            label=wal.label.get("LABEL", ""), pgdata=cluster.pgdata, hostname=socket.gethostname(),
            tool=f"cloudbk {__version__}",
        )  # fmt: skip
        progress.note("writing the manifest")
        _write_manifest(storage, server, manifest)
        manifest_written = True
    except BaseException:
        heartbeat.stop()  # first, so it is not written again after the discard
        for up in uploads:
            up.abort()
        if not manifest_written:
            _discard(storage, server, backup_id)
        raise
    heartbeat.stop()
    _index_backup(storage, server, manifest)
    return manifest


def _discard(storage: Storage, server: str, backup_id: str) -> None:
    try:
        keys = [info.key for info in storage.list(layout.backup_prefix(server, backup_id))]
        storage.delete_many(keys)
    except Exception as exc:
        log.warning("could not remove the objects of the failed backup %s: %s", backup_id, exc)
