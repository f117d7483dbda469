"""The ``backup-push`` use case: a non-exclusive base backup streamed to the repository.

Order of writes (data first, index after, manifest last — readers go the other way):
1. ``pg_backup_start``; one tar stream per tablespace and one for PGDATA, each cut into volumes
   (:mod:`cloudbk.backup.volumes`), ``jobs`` of them at a time each read straight from disk -> tar ->
   compressor -> multipart upload, create-only, by its own worker thread;
2. ``global/pg_control`` read last, then ``pg_backup_stop``; its ``backup_label`` and ``tablespace_map``
   and then pg_control make the last volume of PGDATA (a backup cut short has no pg_control, so it cannot
   start a server);
3. wait, bounded, until the WAL from the begin to the end segment is in the archive (SPEC §3 rule 4);
   all along, a heartbeat object claims the backup's uploads (:mod:`cloudbk.repo.inflight`), so retention aborts
   only those of a backup-push that died;
4. the manifest, create-only: from here on the backup exists;
5. the index entry, by compare-and-swap.
If anything fails before step 4 the objects written so far are deleted (best effort; they are invisible
without a manifest anyway) and closing the session aborts the backup on the server.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from cloudbk import __version__
from cloudbk.backup.volumes import (
    DEFAULT_JOBS,
    DEFAULT_VOLUME_SIZE,
    Counter,
    VolumeJob,
    VolumePlan,
    VolumeWriter,
    plan_stream,
    stream_links,
    write_volumes,
)
from cloudbk.errors import AlreadyExists, CloudbkError, ConflictError, OperationFailed, UsageError
from cloudbk.pg.conn import BackupStop, parse_backup_label, pg_control_system_identifier
from cloudbk.pg.datadir import (
    BACKUP_LABEL,
    PG_CONTROL,
    TABLESPACE_MAP,
    Tablespace,
    scan_data_directory,
    scan_tablespace,
)
from cloudbk.pg.walnames import lsn_segno, segment_name
from cloudbk.progress import NoProgress, Progress
from cloudbk.repo import layout
from cloudbk.repo.index import Index, load_index, update_index
from cloudbk.repo.inflight import Heartbeat
from cloudbk.repo.manifest import BASE_TAR, LinkEntry, Manifest, TarEntry, VolumeEntry, format_time
from cloudbk.storage.backoff import RetryPolicy
from cloudbk.storage.base import CREATE_ONLY, Storage

log = logging.getLogger("cloudbk.backup")

DEFAULT_WAL_WAIT = 300.0  # seconds to wait for the end segment to reach the archive


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
    #: extra zstd worker threads per volume; 0 compresses each volume in its own pipe thread. zstd's threaded
    #: mode buffers whole jobs (measured: 150-180 MiB peak RSS with 1 thread per volume against 69 MiB without)
    compress_threads: int = 0
    jobs: int = DEFAULT_JOBS  # volumes written at once
    volume_size: int = DEFAULT_VOLUME_SIZE  # bytes of file content per volume


def new_backup_id(storage: Storage, server: str, now: datetime | None = None) -> str:
    """A time-sortable id, unused in the repository. Ids are names, never an order: see BackupSummary."""
    base = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    for n in range(1, 1000):
        candidate = base if n == 1 else f"{base}-{n}"
        if next(iter(storage.list(layout.backup_prefix(server, candidate))), None) is None:
            return candidate
    raise OperationFailed(f"no free backup id for {base}")  # pragma: no cover - 999 backups in one second


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


_Links = dict[str, list[LinkEntry]]  # stream name -> the links its scan followed


def _plan(cluster: _Cluster, options: BackupOptions, major: int) -> tuple[list[VolumePlan], _Links, int]:
    """Scan PGDATA and the tablespaces; return their volumes, the links each stream followed, and the bytes."""
    streams = {BASE_TAR: scan_data_directory(cluster.pgdata)}
    streams.update({str(ts.oid): scan_tablespace(ts.location, f"PG_{major}_") for ts in cluster.tablespaces})
    plans = [plan for name, entries in streams.items() for plan in plan_stream(name, entries, options.volume_size)]
    total = sum(e.size for entries in streams.values() for e in entries)
    return plans, {name: stream_links(entries) for name, entries in streams.items()}, total


def _tars(cluster: _Cluster, done: dict[tuple[str, int], VolumeEntry], links: _Links) -> list[TarEntry]:
    """The manifest's streams: PGDATA, then each tablespace, each with its volumes in order."""
    streams = [(BASE_TAR, None), *((str(ts.oid), ts.oid) for ts in cluster.tablespaces)]
    return [
        TarEntry(name, oid, [v for (stream, _), v in sorted(done.items()) if stream == name], links[name])
        for name, oid in streams
    ]


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
    backup_id = new_backup_id(storage, server)
    last: VolumeWriter | None = None
    manifest_written = False
    heartbeat = Heartbeat(storage, server, backup_id)  # claims the uploads below until the backup ends
    heartbeat.start()
    try:
        begin_lsn = source.backup_start(f"cloudbk {backup_id}", options.fast_checkpoint)
        begin_time = source.clock()
        log.info("backup %s started at %s", backup_id, f"{begin_lsn >> 32:X}/{begin_lsn & 0xFFFFFFFF:X}")

        plans, links, total = _plan(cluster, options, source.version // 10000)
        progress.start(f"backup {backup_id}", total)
        counter = Counter(progress)
        job = VolumeJob(storage, server, backup_id, options.compression, options.compress_threads, counter)
        written = write_volumes(job, plans, options.jobs)
        with open(os.path.join(cluster.pgdata, PG_CONTROL), "rb") as f:
            pg_control = f.read()  # after every other file, before pg_backup_stop

        stop = source.backup_stop()
        end_time = source.clock()
        next_xid = source.next_xid()
        # the last volume of PGDATA: backup_label, tablespace_map, and pg_control last of all
        last_number = 1 + sum(1 for stream, _ in written if stream == BASE_TAR)
        last = job.open(BASE_TAR, last_number)
        last.add_bytes(BACKUP_LABEL, stop.backup_label.encode())
        if stop.tablespace_map:
            last.add_bytes(TABLESPACE_MAP, stop.tablespace_map.encode())
        last.add_bytes(PG_CONTROL, pg_control)
        done = {where: volume for where, (volume, _) in written.items()}
        done[(BASE_TAR, last_number)] = last.finish()
        progress.finish()

        wal = _wal_range(stop, begin_lsn, cluster.segment_size)
        shrunk = sum(n for _, n in written.values())
        if shrunk:
            log.info("%d files shrank while they were copied (normal under load; WAL replay repairs them)", shrunk)
        progress.note(f"waiting for WAL {wal.begin_wal} .. {wal.end_wal} to be archived")
        wait_for_wal(storage, server, wal.timeline, wal.begin_seg, wal.end_seg, cluster.segment_size,
                     options.wal_wait, source.archiver_status)  # fmt: skip

        manifest = Manifest(
            id=backup_id, server=server, system_identifier=cluster.system_identifier, pg_version=source.version,
            timeline=wal.timeline, begin_lsn=begin_lsn, end_lsn=stop.lsn, begin_wal=wal.begin_wal,
            end_wal=wal.end_wal, begin_time=format_time(begin_time), end_time=format_time(end_time),
            wal_segment_size=cluster.segment_size, compression=options.compression, tablespaces=cluster.tablespaces,
            tars=_tars(cluster, done, links), next_xid=next_xid,
            label=wal.label.get("LABEL", ""), pgdata=cluster.pgdata, hostname=socket.gethostname(),
            tool=f"cloudbk {__version__}",
        )  # fmt: skip
        progress.note("writing the manifest")
        _write_manifest(storage, server, manifest)
        manifest_written = True
    except BaseException:
        heartbeat.stop()  # first, so it is not written again after the discard
        if last is not None:
            last.abort()
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
