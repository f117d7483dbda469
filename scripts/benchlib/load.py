"""Load phase: a real PostgreSQL 15 under the heaviest pgbench write load this machine produces, archiving
with each tool in turn; the largest ``.ready`` backlog, ``failed_count`` and how much WAL was written.

One cluster serves every archiver (``pgbench -i`` once, with ``archive_command = '/bin/true'``); before each
mode the archive_command is changed (a reload), the archiver's statistics reset; after it, whatever backlog is
left gets ``drain`` seconds to clear, then is discarded with ``/bin/true`` so the next mode starts at zero;
each mode starts right after a ``CHECKPOINT``, so each pays the same full-page images.
The server's environment carries the endpoint's credentials and CA (never the command line).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pgcluster import PgCluster

from .peers import PgBackRest, write_pgbackrest_config
from .walsource import pgbench

MiB = 1024 * 1024
DISCARD = "/bin/true"


def ready_count(status: Path) -> int:
    try:
        return sum(1 for name in os.listdir(status) if name.endswith(".ready"))
    except FileNotFoundError:
        return 0


@dataclass
class BacklogSampler:
    """Counts ``archive_status/*.ready`` every ``interval`` seconds in a thread; keeps the largest."""

    status: Path
    interval: float = 0.5
    largest: int = 0
    samples: int = 0

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.largest = max(self.largest, ready_count(self.status))
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> BacklogSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def start_load_cluster(env: Mapping[str, str], scale: int) -> PgCluster:
    cluster = PgCluster.init("bench-load", env=env, initdb_args=("--no-sync",))
    cluster.configure(
        {
            "synchronous_commit": "off",
            "full_page_writes": "on",
            "max_wal_size": "'4GB'",
            "archive_mode": "on",
            "archive_command": f"'{DISCARD}'",
        }
    )
    cluster.start()
    print(f"  pgbench -i -s {scale} for the load phase ...", file=sys.stderr)
    pgbench(cluster, "-i", "-q", "-s", str(scale))
    cluster.sql("checkpoint")
    set_archive_command(cluster, DISCARD)
    wait_backlog(cluster, 0, 600)
    return cluster


def set_archive_command(cluster: PgCluster, command: str) -> None:
    quoted = command.replace("'", "''")
    cluster.sql(f"alter system set archive_command = '{quoted}'")
    cluster.sql("select pg_reload_conf()")
    time.sleep(0.5)  # the archiver picks up the reload at its next wake-up


def wait_backlog(cluster: PgCluster, target: int, timeout: float) -> float | None:
    """Seconds until at most ``target`` files are ``.ready``, or None when ``timeout`` ran out."""
    status = cluster.datadir / "pg_wal" / "archive_status"
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if ready_count(status) <= target:
            return time.monotonic() - start
        time.sleep(0.5)
    return None


def load_mode(cluster: PgCluster, command: str, seconds: int, clients: int, drain: float) -> dict[str, Any]:
    set_archive_command(cluster, command)
    # Every mode starts right after a checkpoint, so each writes the same burst of full-page images.
    cluster.sql("checkpoint")
    cluster.sql("select pg_stat_reset_shared('archiver')")
    lsn0 = cluster.sql("select pg_current_wal_lsn()")
    status = cluster.datadir / "pg_wal" / "archive_status"
    with BacklogSampler(status) as sampler:
        start = time.monotonic()
        pgbench(cluster, "-N", "-T", str(seconds), "-c", str(clients), "-j", "2")
        elapsed = time.monotonic() - start
        wal_bytes = int(cluster.sql(f"select pg_current_wal_lsn() - '{lsn0}'::pg_lsn"))
        at_end = ready_count(status)
        drained = wait_backlog(cluster, 0, drain)
    archived, failed = cluster.sql("select archived_count, failed_count from pg_stat_archiver").split("|")
    set_archive_command(cluster, DISCARD)
    wait_backlog(cluster, 0, 600)
    return {
        "archive_command": command,
        "load_s": elapsed,
        "wal_mib": wal_bytes / MiB,
        "wal_mib_per_s": wal_bytes / MiB / elapsed,
        "largest_ready_backlog": sampler.largest,
        "ready_at_load_end": at_end,
        "drain_s": drained,
        "drain_limit_s": drain,
        "archived_count": int(archived),
        "failed_count": int(failed),
        "archived_segments_per_s": int(archived) / (elapsed + (drained if drained is not None else drain)),
    }


def load_phase(
    results: dict[str, Any],
    server_env: Mapping[str, str],
    cloudbk_commands: Mapping[str, str],
    pgbackrest_home: Path,
    endpoint: Any,
    scale: int,
    seconds: int,
    clients: int,
    drain: float,
    service_pids: list[int],
) -> None:
    """Each mode under the same load, into ``results`` as it finishes. ``service_pids`` gets the postmaster's
    PID while the cluster runs."""
    cluster = start_load_cluster(server_env, scale)
    try:
        service_pids.append(postmaster_pid(cluster))
        pgbackrest: PgBackRest = write_pgbackrest_config(
            pgbackrest_home, endpoint, "load", cluster.datadir, cluster.port, cluster.socket_dir
        )
        pgbackrest.create_stanza()
        modes = {**cloudbk_commands, "pgBackRest async": pgbackrest.archive_command()}
        for mode, command in modes.items():
            results[mode] = load_mode(cluster, command, seconds, clients, drain)
            r = results[mode]
            print(f"  load {mode}: {r['wal_mib_per_s']:.1f} MiB/s WAL, backlog ≤ {r['largest_ready_backlog']}, "
                  f"failed {r['failed_count']}", file=sys.stderr)  # fmt: skip
    finally:
        cluster.destroy()


def postmaster_pid(cluster: PgCluster) -> int:
    return int((cluster.datadir / "postmaster.pid").read_text().split()[0])
