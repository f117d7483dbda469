"""PostgreSQL's call patterns, replayed: the archiver (archive_command) and recovery (restore_command).

Archiver: one call at a time, oldest ``.ready`` first, cwd = the data directory, ``%p`` = ``pg_wal/NAME``;
after an exit 0 ``archive_status/NAME.ready`` is renamed to ``NAME.done``; a failure is retried after 1 s
(PostgreSQL retries three times, then waits a minute: here the run stops instead).
Recovery: cwd = the data directory (with ``recovery.signal``), ``%p`` = ``pg_wal/RECOVERYXLOG``, names in
order; each file fetched is checked byte for byte against the original, then deleted (as replay consumes it).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .proctree import CpuMeter
from .runner import ms_summary, run_pg
from .walsource import WalSource

RETRIES = 3

PushCommand = Callable[[str], list[str]]  # %p -> argv
FetchCommand = Callable[[str, str], list[str]]  # (%f, %p) -> argv


@dataclass
class Replay:
    """The outcome of one replay: per-call wall times, the loop's wall time and CPU."""

    mode: str
    calls: list[float] = field(default_factory=list)
    failures: int = 0
    errors: list[str] = field(default_factory=list)  # the end of a failed call's stderr, a few of them
    wall: float = 0.0
    cpu: float = 0.0
    emulator_cpu: float = 0.0
    system_cpu: float = 0.0
    unfinished_workers: int = 0

    def as_dict(self) -> dict[str, Any]:
        n = len(self.calls) - self.failures
        return {
            "mode": self.mode,
            "segments": n,
            "failed_calls": self.failures,
            "failed_call_stderr": self.errors,
            "wall_s": self.wall,
            "segments_per_s": n / self.wall if self.wall else 0.0,
            **ms_summary(self.calls),
            "cpu_s_per_segment": self.cpu / n if n else 0.0,
            "emulator_cpu_s_per_segment": self.emulator_cpu / n if n else 0.0,
            "machine_cpu_s_per_segment": self.system_cpu / n if n else 0.0,  # everything on the machine
            "unfinished_workers": self.unfinished_workers,
        }


def _call(replay: Replay, argv: list[str], env: Mapping[str, str], cwd: Path) -> None:
    for attempt in range(RETRIES + 1):
        outcome = run_pg(argv, env, cwd=cwd)
        replay.calls.append(outcome.seconds)
        if outcome.returncode == 0:
            return
        replay.failures += 1
        if len(replay.errors) < 5:
            replay.errors.append(f"{' '.join(argv)} exited {outcome.returncode} after {outcome.seconds:.1f}s: "
                                 f"{outcome.stderr[-1500:]}")  # fmt: skip
        if attempt == RETRIES:
            raise SystemExit(f"{replay.mode}: {' '.join(argv)} failed {RETRIES + 1} times:\n{outcome.stderr[-4000:]}")
        time.sleep(1)


def _account(replay: Replay, meter: CpuMeter) -> None:
    meter.stop()
    replay.cpu, replay.emulator_cpu, replay.system_cpu = meter.seconds, meter.service_seconds, meter.system_seconds
    replay.unfinished_workers = meter.unfinished


def replay_archiver(
    mode: str, source: WalSource, command: PushCommand, env: Mapping[str, str], meter: CpuMeter
) -> Replay:
    """Archive every ``.ready`` segment in ``source``'s pg_wal (staged by the caller), one call at a time."""
    replay = Replay(mode)
    status = source.datadir / "pg_wal" / "archive_status"
    meter.start()
    start = time.perf_counter()
    for name in source.names():  # PostgreSQL's order: .history first (none here), then oldest first
        _call(replay, command(f"pg_wal/{name}"), env, source.datadir)
        (status / f"{name}.ready").rename(status / f"{name}.done")
    replay.wall = time.perf_counter() - start
    _account(replay, meter)
    return replay


def replay_recovery(
    mode: str, source: WalSource, command: FetchCommand, env: Mapping[str, str], meter: CpuMeter
) -> Replay:
    """Fetch every segment of ``source`` in order into ``pg_wal/RECOVERYXLOG`` (the caller staged recovery)."""
    replay = Replay(mode)
    dest = source.datadir / "pg_wal" / "RECOVERYXLOG"
    meter.start()
    start = time.perf_counter()
    for seg in source.segments:
        _call(replay, command(seg.name, "pg_wal/RECOVERYXLOG"), env, source.datadir)
        if dest.read_bytes() != seg.read_bytes():
            raise SystemExit(f"{mode}: {seg.name} fetched differs from the original")
        dest.unlink()
    replay.wall = time.perf_counter() - start
    _account(replay, meter)
    return replay
