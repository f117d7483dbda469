"""``cloudbk drill`` against real PostgreSQL 15, on the file backend and S3 (issue 14).

One source cluster per backend is shared by the module (1 MiB segments, a tablespace): 100 orders, a backup,
6 segments each adding 10 orders, a noted time, then a "mistake". The drills run while that production
cluster keeps running on the same host:

- to the noted time: the check query sees the 160 orders from before the target only; the phases fit the
  total; nothing is left in the work directory; the repository gained no WAL; the production cluster's port,
  socket, postmaster.pid and tablespace are untouched; ``check --max-drill-age`` fails before it, passes after.
  On S3 the drill runs as root, its server as ``postgres`` (the default of ``--os-user``).
- with the storage cut (a TCP proxy) while WAL replays: nonzero, the server stopped, the scratch removed.
- of a subscriber with ``shared_preload_libraries``: the publisher's slot is not touched, no replication
  worker and no preloaded library runs.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from backends import Backend, selected, unique_prefix
from bkhelpers import Clusters, archive_all, repo_env, scratch_dir, take_backup
from pgcluster import BIN_DIR, PgCluster, cloudbk, new_dir, pg_command
from services.proxy import TcpProxy, loopback_ports, redirect_env

from cloudbk.repo import layout

COUNT_ORDERS = "SELECT count(*) FROM orders"
S3 = "s3-seaweedfs"
SEGMENTS = 6


@dataclass
class Source:
    backend: Backend
    pg: PgCluster
    backup_id: str
    noted: str
    tablespace: Path


@pytest.fixture(scope="module", params=selected(("file", S3)))
def source(request: pytest.FixtureRequest) -> Iterator[Source]:
    if request.param == "file":  # not scratch_dir: that is emptied after each test, this lives for the module
        home = new_dir("drill-repo")
        backend = Backend("file", f"file://{home}/repo")
    else:
        home, backend = None, request.getfixturevalue(f"{S3.replace('-', '_')}_service").make(unique_prefix("drill"))
    registry = Clusters()
    tablespace = new_dir("drill-ts")
    try:
        pg = registry.archiving(backend, initdb_args=("--wal-segsize=1",))
        pg.sql(f"CREATE TABLESPACE ts LOCATION '{tablespace}'")
        pg.sql("CREATE TABLE orders (id int, note text) TABLESPACE ts")
        pg.sql("INSERT INTO orders SELECT g, 'before the backup' FROM generate_series(1, 100) g")
        backup_id = take_backup(pg, backend)
        for i in range(SEGMENTS):  # WAL to fetch and replay, one segment at a time
            first = 101 + 10 * i
            pg.sql(f"INSERT INTO orders SELECT g, 'after the backup' FROM generate_series({first}, {first + 9}) g")
            pg.sql("SELECT pg_switch_wal()")
        noted = pg.sql("SELECT now()")
        time.sleep(1.1)  # the mistake commits strictly after the noted time
        pg.sql("DELETE FROM orders WHERE id <= 50")
        pg.sql("INSERT INTO orders VALUES (9999, 'after the target')")
        archive_all(pg)
        yield Source(backend, pg, backup_id, noted, tablespace)
    finally:
        registry.destroy_all()
        for path in (home, tablespace):
            if path is not None:
                subprocess.run(["rm", "-rf", str(path)], check=False)


def _drill(backend: Backend, *args: str, as_root: bool = False, env: dict[str, str] | None = None) -> tuple[int, dict]:
    full = {**repo_env(backend), **(env or {})}
    if as_root:
        proc = subprocess.run([str(BIN_DIR / "cloudbk"), "drill", "--json", *args], env={**os.environ, **full},
                              capture_output=True, text=True, timeout=600)  # fmt: skip
    else:
        proc = cloudbk("drill", "--json", *args, env=full, check=False)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def _wal_keys(backend: Backend) -> list[str]:
    storage = backend.open()
    try:
        return [info.key for info in storage.list(layout.wal_prefix("main"))]
    finally:
        storage.close()


def _drill_line(source: Source) -> str:
    proc = cloudbk("check", "--dbname", source.pg.conninfo, "--max-drill-age", "1", env=repo_env(source.backend),
                   check=False)  # fmt: skip
    return next(line.strip() for line in proc.stdout.splitlines() if "last successful drill" in line)


def _production_state(pg: PgCluster, tablespace: Path) -> tuple[object, ...]:
    pid = (pg.datadir / "postmaster.pid").read_text()
    configs = [(pg.datadir / name).read_text() for name in ("postgresql.conf", "postgresql.auto.conf", "pg_hba.conf")]
    sockets = sorted(os.listdir(pg.socket_dir))
    files = sorted(str(p.relative_to(tablespace)) for p in tablespace.rglob("*"))
    return pid, configs, sockets, files


def test_drill_to_a_time_before_the_mistake(source: Source) -> None:
    assert _drill_line(source).startswith("last successful drill: FAILED (never")
    workdir = scratch_dir("drill-work")
    wal_before = _wal_keys(source.backend)
    before = _production_state(source.pg, source.tablespace)
    code, doc = _drill(source.backend, "--target-time", source.noted, "--check-sql", COUNT_ORDERS, "--workdir",
                       str(workdir), as_root=source.backend.name != "file")  # fmt: skip
    assert code == 0 and doc["ok"], json.dumps(doc, indent=1)
    assert doc["backup_id"] == source.backup_id and doc["timeline"] == 2 and doc["reached_time"] is not None
    counted = next(c for c in doc["checks"] if c["name"] == COUNT_ORDERS)
    assert counted["result"] == [[str(100 + 10 * SEGMENTS)]], counted
    assert {c["name"] for c in doc["checks"]} >= {"connect", "databases", "amcheck postgres"}
    assert doc["wal_segments_fetched"] >= SEGMENTS and doc["wal_bytes_fetched"] == doc["wal_segments_fetched"] * 1024**2
    assert doc["port"] != source.pg.port

    phases = {p["name"]: p for p in doc["phases"]}
    in_turn = ["plan", "backup download + extract", "start-up", "checks", "stop + clean up"]
    assert set(phases) == {*in_turn, "WAL fetch + replay"}, phases
    for earlier, later in itertools.pairwise(in_turn):
        assert phases[earlier]["end"] <= phases[later]["start"] + 0.01, (earlier, later, phases)
    assert abs(sum(phases[n]["seconds"] for n in in_turn) - doc["total_seconds"]) < 1.0, doc["phases"]
    assert phases["start-up"]["end"] == doc["rto_seconds"] <= doc["total_seconds"]
    replay = phases["WAL fetch + replay"]
    assert replay["overlaps"] == ["start-up"] and replay["start"] == phases["start-up"]["start"] <= replay["end"]

    assert os.listdir(workdir) == [], "the drill left its scratch directory behind"
    # production archives on timeline 1 (archive_timeout) meanwhile; the drill's timeline 2 must not appear
    gained = set(_wal_keys(source.backend)) - set(wal_before)
    assert all(k.startswith(layout.timeline_prefix("main", 1)) for k in gained), f"the drill archived WAL: {gained}"
    assert _production_state(source.pg, source.tablespace) == before
    assert source.pg.sql("SELECT count(*) FROM orders") == str(100 + 10 * SEGMENTS - 50 + 1)  # production runs on
    assert _drill_line(source).startswith("last successful drill: OK (backup ")
    listed = json.loads(cloudbk("backup-list", "--json", env=repo_env(source.backend)).stdout)
    assert listed[0]["drill"]["last_ok"] is True


@pytest.mark.parametrize("source", selected((S3,)), indirect=True)  # cut with a TCP proxy: a network backend
def test_drill_fails_cleanly_when_storage_goes_during_replay(source: Source) -> None:
    (port,) = loopback_ports(source.backend.env)
    proxy = TcpProxy(port)
    proxy.start()
    proxied = dataclasses.replace(source.backend, env=redirect_env(source.backend.env, port, proxy.port))
    workdir = scratch_dir("drill-cut")
    env = {**os.environ, **repo_env(proxied), "CLOUDBK_RETRY_DEADLINE": "3"}
    argv = pg_command([str(BIN_DIR / "cloudbk"), "drill", "--json", "--workdir", str(workdir)])
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            logs = list(workdir.glob("cloudbk-drill-*/server.log"))
            if logs and "restored log file" in logs[0].read_text(errors="replace"):
                proxy.cut()
                break
            time.sleep(0.05)
        assert proxy.is_cut, "WAL replay was not seen before the drill ended"
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
        proxy.close()
    doc = json.loads(out)
    assert proc.returncode != 0 and not doc["ok"], (out, err)
    assert "stopped during recovery" in doc["error"], doc["error"]
    assert os.listdir(workdir) == []
    assert not [p for p in Path("/proc").glob("[0-9]*") if str(workdir) in _cmdline(p)], "a server is left running"


def _cmdline(proc_dir: Path) -> str:
    try:
        return (proc_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.parametrize("source", selected(("file",)), indirect=True)
def test_drill_stops_and_cleans_up_on_sigterm(source: Source) -> None:
    workdir = scratch_dir("drill-term")
    env = {**os.environ, **repo_env(source.backend)}
    proc = subprocess.Popen([str(BIN_DIR / "cloudbk"), "drill", "--workdir", str(workdir)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and not list(workdir.glob("*/server.log")):
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGTERM)  # the server is starting: it must be stopped, the scratch removed
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGTERM and "terminated by SIGTERM" in err, err
    assert os.listdir(workdir) == []
    assert not [p for p in Path("/proc").glob("[0-9]*") if str(workdir) in _cmdline(p)], "a server is left running"


def test_drill_of_a_subscriber_leaves_the_publisher_alone(file_backend: Backend, clusters: Clusters) -> None:
    publisher = PgCluster.init("pub")
    clusters.all.append(publisher)
    publisher.configure({"wal_level": "logical"})
    publisher.start()
    publisher.sql("CREATE TABLE items (id int PRIMARY KEY); CREATE PUBLICATION pub FOR TABLE items")
    publisher.sql("INSERT INTO items SELECT generate_series(1, 10)")

    subscriber = clusters.archiving(file_backend, tag="sub")
    subscriber.configure({"shared_preload_libraries": "'pg_stat_statements'"})
    subscriber.stop()
    subscriber.start()
    subscriber.sql("CREATE TABLE items (id int PRIMARY KEY)")
    subscriber.sql(f"CREATE SUBSCRIPTION sub CONNECTION '{publisher.conninfo}' PUBLICATION pub")
    subscriber.wait_for("SELECT count(*) FROM items", "10")
    take_backup(subscriber, file_backend)
    archive_all(subscriber)
    subscriber.stop()  # the slot is free: a drill's apply worker could take it
    slot = "SELECT slot_name, active, confirmed_flush_lsn FROM pg_replication_slots"
    publisher.wait_for("SELECT bool_or(active) FROM pg_replication_slots", "f")
    before = publisher.sql(slot)
    publisher.sql("INSERT INTO items SELECT generate_series(11, 20)")  # what a connected subscriber would consume

    queries = ["SHOW shared_preload_libraries", "SELECT count(*) FROM pg_stat_activity WHERE backend_type LIKE "
               "'logical replication%'", "SELECT count(*) FROM items"]  # fmt: skip
    workdir = scratch_dir("drill-keep")
    checks = [arg for q in queries for arg in ("--check-sql", q)]
    code, doc = _drill(file_backend, *checks, "--workdir", str(workdir), "--keep")
    assert code == 0 and doc["ok"], json.dumps(doc, indent=1)
    kept = Path(doc["scratch"])  # --keep: the scratch stays, its server stopped
    assert doc["kept"] and kept.parent == workdir and (kept / "data" / "PG_VERSION").exists()
    assert not (kept / "data" / "postmaster.pid").exists()
    results = {c["name"]: c["result"] for c in doc["checks"]}
    assert [results[q] for q in queries] == [[[""]], [["0"]], [["10"]]], results
    assert publisher.sql(slot) == before, "the drill touched the publisher's slot"
    assert publisher.sql("SELECT count(*) FROM pg_stat_replication") == "0"
