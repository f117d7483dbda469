"""The replay phases: push (archiver), hit (per-call floor), fetch (recovery), each tool on one endpoint."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pgcluster import BIN_DIR

from .endpoint import Endpoint, put_ceiling
from .peers import Barman, PgBackRest, pgbackrest_binary
from .proctree import CpuMeter, all_processes, subtree
from .replay import Replay, replay_archiver, replay_recovery
from .runner import base_env, check, ms_summary, run_pg
from .walsource import WalSource, stage_ready, stage_recovery

CLOUDBK_PUSH = str(BIN_DIR / "cloudbk-wal-push")
CLOUDBK_FETCH = str(BIN_DIR / "cloudbk-wal-fetch")
SERVER = "bench"


@dataclass
class Bench:
    """What every phase shares: the endpoint, the WAL, the peers, and the CPU meter's exclusions."""

    endpoint: Endpoint
    source: WalSource
    pgbackrest: PgBackRest
    barman: Barman | None
    work: Path
    settle: float
    extra_service_pids: list[int]

    def services(self) -> list[int]:
        return [*self.endpoint.pids(), *self.extra_service_pids]

    def meter(self) -> CpuMeter:
        return CpuMeter(self.services, settle=self.settle)

    def cloudbk_env(self, repo: str, **knobs: str) -> dict[str, str]:
        """``repo`` is a prefix in the bucket; ``knobs`` e.g. CLOUDBK_PUSH_AHEAD="0" (unset = cloudbk's default)."""
        return base_env(
            {**self.endpoint.env(), "CLOUDBK_REPO": f"s3://{self.endpoint.bucket}/{repo}", "CLOUDBK_SERVER": SERVER,
             **knobs}
        )  # fmt: skip


# -- push ------------------------------------------------------------------------------------------------


def push_phase(bench: Bench) -> dict[str, Any]:
    """Archiver replay for each tool, plus the raw PUT ceiling. cloudbk's repositories are kept for fetch."""
    results: dict[str, Any] = {}
    modes: list[tuple[str, Any, Mapping[str, str]]] = [
        ("cloudbk push-ahead 0", lambda p: [CLOUDBK_PUSH, p], bench.cloudbk_env("cloudbk-off", CLOUDBK_PUSH_AHEAD="0")),
        ("cloudbk default", lambda p: [CLOUDBK_PUSH, p], bench.cloudbk_env("cloudbk-default")),
        ("pgBackRest async", lambda p: bench.pgbackrest.argv("archive-push", p), base_env()),
    ]
    if bench.barman is not None:
        barman = bench.barman
        modes.append(("barman-cloud", barman.archive, base_env(bench.endpoint.env())))
    for mode, command, env in modes:
        stage_ready(bench.source)
        replay = replay_archiver(mode, bench.source, command, env, bench.meter())
        results[mode] = replay.as_dict()
        _progress(replay)
    results["raw PUT ceiling (boto3, 8 threads)"] = put_ceiling(bench.endpoint, bench.source.segments)
    return results


def _progress(replay: Replay) -> None:
    d = replay.as_dict()
    print(f"  {replay.mode}: {d['segments_per_s']:.2f} segments/s, median {d['median_ms']:.0f} ms", file=sys.stderr)


# -- fetch -----------------------------------------------------------------------------------------------


def fetch_phase(bench: Bench, barman_parallel: int) -> dict[str, Any]:
    """Recovery replay for each tool, from the copies the push phase stored."""
    results: dict[str, Any] = {}

    def cloudbk(f: str, p: str) -> list[str]:
        return [CLOUDBK_FETCH, f, p]

    modes: list[tuple[str, Any, Mapping[str, str]]] = [
        ("cloudbk prefetch 0", cloudbk, bench.cloudbk_env("cloudbk-off", CLOUDBK_PREFETCH="0")),
        ("cloudbk default", cloudbk, bench.cloudbk_env("cloudbk-off")),
        ("pgBackRest async", lambda f, p: bench.pgbackrest.argv("archive-get", f, p), base_env()),
    ]
    if bench.barman is not None:
        barman = bench.barman

        def barman_restore(f: str, p: str) -> list[str]:
            return barman.restore(f, p, barman_parallel)

        modes.append((f"barman-cloud --parallel {barman_parallel}", barman_restore, base_env(bench.endpoint.env())))
    for mode, command, env in modes:
        stage_recovery(bench.source)
        replay = replay_recovery(mode, bench.source, command, env, bench.meter())
        results[mode] = replay.as_dict()
        _progress(replay)
    stage_ready(bench.source)  # leaves no recovery.signal behind
    return results


# -- hit path --------------------------------------------------------------------------------------------


def hit_phase(bench: Bench, runs: int, marker_wait: float) -> dict[str, Any]:
    """The per-call floor: median wall time of trivial commands, interleaved, in the same run as cloudbk's hit."""
    venv_python = str(BIN_DIR / "python")
    commands = {
        "pgbackrest version": [pgbackrest_binary(), "version"],
        "python -I -S -c pass": [venv_python, "-I", "-S", "-c", "pass"],
        "python -c pass": [venv_python, "-c", "pass"],
    }
    env = base_env()
    samples: dict[str, list[float]] = {label: [] for label in commands}
    for _ in range(runs):
        for label, argv in commands.items():
            samples[label].append(check(run_pg(argv, env), argv).seconds)
    results: dict[str, Any] = {label: {"runs": runs, **ms_summary(s)} for label, s in samples.items()}
    hit = cloudbk_hit_path(bench, marker_wait)
    results["cloudbk-wal-push (marker hit)"] = (
        {"runs": len(hit), **ms_summary(hit)} if hit else {"runs": 0, "note": "no push-ahead markers appeared"}
    )
    return results


def markers_for(wal_dir: Path, names: list[str]) -> set[str]:
    """Segment names that have a push-ahead marker: ``pg_wal/cloudbk-push/<id>/NAME.ok`` (cloudbk.wal.marker).

    Only ``.ok`` counts: ``.busy`` (taken, not yet vouched for) and ``.failed`` make the call wait or push itself.
    """
    wanted = set(names)
    return {p.name[: -len(".ok")] for p in wal_dir.glob("cloudbk-push/*/*.ok")} & wanted


def cloudbk_hit_path(bench: Bench, marker_wait: float) -> list[float]:
    """Wall time of ``cloudbk-wal-push pg_wal/NAME`` calls that find their marker (issue 10's hit path).

    The archiver's first call (``cloudbk-wal-push`` with push-ahead at its default) starts the worker; once the
    worker has written markers (waited for up to ``marker_wait`` s, or until no worker process is left), the
    rest are archived in order and each call that had a marker is timed. Returns [] while there are no markers.
    """
    source = bench.source
    wal = stage_ready(source)
    env = bench.cloudbk_env("cloudbk-hit")
    names = source.names()
    status = wal / "archive_status"
    times: list[float] = []
    try:
        check(run_pg([CLOUDBK_PUSH, f"pg_wal/{names[0]}"], env, cwd=source.datadir), [CLOUDBK_PUSH, names[0]])
        (status / f"{names[0]}.ready").rename(status / f"{names[0]}.done")
        deadline = time.monotonic() + marker_wait
        rest = names[1:]
        while time.monotonic() < deadline and len(markers_for(wal, rest)) < len(rest) and _workers_alive(bench):
            time.sleep(0.2)
        marked = markers_for(wal, rest)
        if not marked:
            return []  # no push-ahead (yet): nothing to time
        for name in rest:
            outcome = check(run_pg([CLOUDBK_PUSH, f"pg_wal/{name}"], env, cwd=source.datadir), [CLOUDBK_PUSH, name])
            (status / f"{name}.ready").rename(status / f"{name}.done")
            if name in marked:
                times.append(outcome.seconds)
    finally:
        bench.meter().wait_workers()  # lets the worker finish (and reaps it) before the next phase
    return times


def _workers_alive(bench: Bench) -> bool:
    table = all_processes()
    others = subtree(table, [os.getpid()]) - subtree(table, bench.services()) - {os.getpid()}
    return any(table[p].state != "Z" for p in others)
