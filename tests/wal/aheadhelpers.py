"""Helpers for the push-ahead tests: PostgreSQL's archiver replayed over a synthetic pg_wal, and a subreaper that
collects the exit status of the detached workers."""

from __future__ import annotations

import ctypes
import os
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pgcluster import BIN_DIR
from walhelpers import scratch, write_file, write_segment

from cloudbk import background
from cloudbk.pg import walnames
from cloudbk.wal import marker
from cloudbk.wal.ahead import pg_order

PR_SET_CHILD_SUBREAPER = 36
HIT = "archived by push-ahead"


@dataclass
class Call:
    name: str
    returncode: int
    stderr: str

    @property
    def hit(self) -> bool:
        return HIT in self.stderr


@dataclass
class Archiver:
    """A data directory whose pg_wal holds synthetic WAL files marked ``.ready``, archived one call at a time with
    ``cwd`` = the data directory and ``%p`` = ``pg_wal/NAME``, ``.ready`` renamed ``.done`` after exit 0."""

    datadir: Path
    env: dict[str, str]
    calls: list[Call] = field(default_factory=list)

    @classmethod
    def make(cls, tag: str, env: Mapping[str, str]) -> Archiver:
        datadir = scratch(tag) / "data"
        (datadir / "pg_wal" / "archive_status").mkdir(parents=True)
        return cls(datadir, dict(env))

    @property
    def wal_dir(self) -> Path:
        return self.datadir / "pg_wal"

    @property
    def status_dir(self) -> Path:
        return self.wal_dir / "archive_status"

    def add_segments(self, timeline: int, segnos: Iterable[int], **kwargs: object) -> list[str]:
        names = [write_segment(self.wal_dir, timeline, segno, **kwargs).name for segno in segnos]
        for name in names:
            (self.status_dir / f"{name}.ready").touch()
        return names

    def add_file(self, name: str, data: bytes) -> str:
        write_file(self.wal_dir, name, data)
        (self.status_dir / f"{name}.ready").touch()
        return name

    def ready(self) -> list[str]:
        return pg_order([p.name.removesuffix(".ready") for p in self.status_dir.glob("*.ready")])

    def call(self, name: str, env: Mapping[str, str] | None = None, datadir: Path | None = None) -> Call:
        where = datadir or self.datadir
        proc = subprocess.run(
            [str(BIN_DIR / "cloudbk-wal-push"), f"pg_wal/{name}"],
            cwd=where,
            env={**os.environ, **(env if env is not None else self.env)},
            capture_output=True,
            text=True,
            timeout=300,
        )
        if proc.returncode == 0:
            status = where / "pg_wal" / "archive_status"
            os.rename(status / f"{name}.ready", status / f"{name}.done")
        call = Call(name, proc.returncode, proc.stderr)
        self.calls.append(call)
        return call

    def archive_all(self, retries: int = 0) -> list[Call]:
        """Archive every ready file in PostgreSQL's order; a failed call is retried (PostgreSQL waits 1 s)."""
        done: list[Call] = []
        while names := self.ready():
            call = self.call(names[0])
            if call.returncode != 0:
                if retries <= 0:
                    raise AssertionError(f"archiving {call.name} failed ({call.returncode}):\n{call.stderr}")
                retries -= 1
                continue
            done.append(call)
        return done

    def state_dir(self, env: Mapping[str, str] | None = None) -> str:
        ident = marker.identity({}, {**os.environ, **(env if env is not None else self.env)})
        return marker.state_dir(str(self.wal_dir), ident)

    def wait_for_markers(self, names: Iterable[str], timeout: float = 60) -> None:
        sdir = self.state_dir()
        wanted = list(names)
        deadline = time.monotonic() + timeout
        while not all(os.path.exists(os.path.join(sdir, n + marker.OK)) for n in wanted):
            if time.monotonic() > deadline:
                raise AssertionError(f"no markers for {wanted} after {timeout}s; worker log:\n{self.worker_log()}")
            time.sleep(0.05)

    def worker_log(self) -> str:
        path = Path(self.state_dir()) / background.LOG_FILE
        return path.read_text() if path.exists() else "(no worker log)"


def history_bytes(parent: int, switch_lsn: str) -> bytes:
    return f"{parent}\t{switch_lsn}\tno recovery target specified\n".encode()


def history_name(timeline: int) -> str:
    return walnames.history_name(timeline)


class Reaper:
    """Make this test process the subreaper of what it starts, so a detached worker, re-parented when the call
    that started it exits, becomes our child and its exit status can be read."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self.statuses: dict[int, int] = {}

    def __enter__(self) -> Reaper:
        assert self._libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
        return self

    def __exit__(self, *exc: object) -> None:
        self._libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)

    def exit_code(self, pid: int, timeout: float = 60) -> int:
        """The exit code of worker ``pid`` (negative: killed by that signal), waiting for it to end."""
        if pid in self.statuses:
            return self.statuses[pid]
        deadline = time.monotonic() + timeout
        while True:
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # not ours yet: the call that started it has not exited
                done, status = 0, 0
            if done == pid:
                self.statuses[pid] = os.waitstatus_to_exitcode(status)
                return self.statuses[pid]
            if time.monotonic() > deadline:
                raise AssertionError(f"worker {pid} still runs after {timeout}s")
            time.sleep(0.05)
