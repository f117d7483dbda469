"""The ``verify`` use case: re-read a backup's objects and prove they restore, without writing anything.

For one backup (:func:`verify_backup`):

1. its manifest is read and parsed (a corrupt one is a problem naming ``manifest.json``), and compared with
   the index's summary of it, field by field;
2. one LIST of the backup's prefix shows each volume stored at the size the manifest gives (a missing or
   truncated volume is a problem naming it, and is not read);
3. every other volume is downloaded, decompressed and read as a tar, ``jobs`` at a time: each file's size and
   SHA-256 (each piece's, for a split file) against the manifest, files the manifest lists but the volume
   lacks, members the manifest does not know, and the whole volume against its SHA-256 and size;
4. the WAL from the backup's begin to its end segment: each segment stored, its envelope, checksum and long
   page header checked by the same code as ``wal-verify --deep`` (:mod:`cloudbk.wal.verify`).

A storage failure after retries raises: an unreachable repository is not a verdict about a backup.
``verify --all`` verifies every backup without step 4, then runs ``wal-verify --deep`` over the archive.
"""

from __future__ import annotations

import hashlib
import tarfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from cloudbk.backup.tarstream import CHUNK, PIECE_OFFSET
from cloudbk.backup.volumes import DEFAULT_JOBS
from cloudbk.errors import CloudbkError, IntegrityError, NotFound, StorageError
from cloudbk.pg.walnames import parse_wal_name, segment_name
from cloudbk.repo import layout
from cloudbk.repo.index import Index
from cloudbk.repo.manifest import FileEntry, Manifest, TarEntry, VolumeEntry
from cloudbk.repo.objects import TAR, open_object
from cloudbk.storage.base import Storage
from cloudbk.wal.verify import _check_object as check_wal_object

# summary fields the index may hold that are not the manifest's: compared only when both have them
_DERIVED = ("manifest_size", "keep")


@dataclass(frozen=True)
class Finding:
    """One problem, naming the object it concerns."""

    key: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"key": self.key, "message": self.message}


@dataclass
class BackupVerification:
    backup_id: str
    problems: list[Finding] = field(default_factory=list)
    volumes: int = 0  # volumes read to their end
    bytes: int = 0  # plain bytes of file content checked
    wal_segments: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "backup": self.backup_id,
            "ok": self.ok,
            "problems": [p.to_dict() for p in self.problems],
            "volumes_read": self.volumes,
            "bytes_checked": self.bytes,
            "wal_segments_checked": self.wal_segments,
            "seconds": round(self.seconds, 3),
        }


def _problem(exc: BaseException) -> str:
    return exc.message if isinstance(exc, CloudbkError) else f"{type(exc).__name__}: {exc}"


def compare_summary(manifest: Manifest, entry: dict[str, Any] | None, index_key: str) -> list[Finding]:
    """The index's summary of a backup against its manifest: one finding per field that disagrees."""
    if entry is None:
        return [Finding(index_key, f"backup {manifest.id} is not in the index; run `cloudbk reindex`")]
    expected = manifest.summary()
    differ = [n for n in sorted(expected) if n in entry and n not in _DERIVED and entry[n] != expected[n]]
    return [
        Finding(
            index_key,
            f"the index says {n} of backup {manifest.id} is {entry[n]!r}, its manifest {expected[n]!r}; "
            "run `cloudbk reindex`",
        )
        for n in differ
    ]


class _VolumeReader:
    """Reads one volume as a tar and checks every member against the manifest's rows for it."""

    def __init__(self, storage: Storage, key: str, tar: TarEntry, volume: VolumeEntry) -> None:
        self.storage, self.key, self.tar, self.volume = storage, key, tar, volume
        self.expected = {(f.path, f.offset): f for f in volume.files}
        self.seen: set[tuple[str, int | None]] = set()
        self.findings: list[Finding] = []
        self.bytes = 0

    def run(self) -> list[Finding]:
        try:
            source = open_object(self.storage, self.key, TAR, self.volume.name, self.volume.size,
                                 self.volume.sha256, origin="its manifest")  # fmt: skip
            with source:
                tar = tarfile.open(fileobj=source, mode="r|", bufsize=CHUNK)  # noqa: SIM115
                with tar:
                    while (member := tar.next()) is not None:
                        self._member(tar, member)
                        tar.members.clear()  # type: ignore[attr-defined]  # stream mode keeps every member: not needed
                source.finish()  # the end-of-archive blocks and the volume's own SHA-256
        except NotFound:
            return [Finding(self.key, "the volume disappeared while it was being verified")]
        except StorageError:
            raise
        except (CloudbkError, tarfile.TarError, OSError, EOFError, ValueError) as exc:
            self.findings.append(Finding(self.key, f"unreadable: {_problem(exc)}"))
            return self.findings
        for path, offset in sorted(set(self.expected) - self.seen, key=str):
            piece = "" if offset is None else f" (the piece at offset {offset})"
            self.findings.append(Finding(self.key, f"lacks {path}{piece}, which its manifest lists"))
        return self.findings

    def _member(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        name = member.name.removeprefix("./").rstrip("/")
        if member.isdir():
            return
        if member.issym() and self.tar.links is None:
            return  # backups from before links were recorded store them as members
        if not member.isreg():
            self.findings.append(Finding(self.key, f"holds {name!r}, neither a regular file nor a directory"))
            return
        raw = member.pax_headers.get(PIECE_OFFSET)
        offset = int(raw) if raw is not None and raw.isdigit() else None
        want: FileEntry | None = self.expected.get((name, offset))
        digest, size = hashlib.sha256(), 0
        stream = tar.extractfile(member)
        while stream is not None and (chunk := stream.read(CHUNK)):
            digest.update(chunk)
            size += len(chunk)
        self.bytes += size
        if want is None:
            self.findings.append(Finding(self.key, f"holds {name!r}, which its manifest does not list"))
            return
        self.seen.add((name, offset))
        if size != want.size or digest.hexdigest() != want.sha256:
            self.findings.append(Finding(self.key, f"{name}: {size} bytes with sha256 {digest.hexdigest()[:16]}…, "
                                 f"the manifest says {want.size} bytes with sha256 {want.sha256[:16]}…"))  # fmt: skip


def _load_manifest(storage: Storage, server: str, backup_id: str) -> tuple[Manifest | None, list[Finding]]:
    key = layout.backup_manifest_key(server, backup_id)
    try:
        return Manifest.from_json(storage.get_bytes(key), key), []
    except NotFound:
        return None, [Finding(key, "the manifest is missing")]
    except IntegrityError as exc:
        return None, [Finding(key, f"the manifest is corrupt: {exc.message}")]


def _check_stored(storage: Storage, server: str, manifest: Manifest) -> tuple[list[Any], list[Finding]]:
    """The volumes stored at their size (to read), and a finding for each missing or truncated one."""
    listed = {info.key: info.size for info in storage.list(layout.backup_prefix(server, manifest.id))}
    readable, findings = [], []
    for tar, volume in manifest.volumes:
        key = layout.backup_object_key(server, manifest.id, volume.name)
        size = listed.get(key)
        if size == volume.stored_size:
            readable.append((key, tar, volume))
        elif size is None:
            findings.append(Finding(key, "the volume is missing"))
        else:
            findings.append(Finding(key, f"the volume is {size} bytes, its manifest says {volume.stored_size} "
                                    "(truncated or replaced)"))  # fmt: skip
    return readable, findings


def wal_keys(server: str, manifest: Manifest) -> list[str]:
    """The keys of the segments from the backup's begin to its end segment."""
    first, last = parse_wal_name(manifest.begin_wal), parse_wal_name(manifest.end_wal)
    size = manifest.wal_segment_size
    return [
        layout.wal_key(server, segment_name(first.timeline, n, size))
        for n in range(first.segno(size), last.segno(size) + 1)
    ]


def verify_backup(
    storage: Storage, server: str, index: Index, backup_id: str, jobs: int = DEFAULT_JOBS, wal: bool = True
) -> BackupVerification:
    """Verify one backup (see the module docstring); ``wal``: also its own WAL range."""
    start = time.monotonic()
    result = BackupVerification(backup_id)
    manifest, result.problems = _load_manifest(storage, server, backup_id)
    if manifest is None:
        result.seconds = time.monotonic() - start
        return result
    result.problems += compare_summary(manifest, index.backups.get(backup_id), layout.index_key(server))
    readable, missing = _check_stored(storage, server, manifest)
    result.problems += missing
    tasks: list[Callable[[], list[Finding]]] = []
    readers = [_VolumeReader(storage, key, tar, volume) for key, tar, volume in readable]
    tasks += [r.run for r in readers]
    segments = wal_keys(server, manifest) if wal else []
    tasks += [_wal_task(storage, key, index, manifest.wal_segment_size) for key in segments]
    with ThreadPoolExecutor(max_workers=max(1, jobs), thread_name_prefix="cloudbk-verify") as pool:
        futures = [pool.submit(task) for task in tasks]
        try:
            for future in futures:
                result.problems += future.result()
        except BaseException:  # a storage failure, Ctrl-C: the objects not started are not read
            for future in futures:
                future.cancel()
            raise
    result.volumes = len(readers)
    result.bytes = sum(r.bytes for r in readers)
    result.wal_segments = len(segments)
    result.seconds = time.monotonic() - start
    return result


def _wal_task(storage: Storage, key: str, index: Index, segment_size: int) -> Callable[[], list[Finding]]:
    def check() -> list[Finding]:
        problems = check_wal_object(storage, key, index, segment_size)
        return [Finding(p.key or key, "the WAL segment is not in the archive" if p.kind == "gap" else p.message)
                for p in problems]  # fmt: skip

    return check
