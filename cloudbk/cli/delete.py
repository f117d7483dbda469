"""``cloudbk delete ID [--force]``: delete one backup (its manifest first, then its data, then its index entry).

Refuses a kept backup (``cloudbk keep --release ID`` first) and, unless ``--force``, the last backup or one
whose deletion leaves fewer than the configured minimum redundancy. WAL is never deleted here: retention
decides what WAL is no longer needed.
"""

from __future__ import annotations

import argparse

from cloudbk.cli.common import open_repo
from cloudbk.config import Settings

HELP = "delete one backup (not its WAL; see retention)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("backup_id", metavar="ID", help="the backup id (see backup-list)")
    parser.add_argument(
        "--force",
        action="store_true",
        help="also delete the last backup, or the leftovers of a backup that has no manifest",
    )


def run(args: argparse.Namespace, settings: Settings) -> int:
    from cloudbk.config import minimum_redundancy
    from cloudbk.lifecycle.actions import delete_backup

    floor = minimum_redundancy(settings, None)
    with open_repo(settings) as storage:
        result = delete_backup(storage, settings.server, args.backup_id, force=args.force, minimum_redundancy=floor)
    what = "backup" if result.existed else "leftovers of backup"
    print(f"deleted {what} {result.backup_id} ({len(result.deleted_keys)} objects)")
    return 0
