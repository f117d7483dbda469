#!/usr/bin/env python3
"""WAL command benchmark: per-call wall time of ``cloudbk-wal-push`` and ``cloudbk-wal-fetch`` for real 16 MiB
segments, next to the bare interpreter start (``python -c pass``).

An archive_command runs once per segment, hundreds of times a minute on a busy server, so what matters is the
whole process: interpreter start, imports, client set-up, the requests, compression. Each call here is a fresh
process, exactly as PostgreSQL runs it. The segments are real: a throwaway PostgreSQL 15 cluster runs
``pgbench -i`` and a short ``pgbench`` TPC-B run, and the most recent full segments are taken from its pg_wal.
Services are started on 127.0.0.1 by the same code the tests use and stopped by PID.

    /opt/cloudbk-venv/bin/python scripts/bench_wal.py                       # file and SeaweedFS (S3), 10 calls
    /opt/cloudbk-venv/bin/python scripts/bench_wal.py --backends file,s3-moto,s3-seaweedfs,azure,gcs --calls 20

Run it as root (PostgreSQL is then run as the ``postgres`` user) or as the PostgreSQL user itself.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from services.launch import start_backend  # noqa: E402 - needs the sys.path entries above

BIN = Path(sys.executable).parent
MiB = 1024 * 1024
BACKENDS = ("file", "s3-moto", "s3-seaweedfs", "azure", "gcs")
_WORK_TIME = re.compile(r" in ([0-9.]+)s$", re.MULTILINE)


def real_segments(count: int, out: Path, scale: int) -> list[Path]:
    """``count`` full WAL segments written by a real PostgreSQL 15 under pgbench, copied into ``out``."""
    from pgcluster import PG_BIN, PgCluster, run_as_pg

    cluster = PgCluster.init("bench-wal", initdb_args=("--no-sync",))
    cluster.configure({"wal_keep_size": "'4GB'", "max_wal_size": "'4GB'", "checkpoint_timeout": "'1h'"})
    cluster.start()
    try:
        pgbench = [str(PG_BIN / "pgbench"), "-h", "127.0.0.1", "-p", str(cluster.port), "-U", "postgres"]
        run_as_pg([*pgbench, "-i", "-q", "-s", str(scale), "postgres"])
        cluster.sql("checkpoint")  # the TPC-B run then writes full-page images, as a real server does
        run_as_pg([*pgbench, "-T", "10", "-c", "2", "-j", "2", "postgres"])
        current = cluster.sql("select pg_walfile_name(pg_current_wal_lsn())")
        wal_dir = cluster.datadir / "pg_wal"
        names = sorted(p.name for p in wal_dir.iterdir() if re.fullmatch(r"[0-9A-F]{24}", p.name) and p.name < current)
        if len(names) < count:
            raise SystemExit(f"only {len(names)} full segments were written; raise --scale")
        chosen = []
        for name in names[-count:]:
            shutil.copyfile(wal_dir / name, out / name)
            chosen.append(out / name)
        return chosen
    finally:
        cluster.destroy()


def timed(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, float | None]:
    """Wall time of one process, and the time cloudbk itself reports for its work (after start-up)."""
    import os

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="file,s3-seaweedfs", help=f"comma-separated, from {','.join(BACKENDS)}")
    parser.add_argument("--calls", type=int, default=10, help="segments pushed and fetched per backend")
    parser.add_argument("--scale", type=int, default=10, help="pgbench scale factor for the WAL generator")
    args = parser.parse_args()
    for name in args.backends.split(","):
        if name not in BACKENDS:
            parser.error(f"unknown backend {name!r}")

    from pgcluster import new_dir

    rows: list[str] = []
    ratios: list[float] = []
    with tempfile.TemporaryDirectory(prefix="cloudbk-bench-wal-") as tmp:
        segdir = new_dir("bench-segments")
        try:
            print(f"generating {args.calls} real WAL segments with pgbench (scale {args.scale}) ...", file=sys.stderr)
            segments = real_segments(args.calls, segdir, args.scale)
            baseline = [timed([sys.executable, "-c", "pass"]) for _ in range(args.calls)]
            rows.append(summary("`python -c pass`", "-", baseline))
            for name in args.backends.split(","):
                work = Path(tmp) / name
                work.mkdir()
                service, url, env = start_backend(name, work)
                try:
                    env = {**env, "CLOUDBK_REPO": url}
                    pushes = [timed([str(BIN / "cloudbk-wal-push"), str(seg)], env) for seg in segments]
                    fetches = []
                    for seg in segments:
                        dest = work / "RECOVERYXLOG"
                        fetches.append(timed([str(BIN / "cloudbk-wal-fetch"), seg.name, str(dest)], env))
                        if dest.read_bytes() != seg.read_bytes():
                            raise SystemExit(f"{seg.name} fetched from {name} differs from the original")
                        dest.unlink()
                    if name == "file":
                        stored = sum(p.stat().st_size for p in (work / "repo").rglob("0*") if p.is_file())
                        ratios.append(stored / (len(segments) * 16 * MiB))
                    rows.append(summary("`cloudbk-wal-push`", name, pushes))
                    rows.append(summary("`cloudbk-wal-fetch`", name, fetches))
                    print(f"  measured {name}", file=sys.stderr)
                finally:
                    if service is not None:
                        service.stop()
        finally:
            shutil.rmtree(segdir, ignore_errors=True)

    print(f"\nPer call, {args.calls} calls each, 16 MiB segments from pgbench, one fresh process per call (ms)\n")
    print("| command | repository | median | min | max | cloudbk's own work (median) |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(row)
    if ratios:
        print(f"\nzstd: stored objects are {100 * ratios[0]:.0f}% of the segments' size")


if __name__ == "__main__":
    main()
