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

MANIFEST_FORMAT_VERSION = 2  # 2: tar streams stored as volumes (docs/format.md); 1 is still read
FORMAT_SINGLE_OBJECT = 1  # manifests whose tar streams are one object each
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
    """One regular file inside a tar stream (its path relative to the stream's root directory), or one piece
    of a file split across volumes: ``offset`` is where the piece starts in the file, ``size`` and ``sha256``
    are the piece's."""

    path: str
    size: int
    sha256: str
    offset: int | None = None

    def row(self) -> list[Any]:
        """The compact JSON row: ``[path, size, sha256]``, with the offset appended for a piece."""
        head: list[Any] = [self.path, self.size, self.sha256]
        return head if self.offset is None else [*head, self.offset]

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> FileEntry:
        if len(row) not in (3, 4):
            raise ValueError(f"file row {row!r} is not [path, size, sha256] or [path, size, sha256, offset]")
        offset = None if len(row) == 3 else int(row[3])
        return cls(str(row[0]), int(row[1]), str(row[2]), offset)


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
class VolumeEntry:
    """One stored object of a tar stream: a complete tar of its own (docs/format.md, "Volumes")."""

    name: str  # object name inside the backup's prefix, e.g. "base.00001.tar.zst" (format 1: "base.tar.zst")
    size: int  # bytes of the uncompressed tar
    sha256: str  # of the uncompressed tar
    stored_size: int  # bytes of the stored object (envelope header + compressed tar)
    files: list[FileEntry] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        # compact rows: a large cluster has tens of thousands of files
        doc = {"name": self.name, "size": self.size, "sha256": self.sha256, "stored_size": self.stored_size}
        return {**doc, "files": [f.row() for f in self.files]}

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> VolumeEntry:
        files = [FileEntry.from_row(row) for row in doc["files"]]
        return cls(str(doc["name"]), int(doc["size"]), str(doc["sha256"]), int(doc["stored_size"]), files)


@dataclass
class TarEntry:
    """One tar stream: PGDATA (``tablespace_oid`` None) or one tablespace's directory, stored as volumes."""

    name: str  # the stream: "base" or the tablespace OID (format 1: the one object's name, "base.tar.zst")
    tablespace_oid: int | None
    volumes: list[VolumeEntry] = field(default_factory=list)
    #: None in manifests written before links were recorded: their tars may hold symbolic link members
    links: list[LinkEntry] | None = None

    @classmethod
    def single(cls, name: str, tablespace_oid: int | None, size: int, sha256: str, stored_size: int,
               files: list[FileEntry] | None = None, links: list[LinkEntry] | None = None) -> TarEntry:  # fmt: skip
        """A stream stored as one object named ``name`` (how format 1 stores every stream)."""
        return cls(name, tablespace_oid, [VolumeEntry(name, size, sha256, stored_size, files or [])], links)

    @property
    def files(self) -> list[FileEntry]:
        """Every file row of every volume (a split file has one row per piece, each with its offset)."""
        return [f for v in self.volumes for f in v.files]

    @property
    def size(self) -> int:
        return sum(v.size for v in self.volumes)

    @property
    def stored_size(self) -> int:
        return sum(v.stored_size for v in self.volumes)

    @property
    def data_size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def paths(self) -> set[str]:
        return {f.path for f in self.files}

    def to_dict(self, version: int) -> dict[str, Any]:
        links = {} if self.links is None else {"links": [asdict(link) for link in self.links]}
        if version <= FORMAT_SINGLE_OBJECT:
            (only,) = self.volumes
            doc = {**only.to_dict(), "name": self.name, "tablespace_oid": self.tablespace_oid}
            return {**doc, **links}
        volumes = [v.to_dict() for v in self.volumes]
        return {"name": self.name, "tablespace_oid": self.tablespace_oid, "volumes": volumes, **links}

    @classmethod
    def from_dict(cls, doc: dict[str, Any], version: int) -> TarEntry:
        oid = None if doc["tablespace_oid"] is None else int(doc["tablespace_oid"])
        links = _read_links(doc.get("links"))
        if version <= FORMAT_SINGLE_OBJECT:
            return cls(str(doc["name"]), oid, [VolumeEntry.from_dict(doc)], links)
        tar = cls(str(doc["name"]), oid, [VolumeEntry.from_dict(v) for v in doc["volumes"]], links)
        check_pieces(tar)
        return tar


def check_pieces(tar: TarEntry) -> None:
    """``ValueError`` unless every file is in one volume whole, or in pieces that cover it exactly, in order,
    at most one piece per volume: what restore relies on to reassemble files without overwriting anything."""
    pieces: dict[str, list[FileEntry]] = {}
    for volume in tar.volumes:
        names = [f.path for f in volume.files]
        if len(names) != len(set(names)):
            raise ValueError(f"volume {volume.name} lists a file twice")
        for f in volume.files:
            pieces.setdefault(f.path, []).append(f)
    for path, rows in pieces.items():
        if len(rows) == 1 and rows[0].offset is None:
            continue
        at = 0
        for row in rows:
            if row.offset != at or row.size <= 0:
                raise ValueError(f"the pieces of {path} in stream {tar.name} do not cover it in order")
            at += row.size


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
        return sum(len(t.paths) for t in self.tars)

    @property
    def volumes(self) -> list[tuple[TarEntry, VolumeEntry]]:
        """Every stored data object, with the stream it belongs to."""
        return [(t, v) for t in self.tars for v in t.volumes]

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
        doc["tars"] = [t.to_dict(self.format_version) for t in self.tars]
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
                tars=[TarEntry.from_dict(t, version) for t in doc["tars"]],
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
            objects={v.name: v.stored_size for t in self.tars for v in t.volumes},
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
