"""Helpers for the prefetch tests: PostgreSQL's restore_command calls replayed over a synthetic data directory
(``cwd`` = the data directory with ``recovery.signal``, ``%p`` = ``pg_wal/RECOVERYXLOG``), and an archive of
synthetic segments to replay from."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from backends import Backend
from pgcluster import BIN_DIR, new_dir
from walhelpers import SYSID, scratch, write_file, write_segment

from cloudbk import background
from cloudbk.pg import walnames
from cloudbk.repo import layout
from cloudbk.repo.index import update_index
from cloudbk.wal import marker, spool
from cloudbk.wal.push import index_change, stage_wal

SERVED = "served from the prefetch spool"
RECOVERYXLOG = "pg_wal/RECOVERYXLOG"


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def archive_segments(backend: Backend, timeline: int, segnos: Iterable[int], **kwargs: object) -> dict[str, str]:
    """Push synthetic segments into ``backend`` (server main, indexed); their names and SHA-256."""
    work = new_dir("prefetch-src")
    storage = backend.open()
    stored: dict[str, str] = {}
    try:
        staged = []
        for segno in segnos:
            path = write_segment(work, timeline, segno, **kwargs)
            staged.append(stage_wal(storage, "main", str(path), "zstd"))
            stored[path.name] = sha256_of(path.read_bytes())
            path.unlink()
        update_index(storage, "main", index_change(staged))
    finally:
        storage.close()
        shutil.rmtree(work, ignore_errors=True)
    return stored


def archive_file(backend: Backend, name: str, data: bytes) -> None:
    work = new_dir("prefetch-src")
    storage = backend.open()
    try:
        staged = stage_wal(storage, "main", str(write_file(work, name, data)), "zstd")
        update_index(storage, "main", index_change([staged]))
    finally:
        storage.close()
        shutil.rmtree(work, ignore_errors=True)


def corrupt_object(backend: Backend, name: str) -> None:
    """Flip a byte in the last part of a stored WAL object of a ``file://`` repository (its payload)."""
    path = Path(backend.url.removeprefix("file://")) / layout.wal_key("main", name)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.chmod(0o644)
    path.write_bytes(bytes(data))


@dataclass
class Call:
    name: str
    returncode: int
    stderr: str
    sha256: str | None  # of what the call left in %p
    seconds: float

    @property
    def served(self) -> bool:
        return SERVED in self.stderr


@dataclass
class Recovery:
    """A data directory in archive recovery whose restore_command calls a test makes one at a time."""

    datadir: Path
    env: dict[str, str]
    calls: list[Call] = field(default_factory=list)

    @classmethod
    def make(cls, tag: str, env: Mapping[str, str], sysid: int = SYSID, restore_id: str | None = None) -> Recovery:
        datadir = scratch(tag) / "data"
        (datadir / "pg_wal" / "archive_status").mkdir(parents=True)
        (datadir / "global").mkdir()
        (datadir / "global" / "pg_control").write_bytes(sysid.to_bytes(8, sys.byteorder) + bytes(8184))
        (datadir / "PG_VERSION").write_text("15\n")
        (datadir / "recovery.signal").touch()
        if restore_id is not None:
            (datadir / spool.RESTORE_ID_FILE).write_text(restore_id + "\n")
        return cls(datadir, dict(env))

    def call(self, name: str, env: Mapping[str, str] | None = None) -> Call:
        dest = self.datadir / RECOVERYXLOG
        start = time.monotonic()
        proc = subprocess.run(
            [str(BIN_DIR / "cloudbk-wal-fetch"), name, RECOVERYXLOG],
            cwd=self.datadir,
            env={**os.environ, **(env if env is not None else self.env)},
            capture_output=True,
            text=True,
            timeout=300,
        )
        seconds = time.monotonic() - start
        digest = sha256_of(dest.read_bytes()) if proc.returncode == 0 and dest.exists() else None
        if dest.exists():
            dest.unlink()  # PostgreSQL removes it once it has read it
        call = Call(name, proc.returncode, proc.stderr, digest, seconds)
        self.calls.append(call)
        return call

    def spool_dir(self, env: Mapping[str, str] | None = None) -> Path:
        ident = marker.identity({}, {**os.environ, **(env if env is not None else self.env)})
        return Path(spool.spool_dir(str(self.datadir), ident))

    def entries(self) -> set[str]:
        sdir = self.spool_dir()
        return {n for n in os.listdir(sdir) if spool.is_segment_name(n)} if sdir.is_dir() else set()

    def wait_for_entries(self, names: Iterable[str], timeout: float = 60) -> None:
        wanted = set(names)
        deadline = time.monotonic() + timeout
        while not wanted <= self.entries():
            if time.monotonic() > deadline:
                raise AssertionError(f"no spool entries {sorted(wanted - self.entries())}; log:\n{self.worker_log()}")
            time.sleep(0.05)

    def wait_idle(self, timeout: float = 60) -> None:
        """Until the prefetcher has exited."""
        deadline = time.monotonic() + timeout
        while background.is_running(str(self.spool_dir())):
            if time.monotonic() > deadline:
                raise AssertionError(f"the prefetcher still runs after {timeout}s; log:\n{self.worker_log()}")
            time.sleep(0.1)

    def worker_log(self) -> str:
        path = self.spool_dir() / background.LOG_FILE
        return path.read_text() if path.exists() else "(no prefetcher log)"


def segment(timeline: int, segno: int) -> str:
    return walnames.segment_name(timeline, segno)
