"""The prefetch spool under real PostgreSQL 15 recoveries: ``cloudbk restore`` of a ``cloudbk backup-push``
backup, ``restore_command = 'cloudbk-wal-fetch ...'`` as restore writes it, prefetch on (the default).

- PITR on S3 and Azure: every segment replayed, the target reached, most segments served from the spool (the
  first ones filled while the backup extracted), the prefetcher killed with SIGKILL once mid-recovery, and
  the spool removed once the server runs outside recovery.
- Across a timeline switch: restores to ``latest`` and to a point on the old timeline after the switch point
  each replay their own timeline's segments.
(The storage cut mid-recovery with prefetch on is test_wal_recovery_pg.py's key test.)
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import threading
import time

import pytest
from backends import Backend, selected, unique_prefix
from pgcluster import BIN_DIR, PgCluster, cloudbk, new_dir
from walhelpers import cloudbk_env

from cloudbk import background
from cloudbk.wal import spool

RESTORED = re.compile(r'restored log file "([0-9A-F]{24})" from archive')
SERVED = re.compile(r"([0-9A-F]{24}) served from the prefetch spool")
SEGMENTS = 12


@pytest.fixture(params=selected(("s3-seaweedfs", "azure")))
def pitr_backend(request: pytest.FixtureRequest) -> Backend:
    service = request.getfixturevalue(f"{request.param.replace('-', '_')}_service")
    backend: Backend = service.make(unique_prefix("prefetch-pg"))
    return backend


def _primary(env: dict[str, str], tag: str) -> PgCluster:
    primary = PgCluster.init(tag, env=env, initdb_args=("--no-sync",))
    primary.enable_archiving(f"{BIN_DIR / 'cloudbk-wal-push'} %p")
    primary.configure({"checkpoint_timeout": "'30min'", "max_wal_size": "'1GB'"})
    primary.start()
    primary.sql("create table t (phase text, i int, pad text)")
    return primary


def _backup(primary: PgCluster, env: dict[str, str]) -> str:
    out = cloudbk("backup-push", "--dbname", primary.conninfo, "--pgdata", str(primary.datadir), env=env)
    return out.stdout.strip().splitlines()[-1]


def _segments(primary: PgCluster, phase: str, count: int) -> None:
    for _ in range(count):
        primary.sql(f"insert into t select '{phase}', g, repeat(md5(g::text), 8) from generate_series(1, 2000) g")
        primary.sql("select pg_switch_wal()")


def _restore(env: dict[str, str], tag: str, *args: str) -> tuple[PgCluster, str]:
    dest = new_dir(tag) / "data"
    out = cloudbk("restore", str(dest), *args, env=env)
    cluster = PgCluster(dest, env=env)
    cluster.configure({"port": str(cluster.port), "unix_socket_directories": f"'{dest.parent}'", "archive_mode": "off"})
    return cluster, out.stdout + out.stderr


def _log(cluster: PgCluster) -> str:
    try:
        return cluster.logfile.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _spool_gone(cluster: PgCluster, env: dict[str, str]) -> None:
    """The spool goes once the server runs outside recovery: by the prefetcher, else by the next check."""
    root = cluster.datadir / "pg_wal" / spool.STATE_DIR
    deadline = time.monotonic() + 15
    while root.exists() and any(background.is_running(str(d)) for d in root.iterdir()):
        assert time.monotonic() < deadline, "a prefetcher outlives recovery"
        time.sleep(0.1)
    if root.exists():
        cloudbk("check", "--pgdata", str(cluster.datadir), "--dbname", cluster.conninfo, env=env, check=False)
    assert not root.exists(), sorted(os.listdir(root))


def _kill_once(cluster: PgCluster, killed: list[int], stop: threading.Event) -> None:
    """SIGKILL the prefetcher once, while it works (a lock held and a download under way), after the server
    has been served its first segment from what restore spooled."""
    root = cluster.datadir / "pg_wal" / spool.STATE_DIR
    while not stop.is_set() and not SERVED.search(_log(cluster)):
        time.sleep(0.01)
    while not stop.is_set() and not killed:
        for sdir in root.glob("*") if root.exists() else []:
            pid = background.worker_pid(str(sdir))
            if pid and background.is_running(str(sdir)) and any(sdir.glob("*" + spool.BUSY)):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
        time.sleep(0.01)


def test_pitr_restore_with_prefetch_replays_every_segment(pitr_backend: Backend) -> None:
    env = cloudbk_env(pitr_backend, CLOUDBK_RETRY_DEADLINE="30")
    primary = _primary(env, "prefetch-src")
    try:
        primary.sql("insert into t select 'base', g, '' from generate_series(1, 1000) g")
        _backup(primary, env)
        _segments(primary, "replayed", SEGMENTS)
        primary.sql("select pg_create_restore_point('prefetch_target')")
        primary.sql("insert into t select 'after', g, '' from generate_series(1, 100) g")
        primary.sql("select pg_switch_wal()")
        expected = primary.sql("select count(*) from t where phase <> 'after'")
        primary.wait_archived()
    finally:
        primary.destroy()

    restored, output = _restore(env, "prefetch-pitr", "--target-name", "prefetch_target")
    assert "prefetching the first WAL segments" in output, output
    killed: list[int] = []
    stop = threading.Event()
    killer = threading.Thread(target=_kill_once, args=(restored, killed, stop))
    killer.start()
    try:
        restored.start(wait=False)
        restored.wait_for("select pg_is_in_recovery()", "f", timeout=180)
        stop.set()
        killer.join()
        assert restored.sql("select count(*) from t where phase <> 'after'") == expected
        assert restored.sql("select count(*) from t where phase = 'after'") == "0"
        log = _log(restored)
        names = RESTORED.findall(log)
        segnos = [int(n[8:16], 16) * 256 + int(n[16:], 16) for n in names if n.startswith("00000001")]
        assert segnos == list(range(segnos[0], segnos[0] + len(segnos))) and len(segnos) >= SEGMENTS, names
        served = SERVED.findall(log)
        assert len(served) >= SEGMENTS // 2, log[-4000:]
        assert names[0] in served, "the first segment should come from the spool restore filled"
        assert killed, "the prefetcher was never caught downloading"
        _spool_gone(restored, env)
    finally:
        stop.set()
        restored.destroy()


def test_restores_across_a_timeline_switch_replay_their_own_timeline() -> None:
    repo = new_dir("prefetch-tli-repo")
    backend = Backend("file", f"file://{repo}")
    env = cloudbk_env(backend, CLOUDBK_RETRY_DEADLINE="30")
    primary = _primary(env, "prefetch-tli")
    try:
        _backup(primary, env)
        _segments(primary, "a", 3)
        switch_lsn = primary.sql("select pg_current_wal_lsn()")
        _segments(primary, "b", 3)
        primary.wait_archived()

        # a restore to the switch point promotes onto timeline 2 and archives it into the same repository
        first, _ = _restore(env, "prefetch-tli-1", "--target-lsn", switch_lsn)
        first.configure({"archive_mode": "on", "archive_command": f"'{BIN_DIR / 'cloudbk-wal-push'} %p'"})
        try:
            first.start()
            first.wait_for("select pg_is_in_recovery()", "f", timeout=180)
            assert first.sql("select substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)") == "00000002"
            _segments(first, "c", 3)
            first.wait_archived()
        finally:
            first.destroy()

        # the old timeline goes on after the switch point
        _segments(primary, "d", 2)
        primary.sql("select pg_create_restore_point('old_timeline')")
        primary.sql("select pg_switch_wal()")
        primary.wait_archived()
    finally:
        primary.destroy()

    for tag, args, phases, timelines in (
        ("latest", (), "a,c", {"00000001", "00000002"}),
        ("old", ("--target-timeline", "1", "--target-name", "old_timeline"), "a,b,d", {"00000001"}),
    ):
        cluster, _ = _restore(env, f"prefetch-tli-{tag}", *args)
        try:
            cluster.start(wait=False)
            cluster.wait_for("select pg_is_in_recovery()", "f", timeout=180)
            got = cluster.sql("select string_agg(distinct phase, ',' order by phase) from t")
            assert got == phases, (tag, got)
            log = _log(cluster)
            assert {n[:8] for n in RESTORED.findall(log)} == timelines, (tag, RESTORED.findall(log))
            assert SERVED.findall(log), f"{tag}: nothing served from the spool\n{log[-3000:]}"
            _spool_gone(cluster, env)
        finally:
            cluster.destroy()
    shutil.rmtree(repo, ignore_errors=True)
