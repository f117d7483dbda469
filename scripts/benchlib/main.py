"""Set up the endpoint, the WAL and the peers once, then run the selected phases against them."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pgcluster import BIN_DIR

from .endpoint import start_endpoint
from .load import load_phase
from .peers import Barman, barman_available, write_pgbackrest_config
from .phases import SERVER, Bench, fetch_phase, hit_phase, push_phase
from .pitr import restore_phase
from .proctree import CpuMeter, reap_orphans
from .runner import base_env, chown_tree
from .walsource import clear, generate


def _say(message: str) -> None:
    print(message, file=sys.stderr)


def _bench(args: argparse.Namespace, work: Path) -> Bench:
    endpoint = start_endpoint(work)
    store = work / "segments"
    store.mkdir()
    _say(f"generating {args.segments} real WAL segments with pgbench (scale {args.scale}) ...")
    try:
        source = generate(args.segments, store, args.scale)
    except BaseException:
        endpoint.stop()
        raise
    try:
        cluster = source.cluster
        pgbackrest = write_pgbackrest_config(
            work / "pgbackrest", endpoint, "bench", cluster.datadir, cluster.port, cluster.socket_dir
        )
        pgbackrest.create_stanza()
        cluster.stop()
        barman = None
        if not args.no_barman and barman_available():
            spool = work / "barman-spool"
            spool.mkdir()
            chown_tree(spool)
            barman = Barman(endpoint, spool)
        elif not args.no_barman:
            _say("barman-cloud not found (a virtualenv at /opt/barman-venv with barman[cloud]): left out")
    except BaseException:
        source.cluster.destroy()
        endpoint.stop()
        raise
    return Bench(endpoint, source, pgbackrest, barman, work, args.settle, [])


def _load(args: argparse.Namespace, bench: Bench, out: dict[str, Any]) -> None:
    push = BIN_DIR / "cloudbk-wal-push"
    repo = f"s3://{bench.endpoint.bucket}"
    commands = {
        "cloudbk push-ahead 0": f"CLOUDBK_REPO={repo}/load-off CLOUDBK_PUSH_AHEAD=0 {push} %p",
        "cloudbk default": f"CLOUDBK_REPO={repo}/load-default {push} %p",
    }
    server_env = base_env({**bench.endpoint.env(), "CLOUDBK_SERVER": f"{SERVER}-load"})
    load_phase(
        out, server_env, commands, bench.work / "pgbackrest-load", bench.endpoint, args.load_scale, args.load_seconds,
        args.load_clients, args.drain_seconds, bench.extra_service_pids,
    )  # fmt: skip


def run_phases(args: argparse.Namespace, work: Path, results: dict[str, Any]) -> None:
    """Fill ``results`` phase by phase (what finished is kept when a later phase fails)."""
    phases = args.phase_list
    bench = _bench(args, work)
    try:
        if "push" in phases or "fetch" in phases:
            _say("push: replaying the archiver ...")
            results["push"] = push_phase(bench)  # fetch reads what push stored
        if "hit" in phases:
            _say("hit: per-call floor ...")
            results["hit"] = hit_phase(bench, args.hit_runs, args.marker_wait)
        if "fetch" in phases:
            _say("fetch: replaying recovery ...")
            results["fetch"] = fetch_phase(bench, args.barman_parallel)
        if "restore" in phases:
            _say("restore: PITR restores ...")
            results["restore"] = restore_phase(bench.endpoint, work, args.segments, args.scale)
        if "load" in phases:
            _say(f"load: pgbench for {args.load_seconds} s per archiver ...")
            clear(bench.source)
            _load(args, bench, results.setdefault("load", {}))
    finally:
        bench.source.cluster.destroy()
        bench.endpoint.stop()
        # a detached worker (pgBackRest's async process, cloudbk's push-ahead) still running after an error
        # would write into the directory about to be removed: let it finish first
        CpuMeter(list, settle=args.settle).wait_workers()
        reap_orphans()
        if "push" not in phases:
            results.pop("push", None)
