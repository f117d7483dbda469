#!/usr/bin/env python3
"""WAL benchmark: cloudbk's archive_command and restore_command next to pgBackRest async (and barman-cloud),
on one S3 endpoint (SeaweedFS's S3 gateway over HTTPS on 127.0.0.1), in one run (issues 10 and 11).

Phases (``--phases``, comma-separated; default ``push,hit,fetch,restore,load``):

- ``push``: PostgreSQL's archiver replayed. ``--segments`` real pgbench segments sit in a data directory's
  pg_wal with ``archive_status/NAME.ready``; one call at a time (cwd = the data directory, ``%p`` =
  ``pg_wal/NAME``), ``.ready`` renamed to ``.done`` after each exit 0. cloudbk with ``CLOUDBK_PUSH_AHEAD=0`` and
  at its default, ``pgbackrest archive-push`` (archive-async=y, process-max=2, zstd at cloudbk's level),
  barman-cloud-wal-archive when /opt/barman-venv has it; and the raw PUT ceiling (boto3, 8 threads, no
  compression). Segments/s, ms per call, CPU seconds per segment of every process (detached workers too).
- ``hit``: the per-call floor, median of ``--hit-runs`` fresh processes each: ``pgbackrest version``, the venv's
  ``python -I -S -c pass`` and ``python -c pass``; and cloudbk's marker-hit path once push-ahead writes markers.
- ``fetch``: PostgreSQL's recovery replayed (cwd = data directory with recovery.signal, ``%p`` =
  ``pg_wal/RECOVERYXLOG``, each file checked and deleted): cloudbk with ``CLOUDBK_PREFETCH=0`` and at its
  default, pgBackRest async archive-get, barman-cloud-wal-restore ``--parallel``.
- ``restore``: a real PITR restore of a base backup plus ``--segments`` of WAL: seconds from ``cloudbk restore``
  (prefetch 0 and default) and from ``pgbackrest restore`` to the server out of recovery.
- ``load``: a real PostgreSQL 15 under ``pgbench -N`` for ``--load-seconds`` with each archive_command in turn:
  largest ``.ready`` backlog, ``failed_count``, WAL MiB/s.
- ``calls``: the older per-backend table (``--backends``, ``--calls``): cloudbk alone on every backend.

    /opt/cloudbk-venv/bin/python scripts/bench_wal.py --segments 16 --load-seconds 20   # a quick run
    /opt/cloudbk-venv/bin/python scripts/bench_wal.py --json /tmp/bench-wal.json          # the full run
    /opt/cloudbk-venv/bin/python scripts/bench_wal.py --phases calls --backends file,s3-moto,s3-seaweedfs,azure,gcs

Run it as root (PostgreSQL and every archive/restore command then run as the ``postgres`` user). Needs
``apt-get install pgbackrest``; barman-cloud is optional (a virtualenv at /opt/barman-venv with barman[cloud]
and zstandard). Services listen on 127.0.0.1 only and are stopped by PID; everything temporary lives in one
directory that is removed at the end. The machine's other load shows in the numbers: they are indicative.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

PHASES = ("push", "hit", "fetch", "restore", "load", "calls")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--phases", default="push,hit,fetch,restore,load", help=f"comma-separated, from {','.join(PHASES)}"
    )
    parser.add_argument("--segments", type=int, default=64, help="real 16 MiB segments replayed per tool")
    parser.add_argument("--scale", type=int, default=10, help="pgbench scale of the segment generator")
    parser.add_argument("--hit-runs", type=int, default=25, help="runs of each hit-path command (≥ 20)")
    parser.add_argument("--marker-wait", type=float, default=60, help="seconds to wait for push-ahead markers")
    parser.add_argument("--settle", type=float, default=60, help="seconds to wait for detached workers to exit")
    parser.add_argument("--barman-parallel", type=int, default=8, help="barman-cloud-wal-restore --parallel")
    parser.add_argument("--no-barman", action="store_true", help="leave barman-cloud out")
    parser.add_argument("--load-seconds", type=int, default=120, help="pgbench run per archiver")
    parser.add_argument("--load-scale", type=int, default=50, help="pgbench -i -s for the load phase")
    parser.add_argument("--load-clients", type=int, default=4, help="pgbench -c for the load phase")
    parser.add_argument("--drain-seconds", type=float, default=60, help="backlog drain allowed after each load")
    parser.add_argument("--backends", default="file,s3-seaweedfs", help="for --phases calls")
    parser.add_argument("--calls", type=int, default=10, help="segments per backend for --phases calls")
    parser.add_argument("--json", type=Path, help="also write the raw numbers to this file")
    args = parser.parse_args()
    args.phase_list = args.phases.split(",")
    for phase in args.phase_list:
        if phase not in PHASES:
            parser.error(f"unknown phase {phase!r}")
    if args.hit_runs < 20:
        parser.error("--hit-runs must be at least 20")
    return args


def meta(args: argparse.Namespace) -> dict[str, Any]:
    from cloudbk import __version__

    version = "not installed"
    if shutil.which("pgbackrest"):
        version = subprocess.run(["pgbackrest", "version"], capture_output=True, text=True).stdout.split()[-1]
    probe = [str(Path(sys.executable).parent / "python"), "-c", "import cloudbk; print(cloudbk.__file__)"]
    measured = subprocess.run(probe, capture_output=True, text=True, cwd="/").stdout.strip()
    return {
        "cloudbk_measured": measured,  # the package the commands under test import (this venv's)
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": os.cpu_count(),
        "segments": args.segments,
        "load_seconds": args.load_seconds,
        "phases": args.phase_list,
        "pgbackrest": version,
        "cloudbk": __version__,
        "loadavg_at_start": os.getloadavg(),
    }


def run_calls(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from benchlib.percall import BACKENDS, calls_phase
    from benchlib.walsource import generate

    backends = args.backends.split(",")
    for name in backends:
        if name not in BACKENDS:
            raise SystemExit(f"unknown backend {name!r}")
    store = work / "calls-segments"
    store.mkdir()
    source = generate(args.calls, store, args.scale)
    source.cluster.destroy()
    table, raw = calls_phase(backends, source.segments, work / "calls")
    print(table)
    return raw


def main() -> None:
    args = parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: PostgreSQL and the archive commands run as the postgres user")
    wants_peer = set(args.phase_list) - {"calls"}
    if wants_peer and not shutil.which("pgbackrest"):
        raise SystemExit("pgBackRest is not installed: apt-get install pgbackrest")
    from benchlib.proctree import become_subreaper

    become_subreaper()  # detached workers stay our descendants, so their CPU is counted
    work = Path(tempfile.mkdtemp(prefix="cloudbk-bench-wal-"))
    os.chmod(work, 0o755)  # the postgres user reaches its directories and the CA certificate
    os.environ["CLOUDBK_TEST_DIR"] = str(work / "pg")  # PostgreSQL clusters live in here too
    results: dict[str, Any] = {"meta": meta(args)}
    try:
        if "calls" in args.phase_list:
            (work / "calls").mkdir()
            results["calls"] = run_calls(args, work)
        if wants_peer:
            from benchlib.main import run_phases

            run_phases(args, work, results)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        report(args, results, bool(wants_peer))  # also what finished before an error


def report(args: argparse.Namespace, results: dict[str, Any], tables: bool) -> None:
    results["meta"]["loadavg_at_end"] = os.getloadavg()
    if tables:
        from benchlib.report import render

        print(render(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
