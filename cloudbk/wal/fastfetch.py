"""The hit path of ``cloudbk-wal-fetch``: serve the requested segment from the prefetch spool, standard library
only (the interpreter runs with ``-I -S``; see ``bin/cloudbk-wal-fetch``).

1. Understand the command line without argparse (``[options] WAL_NAME DEST_PATH``); anything unusual, a name
   that is not a full segment, or ``--prefetch 0`` / ``CLOUDBK_PREFETCH=0`` -> the full command.
2. Serve the exact name from a verified entry of the current generation (:func:`cloudbk.wal.spool.serve`),
   and make sure the prefetcher runs to keep the spool filled.
3. Otherwise return False: the full command fetches from the archive and answers PostgreSQL itself — a
   prefetch miss or failure never becomes an exit status.
"""

from __future__ import annotations

import os
import sys

from cloudbk.wal import fastargs, spool

TYPE_CHECKING = False  # typing itself costs import time on the fast path
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

_VALUE_FLAGS: dict[str, str | None] = {**fastargs.COMMON_FLAGS, "--prefetch": "prefetch"}


def prefetch_off(flags: Mapping[str, object], environ: Mapping[str, str]) -> bool:
    value = flags.get("prefetch")
    if value is None:
        value = environ.get("CLOUDBK_PREFETCH")
    return value is not None and str(value).strip() == "0"


def hit(argv: Sequence[str], environ: Mapping[str, str]) -> bool:
    """Whether this ``cloudbk-wal-fetch`` call was served from the spool."""
    parsed = fastargs.parse(argv, _VALUE_FLAGS, 2)
    if parsed is None:
        return False
    flags, (name, dest) = parsed
    if prefetch_off(flags, environ):
        return False
    sha256 = spool.serve(name, dest, flags, environ)
    if sha256 is None:
        return False
    sys.stderr.write(f"cloudbk wal-fetch: INFO: {name} served from the prefetch spool (sha256 {sha256[:16]}…)\n")
    datadir = spool.data_directory(dest)
    if datadir is not None:
        from cloudbk.wal import marker

        try:
            spool.start_prefetcher(datadir, spool.spool_dir(datadir, marker.identity(flags, environ)), flags, environ)
        except OSError:
            pass  # the spool still works; the next miss starts it
    return True


def launch() -> None:
    """The ``cloudbk-wal-fetch`` launcher's Python half: the hit path, else the full command with ``site``.

    An error on the hit path must never end the process: an uncaught exception exits 1, which PostgreSQL reads
    as "not in the archive" (it may end recovery there). The full command runs instead and answers."""
    try:
        served = hit(sys.argv[1:], os.environ)
    except Exception as exc:
        sys.stderr.write(f"cloudbk wal-fetch: WARNING: prefetch spool not used: {exc!r}\n")
        served = False
    if served:
        sys.stderr.flush()
        os._exit(0)  # nothing else to flush: skip the interpreter's teardown, it is part of PostgreSQL's wait
    import site

    site.main()
    from cloudbk.cli.main import wal_fetch_main

    wal_fetch_main()
