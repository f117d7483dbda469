"""``cloudbk reindex``: rebuild the server's index from the objects (WAL keys, history files, manifests)."""

from __future__ import annotations

import argparse

from cloudbk.cli.common import LONG_RETRY_DEADLINE, open_repo
from cloudbk.config import Settings

HELP = "rebuild the index (backups, WAL ranges, timeline histories) from the stored objects"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    return None


def run(args: argparse.Namespace, settings: Settings) -> int:
    from cloudbk.lifecycle.reindex import reindex
    from cloudbk.repo import layout

    storage = open_repo(settings, LONG_RETRY_DEADLINE)
    try:
        report = reindex(storage, settings.server)
    finally:
        storage.close()
    timelines = ", ".join(str(t) for t in report.timelines) or "none"
    if report.index_unreadable is not None:
        key = layout.index_key(settings.server)
        print(
            f"{key} was unreadable ({report.index_unreadable}); rebuilt from {report.backups} backups and "
            f"{report.segments} WAL segments"
        )
    print(f"index of server {settings.server!r} rebuilt:")
    print(f"  WAL segments      {report.segments} (timelines {timelines}), {report.other_files} other WAL files")
    print(f"  history files     {report.histories}")
    print(f"  backups           {report.backups}")
    print(f"  changes           {report.added} segments added, {report.removed} removed (objects gone)")
    if report.kept_concurrent:
        print(f"  kept              {report.kept_concurrent} entries written while reindexing")
    for backup_id in report.unfinished_backups:
        print(f"  unfinished backup {backup_id}: objects without a manifest (not listed, never restored)")
    for line in report.unreadable:
        print(f"  skipped           {line}")
    return 0
