"""``cloudbk wal-push WAL_PATH`` / ``cloudbk-wal-push WAL_PATH``: the archive_command.

Exit 0 only when the file is durably stored (or the identical file already was). Exit codes otherwise follow
SPEC §1: 2 when the storage fails after retries, 3 for usage errors, 4 for a conflict or an integrity problem,
1 when the local file cannot be read. PostgreSQL retries any nonzero exit.
"""

from __future__ import annotations

import argparse
import logging

from cloudbk.cli.main import terminate_on_sigterm
from cloudbk.config import Settings
from cloudbk.errors import CloudbkError

HELP = "archive one WAL file (archive_command = 'cloudbk-wal-push %p')"

log = logging.getLogger("cloudbk")


def human_size(n: int) -> str:
    if n >= 1024 * 1024:
        return f"{n / (1024 * 1024):.1f} MiB"
    if n >= 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{n} B"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="WAL_PATH", help="the WAL file to archive (%%p in archive_command)")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from cloudbk.storage.registry import open_storage
    from cloudbk.wal.push import push_wal

    with terminate_on_sigterm():
        storage = open_storage(settings.require_repo(), settings.storage_options())
        try:
            with storage.whole_call():  # --retry-deadline bounds the whole command (cloudbk.storage.deadline)
                result = push_wal(storage, settings.server, args.path, settings.compression)
        except CloudbkError:
            raise
        except Exception as exc:
            log.debug("unexpected error", exc_info=True)
            raise CloudbkError(f"unexpected error while archiving {args.path}: {exc!r}", key=args.path) from exc
        finally:
            storage.close()
    if result.already_archived:
        log.info(
            "%s already archived with identical content (sha256 %s…), nothing written, in %.2fs",
            result.name,
            result.sha256[:16],
            result.seconds,
        )
    else:
        log.info(
            "pushed %s (%s -> %s %s) in %.2fs",
            result.name,
            human_size(result.size),
            human_size(result.stored_size),
            result.compression,
            result.seconds,
        )
    return 0
