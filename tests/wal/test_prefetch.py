"""The prefetch spool (docs/wal.md): a detached prefetcher downloads what restore_command will ask for next, and a
call serves only the exact name asked for, from a verified entry of the current generation.

PostgreSQL's restore_command calls are replayed over a synthetic data directory (``prefetchhelpers.Recovery``)
where a test needs to steer timing; real PostgreSQL 15 recoveries are in test_prefetch_pg.py.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aheadhelpers import Reaper
from backends import Backend, selected, unique_prefix
from pgcluster import BIN_DIR
from prefetchhelpers import (
    Recovery,
    archive_file,
    archive_segments,
    corrupt_object,
    segment,
    sha256_of,
)
from walhelpers import HEAVY_MODULES, cloudbk_env, probe_hit_path, remove_scratch, scratch, segment_bytes

from cloudbk import background
from cloudbk.pg.walnames import HistoryEntry, parse_lsn
from cloudbk.wal import marker, spool
from cloudbk.wal.prefetchpath import ahead, target_timeline_setting, timeline_path

REPLAY_BACKENDS = ("file", "s3-seaweedfs")
MiB = 1024 * 1024


@pytest.fixture(autouse=True)
def _remove_scratch() -> Iterator[None]:
    yield
    remove_scratch()


def _backend(request: pytest.FixtureRequest, name: str) -> Backend:
    if name == "file":
        return Backend(name, f"file://{scratch('prefetchrepo')}")
    service = request.getfixturevalue(f"{name.replace('-', '_')}_service")
    backend: Backend = service.make(unique_prefix("prefetch"))
    return backend


@pytest.fixture(params=selected(REPLAY_BACKENDS))
def replay_backend(request: pytest.FixtureRequest) -> Backend:
    return _backend(request, request.param)


@pytest.fixture
def file_backend() -> Backend:
    return Backend("file", f"file://{scratch('prefetchrepo')}")


@pytest.fixture
def reaper() -> Iterator[Reaper]:
    with Reaper() as r:
        yield r


def _worker_exit(recovery: Recovery, reaper: Reaper) -> int:
    pid = background.worker_pid(str(recovery.spool_dir()))
    assert pid is not None, "no prefetcher ever ran"
    return reaper.exit_code(pid)


def test_replayed_recovery_is_served_from_the_spool_within_its_bound(replay_backend: Backend, reaper: Reaper) -> None:
    stored = archive_segments(replay_backend, 1, range(1, 25), payload=2 * MiB)
    recovery = Recovery.make("prefetch-replay", cloudbk_env(replay_backend, CLOUDBK_PREFETCH="4"))
    most = 0
    for segno in range(1, 25):
        call = recovery.call(segment(1, segno))
        assert call.returncode == 0 and call.sha256 == stored[call.name], call.stderr
        most = max(most, len(recovery.entries()))
        time.sleep(0.05)  # PostgreSQL replays the segment
    end = recovery.call(segment(1, 25))
    assert end.returncode == 1 and "is not in the archive" in end.stderr  # the archive's answer, not the spool's
    served = [c for c in recovery.calls if c.served]
    assert len(served) >= 20, [c.stderr for c in recovery.calls if not c.served]
    assert most <= 4, f"the spool held {most} entries with --prefetch 4"
    assert _worker_exit(recovery, reaper) == 0, recovery.worker_log()
    left = {n for n in os.listdir(recovery.spool_dir()) if n not in (background.LOCK_FILE, background.LOG_FILE)}
    assert left <= {spool.WANT}, left  # every entry used, nothing half written left behind


def test_a_corrupt_object_is_never_spooled_and_the_call_reports_it(file_backend: Backend, reaper: Reaper) -> None:
    stored = archive_segments(file_backend, 1, range(1, 9))
    corrupt_object(file_backend, segment(1, 4))
    recovery = Recovery.make("prefetch-corrupt", cloudbk_env(file_backend))
    assert recovery.call(segment(1, 1)).returncode == 0  # a miss: it starts the prefetcher
    recovery.wait_for_entries([segment(1, n) for n in (2, 3, 5, 6, 7, 8)])
    deadline = time.monotonic() + 30
    while "not spooled" not in recovery.worker_log():
        assert time.monotonic() < deadline, recovery.worker_log()
        time.sleep(0.05)
    assert segment(1, 4) not in recovery.entries()
    assert not [n for n in os.listdir(recovery.spool_dir()) if spool.TMP_INFIX in n]
    for segno in (2, 3):
        call = recovery.call(segment(1, segno))
        assert call.served and call.sha256 == stored[call.name]
    bad = recovery.call(segment(1, 4))
    assert bad.returncode == 126 and "corrupt" in bad.stderr and not bad.served, bad.stderr
    assert _worker_exit(recovery, reaper) == 0, recovery.worker_log()


def _forge(sdir: Path, name: str, data: bytes, gen: dict[str, str]) -> None:
    """Replace entry ``name`` with ``data`` and a voucher that is right in every respect for ``gen``."""
    import hashlib

    path = sdir / name
    path.write_bytes(data)
    st = os.stat(path)
    voucher = spool.format_voucher(name, len(data), hashlib.sha256(data).hexdigest(), marker.file_identity(st), gen)
    (sdir / f"{name}{spool.OK}").write_text(voucher)


def test_a_spool_from_another_restore_is_never_served(file_backend: Backend, reaper: Reaper) -> None:
    stored = archive_segments(file_backend, 1, range(1, 8))
    env = cloudbk_env(file_backend)
    first = Recovery.make("prefetch-gen-a", env, restore_id="restore-a")
    assert first.call(segment(1, 1)).returncode == 0
    first.wait_for_entries([segment(1, n) for n in range(2, 8)])
    sdir = first.spool_dir()
    os.kill(background.worker_pid(str(sdir)) or 0, signal.SIGTERM)
    assert _worker_exit(first, reaper) == 0
    assert first.call(segment(1, 2)).served  # a control: in its own data directory the spool serves
    ident = marker.identity({}, {**os.environ, **env})
    gen = spool.generation(str(first.datadir), ident)
    assert gen is not None
    forged = b"not the archived segment" * 1000  # served, it would show: every check but the generation passes
    for segno in (3, 4):
        _forge(sdir, segment(1, segno), forged, gen)

    # the whole data directory copied (its restore id too): other inodes, another data directory
    copy = first.datadir.parent / "copy"
    shutil.copytree(first.datadir, copy, symlinks=True)
    copied = Recovery(copy, dict(env))
    call = copied.call(segment(1, 3))
    assert call.returncode == 0 and not call.served and call.sha256 == stored[call.name], call.stderr

    # the spool moved (same inodes) into the data directory of another restore of the same system
    other = Recovery.make("prefetch-gen-b", env, restore_id="restore-b")
    target = other.spool_dir()
    target.parent.mkdir(parents=True)
    os.rename(sdir, target)
    assert {segment(1, n) for n in range(3, 8)} <= other.entries()
    call = other.call(segment(1, 3))
    assert call.returncode == 0 and not call.served and call.sha256 == stored[call.name], call.stderr
    call = other.call(segment(1, 4))  # it may come from an entry B's own prefetcher made meanwhile
    assert call.returncode == 0 and call.sha256 == stored[call.name], call.stderr
    # every entry of the first restore is gone (the call drops the one asked for, B's prefetcher the others)
    other.wait_idle()
    ours = spool.generation(str(other.datadir), ident)
    assert ours is not None
    for name in other.entries():
        fields = spool.voucher_fields((target / f"{name}{spool.OK}").read_text())
        assert fields is not None and spool.same_generation(fields, ours), name


def test_kill_9_of_the_prefetcher_never_serves_a_partial_entry(replay_backend: Backend, reaper: Reaper) -> None:
    count = 30
    stored = archive_segments(replay_backend, 1, range(1, count + 1), payload=4 * MiB)
    recovery = Recovery.make("prefetch-kill", cloudbk_env(replay_backend, CLOUDBK_RETRY_DEADLINE="30"))
    results: list[tuple[str, int, bool]] = []

    def replay() -> None:
        for segno in range(1, count + 1):
            call = recovery.call(segment(1, segno))
            results.append((call.name, call.returncode, call.sha256 == stored.get(call.name)))

    thread = threading.Thread(target=replay)
    thread.start()
    rng = random.Random(11)
    killed: list[int] = []
    try:
        while thread.is_alive() and len(killed) < 8:
            time.sleep(rng.uniform(0.05, 0.4))
            sdir = str(recovery.spool_dir())
            pid = background.worker_pid(sdir)
            if pid is None or pid in killed or not background.is_running(sdir):
                continue
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            assert reaper.exit_code(pid, timeout=30) == -signal.SIGKILL
    finally:
        thread.join(timeout=300)
    assert len(killed) >= 3, f"only {len(killed)} kills landed"
    assert [r for r in results if r[1] != 0 or not r[2]] == [], "a call failed or served other bytes"
    assert len(results) == count
    assert sum(c.served for c in recovery.calls) >= count // 4, "the spool never recovered from the kills"


def test_prefetch_0_turns_it_off(file_backend: Backend) -> None:
    stored = archive_segments(file_backend, 1, range(1, 4))
    recovery = Recovery.make("prefetch-off", cloudbk_env(file_backend, CLOUDBK_PREFETCH="0"))
    for segno in range(1, 4):
        call = recovery.call(segment(1, segno))
        assert call.returncode == 0 and not call.served and call.sha256 == stored[call.name]
    assert not (recovery.datadir / "pg_wal" / spool.STATE_DIR).exists()


def test_no_prefetcher_when_the_postmaster_is_pid_1(file_backend: Backend) -> None:
    archive_segments(file_backend, 1, range(1, 4))
    recovery = Recovery.make("prefetch-pid1", cloudbk_env(file_backend))
    (recovery.datadir / "postmaster.pid").write_text(f"1\n{recovery.datadir}\n")
    calls = [recovery.call(segment(1, n)) for n in range(1, 4)]
    assert [c.returncode for c in calls] == [0, 0, 0] and not any(c.served for c in calls)
    assert sum("PostgreSQL runs as PID 1" in c.stderr for c in calls) == 1
    assert background.worker_pid(str(recovery.spool_dir())) is None


def test_outside_recovery_the_spool_is_removed(file_backend: Backend, reaper: Reaper) -> None:
    archive_segments(file_backend, 1, range(1, 6))
    env = cloudbk_env(file_backend)
    recovery = Recovery.make("prefetch-done", env)
    recovery.call(segment(1, 1))
    recovery.wait_for_entries([segment(1, 2)])
    (recovery.datadir / "recovery.signal").unlink()  # promoted
    assert _worker_exit(recovery, reaper) == 0
    assert not (recovery.datadir / "pg_wal" / spool.STATE_DIR).exists(), recovery.worker_log()
    # a stale one (its prefetcher killed) goes with the next call, or with `cloudbk check --pgdata`
    for cleaner in ("call", "check"):
        stale = recovery.spool_dir()
        stale.mkdir(parents=True)
        (stale / segment(1, 3)).write_bytes(b"x")
        if cleaner == "call":
            recovery.call(segment(1, 3))
        else:
            subprocess.run(
                [str(BIN_DIR / "cloudbk"), "check", "--pgdata", str(recovery.datadir), "--dbname", "port=1"],
                env={**os.environ, **env},
                capture_output=True,
                timeout=120,
            )
        assert not (recovery.datadir / "pg_wal" / spool.STATE_DIR).exists(), cleaner


def test_the_hit_path_loads_the_standard_library_only(file_backend: Backend, reaper: Reaper) -> None:
    archive_segments(file_backend, 1, range(1, 4))
    recovery = Recovery.make("prefetch-imports", cloudbk_env(file_backend, CLOUDBK_PREFETCH="1"))
    recovery.call(segment(1, 1))
    recovery.wait_for_entries([segment(1, 2)])
    os.kill(background.worker_pid(str(recovery.spool_dir())) or 0, signal.SIGTERM)
    assert _worker_exit(recovery, reaper) == 0
    ok, loaded = probe_hit_path(
        "(setattr(__import__('cloudbk.wal.spool').wal.spool.background, 'spawn_detached', lambda *a: 0), "
        "__import__('cloudbk.wal.fastfetch').wal.fastfetch.hit([sys.argv[2], 'pg_wal/RECOVERYXLOG'], os.environ))[1]",
        segment(1, 2), recovery.datadir, recovery.env,
    )  # fmt: skip
    assert ok
    assert {m for m in loaded if m.startswith("cloudbk")} == {
        "cloudbk", "cloudbk.background", "cloudbk.wal", "cloudbk.wal.fastargs", "cloudbk.wal.fastfetch",
        "cloudbk.wal.marker", "cloudbk.wal.spool",
    }  # fmt: skip
    for heavy in HEAVY_MODULES:
        assert heavy not in loaded, heavy


# -- the timeline path, pure ---------------------------------------------------------------------------------


def test_the_path_follows_the_target_timelines_history_only() -> None:
    size = 16 * MiB
    history = [HistoryEntry(1, parse_lsn("0/5800028")), HistoryEntry(2, parse_lsn("0/9000000"))]
    path = timeline_path(3, history, size)
    assert path.spans == ((1, 0), (2, 5), (3, 9))
    # the switch segment comes from the new timeline (PostgreSQL reads the newest that had begun by then)
    assert ahead(path, 3, 7, size) == [segment(1, 4), segment(2, 5), segment(2, 6), segment(2, 7), segment(2, 8),
                                       segment(3, 9), segment(3, 10)]  # fmt: skip
    assert ahead(path, 3, 7, size, stop=6) == [segment(1, 4), segment(2, 5)]
    assert timeline_path(2, history, size).spans == ((1, 0), (2, 5))  # a point on timeline 2: 3 is ignored
    assert timeline_path(1, [], size).spans == ((1, 0),)


def test_the_target_timeline_setting_is_read_as_postgresql_reads_it() -> None:
    datadir = scratch("prefetch-conf")
    assert target_timeline_setting(str(datadir)) == "latest"
    (datadir / "postgresql.conf").write_text("recovery_target_timeline = 'current'  # x\n")
    assert target_timeline_setting(str(datadir)) == "current"
    (datadir / "postgresql.auto.conf").write_text("# a comment\nrecovery_target_timeline = '2'\n")
    assert target_timeline_setting(str(datadir)) == "2"


def test_an_error_on_the_hit_path_falls_through_to_the_fetch(file_backend: Backend) -> None:
    stored = archive_segments(file_backend, 1, range(1, 3))
    recovery = Recovery.make("prefetch-boom", cloudbk_env(file_backend, CLOUDBK_PREFETCH="0"))
    probe = (
        "import sys; sys.path.append(sys.argv[1]); import cloudbk.wal.spool as s\n"
        "def boom(*args): raise RuntimeError('boom')\n"
        "s.serve = boom; sys.argv = ['cloudbk-wal-fetch', sys.argv[2], 'pg_wal/RECOVERYXLOG']\n"
        "from cloudbk.wal.fastfetch import launch; launch()\n"
    )
    env = {**os.environ, **recovery.env}
    del env["CLOUDBK_PREFETCH"]
    proc = subprocess.run(
        [sys.executable, "-c", probe, str(Path(__file__).resolve().parents[2]), segment(1, 1)],
        cwd=recovery.datadir,
        env=env,
        capture_output=True,
        text=True,
    )
    # an uncaught exception would exit 1: "not in the archive" to PostgreSQL
    assert proc.returncode == 0 and "prefetch spool not used: RuntimeError('boom')" in proc.stderr, proc.stderr
    assert sha256_of((recovery.datadir / "pg_wal" / "RECOVERYXLOG").read_bytes()) == stored[segment(1, 1)]


def test_a_partial_is_never_spooled_for_a_full_name(file_backend: Backend, reaper: Reaper) -> None:
    stored = archive_segments(file_backend, 1, [1, 2, 4])
    archive_file(file_backend, segment(1, 3) + ".partial", segment_bytes(1, 3))
    recovery = Recovery.make("prefetch-partial", cloudbk_env(file_backend))
    assert recovery.call(segment(1, 1)).returncode == 0
    recovery.wait_for_entries([segment(1, 2)])
    assert _worker_exit(recovery, reaper) == 0, recovery.worker_log()
    assert recovery.entries() == {segment(1, 2)}  # nothing for 3, and nothing past the first absent segment
    assert recovery.call(segment(1, 2)).served
    end = recovery.call(segment(1, 3))
    assert end.returncode == 1 and not end.served and "is not in the archive" in end.stderr, end.stderr
    assert stored[segment(1, 4)]  # it exists, after the end PostgreSQL is told about


def test_restore_writes_an_explicit_prefetch_into_restore_command() -> None:
    from cloudbk.cli.restore import restore_command
    from cloudbk.config import resolve

    settings = resolve({"repo": "file:///r", "prefetch": "0"}, environ={})
    assert restore_command(settings, "file:///r", "0").endswith(" --prefetch 0 %f %p")
    assert "--prefetch" not in restore_command(resolve({"repo": "file:///r"}, environ={}), "file:///r")
