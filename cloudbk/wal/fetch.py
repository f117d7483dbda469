"""Fetch one WAL file from the archive into a path PostgreSQL gave us: the restore_command.

PostgreSQL must never see a partial or corrupt file (SPEC §3.2), so the object is streamed through the
decompressor into a temporary file beside DEST, its SHA-256 and size are checked against the object's header,
the file is fsynced and renamed into place, and the directory is fsynced. On any failure the temporary file is
removed and DEST is not created.

What an error *means* matters more here than anywhere else (SPEC §3.3): only a definite "absent" answer may
become exit 1, because PostgreSQL reads exit 1 as "end of the archive" and may end recovery there. So:

- the object key is built from the requested name alone, and the object's own header must name the same file:
  a ``.partial`` object is never served for a full segment name;
- ``NotFound`` is raised only when the storage answered that the object is absent *and* the repository has
  an index for this server. An archive with no index at all (a wrong ``--repo``/``--server``/prefix, a
  missing bucket) is a configuration error, never "absent": every lookup would say absent and recovery
  would stop at the base backup;
- anything else (storage unreachable after retries, a corrupt object, a local disk error) is raised as
  what it is; the CLI maps it to the exit code for the server's mode (archive recovery or standby).

The index is not read on the normal path: the key is deterministic and the object is the truth.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cloudbk.errors import (
    ArchiveNotConfigured,
    CloudbkError,
    IntegrityError,
    LocalWriteError,
    NotFound,
    UsageError,
)
from cloudbk.localfs import fsync_dir
from cloudbk.pg.walnames import parse_wal_name
from cloudbk.repo import layout
from cloudbk.repo.compression import READ_CHUNK, DecompressingReader
from cloudbk.repo.envelope import Header, read_header
from cloudbk.storage.base import ObjectReader, Storage

log = logging.getLogger("cloudbk.wal.fetch")

#: the ``kind`` of every WAL object's envelope header
HEADER_KIND = "wal"
TMP_INFIX = ".cloudbk-tmp-"


@dataclass(frozen=True)
class StoredWal:
    """A WAL object that was read in full and matched the checksum and size in its header."""

    header: Header
    sha256: str
    size: int  # uncompressed
    stored_size: int  # bytes read from storage: envelope header + compressed payload


@dataclass(frozen=True)
class FetchResult:
    name: str
    key: str
    dest: str
    size: int
    stored_size: int
    compression: str
    seconds: float


class _CountingReader(io.RawIOBase):
    """Counts the bytes read from an object, so the stored size is known without another request."""

    def __init__(self, inner: ObjectReader) -> None:
        super().__init__()
        self._inner = inner
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self._inner.readinto(buffer) or 0
        self.count += n
        return n


def read_verified(storage: Storage, key: str, name: str, sink: Callable[[bytes], object] | None = None) -> StoredWal:
    """Stream the WAL object ``key`` (holding file ``name``) into ``sink``, checking it against its header.

    ``NotFound`` if the object is absent. ``IntegrityError`` if it is not a cloudbk WAL object for ``name``,
    cannot be decompressed, is longer or shorter than its header says, or its SHA-256 does not match. The sink
    may have received bytes before an ``IntegrityError``; callers discard them.
    """
    with storage.open_read(key) as obj:
        raw = _CountingReader(obj)
        header = read_header(raw, key)
        if header.kind != HEADER_KIND or header.name != name:
            raise IntegrityError(
                f"object {key} holds {header.kind} file {header.name!r}, not WAL file {name}",
                key=key,
                hint="the object was copied or renamed inside the repository; it is not used for recovery",
            )
        if header.sha256 is None or header.size is None:
            raise IntegrityError(f"object {key} has no checksum in its header", key=key)
        digest = hashlib.sha256()
        size = 0
        reader = DecompressingReader(header.compression, raw)
        try:
            while True:
                chunk = reader.read(READ_CHUNK)
                if not chunk:
                    break
                size += len(chunk)
                if size > header.size:
                    raise IntegrityError(
                        f"object {key} is corrupt: it decompresses to more than the {header.size} bytes its header "
                        "records",
                        key=key,
                        hint="the archived copy of this WAL file is damaged; it is not used for recovery",
                    )
                digest.update(chunk)
                if sink is not None:
                    sink(chunk)
        except IntegrityError as exc:
            if exc.key is None:  # raised by the decompressor, which does not know the key
                raise IntegrityError(
                    f"object {key} is corrupt: {exc.message}",
                    key=key,
                    hint="the archived copy of this WAL file is damaged; it is not used for recovery",
                ) from exc
            raise
        finally:
            reader.close()
        if size != header.size or digest.hexdigest() != header.sha256:
            raise IntegrityError(
                f"object {key} is corrupt: {size} bytes with sha256 {digest.hexdigest()[:16]}…, its header records "
                f"{header.size} bytes with sha256 {header.sha256[:16]}…",
                key=key,
                hint="the archived copy of this WAL file is damaged or truncated; it is not used for recovery",
            )
        return StoredWal(header, header.sha256, header.size, raw.count)


def _absent(storage: Storage, server: str, name: str, key: str, exc: NotFound) -> CloudbkError:
    """The object is absent: confirm the archive exists at all before answering "absent"."""
    if storage.exists(layout.index_key(server)):
        return NotFound(f"{name} is not in the archive", key=key)
    return ArchiveNotConfigured(
        f"{name} was requested, but the repository has no WAL archive for server {server!r} "
        f"(no {layout.index_key(server)})",
        key=key,
        hint="check --repo / CLOUDBK_REPO and --server / CLOUDBK_SERVER (and the bucket and prefix); "
        "if the index was deleted, run `cloudbk reindex`",
    )


def fetch_wal(storage: Storage, server: str, name: str, dest: str) -> FetchResult:
    """Restore WAL file ``name`` to ``dest`` atomically and verified; see the module docstring."""
    start = time.monotonic()
    wal = parse_wal_name(name)
    key = layout.wal_key(server, wal)
    directory = os.path.dirname(dest) or "."
    if not os.path.isdir(directory):
        raise UsageError(f"destination directory {directory} does not exist", key=dest)
    tmp = os.path.join(directory, f".{os.path.basename(dest)}{TMP_INFIX}{uuid.uuid4().hex[:12]}")
    log.debug("%s: reading %s into %s", name, key, tmp)

    fd = -1
    try:
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise LocalWriteError(f"cannot create {tmp}: {exc.strerror}", key=dest) from exc

        def write(chunk: bytes) -> None:
            view = memoryview(chunk)
            while view:
                try:
                    n = os.write(fd, view)
                except OSError as exc:
                    raise LocalWriteError(f"cannot write {tmp}: {exc.strerror}", key=dest) from exc
                view = view[n:]

        try:
            stored = read_verified(storage, key, name, write)
        except NotFound as exc:
            raise _absent(storage, server, name, key, exc) from exc
        try:
            os.fsync(fd)
            os.close(fd)
            fd = -1
            os.rename(tmp, dest)
            fsync_dir(directory)
        except OSError as exc:
            raise LocalWriteError(f"cannot install {dest}: {exc.strerror}", key=dest) from exc
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    log.debug("%s: verified sha256 %s, %d bytes", name, stored.sha256, stored.size)
    return FetchResult(
        name=name,
        key=key,
        dest=dest,
        size=stored.size,
        stored_size=stored.stored_size,
        compression=stored.header.compression,
        seconds=time.monotonic() - start,
    )
