"""``cloudbk backup-list [--json]``: the complete backups, oldest first (by end LSN and time, never by id).

Which backups count is decided by :func:`cloudbk.repo.catalog.load_catalog` (one LIST of the backups prefix next
to the index): a damaged backup is not listed, and a warning names it.
"""

from __future__ import annotations

import argparse
import json

from cloudbk.cli.common import open_repo
from cloudbk.cli.output import describe_backup, human_size, proof_text, table, wal_text
from cloudbk.config import Settings

HELP = "list the complete backups with their WAL range, sizes and the WAL archived after them"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from cloudbk.repo.catalog import load_catalog
    from cloudbk.repo.proofs import describe, load_proofs

    storage = open_repo(settings)
    try:
        catalog = load_catalog(storage, settings.server)  # the backups that count (damaged ones are logged)
        proofs = load_proofs(storage, settings.server)
    finally:
        storage.close()
    docs = [{**describe_backup(catalog.index, b), **describe(proofs, b.id)} for b in catalog.backups]
    if args.json:
        print(json.dumps(docs, indent=1))
        return 0
    if not docs:
        damaged = f" ({len(catalog.damaged)} damaged: see `cloudbk check`)" if catalog.damaged else ""
        print(f"no backups for server {settings.server!r}{damaged}")
        return 0
    rows = [
        [
            d["id"],
            d["status"],
            d["end_time"][:19].replace("T", " "),
            str(d["timeline"]),
            d["begin_lsn"],
            d["end_lsn"],
            human_size(d["data_size"]),
            human_size(d["stored_size"]),
            f"{d['compression_ratio']:.1f}x",
            wal_text(d),
            proof_text(d["verify"]),
            proof_text(d["drill"]),
        ]
        for d in docs
    ]
    header = ["ID", "STATUS", "END TIME (UTC)", "TL", "BEGIN LSN", "END LSN", "SIZE", "STORED", "RATIO", "WAL AFTER"]
    header += ["VERIFIED", "DRILLED"]
    print(table(rows, header))
    return 0
