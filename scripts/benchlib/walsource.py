"""Real WAL: a PostgreSQL 15 cluster under pgbench writes the segments every phase replays.

The cluster stays (stopped) for the whole run: pgBackRest's stanza is created against it and checks every
segment's system identifier against it, and its data directory is where the archiver and the recovery call
patterns are replayed, so every tool sees a real data directory with its own segments in ``pg_wal``.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from pgcluster import PG_BIN, PgCluster, run_as_pg

from .runner import chown_tree

SEGMENT = re.compile(r"[0-9A-F]{24}")
MAX_ROUNDS = 30  # pgbench rounds of 10 s before giving up on the segment count


@dataclass
class WalSource:
    cluster: PgCluster
    store: Path  # pristine copies of the chosen segments
    segments: list[Path]

    @property
    def datadir(self) -> Path:
        return self.cluster.datadir

    def names(self) -> list[str]:
        return [p.name for p in self.segments]


def pgbench(cluster: PgCluster, *args: str) -> None:
    base = [str(PG_BIN / "pgbench"), "-h", "127.0.0.1", "-p", str(cluster.port), "-U", "postgres"]
    run_as_pg([*base, *args, "postgres"], timeout=3600)


def _full_segments(cluster: PgCluster, after: str) -> list[str]:
    current = cluster.sql("select pg_walfile_name(pg_current_wal_lsn())")
    wal_dir = cluster.datadir / "pg_wal"
    return sorted(p.name for p in wal_dir.iterdir() if SEGMENT.fullmatch(p.name) and after <= p.name < current)


def generate(count: int, store: Path, scale: int) -> WalSource:
    """Start a cluster, write at least ``count`` full TPC-B segments (after ``pgbench -i``), copy them out.

    The cluster is left running: the caller creates pgBackRest's stanza, then calls :func:`stop`.
    """
    cluster = PgCluster.init("bench-wal", initdb_args=("--no-sync",))
    cluster.configure(
        {"wal_keep_size": "'8GB'", "max_wal_size": "'8GB'", "checkpoint_timeout": "'1h'", "synchronous_commit": "off"}
    )
    cluster.start()
    try:
        pgbench(cluster, "-i", "-q", "-s", str(scale))
        first = cluster.sql("select pg_walfile_name(pg_current_wal_lsn())")
        for _ in range(MAX_ROUNDS):
            # each round starts after a checkpoint, so it writes full-page images, as a busy server does
            cluster.sql("checkpoint")
            pgbench(cluster, "-T", "10", "-c", "4", "-j", "2")
            names = _full_segments(cluster, first)
            if len(names) >= count:
                break
        else:
            raise SystemExit(f"only {len(names)} full segments after {MAX_ROUNDS} pgbench rounds")
        segments = []
        for name in names[:count]:
            shutil.copyfile(cluster.datadir / "pg_wal" / name, store / name)
            segments.append(store / name)
        return WalSource(cluster, store, segments)
    except BaseException:
        cluster.destroy()
        raise


def _empty_pg_wal(datadir: Path) -> Path:
    wal = datadir / "pg_wal"
    shutil.rmtree(wal)
    (wal / "archive_status").mkdir(parents=True)
    return wal


def stage_ready(source: WalSource) -> Path:
    """pg_wal holding exactly the chosen segments, each with ``archive_status/NAME.ready``, as PostgreSQL leaves
    it for the archiver; anything else (markers, spools, earlier copies) removed. Returns the pg_wal path."""
    wal = _empty_pg_wal(source.datadir)
    (source.datadir / "recovery.signal").unlink(missing_ok=True)
    for seg in source.segments:
        shutil.copyfile(seg, wal / seg.name)
        (wal / "archive_status" / f"{seg.name}.ready").touch()
    chown_tree(wal)
    return wal


def stage_recovery(source: WalSource) -> Path:
    """An empty pg_wal and ``recovery.signal``: the data directory as restore_command sees it in recovery."""
    wal = _empty_pg_wal(source.datadir)
    (source.datadir / "recovery.signal").touch()
    chown_tree(wal)
    chown_tree(source.datadir / "recovery.signal")
    return wal


def clear(source: WalSource) -> None:
    """Give the staged copies' disk space back (the pristine ones in ``store`` stay)."""
    _empty_pg_wal(source.datadir)
