"""Recovery with ``restore_command = 'cloudbk-wal-fetch %f %p'`` while the storage goes away and comes back.

The storage is cut with a TCP proxy between PostgreSQL's restore_command and the emulator (connections refused
and reset, as when the storage host vanishes); the primary archives through a direct connection.

- Archive recovery (PITR), with the prefetch spool on (a small window, so the cut comes with segments still to
  fetch): PostgreSQL must stop with FATAL and must not promote, whatever the prefetcher has or has not spooled;
  started again once the storage is back, it completes recovery to the target with all the data.
- Standby: wal-fetch exits 2, the standby keeps retrying, and catches up when the storage returns.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

from pgcluster import PG_BIN, PgCluster, new_dir, run_as_pg
from walhelpers import Outage, cloudbk_env

from cloudbk.repo.index import load_index

SEGMENTS_AFTER_BACKUP = 10
PROBE_DEADLINE = "0.5"  # the probes below only need to see the outage, not wait it out
RESTORED = re.compile(r'restored log file "([0-9A-F]{24})" from archive')


def _base_backup(primary: PgCluster, workdir: Path) -> Path:
    """A tar-format base backup without WAL: recovery has to fetch every segment from the archive."""
    target = workdir / "tar"
    run_as_pg(
        [str(PG_BIN / "pg_basebackup"), "-d", primary.conninfo, "-D", str(target), "-Ft", "-X", "none", "-c", "fast"]
    )
    return target / "base.tar"


def _restore(tar: Path, tag: str, env: dict[str, str], signal_file: str, settings: dict[str, str]) -> PgCluster:
    parent = new_dir(tag)
    datadir = parent / "data"
    run_as_pg(["mkdir", "-m", "700", str(datadir)])
    run_as_pg(["tar", "-xf", str(tar), "-C", str(datadir)])
    cluster = PgCluster(datadir, env=env)
    cluster.configure(
        {
            "port": str(cluster.port),
            "unix_socket_directories": f"'{parent}'",
            "archive_mode": "off",
            "restore_command": "'cloudbk-wal-fetch %f %p'",
            **settings,
        }
    )
    run_as_pg(["touch", str(datadir / signal_file)])
    return cluster


def _log(cluster: PgCluster) -> str:
    try:
        return cluster.logfile.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _wait(condition: object, what: str, cluster: PgCluster, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{cluster.log_tail(80)}")
        time.sleep(0.05)


def _control_state(cluster: PgCluster) -> str:
    out = run_as_pg([str(PG_BIN / "pg_controldata"), str(cluster.datadir)]).stdout
    return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Database cluster state"))


def test_pitr_stops_on_storage_outage_and_completes_after_restart(
    outage: Outage, pg_dirs: Callable[[str], Path]
) -> None:
    primary = PgCluster.init("primary", env=cloudbk_env(outage.direct), initdb_args=("--no-sync",))
    primary.enable_archiving("cloudbk-wal-push %p")
    primary.start()
    try:
        primary.sql("create table t (phase int, i int, pad text)")
        primary.sql("insert into t select 1, g, md5(g::text) from generate_series(1, 1000) g")
        tar = _base_backup(primary, pg_dirs("basebackup"))
        for n in range(SEGMENTS_AFTER_BACKUP):
            rows = f"generate_series({n * 500}, {n * 500 + 499})"
            primary.sql(f"insert into t select 2, g, repeat(md5(g::text), 4) from {rows} g")
            primary.sql("select pg_switch_wal()")
        primary.sql("select pg_create_restore_point('cloudbk_target')")
        primary.sql("insert into t select 3, g, 'after the target' from generate_series(1, 100) g")
        primary.sql("select pg_switch_wal()")
        expected = primary.sql("select count(*) from t where phase < 3")
        primary.wait_archived()
        assert primary.sql("select failed_count from pg_stat_archiver") == "0"
    finally:
        primary.destroy()

    env = cloudbk_env(outage.proxied, CLOUDBK_PREFETCH="2")
    restored = _restore(
        tar,
        "pitr",
        env,
        "recovery.signal",
        {
            "recovery_target_name": "'cloudbk_target'",
            "recovery_target_action": "'promote'",
            # after promotion the new timeline is archived into the same repository, its .history file first
            "archive_mode": "on",
            "archive_command": "'cloudbk-wal-push %p'",
        },
    )
    try:
        restored.start(wait=False)
        # let recovery get going, then take the storage away mid-recovery
        _wait(lambda: len(RESTORED.findall(_log(restored))) >= 2, "recovery to restore 2 segments", restored)
        outage.proxy.cut()
        _wait(lambda: not restored.is_running(), "PostgreSQL to stop", restored, timeout=60)

        log = _log(restored)
        restored_before = RESTORED.findall(log)
        assert len(restored_before) < SEGMENTS_AFTER_BACKUP + 1, "recovery finished before the outage"
        assert re.search(r"FATAL: +could not restore file \"[0-9A-F]{24}\" from archive", log), log[-3000:]
        assert "exiting with 126" in log  # cloudbk's own explanation, in the server log
        assert "selected new timeline ID" not in log and "archive recovery complete" not in log
        assert "database system is ready to accept connections" not in log
        assert (restored.datadir / "recovery.signal").exists(), "the server promoted"
        assert _control_state(restored) == "in archive recovery"

        # the restore_command alone, as PostgreSQL runs it (in the data directory), while the storage is down
        probe = run_as_pg(
            ["cloudbk-wal-fetch", "000000010000000000000010", str(pg_dirs("probe") / "x")],
            env={**env, "CLOUDBK_RETRY_DEADLINE": PROBE_DEADLINE},
            cwd=str(restored.datadir),
            check=False,
        )
        assert probe.returncode == 126, probe.stderr

        outage.proxy.restore()
        restored.start()
        restored.wait_for("select pg_is_in_recovery()", "f")
        assert restored.sql("select count(*) from t where phase < 3") == expected
        assert restored.sql("select count(*) from t where phase = 3") == "0"
        assert restored.sql("select substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)") == "00000002"
        assert restored_before == RESTORED.findall(_log(restored))[: len(restored_before)]
        assert "served from the prefetch spool" in _log(restored), "prefetch was not on"

        # the promoted server archives its new timeline into the same repository
        restored.sql("create table after_pitr as select 1 as x")
        restored.sql("select pg_switch_wal()")
        restored.wait_archived()
        assert restored.sql("select failed_count from pg_stat_archiver") == "0", restored.log_tail()
    finally:
        restored.destroy()

    index = load_index(outage.direct.open(), "main")
    assert 2 in index.histories and index.histories[2][0].timeline == 1
    assert 2 in index.segments
    assert any(name.endswith(".backup") for name in index.other_files), index.other_files


def test_standby_retries_through_storage_outage_and_catches_up(outage: Outage, pg_dirs: Callable[[str], Path]) -> None:
    primary = PgCluster.init("primary", env=cloudbk_env(outage.direct), initdb_args=("--no-sync",))
    primary.enable_archiving("cloudbk-wal-push %p")
    primary.start()
    standby: PgCluster | None = None
    try:
        primary.sql("create table t (phase int, i int)")
        tar = _base_backup(primary, pg_dirs("basebackup"))
        env = cloudbk_env(outage.proxied)
        standby = _restore(
            tar, "standby", env, "standby.signal", {"hot_standby": "on", "wal_retrieve_retry_interval": "'200ms'"}
        )
        standby.start()
        # (one statement per call: several in one psql -c share a transaction, committed after the switch)
        primary.sql("insert into t select 1, g from generate_series(1, 1000) g")
        primary.sql("select pg_switch_wal()")
        primary.wait_archived()
        standby.wait_for("select count(*) from t", "1000")

        outage.proxy.cut()
        cut_at = len(_log(standby))
        needed = primary.sql("select pg_walfile_name(pg_current_wal_lsn())")
        for n in range(3):
            primary.sql(f"insert into t select 2, g from generate_series({n * 1000}, {n * 1000 + 999}) g")
            primary.sql("select pg_switch_wal()")
        primary.wait_archived()  # the primary's own path to the storage is untouched

        probe = run_as_pg(
            ["cloudbk-wal-fetch", needed, str(pg_dirs("probe") / "x")],
            env={**env, "CLOUDBK_RETRY_DEADLINE": PROBE_DEADLINE},
            cwd=str(standby.datadir),
            check=False,
        )
        assert probe.returncode == 2, probe.stderr

        def retried() -> bool:
            return _log(standby)[cut_at:].count("standby mode, PostgreSQL will retry") >= 2

        _wait(retried, "the standby to retry the fetch twice", standby, timeout=60)
        assert standby.is_running()
        assert standby.sql("select pg_is_in_recovery()") == "t"
        assert standby.sql("select count(*) from t") == "1000"
        assert "FATAL" not in _log(standby)[cut_at:]

        outage.proxy.restore()
        standby.wait_for("select count(*) from t", "4000")

    finally:
        primary.destroy()
        if standby is not None:
            standby.destroy()
