"""Restore phase (issue 11): a real PITR restore of a base backup plus ``segments`` of WAL, from
``cloudbk restore`` (or ``pgbackrest restore``) to the server out of recovery and accepting writes.

One source cluster archives into both repositories at once (``archive_command`` runs cloudbk, then
pgBackRest) and both take a base backup of it before pgbench writes the WAL to replay. Each restore goes into
a fresh directory, with ``archive_mode = off`` (a promoted copy must not publish a new timeline the next
restore would follow), and must end with the same table checksum as the source.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pgcluster import BIN_DIR, PgCluster, new_dir, run_as_pg

from .endpoint import Endpoint
from .peers import PgBackRest, write_pgbackrest_config
from .runner import base_env, check, chown_tree, run_pg
from .walsource import pgbench

CHECKSUM = "select count(*) || ':' || sum(abalance) || ':' || sum(hashtext(filler)) from pgbench_accounts"
SERVER = "bench-pitr"


def _source(
    env: Mapping[str, str], scale: int, pgbackrest_home: Path, endpoint: Endpoint
) -> tuple[PgCluster, PgBackRest]:
    cluster = PgCluster.init("bench-pitr", env=env, initdb_args=("--no-sync",))
    pgbackrest = write_pgbackrest_config(
        pgbackrest_home, endpoint, "pitr", cluster.datadir, cluster.port, cluster.socket_dir
    )
    both = f"{BIN_DIR / 'cloudbk-wal-push'} %p && {pgbackrest.archive_command()}"
    cluster.configure({"max_wal_size": "'8GB'", "checkpoint_timeout": "'1h'", "synchronous_commit": "off"})
    cluster.enable_archiving(both)
    cluster.start()
    pgbench(cluster, "-i", "-q", "-s", str(scale))
    pgbackrest.create_stanza()
    return cluster, pgbackrest


def _backups_and_wal(cluster: PgCluster, pgbackrest: PgBackRest, env: Mapping[str, str], segments: int) -> str:
    """Both base backups, then at least ``segments`` segments of pgbench WAL, all archived; the checksum."""
    run_as_pg([str(BIN_DIR / "cloudbk"), "backup-push", "--dbname", cluster.conninfo, "--pgdata",
               str(cluster.datadir)], env=env, timeout=1800)  # fmt: skip
    run_as_pg(pgbackrest.argv("--log-level-console=warn", "--type=full", "backup"), timeout=1800)
    start = int(cluster.sql("select pg_current_wal_lsn() - '0/0'::pg_lsn"))
    while int(cluster.sql("select pg_current_wal_lsn() - '0/0'::pg_lsn")) - start < segments * 16 * 1024 * 1024:
        cluster.sql("checkpoint")  # full-page images again: more WAL per round, as on a busy server
        pgbench(cluster, "-N", "-T", "10", "-c", "4", "-j", "2")
    checksum = cluster.sql(CHECKSUM)
    cluster.sql("select pg_switch_wal()")
    cluster.wait_archived(timeout=1800)
    return checksum


def _recover(dest: Path, env: Mapping[str, str], started: float, checksum: str) -> dict[str, float]:
    """Start the restored directory, wait until it is out of recovery, check the data; timings from ``started``."""
    restored = time.perf_counter()
    pg = PgCluster(dest, env=env)
    pg.logfile = dest.parent / "restored.log"
    pg.configure({"archive_mode": "off", "unix_socket_directories": f"'{dest.parent}'", "port": str(pg.port)})
    try:
        pg.start()
        connected = time.perf_counter()
        pg.wait_for("select pg_is_in_recovery()", "f", timeout=3600)
        ready = time.perf_counter()
        if pg.sql(CHECKSUM) != checksum:
            raise SystemExit(f"the server restored into {dest} does not hold the source's data")
    finally:
        pg.destroy()
    return {
        "restore_s": restored - started,
        "first_connection_s": connected - started,
        "to_ready_s": ready - started,
        "recovery_s": ready - restored,
    }


def restore_phase(endpoint: Endpoint, work: Path, segments: int, scale: int) -> dict[str, Any]:
    creds = {**endpoint.env(), "CLOUDBK_REPO": f"s3://{endpoint.bucket}/pitr", "CLOUDBK_SERVER": SERVER}
    env = base_env(creds)
    cluster, pgbackrest = _source(env, scale, work / "pgbackrest-pitr", endpoint)
    try:
        print(f"  restore: base backups and {segments} segments of WAL ...", file=sys.stderr)
        checksum = _backups_and_wal(cluster, pgbackrest, env, segments)
    finally:
        cluster.destroy()
    results: dict[str, Any] = {}
    for mode, knobs in (("cloudbk prefetch 0", {"CLOUDBK_PREFETCH": "0"}), ("cloudbk default", {})):
        dest = new_dir("pitr-cloudbk") / "data"
        mode_env = base_env({**creds, **knobs})
        started = time.perf_counter()
        argv = [str(BIN_DIR / "cloudbk"), "restore", str(dest)]
        check(run_pg(argv, mode_env, timeout=3600), argv)
        results[mode] = _recover(dest, mode_env, started, checksum)
        print(f"  restore {mode}: ready after {results[mode]['to_ready_s']:.1f} s", file=sys.stderr)
    dest = new_dir("pitr-pgbackrest") / "data"
    dest.mkdir(mode=0o700)  # pgBackRest restores into an existing, empty directory
    chown_tree(dest)
    started = time.perf_counter()
    argv = pgbackrest.argv(f"--pg1-path={dest}", "restore")
    check(run_pg(argv, env, timeout=3600), argv)
    results["pgBackRest async"] = _recover(dest, env, started, checksum)
    print(f"  restore pgBackRest: ready after {results['pgBackRest async']['to_ready_s']:.1f} s", file=sys.stderr)
    return results
