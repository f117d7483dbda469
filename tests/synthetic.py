"""Synthetic repository content for tests that need no PostgreSQL server: a tiny restorable backup, and WAL
segments with the long page header ``wal-push`` checks."""

from __future__ import annotations

import hashlib
import io
import struct
import tarfile
from datetime import UTC, datetime
from pathlib import Path

from cloudbk.pg.walnames import segment_name
from cloudbk.repo import layout
from cloudbk.repo.index import Index, update_index
from cloudbk.repo.manifest import FileEntry, Manifest, TarEntry, format_time
from cloudbk.repo.objects import TAR, create_object
from cloudbk.storage.base import Storage

SEG = 16 * 1024 * 1024
SYSID = 7300000000000000001
BACKUP_ID = "20261121T090000Z"
BASE_NAME = "base.tar.zst"


def segment_file(directory: Path, timeline: int, segno: int) -> Path:
    """A 16 MiB segment whose first page has a PostgreSQL 15 long header (what wal-push checks)."""
    path = directory / segment_name(timeline, segno)
    header = struct.pack("<HHIQI4xQII", 0xD110, 0x0002, timeline, segno * SEG, 0, SYSID, SEG, 8192)
    path.write_bytes(header + bytes(SEG - len(header)))
    return path


def plant_backup(storage: Storage, ended: datetime | None = None, backup_id: str = BACKUP_ID) -> Manifest:
    """A backup of segment 2 on timeline 1 (PG_VERSION and pg_control only) whose WAL the index lists as
    archived (segments 1..4): enough for ``restore`` to run."""
    members = {"PG_VERSION": b"15\n", "global/pg_control": bytes(8192)}
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    files = [FileEntry(name, len(data), hashlib.sha256(data).hexdigest()) for name, data in members.items()]
    end = format_time(ended or datetime.now(UTC))
    manifest = Manifest(
        id=backup_id, server="main", system_identifier=str(SYSID), pg_version=150004, timeline=1,
        begin_lsn=2 * SEG + 0x28, end_lsn=2 * SEG + 0x100, begin_wal=segment_name(1, 2), end_wal=segment_name(1, 2),
        begin_time=end, end_time=end, wal_segment_size=SEG, compression="zstd",
        tars=[store_tar(storage, backup_id, raw.getvalue(), files)],
    )  # fmt: skip
    publish_backup(storage, manifest, 4)
    return manifest


def store_tar(storage: Storage, backup_id: str, tar: bytes, files: list[FileEntry]) -> TarEntry:
    """Store ``tar`` as the PGDATA tar object of ``backup_id`` (through the object codec, as backup-push does)."""
    sink = create_object(storage, layout.backup_object_key("main", backup_id, BASE_NAME), TAR, BASE_NAME, "zstd")
    sink.write(tar)
    stored = sink.commit()
    return TarEntry.single(BASE_NAME, None, stored.size, stored.sha256, stored.stored_size, files)


def publish_backup(storage: Storage, manifest: Manifest, last_segment: int) -> None:
    """Store ``manifest`` and index it, with segments 1 .. ``last_segment`` of timeline 1 listed as archived."""
    storage.put_bytes(layout.backup_manifest_key("main", manifest.id), manifest.to_json())

    def mutate(index: Index) -> bool:
        index.system_identifier, index.wal_segment_size = manifest.system_identifier, SEG
        index.add_segments(1, 1, last_segment)
        index.backups[manifest.id] = manifest.summary()
        return True

    update_index(storage, "main", mutate)
