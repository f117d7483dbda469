"""The per-backup manifest (``<server>/backups/<id>/manifest.json``) and the summary of it kept in the index.

The manifest is written last, create-only: a backup whose manifest is absent does not exist. It describes
the backup well enough to restore and verify it without anything else: the WAL range it needs, each tar
stream (its object name, the SHA-256 and size of its uncompressed bytes, the stored size) and each file
inside it with its size and SHA-256. LSNs are written the way PostgreSQL prints them (``0/2000028``), times
as UTC ISO 8601 (``2026-11-21T09:30:12.123456Z``). See docs/format.md.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar

from cloudbk.errors import CorruptManifest, IntegrityError, refuse_newer_format
from cloudbk.pg.datadir import Tablespace
from cloudbk.pg.walnames import format_lsn, parse_lsn

MANIFEST_FORMAT_VERSION = 1
STATUS_COMPLETE = "complete"
BASE_TAR = "base"  # the tar stream holding PGDATA; tablespace streams are named by their OID
_CORRUPT_HINT = "the backup cannot be restored from this manifest; use another backup"


def format_time(moment: datetime) -> str:
    """UTC ISO 8601 with microseconds and a Z, sortable as text."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str) -> datetime:
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment


@dataclass(frozen=True)
class FileEntry:
    """One regular file inside a tar stream: its path relative to the stream's root directory."""

    path: str
    size: int
    sha256: str


# The fields a manifest and its summary in the index share, each with how it is read back from JSON.
_SHARED_FIELDS: dict[str, Callable[[Any], Any]] = {
    "id": str,
    "system_identifier": str,
    "pg_version": int,
    "timeline": int,
    "begin_lsn": parse_lsn,
    "end_lsn": parse_lsn,
    "begin_wal": str,
    "end_wal": str,
    "begin_time": str,
    "end_time": str,
    "wal_segment_size": int,
    "compression": str,
}


def _read_shared(doc: dict[str, Any]) -> dict[str, Any]:
    """The shared fields of a manifest or summary document (KeyError/ValueError/TypeError on bad input)."""
    return {name: convert(doc[name]) for name, convert in _SHARED_FIELDS.items()}


@dataclass(frozen=True)
class LinkEntry:
    """A symbolic link the backup found (and followed) in a tar stream's directory: see docs/backup.md."""

    DIR: ClassVar[str] = "dir"
    FILE: ClassVar[str] = "file"
    DANGLING: ClassVar[str] = "dangling"  # pointed at nothing: no content in the tar

    path: str  # relative to the stream's root, like FileEntry.path
    target: str  # what readlink() returned at backup time
    type: str  # what it pointed at: DIR, FILE or DANGLING


@dataclass
class TarEntry:
    """One tar stream: PGDATA (``tablespace_oid`` None) or one tablespace's directory."""

    name: str  # object name inside the backup's prefix, e.g. "base.tar.zst" or "16385.tar.zst"
    tablespace_oid: int | None
    size: int  # bytes of the uncompressed tar stream
    sha256: str  # of the uncompressed tar stream
    stored_size: int  # bytes of the stored object (envelope header + compressed stream)
    files: list[FileEntry] = field(default_factory=list)
    #: None in manifests written before links were recorded: their tars may hold symbolic link members
    links: list[LinkEntry] | None = None

    @property
    def data_size(self) -> int:
        return sum(f.size for f in self.files)


def _read_links(rows: Any) -> list[LinkEntry] | None:
    if rows is None:
        return None
    links = [LinkEntry(str(r["path"]), str(r["target"]), str(r["type"])) for r in rows]
    for link in links:
        if link.type not in (LinkEntry.DIR, LinkEntry.FILE, LinkEntry.DANGLING):
            raise ValueError(f"link {link.path!r} has an unknown type {link.type!r}")
    return links


@dataclass
class Manifest:
    id: str
    server: str
    system_identifier: str
    pg_version: int  # server_version_num, e.g. 150004
    timeline: int
    begin_lsn: int
    end_lsn: int
    begin_wal: str  # the segment holding begin_lsn: the first one recovery needs
    end_wal: str  # the last segment recovery needs to reach consistency
    begin_time: str
    end_time: str
    wal_segment_size: int
    compression: str
    tablespaces: list[Tablespace] = field(default_factory=list)
    tars: list[TarEntry] = field(default_factory=list)
    #: pg_snapshot_xmax of the server's snapshot right after the backup ended: every transaction id at or
    #: above it started after the backup, so a --target-xid at or above it is reachable from this backup
    next_xid: int | None = None
    status: str = STATUS_COMPLETE
    label: str = ""
    pgdata: str = ""
    hostname: str = ""
    tool: str = ""
    format_version: int = MANIFEST_FORMAT_VERSION

    # -- derived sizes ------------------------------------------------------------------------------------

    @property
    def data_size(self) -> int:
        """Bytes of the files in the backup."""
        return sum(t.data_size for t in self.tars)

    @property
    def stored_size(self) -> int:
        return sum(t.stored_size for t in self.tars)

    @property
    def file_count(self) -> int:
        return sum(len(t.files) for t in self.tars)

    def tar(self, name: str) -> TarEntry:
        for t in self.tars:
            if t.name == name:
                return t
        raise KeyError(name)

    # -- serialisation ------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["begin_lsn"] = format_lsn(self.begin_lsn)
        doc["end_lsn"] = format_lsn(self.end_lsn)
        doc["tars"] = [
            {
                "name": t.name,
                "tablespace_oid": t.tablespace_oid,
                "size": t.size,
                "sha256": t.sha256,
                "stored_size": t.stored_size,
                # compact rows: [path, size, sha256]; a large cluster has tens of thousands of files
                "files": [[f.path, f.size, f.sha256] for f in t.files],
                **({} if t.links is None else {"links": [asdict(link) for link in t.links]}),
            }
            for t in self.tars
        ]
        doc["data_size"] = self.data_size
        doc["stored_size"] = self.stored_size
        return doc

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), indent=1).encode()

    @classmethod
    def from_dict(cls, doc: dict[str, Any], key: str) -> Manifest:
        try:
            version = int(doc.get("format_version", 0))
            refuse_newer_format("manifest", key, version, MANIFEST_FORMAT_VERSION)
            return cls(
                **_read_shared(doc),
                server=str(doc["server"]),
                tablespaces=[Tablespace(int(t["oid"]), str(t["name"]), str(t["location"])) for t in doc["tablespaces"]],
                tars=[
                    TarEntry(
                        name=str(t["name"]),
                        tablespace_oid=None if t["tablespace_oid"] is None else int(t["tablespace_oid"]),
                        size=int(t["size"]),
                        sha256=str(t["sha256"]),
                        stored_size=int(t["stored_size"]),
                        files=[FileEntry(str(p), int(s), str(h)) for p, s, h in t["files"]],
                        links=_read_links(t.get("links")),
                    )
                    for t in doc["tars"]
                ],
                next_xid=None if doc.get("next_xid") is None else int(doc["next_xid"]),
                status=str(doc.get("status", STATUS_COMPLETE)),
                label=str(doc.get("label", "")),
                pgdata=str(doc.get("pgdata", "")),
                hostname=str(doc.get("hostname", "")),
                tool=str(doc.get("tool", "")),
                format_version=version,
            )
        except IntegrityError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CorruptManifest(
                f"manifest {key} is unreadable: {exc!r}",
                key=key,
                hint=_CORRUPT_HINT,
            ) from exc

    @classmethod
    def from_json(cls, data: bytes, key: str) -> Manifest:
        try:
            doc = json.loads(data)
        except ValueError as exc:
            raise CorruptManifest(f"manifest {key} is not valid JSON: {exc}", key=key, hint=_CORRUPT_HINT) from exc
        if not isinstance(doc, dict):
            raise CorruptManifest(f"manifest {key} is not a JSON object", key=key, hint=_CORRUPT_HINT)
        return cls.from_dict(doc, key)

    def summary(self, manifest_size: int | None = None) -> dict[str, Any]:
        """What the index keeps about this backup: enough to list it, to plan a recovery from it, and to see
        from one LIST whether its objects are still the size they were stored with (``manifest_size``: the
        stored manifest's bytes, by default those of :meth:`to_json`, which is what backup-push stores)."""
        return BackupSummary(
            **{name: getattr(self, name) for name in _SHARED_FIELDS},
            status=self.status,
            data_size=self.data_size,
            stored_size=self.stored_size,
            file_count=self.file_count,
            tablespaces=len(self.tablespaces),
            next_xid=self.next_xid,
            objects={t.name: t.stored_size for t in self.tars},
            manifest_size=len(self.to_json()) if manifest_size is None else manifest_size,
        ).to_dict()


@dataclass(frozen=True)
class BackupSummary:
    """A backup as the index lists it (a subset of its manifest)."""

    id: str
    status: str
    system_identifier: str
    pg_version: int
    timeline: int
    begin_lsn: int
    end_lsn: int
    begin_wal: str
    end_wal: str
    begin_time: str
    end_time: str
    wal_segment_size: int
    compression: str
    data_size: int
    stored_size: int
    file_count: int = 0
    tablespaces: int = 0
    next_xid: int | None = None
    #: data object name -> stored size, and the stored manifest's size (absent in entries older than them)
    objects: dict[str, int] | None = field(default=None, hash=False)
    manifest_size: int | None = None

    @property
    def ratio(self) -> float:
        """Compression ratio: data bytes per stored byte."""
        return self.data_size / self.stored_size if self.stored_size else 0.0

    @property
    def sort_key(self) -> tuple[int, str]:
        """Backups are ordered by where they end in WAL, then by end time; never by id."""
        return (self.end_lsn, self.end_time)

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["begin_lsn"] = format_lsn(self.begin_lsn)
        doc["end_lsn"] = format_lsn(self.end_lsn)
        return doc

    @classmethod
    def from_dict(cls, doc: dict[str, Any], where: str = "index") -> BackupSummary:
        try:
            return cls(
                **_read_shared(doc),
                status=str(doc["status"]),
                data_size=int(doc["data_size"]),
                stored_size=int(doc["stored_size"]),
                file_count=int(doc.get("file_count", 0)),
                tablespaces=int(doc.get("tablespaces", 0)),
                next_xid=None if doc.get("next_xid") is None else int(doc["next_xid"]),
                objects=None if doc.get("objects") is None else {str(k): int(v) for k, v in doc["objects"].items()},
                manifest_size=None if doc.get("manifest_size") is None else int(doc["manifest_size"]),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise IntegrityError(
                f"backup entry {doc.get('id', '?')} in {where} is unreadable: {exc!r}",
                key=where,
                hint="run `cloudbk reindex` to rebuild the index from the manifests",
            ) from exc


def complete_backups(entries: dict[str, dict[str, Any]], where: str = "index") -> list[BackupSummary]:
    """The complete backups of an index, oldest first (by end LSN, then end time)."""
    backups = [BackupSummary.from_dict(doc, where) for doc in entries.values()]
    return sorted((b for b in backups if b.status == STATUS_COMPLETE), key=lambda b: b.sort_key)


def backup_order_key(backup: BackupSummary) -> tuple[int, datetime, int, str]:
    """Where a backup sits in the archive's history: end LSN, then end time. The id only breaks exact ties."""
    return (backup.end_lsn, parse_time(backup.end_time), backup.begin_lsn, backup.id)


def order_backups(backups: Sequence[BackupSummary]) -> list[BackupSummary]:
    """Oldest first, by :func:`backup_order_key`."""
    return sorted(backups, key=backup_order_key)
