"""``cloudbk backup-show ID|latest [--json]``: one backup in detail, from its manifest."""

from __future__ import annotations

import argparse
import json

from cloudbk.cli.common import open_repo
from cloudbk.cli.output import describe_backup, human_duration, human_size, wal_text
from cloudbk.config import Settings

HELP = "show one backup (ID or 'latest'): WAL range, times, sizes, tablespaces, WAL archived after it"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("backup_id", metavar="ID|latest", help="the backup id, or 'latest' for the newest backup")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("--files", action="store_true", help="also list every file with its size and SHA-256")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from cloudbk.repo.catalog import load_catalog, load_manifest, resolve_backup
    from cloudbk.repo.manifest import parse_time

    storage = open_repo(settings)
    try:
        catalog = load_catalog(storage, settings.server)
        index = catalog.index
        summary = resolve_backup(catalog, args.backup_id)  # a damaged backup is an error naming what is wrong
        manifest = load_manifest(storage, settings.server, summary.id)
    finally:
        storage.close()

    doc = describe_backup(index, summary)
    doc["tablespaces"] = [{"oid": t.oid, "name": t.name, "location": t.location} for t in manifest.tablespaces]
    doc["tars"] = [
        {"name": t.name, "tablespace_oid": t.tablespace_oid, "size": t.size, "stored_size": t.stored_size,
         "files": len(t.paths),
         "volumes": [{"name": v.name, "size": v.size, "sha256": v.sha256, "stored_size": v.stored_size,
                      "files": len(v.files)} for v in t.volumes]}
        for t in manifest.tars
    ]  # fmt: skip
    doc["links"] = [{"tar": t.name, "path": lk.path, "target": lk.target, "type": lk.type}
                    for t in manifest.tars for lk in t.links or []]  # fmt: skip
    doc.update(label=manifest.label, pgdata=manifest.pgdata, hostname=manifest.hostname, tool=manifest.tool)
    if args.files:
        doc["files"] = [{"tar": t.name, "volume": v.name, "path": f.path, "size": f.size, "sha256": f.sha256,
                         **({} if f.offset is None else {"offset": f.offset})}
                        for t in manifest.tars for v in t.volumes for f in v.files]  # fmt: skip
    if args.json:
        print(json.dumps(doc, indent=1))
        return 0
    seconds = (parse_time(summary.end_time) - parse_time(summary.begin_time)).total_seconds()
    lines = [
        ("backup", summary.id),
        ("status", summary.status),
        ("system identifier", summary.system_identifier),
        ("PostgreSQL", f"{summary.pg_version // 10000}.{summary.pg_version % 100} ({summary.pg_version})"),
        ("timeline", str(summary.timeline)),
        ("begin", f"{summary.begin_time}  LSN {doc['begin_lsn']}  WAL {summary.begin_wal}"),
        ("end", f"{summary.end_time}  LSN {doc['end_lsn']}  WAL {summary.end_wal}"),
        ("duration", human_duration(seconds)),
        ("size", f"{human_size(summary.data_size)} in {summary.file_count} files"),
        ("stored", f"{human_size(summary.stored_size)} ({summary.compression}, ratio {summary.ratio:.2f})"),
        ("WAL after it", f"{doc['wal_after']['segments']} segments, {wal_text(doc)}"),
        ("label", manifest.label),
        ("source", f"{manifest.hostname}:{manifest.pgdata} ({manifest.tool})"),
    ]
    for ts in manifest.tablespaces:
        lines.append(("tablespace", f"{ts.name} (oid {ts.oid}) at {ts.location}"))
    for lk in doc["links"]:  # restored as plain directories and files unless --link-all / --link-map
        lines.append(("link", f"{lk['path']} -> {lk['target']} ({lk['type']})"))
    for t in manifest.tars:
        volumes = f"{len(t.volumes)} volume{'s' if len(t.volumes) != 1 else ''}"
        lines.append(
            ("stream", f"{t.name}: {len(t.paths)} files, {human_size(t.size)} tar, {human_size(t.stored_size)} "
             f"stored in {volumes}")
        )  # fmt: skip
    width = max(len(k) for k, _ in lines)
    print("\n".join(f"{k.ljust(width)}  {v}" for k, v in lines))
    if args.files:
        for f in doc["files"]:
            piece = f"  (piece at offset {f['offset']})" if "offset" in f else ""
            print(f"{f['volume']}  {f['sha256']}  {f['size']:>12}  {f['path']}{piece}")
    return 0
