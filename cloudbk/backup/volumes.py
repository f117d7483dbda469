"""Volumes: each tar stream cut into objects of bounded size, written ``jobs`` at a time (docs/format.md, "Volumes").

Planning is pure: a stream's entries become volumes holding at most ``volume_size`` bytes of file content
each, in the scan's order. A file larger than a volume is split into pieces at multiples of the volume size
(itself a multiple of PostgreSQL's 8 KiB block), each piece in a volume of its own, marked in its tar header
and listed in the manifest with its offset; restore writes each piece at its offset.

Writing: a pool of ``jobs`` worker threads takes the volumes of every stream in turn; each worker reads its
volume's files, makes the tar, hashes, compresses and uploads it (file reading and hashing in the worker,
the stream's hash, compression and upload behind a :class:`~cloudbk.backup.tarstream.PipeSink`). Memory is
bounded per worker (the pipe's chunks, the compressor's window, the writer's parts in flight), so by
``jobs``, whatever the size of the database. The first volume to fail cancels the others; its error is the
one raised.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from dataclasses import dataclass

from cloudbk.backup.tarstream import PipeSink, TarWriter
from cloudbk.backup.workers import checked, run_parallel
from cloudbk.errors import OperationFailed, UsageError
from cloudbk.pg.datadir import Entry
from cloudbk.progress import Progress
from cloudbk.repo import layout
from cloudbk.repo.manifest import FileEntry, LinkEntry, VolumeEntry
from cloudbk.repo.objects import TAR, create_object
from cloudbk.storage.base import Storage

log = logging.getLogger("cloudbk.backup")

MiB = 1024 * 1024
#: docs/format.md, "Volumes", says why 128 MiB
DEFAULT_VOLUME_SIZE = 128 * MiB
MIN_VOLUME_SIZE = 1 * MiB
BLOCK_SIZE = 8192  # PostgreSQL's BLCKSZ: split files are cut at multiples of it
DEFAULT_JOBS = 2
EXTENSIONS = {"zstd": ".zst", "lz4": ".lz4", "gzip": ".gz", "none": ""}


class Counter:
    """Thread-safe byte counter feeding the progress reporter; also where workers notice a cancellation."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._lock = threading.Lock()
        self.total = 0
        self.cancel = threading.Event()
        self._advance = checked(self.cancel, self._add)

    def _add(self, n: int) -> None:
        with self._lock:
            self.total += n
        self._progress.advance(n)

    def __call__(self, n: int) -> None:
        self._advance(n)


# -- planning -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Piece:
    """One item of a volume: a directory, a whole file (``offset`` None) or ``length`` bytes of a file."""

    entry: Entry
    offset: int | None = None
    length: int = 0


@dataclass
class VolumePlan:
    stream: str  # "base" or the tablespace OID
    number: int  # 1-based, in the stream's order
    items: list[Piece]

    def object_name(self, compression: str) -> str:
        return volume_name(self.stream, self.number, compression)


def check_volume_size(size: int) -> int:
    """``size``, or a ``UsageError`` when it is too small or not a multiple of PostgreSQL's block."""
    if size < MIN_VOLUME_SIZE or size % BLOCK_SIZE:
        raise UsageError(
            f"volume size {size} is not a multiple of {BLOCK_SIZE} bytes of at least {MIN_VOLUME_SIZE}",
            hint=f"e.g. --volume-size 128MiB (the default is {DEFAULT_VOLUME_SIZE // MiB}MiB)",
        )
    return size


def volume_name(stream: str, number: int, compression: str) -> str:
    return f"{stream}.{number:05d}.tar{EXTENSIONS[compression]}"


def plan_stream(stream: str, entries: list[Entry], volume_size: int) -> list[VolumePlan]:
    """Cut one stream's entries into volumes of at most ``volume_size`` bytes of file content."""
    volumes: list[list[Piece]] = [[]]
    used = 0

    def close() -> None:
        nonlocal used
        if volumes[-1]:
            volumes.append([])
        used = 0

    for entry in entries:
        if entry.kind != "f" or entry.size == 0:
            volumes[-1].append(Piece(entry))
        elif entry.size <= volume_size:
            if used + entry.size > volume_size:
                close()
            volumes[-1].append(Piece(entry))
            used += entry.size
        else:
            close()
            for offset in range(0, entry.size, volume_size):
                length = min(volume_size, entry.size - offset)
                volumes[-1].append(Piece(entry, offset, length))
                used = length
                if length == volume_size:
                    close()
    if len(volumes) > 1 and not volumes[-1]:
        volumes.pop()
    return [VolumePlan(stream, n, items) for n, items in enumerate(volumes, 1)]


def stream_links(entries: list[Entry]) -> list[LinkEntry]:
    """The symbolic links the scan followed in a stream (recorded in the manifest, not in the tar)."""
    kinds = {"d": LinkEntry.DIR, "f": LinkEntry.FILE}
    return [LinkEntry(e.rel, e.target, kinds.get(e.kind, LinkEntry.DANGLING)) for e in entries if e.target]


# -- writing --------------------------------------------------------------------------------------------------


class VolumeWriter:
    """One volume being written: envelope header, then tar -> compressor -> object writer."""

    def __init__(
        self, storage: Storage, key: str, name: str, compression: str, threads: int, on_bytes: Counter
    ) -> None:
        self.name = name
        # a volume's parts go one after the other (its worker waits while one uploads): the jobs are the
        # parallelism, and memory is ``jobs`` parts, whatever the database size
        self.sink = create_object(storage, key, TAR, name, compression, threads=threads, parts_in_flight=1)
        # files are read and hashed in this thread; the tar is hashed, compressed and uploaded in another
        self.pipe = PipeSink(self.sink, depth=4)  # 4 MiB between the threads, per volume in flight
        self.tar = TarWriter(self.pipe, on_bytes)
        self.files: list[FileEntry] = []
        self.shrunk = 0

    def add(self, piece: Piece) -> None:
        entry = piece.entry
        if entry.kind == "d":
            self.tar.add_dir(entry.rel, entry.mode, entry.mtime)
        elif entry.kind == "f":
            self.add_file(entry.rel, entry.path, piece)

    def add_file(self, rel: str, path: str, piece: Piece) -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            log.debug("%s vanished during the backup; WAL replay recreates it if it is needed", path)
            if piece.offset is None:
                return
            # a piece of a split file that was dropped meanwhile is stored as zeros, as if the file had shrunk:
            # the stream's other volumes hold its other pieces, and they must still cover the file
            fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise OperationFailed(f"cannot read {path}: {exc.strerror}", key=path) from exc
        try:
            st = os.fstat(fd)
            regular = stat.S_ISREG(st.st_mode)
            if regular:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            # a whole file is copied at the size it has now; a piece at the size it was planned with
            size = st.st_size if piece.offset is None else piece.length
            mode, mtime = (st.st_mode, st.st_mtime) if regular else (piece.entry.mode, piece.entry.mtime)
            try:
                entry, short = self.tar.add_file(rel, fd, size, mode, mtime, piece.offset)
            except OSError as exc:
                raise OperationFailed(f"cannot read {path}: {exc.strerror}", key=path) from exc
        finally:
            os.close(fd)
        if short:
            self.shrunk += 1
            log.debug("%s shrank by %d bytes while it was copied; padded with zeros", path, short)
        self.files.append(entry)

    def add_bytes(self, rel: str, data: bytes) -> None:
        self.files.append(self.tar.add_bytes(rel, data))

    def finish(self) -> VolumeEntry:
        self.tar.close()
        self.pipe.close()
        stored = self.sink.commit()
        return VolumeEntry(self.name, stored.size, stored.sha256, stored.stored_size, self.files)

    def abort(self) -> None:
        self.pipe.abort()
        self.sink.abort()


@dataclass(frozen=True)
class VolumeJob:
    """Where and how the volumes of one backup are written."""

    storage: Storage
    server: str
    backup_id: str
    compression: str
    threads: int  # compressor threads per volume
    counter: Counter

    def open(self, stream: str, number: int) -> VolumeWriter:
        name = volume_name(stream, number, self.compression)
        key = layout.backup_object_key(self.server, self.backup_id, name)
        return VolumeWriter(self.storage, key, name, self.compression, self.threads, self.counter)

    def write(self, plan: VolumePlan) -> tuple[VolumeEntry, int]:
        """Write one planned volume; return it and how many of its files shrank while they were copied."""
        writer = self.open(plan.stream, plan.number)
        try:
            for piece in plan.items:
                writer.add(piece)
            return writer.finish(), writer.shrunk
        except BaseException:
            writer.abort()
            raise


def write_volumes(job: VolumeJob, plans: list[VolumePlan], jobs: int) -> dict[tuple[str, int], tuple[VolumeEntry, int]]:
    """Write every planned volume, ``jobs`` at a time; (stream, number) -> (volume, files that shrank)."""
    results = run_parallel(job.write, plans, jobs, job.counter.cancel, "volume")
    return {(p.stream, p.number): result for p, result in zip(plans, results, strict=True)}
