"""Markdown tables from the raw numbers, with ratios against pgBackRest async."""

from __future__ import annotations

from typing import Any

PEER = "pgBackRest async"
X = "\N{MULTIPLICATION SIGN}"  # ratios read "3.10x", with the proper sign


def _fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _ratio(value: float | None, peer: float | None) -> str:
    if not value or not peer:
        return "-"
    return f"{value / peer:.2f}{X}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def push_table(push: dict[str, Any], segments: int) -> str:
    peer = push.get(PEER, {})
    rows = []
    for mode, r in push.items():
        if mode.startswith("raw PUT"):
            continue
        rows.append([
            mode, _fmt(r["segments_per_s"], 2), _ratio(r["segments_per_s"], peer.get("segments_per_s")),
            _fmt(r["median_ms"]), _fmt(r["p90_ms"]), _fmt(r["cpu_s_per_segment"], 3),
            _fmt(r["emulator_cpu_s_per_segment"], 3), _fmt(r["failed_calls"]),
        ])  # fmt: skip
    for mode, r in push.items():
        if mode.startswith("raw PUT"):
            rows.append([mode, _fmt(r["segments_per_s"], 2), _ratio(r["segments_per_s"], peer.get("segments_per_s")),
                         "-", "-", _fmt(r["cpu_s_per_segment"], 3), "-", "0"])  # fmt: skip
    header = ["archiver", "segments/s", f"{X} {PEER} segments/s", "ms/call median", "ms/call p90",
              "CPU s/segment (all processes)", "emulator CPU s/segment", "failed calls"]  # fmt: skip
    title = f"### Push: PostgreSQL's archiver replayed, {segments} real 16 MiB segments, SeaweedFS over HTTPS\n\n"
    return title + _table(header, rows)


def fetch_table(fetch: dict[str, Any], segments: int) -> str:
    peer = fetch.get(PEER, {})
    rows = [
        [mode, _fmt(r["median_ms"]), _fmt(r["p90_ms"]), _ratio(r["median_ms"], peer.get("median_ms")),
         _fmt(r["wall_s"], 1), _fmt(r["cpu_s_per_segment"], 3), _fmt(r["emulator_cpu_s_per_segment"], 3)]
        for mode, r in fetch.items()
    ]  # fmt: skip
    header = ["restore_command", "ms/call median", "ms/call p90", f"{X} {PEER} median",
              f"total s ({segments} segments)", "CPU s/segment (all processes)", "emulator CPU s/segment"]  # fmt: skip
    title = "### Fetch: PostgreSQL's recovery replayed (cwd = data directory, `%p` = `pg_wal/RECOVERYXLOG`)\n\n"
    return title + _table(header, rows)


def hit_table(hit: dict[str, Any]) -> str:
    peer = hit.get("pgbackrest version", {}).get("median_ms")
    rows = []
    for label, r in hit.items():
        if not r.get("runs"):
            rows.append([f"`{label}`", "-", "-", "-", "-", r.get("note", "")])
            continue
        rows.append([f"`{label}`", _fmt(r["median_ms"], 1), _fmt(r["p90_ms"], 1), _fmt(r["runs"]),
                     _ratio(r["median_ms"], peer), ""])  # fmt: skip
    header = ["command", "wall ms median", "p90", "runs", f"{X} `pgbackrest version`", "note"]
    return "### Hit path: one fresh process, wall time (same run)\n\n" + _table(header, rows)


def load_table(load: dict[str, Any], seconds: int) -> str:
    """No ratio here: while an archiver keeps up, what it archives per second is the load's WAL rate."""
    rows = [
        [mode, _fmt(r["wal_mib_per_s"], 1), _fmt(r["largest_ready_backlog"]), _fmt(r["ready_at_load_end"]),
         _fmt(r["drain_s"], 1) if r["drain_s"] is not None else f"> {r['drain_limit_s']:.0f}",
         _fmt(r["archived_count"]), _fmt(r["archived_segments_per_s"], 2), _fmt(r["failed_count"])]
        for mode, r in load.items()
    ]  # fmt: skip
    header = ["archive_command", "WAL MiB/s written", "largest .ready backlog", ".ready at load end",
              "drain s after load", "archived", "archived segments/s", "failed_count"]  # fmt: skip
    title = f"### Load: pgbench -N for {seconds} s, synchronous_commit=off, archive_mode=on\n\n"
    return title + _table(header, rows)


def restore_table(restore: dict[str, Any], segments: int) -> str:
    peer = restore.get(PEER, {})
    rows = [
        [mode, _fmt(r["restore_s"], 1), _fmt(r["first_connection_s"], 1), _fmt(r["recovery_s"], 1),
         _fmt(r["to_ready_s"], 1), _ratio(r["to_ready_s"], peer.get("to_ready_s"))]
        for mode, r in restore.items()
    ]  # fmt: skip
    header = ["restore", "base restore s", "first connection s", "recovery s", "restore to ready s",
              f"{X} {PEER}"]  # fmt: skip
    title = (
        f"### Restore: base backup plus {segments} segments of pgbench WAL, from the restore command to the "
        "server out of recovery (same data checked)\n\n"
    )
    return title + _table(header, rows)


def render(results: dict[str, Any]) -> str:
    meta = results["meta"]
    parts = [
        f"## WAL benchmark ({meta['date']}, {meta['cpus']} CPUs, {meta['segments']} segments; "
        f"pgBackRest {meta['pgbackrest']}, cloudbk {meta['cloudbk']})"
    ]
    if "push" in results:
        parts.append(push_table(results["push"], meta["segments"]))
    if "hit" in results:
        parts.append(hit_table(results["hit"]))
    if "fetch" in results:
        parts.append(fetch_table(results["fetch"], meta["segments"]))
    if "restore" in results:
        parts.append(restore_table(results["restore"], meta["segments"]))
    if "load" in results:
        parts.append(load_table(results["load"], meta["load_seconds"]))
    return "\n\n".join(parts) + "\n"
