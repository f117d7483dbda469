"""The per-backend phase (``--phases calls``): per-call wall time of ``cloudbk-wal-push`` and
``cloudbk-wal-fetch`` for real segments on each backend (file, moto, SeaweedFS, Azurite, fake-gcs-server), next
to ``python -c pass``. Each call is a fresh process, exactly as PostgreSQL runs it."""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from services.launch import start_backend

BIN = Path(sys.executable).parent
MiB = 1024 * 1024
BACKENDS = ("file", "s3-moto", "s3-seaweedfs", "azure", "gcs")
_WORK_TIME = re.compile(r" in ([0-9.]+)s$", re.MULTILINE)


def timed(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, float | None]:
    """Wall time of one process, and the time cloudbk itself reports for its work (after start-up)."""
    start = time.perf_counter()
    proc = subprocess.run(argv, env={**os.environ, **(env or {})}, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stderr}")
    m = _WORK_TIME.search(proc.stderr)
    return wall, float(m.group(1)) if m else None


def summary(label: str, repo: str, samples: list[tuple[float, float | None]]) -> str:
    walls = [w * 1000 for w, _ in samples]
    works = [w * 1000 for _, w in samples if w is not None]
    work = f"{statistics.median(works):.0f}" if works else "-"
    return f"| {label} | {repo} | {statistics.median(walls):.0f} | {min(walls):.0f} | {max(walls):.0f} | {work} |"


def calls_phase(backends: list[str], segments: list[Path], work: Path) -> tuple[str, dict[str, object]]:
    """Push then fetch ``segments`` on each backend: the Markdown table and the raw numbers."""
    rows: list[str] = []
    raw: dict[str, object] = {}
    ratios: list[float] = []
    baseline = [timed([sys.executable, "-c", "pass"]) for _ in segments]
    rows.append(summary("`python -c pass`", "-", baseline))
    raw["python -c pass"] = [w for w, _ in baseline]
    for name in backends:
        home = work / name
        home.mkdir()
        service, url, env = start_backend(name, home)
        try:
            env = {**env, "CLOUDBK_REPO": url}
            pushes = [timed([str(BIN / "cloudbk-wal-push"), str(seg)], env) for seg in segments]
            fetches = []
            for seg in segments:
                dest = home / "RECOVERYXLOG"
                fetches.append(timed([str(BIN / "cloudbk-wal-fetch"), seg.name, str(dest)], env))
                if dest.read_bytes() != seg.read_bytes():
                    raise SystemExit(f"{seg.name} fetched from {name} differs from the original")
                dest.unlink()
            if name == "file":
                stored = sum(p.stat().st_size for p in (home / "repo").rglob("0*") if p.is_file())
                ratios.append(stored / (len(segments) * 16 * MiB))
            rows.append(summary("`cloudbk-wal-push`", name, pushes))
            rows.append(summary("`cloudbk-wal-fetch`", name, fetches))
            raw[name] = {"push": pushes, "fetch": fetches}
            print(f"  measured {name}", file=sys.stderr)
        finally:
            if service is not None:
                service.stop()
    lines = [
        f"### Per call, {len(segments)} calls each, 16 MiB segments from pgbench, one fresh process per call (ms)\n",
        "| command | repository | median | min | max | cloudbk's own work (median) |",
        "|---|---|---|---|---|---|",
        *rows,
    ]
    if ratios:
        lines.append(f"\nzstd: stored objects are {100 * ratios[0]:.0f}% of the segments' size")
    return "\n".join(lines), raw
