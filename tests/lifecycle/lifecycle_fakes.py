"""Build repositories in the memory backend for the lifecycle unit tests: backups and WAL as cloudbk lays them
out (real manifests, envelope headers, index entries), without PostgreSQL.

Segments are 1 MiB (a size PostgreSQL allows) so that deep verification can read whole, realistic objects:
a long page header with the system identifier, then zeros.
"""

from __future__ import annotations

import hashlib
import io
import struct
from datetime import UTC, datetime, timedelta

from cloudbk.pg.walnames import HistoryEntry, history_name, segment_name
from cloudbk.repo import layout
from cloudbk.repo.compression import CompressingWriter
from cloudbk.repo.envelope import Header
from cloudbk.repo.index import Index, update_index
from cloudbk.repo.manifest import BackupSummary, Manifest, TarEntry, format_time
from cloudbk.storage.base import CREATE_ONLY, Storage

SEG = 1024 * 1024
SYSID = "7300000000000000001"
OTHER_SYSID = "7399999999999999999"
SERVER = "main"
T0 = datetime(2026, 1, 1, tzinfo=UTC)
TAR_BYTES = b"tar bytes"  # a backup's data object (its manifest gives this as its stored size)


def lsn(segno: int, offset: int = 0x28) -> int:
    return segno * SEG + offset


def segment_bytes(timeline: int, segno: int, sysid: str = SYSID) -> bytes:
    """A 1 MiB segment whose first page carries a valid long page header."""
    header = struct.pack("<HHIQI4xQII", 0xD110, 0x0002, timeline, segno * SEG, 0, int(sysid), SEG, 8192)
    return header + bytes(SEG - len(header))


def wal_object(name: str, content: bytes, compression: str = "zstd") -> bytes:
    sink = io.BytesIO()
    header = Header(
        kind="wal", name=name, compression=compression, sha256=hashlib.sha256(content).hexdigest(), size=len(content)
    )
    sink.write(header.encode())
    writer = CompressingWriter(compression, sink)
    writer.write(content)
    writer.finish()
    return sink.getvalue()


def put_segments(
    storage: Storage, timeline: int, first: int, last: int, sysid: str = SYSID, index: bool = True, server: str = SERVER
) -> list[str]:
    keys = []
    for segno in range(first, last + 1):
        name = segment_name(timeline, segno, SEG)
        key = layout.wal_key(server, name)
        storage.put_bytes(key, wal_object(name, segment_bytes(timeline, segno, sysid)), CREATE_ONLY)
        keys.append(key)
    if index:

        def mutate(ix: Index) -> bool:
            ix.system_identifier = ix.system_identifier or SYSID
            ix.wal_segment_size = SEG
            ix.add_segments(timeline, first, last)
            return True

        update_index(storage, server, mutate)
    return keys


def put_other(storage: Storage, name: str, content: bytes = b"START WAL LOCATION: x\n", server: str = SERVER) -> str:
    key = layout.wal_key(server, name)
    storage.put_bytes(key, wal_object(name, content), CREATE_ONLY)

    def mutate(ix: Index) -> bool:
        return ix.add_other_file(name)

    update_index(storage, server, mutate)
    return key


def put_history(storage: Storage, timeline: int, entries: list[tuple[int, int]], server: str = SERVER) -> str:
    text = "".join(
        f"{tli}\t{lsn_ >> 32:X}/{lsn_ & 0xFFFFFFFF:X}\tno recovery target specified\n" for tli, lsn_ in entries
    )
    name = history_name(timeline)
    key = layout.wal_key(server, name)
    storage.put_bytes(key, wal_object(name, text.encode()), CREATE_ONLY)
    parsed = [HistoryEntry(t, s, "no recovery target specified") for t, s in entries]

    def mutate(ix: Index) -> bool:
        return ix.add_history(timeline, parsed)

    update_index(storage, server, mutate)
    return key


def make_backup(
    storage: Storage,
    backup_id: str,
    timeline: int,
    begin_seg: int,
    end_seg: int,
    end_time: datetime,
    sysid: str = SYSID,
    index: bool = True,
    server: str = SERVER,
) -> BackupSummary:
    """A complete backup: one data object, then its manifest, then its index entry (the real write order)."""
    manifest = Manifest(
        id=backup_id,
        server=server,
        system_identifier=sysid,
        pg_version=150000,
        timeline=timeline,
        begin_lsn=lsn(begin_seg),
        end_lsn=lsn(end_seg, 0x100),
        begin_wal=segment_name(timeline, begin_seg, SEG),
        end_wal=segment_name(timeline, end_seg, SEG),
        begin_time=format_time(end_time - timedelta(minutes=1)),
        end_time=format_time(end_time),
        wal_segment_size=SEG,
        compression="zstd",
        tars=[TarEntry.single("base.tar.zst", None, 100, "0" * 64, len(TAR_BYTES))],
    )
    storage.put_bytes(layout.backup_object_key(server, backup_id, "base.tar.zst"), TAR_BYTES, CREATE_ONLY)
    storage.put_bytes(layout.backup_manifest_key(server, backup_id), manifest.to_json(), CREATE_ONLY)
    summary = manifest.summary()
    if index:

        def mutate(ix: Index) -> bool:
            ix.backups[backup_id] = dict(summary)
            return True

        update_index(storage, server, mutate)
    return BackupSummary.from_dict(summary)


def keys_under(storage: Storage, prefix: str) -> list[str]:
    return [info.key for info in storage.list(prefix)]


def drop_from_index(storage: Storage, timeline: int, segno: int, server: str = SERVER) -> None:
    """Forget one segment in the index (the object stays): what a lost index update looks like."""

    def mutate(index: Index) -> bool:
        index.remove_segments(timeline, segno, segno)
        return True

    update_index(storage, server, mutate)
