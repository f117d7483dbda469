"""Push-ahead (docs/wal.md): a detached worker archives ahead of PostgreSQL's calls, and a call returns 0 on its
marker only when the file is stored *and* indexed in the call's own repository and server.

PostgreSQL's archiver is replayed over a synthetic pg_wal (``aheadhelpers.Archiver``) where a test needs to
steer timing; a real PostgreSQL 15 under pgbench archives on S3 and Azure at the end.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aheadhelpers import Archiver, Reaper, history_bytes, history_name
from backends import Backend, process_backend, selected
from pgcluster import PG_BIN, PgCluster, run_as_pg
from walhelpers import HEAVY_MODULES, cloudbk_env, probe_hit_path, remove_scratch, scratch

from cloudbk import background
from cloudbk.pg.walnames import parse_wal_name
from cloudbk.repo import layout
from cloudbk.repo.index import load_index
from cloudbk.storage.base import Storage
from cloudbk.wal import marker
from cloudbk.wal.fetch import fetch_wal

REPLAY_BACKENDS = ("file", "s3-seaweedfs")


def _backend(request: pytest.FixtureRequest, name: str) -> Backend:
    return process_backend(request, name, lambda: scratch("aheadrepo"), "ahead")


@pytest.fixture(params=selected(REPLAY_BACKENDS))
def replay_backend(request: pytest.FixtureRequest) -> Backend:
    return _backend(request, request.param)


@pytest.fixture(autouse=True)
def _remove_scratch() -> Iterator[None]:
    yield
    remove_scratch()


@pytest.fixture
def reaper() -> Iterator[Reaper]:
    with Reaper() as r:
        yield r


def _indexed(storage: Storage, names: list[str]) -> set[str]:
    """Which of ``names`` (segments, .history) the server's index lists."""
    index = load_index(storage, "main")
    found = set()
    for name in names:
        wal = parse_wal_name(name)
        listed = index.has_segment(wal.timeline, wal.segno()) if wal.kind == "segment" else False
        if listed or (wal.kind == "history" and wal.timeline in index.histories):
            found.add(name)
    return found


def _assert_stored(storage: Storage, archiver: Archiver, names: list[str], out: Path) -> None:
    for name in names:
        fetch_wal(storage, "main", name, str(out / name))
        assert (out / name).read_bytes() == (archiver.wal_dir / name).read_bytes(), f"{name} differs"
        (out / name).unlink()


def _worker_exit(archiver: Archiver, reaper: Reaper) -> int:
    pid = background.worker_pid(archiver.state_dir())
    assert pid is not None, "no worker ever ran"
    return reaper.exit_code(pid)


def test_replayed_archiver_is_served_from_markers_batched_into_few_index_updates(
    replay_backend: Backend, reaper: Reaper
) -> None:
    archiver = Archiver.make("ahead-replay", cloudbk_env(replay_backend, CLOUDBK_RETRY_DEADLINE="30"))
    names = archiver.add_segments(1, range(1, 25))
    names.append(archiver.add_file(history_name(2), history_bytes(1, "0/18000000")))
    names += archiver.add_segments(2, range(24, 28))

    calls = archiver.archive_all()

    # PostgreSQL's order: the history file first, then oldest first
    assert [c.name for c in calls] == [names[24], *names[:24], *names[25:]]
    hits = [c for c in calls if c.hit]
    assert len(hits) >= len(calls) - 2, [c.stderr for c in calls if not c.hit]
    storage = replay_backend.open()
    assert _indexed(storage, names) == set(names)
    _assert_stored(storage, archiver, names, scratch("ahead-fetched"))
    batches = [int(n) for n in _batch_sizes(archiver.worker_log())]
    assert sum(batches) >= len(hits) and len(batches) <= len(names) // 2, archiver.worker_log()

    assert _worker_exit(archiver, reaper) == 0, archiver.worker_log()
    left = sorted(os.listdir(archiver.state_dir()))
    assert left == [background.LOCK_FILE, background.LOG_FILE], left  # every marker used, no note left


def _batch_sizes(log: str) -> list[str]:
    return [line.split("indexed ")[1].split(" ")[0] for line in log.splitlines() if "file(s) in one update" in line]


def test_a_marker_vouches_only_for_its_repository_server_and_file(reaper: Reaper) -> None:
    repo1, repo2 = f"file://{scratch('ahead-r1')}", f"file://{scratch('ahead-r2')}"
    archiver = Archiver.make("ahead-vouch", {"CLOUDBK_REPO": repo1})
    names = archiver.add_segments(1, range(1, 7))
    assert archiver.call(names[0]).returncode == 0  # it starts the worker
    archiver.wait_for_markers(names[1:])
    sdir = archiver.state_dir()

    def stored(repo: str, server: str) -> set[str]:
        store = Backend("file", repo).open()
        return {layout.wal_name_from_key(i.key) for i in store.list(layout.wal_prefix(server))}

    # another repository, even holding a marker of the first one copied into its state directory: the call
    # returns 0 only once the file is in *that* repository (pushed by the call or by that repository's worker)
    other = {"CLOUDBK_REPO": repo2}
    other_sdir = archiver.state_dir(other)
    os.makedirs(other_sdir)
    shutil.copy(os.path.join(sdir, names[1] + marker.OK), os.path.join(other_sdir, names[1] + marker.OK))
    assert archiver.call(names[1], env=other).returncode == 0
    assert names[1] in stored(repo2, "main")
    # another server name in the same repository
    assert archiver.call(names[2], env={"CLOUDBK_REPO": repo1, "CLOUDBK_SERVER": "other"}).returncode == 0
    assert names[2] in stored(repo1, "other")
    # a copy of the data directory, markers and all (same settings, so the same state directory name), whose
    # file then differs from the archived one: the copied marker is not trusted (other inode), the push refused
    copy = archiver.datadir.parent / "copy"
    shutil.copytree(archiver.datadir, copy, symlinks=True)
    _flip_a_byte(copy / "pg_wal" / names[3])
    call = archiver.call(names[3], datadir=copy)
    assert call.returncode == 4 and not call.hit and "different content" in call.stderr, call.stderr
    # a file changed after the worker archived it: pushed for real, and refused as a conflict
    _flip_a_byte(archiver.wal_dir / names[4])
    call = archiver.call(names[4])
    assert call.returncode == 4 and not call.hit and "different content" in call.stderr, call.stderr
    # the untouched one still hits
    assert archiver.call(names[5]).hit

    assert set(names) <= stored(repo1, "main")
    assert _worker_exit(archiver, reaper) == 0, archiver.worker_log()


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[100_000] ^= 0xFF
    path.write_bytes(bytes(data))


def test_kill_9_of_the_worker_never_reports_a_file_not_stored_and_indexed(
    replay_backend: Backend, reaper: Reaper
) -> None:
    archiver = Archiver.make("ahead-kill", cloudbk_env(replay_backend, CLOUDBK_RETRY_DEADLINE="30"))
    names = archiver.add_segments(1, range(1, 11))
    storage = replay_backend.open()
    reported: list[str] = []
    unvouched: list[str] = []
    kills_done = threading.Event()

    def archive() -> None:
        while (ready := archiver.ready()) or not kills_done.is_set():
            if not ready:
                time.sleep(0.01)
                continue
            call = archiver.call(ready[0])
            if call.returncode == 0:
                reported.append(call.name)
                if call.name not in _indexed(storage, [call.name]):  # checked the moment it is reported
                    unvouched.append(call.name)

    thread = threading.Thread(target=archive)
    thread.start()
    rng = random.Random(10)
    killed: list[int] = []
    try:
        segno = len(names) + 1
        while len(killed) < 20:
            names += archiver.add_segments(1, range(segno, segno + 3))  # keep the worker busy
            segno += 3
            time.sleep(rng.uniform(0.0, 0.3))
            sdir = archiver.state_dir()
            pid = background.worker_pid(sdir)
            if pid is None or pid in killed or not background.is_running(sdir):
                continue
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            assert reaper.exit_code(pid, timeout=30) == -signal.SIGKILL
    finally:
        kills_done.set()
        thread.join(timeout=300)
    assert not unvouched, f"reported archived before it was indexed: {unvouched}"
    assert reported == names, "archiving did not resume after the kills"
    assert _indexed(storage, names) == set(names)
    _assert_stored(storage, archiver, names, scratch("ahead-kill-fetched"))


def test_two_archivers_racing_into_one_server_lose_no_index_entry(replay_backend: Backend) -> None:
    env = cloudbk_env(replay_backend, CLOUDBK_RETRY_DEADLINE="30")
    first, second = Archiver.make("ahead-race-a", env), Archiver.make("ahead-race-b", env)
    names = first.add_segments(1, range(1, 31))  # one system: the primary on timeline 1 ...
    names.append(second.add_file(history_name(2), history_bytes(1, "0/14000000")))
    names += second.add_segments(2, range(20, 51))  # ... and its promoted copy on timeline 2
    threads = [threading.Thread(target=a.archive_all) for a in (first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not first.ready() and not second.ready()
    storage = replay_backend.open()
    assert _indexed(storage, names) == set(names)
    index = load_index(storage, "main")
    assert index.segments == {1: [[1, 30]], 2: [[20, 50]]}


def test_worker_errors_reach_the_call_and_the_worker_still_exits_0(reaper: Reaper) -> None:
    repo = f"file://{scratch('ahead-err')}"
    archiver = Archiver.make("ahead-err", {"CLOUDBK_REPO": repo})
    ours = archiver.add_segments(1, [1, 2])
    assert archiver.archive_all()  # the repository now belongs to this system
    foreign = archiver.add_segments(1, [3, 4], sysid=1234567890123456789)
    call = archiver.call(foreign[0])
    assert call.returncode == 4 and "belongs to the database system 1234567890123456789" in call.stderr
    # the worker refused the other one too, and said so in a note; the call reports it and pushes nothing
    archiver_sdir = archiver.state_dir()
    deadline = time.monotonic() + 30
    while not os.path.exists(os.path.join(archiver_sdir, foreign[1] + marker.FAILED)):
        assert time.monotonic() < deadline, archiver.worker_log()
        time.sleep(0.05)
    call = archiver.call(foreign[1])
    assert call.returncode == 4 and "push-ahead could not archive" in call.stderr
    assert _worker_exit(archiver, reaper) == 0, archiver.worker_log()
    assert set(ours) <= {c.name for c in archiver.calls if c.returncode == 0}


def test_storage_down_ends_in_a_synchronous_error_and_worker_exit_0(reaper: Reaper) -> None:
    # a closed loopback port: every request fails at once, and after the retry deadline both sides give up
    env = {
        "CLOUDBK_REPO": "s3://ahead-bucket/p",
        "CLOUDBK_ENDPOINT_URL": f"http://127.0.0.1:{_closed_port()}",
        "AWS_ACCESS_KEY_ID": "k",
        "AWS_SECRET_ACCESS_KEY": "s",
        "CLOUDBK_RETRY_DEADLINE": "1",
    }
    archiver = Archiver.make("ahead-down", env)
    names = archiver.add_segments(1, [1, 2, 3])
    first = archiver.call(names[0])
    assert first.returncode == 2, first.stderr
    second = archiver.call(names[1])
    assert second.returncode == 2 and not second.hit, second.stderr
    assert _worker_exit(archiver, reaper) == 0, archiver.worker_log()
    assert "not archived ahead" in archiver.worker_log()


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_no_worker_when_the_postmaster_is_pid_1() -> None:
    archiver = Archiver.make("ahead-pid1", {"CLOUDBK_REPO": f"file://{scratch('ahead-pid1-repo')}"})
    (archiver.datadir / "postmaster.pid").write_text(f"1\n{archiver.datadir}\n")
    names = archiver.add_segments(1, [1, 2, 3])
    calls = archiver.archive_all()
    assert [c.returncode for c in calls] == [0, 0, 0] and not any(c.hit for c in calls)
    warnings = [c for c in calls if "PostgreSQL runs as PID 1" in c.stderr]
    assert len(warnings) == 1 and warnings[0].name == names[0]  # one warning, not one per call
    assert background.worker_pid(archiver.state_dir()) is None


def test_push_ahead_0_turns_it_off() -> None:
    archiver = Archiver.make("ahead-off", {"CLOUDBK_REPO": f"file://{scratch('ahead-off-repo')}"})
    archiver.env["CLOUDBK_PUSH_AHEAD"] = "0"
    archiver.add_segments(1, [1, 2, 3, 4])
    calls = archiver.archive_all()
    assert not any(c.hit for c in calls)
    assert not os.path.exists(os.path.join(archiver.wal_dir, marker.STATE_DIR))


# -- a real server -----------------------------------------------------------------------------------------


@pytest.fixture(params=selected(("s3-seaweedfs", "azure")))
def load_backend(request: pytest.FixtureRequest) -> Backend:
    return _backend(request, request.param)


def test_pgbench_write_load_with_push_ahead_archives_everything(load_backend: Backend) -> None:
    env = cloudbk_env(load_backend, CLOUDBK_RETRY_DEADLINE="30")
    cluster = PgCluster.init("ahead-pg", env=env, initdb_args=("--no-sync",))
    cluster.configure({"wal_keep_size": "'2GB'", "max_wal_size": "'2GB'", "checkpoint_timeout": "'1h'"})
    cluster.enable_archiving("cloudbk-wal-push %p")
    cluster.start()
    try:
        pgbench = [str(PG_BIN / "pgbench"), "-h", "127.0.0.1", "-p", str(cluster.port), "-U", "postgres"]
        run_as_pg([*pgbench, "-i", "-q", "-s", "5", "postgres"])
        cluster.sql("checkpoint")  # the run then writes full-page images, as a busy server does
        run_as_pg([*pgbench, "-T", "12", "-c", "4", "-j", "2", "-N", "postgres"])
        cluster.sql("select pg_switch_wal()")
        ended = time.monotonic()
        cluster.wait_archived(timeout=60)
        status = cluster.datadir / "pg_wal" / "archive_status"
        assert not list(status.glob("*.ready")), "a .ready file outlived the load"
        assert time.monotonic() - ended < 20, "archiving lagged the load's end"
        failed = cluster.sql("select failed_count from pg_stat_archiver")
        assert failed == "0", cluster.log_tail()
        done = sorted(p.name.removesuffix(".done") for p in status.glob("*.done"))
        segments = [n for n in done if parse_wal_name(n).kind == "segment"]
        assert len(segments) >= 6, done
        storage = load_backend.open()
        assert _indexed(storage, segments) == set(segments)
        out = scratch("ahead-pg-fetched")
        for name in done:
            fetch_wal(storage, "main", name, str(out / name))
            assert (out / name).read_bytes() == (cluster.datadir / "pg_wal" / name).read_bytes(), name
        log = cluster.log_tail(lines=100000)
        assert log.count("archived by push-ahead") >= len(segments) // 2, log[-4000:]
    finally:
        cluster.destroy()


def test_the_hit_path_loads_the_standard_library_only() -> None:
    archiver = Archiver.make("ahead-imports", {"CLOUDBK_REPO": f"file://{scratch('ahead-imports-repo')}"})
    names = archiver.add_segments(1, [1, 2])
    archiver.call(names[0])
    archiver.wait_for_markers(names[1:])
    ok, loaded = probe_hit_path(
        "__import__('cloudbk.wal.fastpush').wal.fastpush.hit(['pg_wal/' + sys.argv[2]], os.environ)",
        names[1], archiver.datadir, archiver.env,
    )  # fmt: skip
    assert ok
    assert {m for m in loaded if m.startswith("cloudbk")} == {
        "cloudbk", "cloudbk.background", "cloudbk.wal", "cloudbk.wal.fastargs", "cloudbk.wal.fastpush",
        "cloudbk.wal.marker",
    }  # fmt: skip
    for heavy in HEAVY_MODULES:
        assert heavy not in loaded, heavy
