"""Run one command the way PostgreSQL runs archive_command / restore_command: as the server's OS user, a
fresh process, with a given working directory and environment; and the statistics the tables report."""

from __future__ import annotations

import os
import pwd
import statistics
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pgcluster import BIN_DIR, PG_BIN, PG_USER


@dataclass(frozen=True)
class Outcome:
    returncode: int
    seconds: float
    stderr: str


def pg_identity() -> tuple[int, int] | None:
    """(uid, gid) to switch to when we are root (PostgreSQL refuses to run as root), else None."""
    if os.geteuid() != 0:
        return None
    pw = pwd.getpwnam(PG_USER)
    return pw.pw_uid, pw.pw_gid


def chown_tree(path: Path) -> None:
    ident = pg_identity()
    if ident is None:
        return
    for root, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            os.chown(os.path.join(root, name), *ident)
    os.chown(path, *ident)


def base_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN_DIR}:{PG_BIN}:{env.get('PATH', '/usr/bin:/bin')}"
    if pg_identity() is not None:
        env["HOME"] = pwd.getpwnam(PG_USER).pw_dir
    env.update(extra or {})
    return env


def run_pg(argv: Sequence[str], env: Mapping[str, str], cwd: Path | str = "/", timeout: float = 600) -> Outcome:
    """Run ``argv`` as the PostgreSQL user (switched to directly, no runuser in between), timed."""
    ident = pg_identity()
    start = time.perf_counter()
    proc = subprocess.run(
        list(argv),
        env=dict(env),
        cwd=str(cwd),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        timeout=timeout,
        user=ident[0] if ident else None,
        group=ident[1] if ident else None,
        extra_groups=[] if ident else None,
    )
    seconds = time.perf_counter() - start
    return Outcome(proc.returncode, seconds, proc.stderr.decode(errors="replace"))


def check(outcome: Outcome, argv: Sequence[str]) -> Outcome:
    if outcome.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {outcome.returncode}:\n{outcome.stderr[-4000:]}")
    return outcome


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation between closest ranks."""
    data = sorted(values)
    if not data:
        return float("nan")
    pos = (len(data) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (pos - low)


def ms_summary(seconds: Sequence[float]) -> dict[str, float]:
    ms = [s * 1000 for s in seconds]
    return {
        "median_ms": statistics.median(ms),
        "p90_ms": percentile(ms, 90),
        "min_ms": min(ms),
        "max_ms": max(ms),
    }
