"""``cloudbk keep ID [--standalone]`` / ``cloudbk keep --release ID`` / ``cloudbk keep --status ID``.

A kept backup is never expired by retention and cannot be deleted until released. ``full`` (the default)
also keeps all WAL after it, so it stays usable for point-in-time recovery; ``--standalone`` keeps only the
WAL from its begin to its end, enough to restore it as it was when it ended (``restore --target-immediate``).
The mark is an object beside the manifest (``backups/<id>/keep.json``), mirrored in the index.
"""

from __future__ import annotations

import argparse

from cloudbk.cli.common import open_repo
from cloudbk.config import Settings

HELP = "keep a backup forever, whatever the retention policy (or --release it)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("backup_id", metavar="ID", help="the backup id, or 'latest'")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--release", action="store_true", help="remove the keep mark")
    action.add_argument("--status", action="store_true", help="print the keep mode (full, standalone or none)")
    action.add_argument("--standalone", action="store_true", help="keep only the WAL the backup needs to be consistent")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from cloudbk.lifecycle.actions import keep_backup, release_backup
    from cloudbk.repo.catalog import KEEP_FULL, KEEP_STANDALONE, load_catalog, resolve_backup

    with open_repo(settings) as storage:
        if args.status:
            catalog = load_catalog(storage, settings.server)
            backup = resolve_backup(catalog, args.backup_id)
            print(catalog.keeps.get(backup.id, "none"))
        elif args.release:
            backup, previous = release_backup(storage, settings.server, args.backup_id)
            if previous is None:
                print(f"backup {backup.id} was not kept")
            else:
                print(f"released backup {backup.id} (was kept: {previous}); retention may now expire it")
        else:
            mode = KEEP_STANDALONE if args.standalone else KEEP_FULL
            backup = keep_backup(storage, settings.server, args.backup_id, mode)
            print(f"backup {backup.id} is kept ({mode})")
    return 0
