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

import logging
import os
import time
import uuid
from dataclasses import dataclass

from cloudbk.errors import (
    ArchiveNotConfigured,
    CloudbkError,
    LocalWriteError,
    NotFound,
    UsageError,
)
from cloudbk.localfs import fsync_dir
from cloudbk.pg.walnames import parse_wal_name
from cloudbk.repo import layout
from cloudbk.repo.objects import WAL, read_object
from cloudbk.storage.base import Storage

log = logging.getLogger("cloudbk.wal.fetch")

TMP_INFIX = ".cloudbk-tmp-"


@dataclass(frozen=True)
class FetchResult:
    name: str
    key: str
    dest: str
    size: int
    stored_size: int
    compression: str
    seconds: float


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
            stored = read_object(storage, key, WAL, name, write)
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
