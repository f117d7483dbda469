"""Push one WAL file (segment, ``.partial``, ``.backup`` or ``.history``) to the archive: the archive_command.

Order of work, each step a guard for the next (SPEC §3.1):

1. Hash the local file (it is on local disk; the digest must go in the object's header before the payload).
   For segments, read the long page header: the system identifier and segment size must match the
   repository's index, so a second cluster pointed at the same repository is refused before it writes.
2. Stream file -> compressor -> storage writer in ``CREATE_ONLY`` mode, header first. The compressor hashes
   what it consumes; if that differs from step 1 the file changed under us and the upload is aborted.
3. The storage confirms the create; the object is durable. If the name already exists, the stored object is
   read back, decompressed and hashed in full: the same content is a re-archive after a crash (success),
   different content is a conflict (nothing is overwritten), an unreadable object is an integrity error.
4. Only then is the index updated (compare-and-swap). If that fails the segment is stored but the push still
   fails (see :class:`IndexUpdateFailed`): PostgreSQL retries, the retry finds the identical object and
   finishes the index update. The index never points at data that is not durable.

No printing, no exits: the CLI maps the exceptions to exit codes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import BinaryIO

from cloudbk.errors import (
    AlreadyExists,
    CloudbkError,
    ConflictError,
    IndexUpdateFailed,
    IntegrityError,
    OperationFailed,
    UsageError,
)
from cloudbk.pg.walnames import (
    BACKUP_LABEL,
    HISTORY,
    PARTIAL,
    SEGMENT,
    HistoryEntry,
    SegmentHeader,
    WalName,
    parse_history,
    parse_segment_header,
    parse_wal_name,
)
from cloudbk.repo import layout
from cloudbk.repo.index import Index, load_index, update_index
from cloudbk.repo.objects import WAL, ObjectSink, create_object, read_object
from cloudbk.storage.base import Storage

log = logging.getLogger("cloudbk.wal.push")

_CHUNK = 1024 * 1024
_CONFLICT_CAUSES = (
    "two clusters archiving into the same repository under the same server name (a copy or restore of this "
    "cluster, a re-created cluster), or two servers promoted onto the same timeline (two standbys of one "
    "primary, or one backup restored twice)"
)


@dataclass(frozen=True)
class LocalFile:
    """What pushing learned about the local file before uploading it."""

    path: str
    wal: WalName
    size: int
    sha256: str
    segment_header: SegmentHeader | None


@dataclass(frozen=True)
class PushResult:
    name: str
    key: str
    size: int  # uncompressed bytes
    stored_size: int  # bytes of the stored object (header + compressed payload); the existing one's if already there
    compression: str
    sha256: str
    already_archived: bool  # the identical file was already in the archive
    seconds: float


def _not_found(path: str) -> OperationFailed:
    return OperationFailed(
        f"WAL file {path} does not exist",
        key=path,
        hint="archive_command must be given %p, the path relative to the data directory",
    )


def inspect_file(path: str) -> LocalFile:
    """Hash ``path`` and, for segments, decode its first page header. Raises on a file that is not WAL."""
    wal = parse_wal_name(os.path.basename(path))
    digest = hashlib.sha256()
    size = 0
    first = b""
    try:
        with open(path, "rb") as f:
            while True:
                chunk = f.read(_CHUNK)
                if not chunk:
                    break
                if not first:
                    first = chunk[:64]
                digest.update(chunk)
                size += len(chunk)
    except FileNotFoundError:
        raise _not_found(path) from None
    except OSError as exc:
        raise OperationFailed(f"cannot read WAL file {path}: {exc.strerror}", key=path) from exc
    return _described(path, wal, size, digest.hexdigest(), first)


def read_whole(path: str) -> tuple[LocalFile, bytes]:
    """Read ``path`` into memory in one go (a WAL file is at most one segment) and hash it once; the push-ahead
    worker's path. A file whose size or mtime changed during the read is refused, nothing stored."""
    wal = parse_wal_name(os.path.basename(path))
    try:
        with open(path, "rb") as f:
            before = os.fstat(f.fileno())
            data = f.read()
            after = os.fstat(f.fileno())
    except FileNotFoundError:
        raise _not_found(path) from None
    except OSError as exc:
        raise OperationFailed(f"cannot read WAL file {path}: {exc.strerror}", key=path) from exc
    if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns) or len(data) != after.st_size:
        raise IntegrityError(
            f"{path} changed while it was read", key=path, hint="it was not archived; PostgreSQL's call retries it"
        )
    return _described(path, wal, len(data), hashlib.sha256(data).hexdigest(), data[:64]), data


def _described(path: str, wal: WalName, size: int, sha256: str, first: bytes) -> LocalFile:
    """The checks a file must pass before it is archived: for segments, a long page header naming it."""
    header: SegmentHeader | None = None
    if wal.kind in (SEGMENT, PARTIAL):
        header = parse_segment_header(first)
        if header is None:
            raise IntegrityError(
                f"{path} does not start with a WAL long page header; it is not a WAL segment or it is corrupt",
                key=path,
                hint="it was not archived; check the file and the disk holding pg_wal",
            )
        expected_addr = wal.segno(header.segment_size) * header.segment_size
        if header.pageaddr != expected_addr:
            raise IntegrityError(
                f"{path} holds WAL from {header.pageaddr:X}, not the segment its name says ({expected_addr:X})",
                key=path,
                hint="the file was renamed or copied over; it was not archived",
            )
        if wal.kind == SEGMENT and size != header.segment_size:
            raise IntegrityError(
                f"{path} is {size} bytes, but its header says segments are {header.segment_size} bytes",
                key=path,
                hint="the segment is truncated; it was not archived. Check the disk holding pg_wal",
            )
    return LocalFile(path, wal, size, sha256, header)


def _check_cluster(index: Index, local: LocalFile, key: str) -> None:
    """Refuse a segment of another cluster (different system identifier or segment size)."""
    header = local.segment_header
    if header is None:
        return
    sysid = str(header.system_identifier)
    if index.system_identifier is not None and index.system_identifier != sysid:
        raise ConflictError(
            f"refusing to archive {local.wal.name}: it belongs to the database system {sysid}, but server "
            f"{index.server!r} in this repository archives the system {index.system_identifier}",
            key=key,
            hint="each cluster needs its own --server name (CLOUDBK_SERVER); a cluster restored or re-initialised "
            "with a new system identifier must archive under a new server name",
        )
    if index.wal_segment_size is not None and index.wal_segment_size != header.segment_size:
        raise ConflictError(
            f"refusing to archive {local.wal.name}: its segment size is {header.segment_size}, the repository's "
            f"server {index.server!r} holds segments of {index.wal_segment_size} bytes",
            key=key,
            hint="use a separate --server name for this cluster",
        )


def _upload(storage: Storage, key: str, local: LocalFile, compression: str) -> int:
    """Stream the file into a create-only write. Returns the stored object size."""
    try:
        f: BinaryIO = open(local.path, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise OperationFailed(f"cannot read WAL file {local.path}: {exc.strerror}", key=local.path) from exc
    with f:
        sink = create_object(
            storage, key, WAL, local.wal.name, compression, local.sha256, local.size, source=local.path
        )
        try:
            while chunk := f.read(_CHUNK):
                sink.write(chunk)
        except BaseException:
            sink.abort()
            raise
        return sink.commit().stored_size


def _write_buffered(storage: Storage, key: str, local: LocalFile, data: bytes, compression: str) -> ObjectSink:
    """Compress ``data`` (hashed already, by :func:`read_whole`) into a create-only write; commit is the caller's."""
    sink = create_object(
        storage, key, WAL, local.wal.name, compression, local.sha256, local.size, source=local.path, hashing=False
    )
    try:
        view = memoryview(data)
        for offset in range(0, len(view), _CHUNK):
            sink.write(view[offset : offset + _CHUNK])
    except BaseException:
        sink.abort()
        raise
    return sink


def _compare_existing(storage: Storage, key: str, local: LocalFile) -> int:
    """The name exists: succeed if it holds exactly our bytes, else raise. Returns the stored size."""
    name = local.wal.name
    try:
        stored = read_object(storage, key, WAL, name)
    except IntegrityError as exc:
        raise IntegrityError(
            f"{name} is already archived at {key}, but the stored object is unreadable or corrupt: {exc.message}",
            key=key,
            hint="nothing was overwritten. Check the object; if it is damaged and this file is the good copy, move "
            "the object aside (do not delete it before checking) and PostgreSQL's next retry will archive it",
        ) from exc
    sha256, size = stored.sha256, stored.size
    if sha256 == local.sha256 and size == local.size:
        return stored.stored_size
    if local.wal.kind == HISTORY:
        hint = (
            "timeline history files are never overwritten. Two clusters share this repository and server name, "
            "or two servers were promoted to the same timeline; archive each under its own --server name"
        )
    else:
        hint = f"likely causes: {_CONFLICT_CAUSES}. Give each cluster its own --server name (CLOUDBK_SERVER)"
    raise ConflictError(
        f"{name} is already archived at {key} with different content (sha256 {sha256[:16]}…, {size} bytes; "
        f"local file sha256 {local.sha256[:16]}…, {local.size} bytes); nothing was overwritten",
        key=key,
        hint=hint,
    )


def _record(
    local: LocalFile, key: str, history: list[HistoryEntry] | None, pushed: datetime
) -> Callable[[Index], bool]:
    """The index change for ``local`` (idempotent: it may run again on a freshly read index). ``pushed`` is
    when the push began: the segment was complete by then, so no time in it is later (``Index.last_push``)."""

    def mutate(index: Index) -> bool:
        changed = False
        header = local.segment_header
        if header is not None:
            _check_cluster(index, local, key)
            if index.system_identifier is None:
                index.system_identifier = str(header.system_identifier)
                changed = True
            if index.wal_segment_size is None:
                index.wal_segment_size = header.segment_size
                changed = True
        wal = local.wal
        if wal.kind == SEGMENT and header is not None:
            if index.add_segments(wal.timeline, wal.segno(header.segment_size)):
                index.record_push(wal.timeline, pushed)
                changed = True
        elif wal.kind in (PARTIAL, BACKUP_LABEL):
            changed |= index.add_other_file(wal.name)
        elif wal.kind == HISTORY and history is not None:
            changed |= index.add_history(wal.timeline, history)
        return changed

    return mutate


def _read_history(local: LocalFile) -> list[HistoryEntry] | None:
    try:
        with open(local.path, encoding="utf-8", errors="replace") as f:
            return parse_history(f.read())
    except (OSError, UsageError) as exc:
        log.warning("%s: timeline history not recorded in the index (%s); run `cloudbk reindex`", local.path, exc)
        return None


@dataclass(frozen=True)
class Staged:
    """A WAL file durably stored (or found identical in the archive), not yet listed in the index."""

    local: LocalFile
    key: str
    stored_size: int
    already_archived: bool
    history: list[HistoryEntry] | None
    pushed: datetime  # when its push began (see _record)


def stage_wal(
    storage: Storage,
    server: str,
    path: str,
    compression: str,
    index: Index | None = None,
    buffer: AbstractContextManager[object] | None = None,
) -> Staged:
    """Steps 1-3 of the module docstring: store ``path`` (or find it stored). ``index`` is a recent copy of the
    server's index for the foreign-cluster check; None reads it.

    ``buffer`` (the push-ahead worker's): read the file into memory once and hash it once, within this context
    (a semaphore bounding how many 16 MiB buffers exist at a time); the upload itself runs outside it. Without
    it the file is streamed twice (hash, then compress and hash again), in bounded memory.
    """
    pushed = datetime.now(UTC)

    def check(local: LocalFile, key: str) -> None:
        # Refuse a foreign cluster's segment before writing anything. (Re-checked inside the index update.)
        if local.segment_header is not None:
            _check_cluster(index if index is not None else load_index(storage, server), local, key)

    already = False
    try:
        if buffer is None:
            local = inspect_file(path)
            key = layout.wal_key(server, local.wal)
            check(local, key)
            stored = _upload(storage, key, local, compression)
        else:
            with buffer:
                local, data = read_whole(path)
                key = layout.wal_key(server, local.wal)
                check(local, key)
                sink = _write_buffered(storage, key, local, data, compression)
                del data
            stored = sink.commit().stored_size
        log.debug("%s: stored %s (%d bytes, sha256 %s)", local.wal.name, key, stored, local.sha256)
    except AlreadyExists:
        log.debug("%s: %s exists; comparing its content", local.wal.name, key)
        stored = _compare_existing(storage, key, local)
        already = True
    history = _read_history(local) if local.wal.kind == HISTORY else None
    return Staged(local, key, stored, already, history, pushed)


def index_change(staged: Sequence[Staged]) -> Callable[[Index], bool]:
    """One idempotent index change listing every file of ``staged`` (one compare-and-swap for a batch)."""
    changes = [_record(s.local, s.key, s.history, s.pushed) for s in staged]

    def mutate(index: Index) -> bool:
        changed = False
        for change in changes:
            changed |= change(index)
        return changed

    return mutate


def push_wal(storage: Storage, server: str, path: str, compression: str) -> PushResult:
    """Archive the WAL file at ``path``; see the module docstring. Raises on anything short of durable storage."""
    start = time.monotonic()
    staged = stage_wal(storage, server, path, compression)
    try:
        update_index(storage, server, index_change([staged]))
    except ConflictError:
        raise
    except CloudbkError as exc:
        raise IndexUpdateFailed(exc, staged.local.wal.name, staged.key) from exc
    local = staged.local
    return PushResult(
        name=local.wal.name,
        key=staged.key,
        size=local.size,
        stored_size=staged.stored_size,
        compression=compression,
        sha256=local.sha256,
        already_archived=staged.already_archived,
        seconds=time.monotonic() - start,
    )
