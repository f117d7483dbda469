"""The hit path of ``cloudbk-wal-push``: return 0 on a marker the push-ahead worker wrote, standard library only.

PostgreSQL archives one file at a time, so the cost of this path bounds how fast a busy server can archive.
It imports no SDK, reads no config file, touches no storage and hashes nothing (SPEC §4). Its job:

1. Understand the command line without argparse (``[options] WAL_PATH``); anything unusual -> the full path.
2. If ``NAME.ok`` vouches for the file (:func:`cloudbk.wal.marker.vouches`), remove it and succeed.
3. If the worker is running and has taken ``NAME`` (``NAME.busy``), wait for its marker, up to the retry
   deadline, as long as the worker lives. A ``NAME.failed`` note, a dead worker, or a file the worker has not
   taken within a short grace ends the wait.
4. Otherwise return None: the caller runs today's synchronous push, which also (re)starts the worker.
"""

from __future__ import annotations

import os
import sys
import time

from cloudbk.background import is_running
from cloudbk.wal import fastargs, marker

TYPE_CHECKING = False  # typing itself costs import time on the fast path
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

# long options of wal-push and the Settings name each fills (None: accepted, not needed here)
_VALUE_FLAGS: dict[str, str | None] = {**fastargs.COMMON_FLAGS, "--push-ahead": "push_ahead"}
DEFAULT_WAIT = 60.0  # seconds: the WAL commands' default retry deadline (cloudbk.config.WAL_RETRY_DEADLINE)
GRACE = 2.0  # seconds a live worker may take to notice a .ready file before the call pushes it itself


def parse_argv(argv: Sequence[str]) -> tuple[dict[str, str], str] | None:
    """(flags by Settings name, WAL path), or None when the line needs the real parser."""
    parsed = fastargs.parse(argv, _VALUE_FLAGS, 1)
    return None if parsed is None else (parsed[0], parsed[1][0])


def wait_for_marker(path: str, flags: Mapping[str, object], environ: Mapping[str, str], starting: bool = False) -> bool:
    """True when the push-ahead worker has archived ``path`` (stored and indexed); see the module docstring.
    ``starting``: the caller has just started the worker, which may take up to :data:`GRACE` to take its lock."""
    wal_dir, name = os.path.split(os.path.abspath(path))
    ident = marker.identity(flags, environ)
    sdir = marker.state_dir(wal_dir, ident)
    base = os.path.join(sdir, name)
    deadline_value = flags.get("retry_deadline") or environ.get("CLOUDBK_RETRY_DEADLINE")
    give_up = time.monotonic() + fastargs.seconds(str(deadline_value) if deadline_value else None, DEFAULT_WAIT)
    start = time.monotonic()
    pause = 0.002
    while True:
        text = marker.read_text(base + marker.OK)
        if text is not None:
            fields = marker.parse_marker(text)
            try:
                st = os.stat(path)
            except OSError:
                return False
            marker.remove(base + marker.OK)
            if fields is not None and marker.vouches(fields, name, ident, st):
                sys.stderr.write(
                    f"cloudbk wal-push: INFO: {name} archived by push-ahead (sha256 {fields['sha256'][:16]}…)\n"
                )
                return True
            return False  # stale or foreign: removed, and this call pushes the file itself
        failed = marker.read_text(base + marker.FAILED)
        if failed is not None:
            sys.stderr.write(f"cloudbk wal-push: WARNING: push-ahead could not archive {name}: {failed.strip()}\n")
            return False
        now = time.monotonic()
        if not is_running(sdir) and not (starting and now - start < GRACE):
            return False
        if now >= give_up:
            return False
        if now - start >= GRACE and not os.path.exists(base + marker.BUSY):
            return False
        time.sleep(pause)
        pause = min(pause * 2, 0.02)


def push_ahead_off(flags: Mapping[str, object], environ: Mapping[str, str]) -> bool:
    value = flags.get("push_ahead")
    if value is None:
        value = environ.get("CLOUDBK_PUSH_AHEAD")
    return value is not None and str(value).strip() == "0"


def hit(argv: Sequence[str], environ: Mapping[str, str]) -> bool:
    """Whether this ``cloudbk-wal-push`` call is already done (the worker archived the file)."""
    parsed = parse_argv(argv)
    if parsed is None:
        return False
    flags, path = parsed
    if push_ahead_off(flags, environ):
        return False
    return wait_for_marker(path, flags, environ)


def launch() -> None:
    """The ``cloudbk-wal-push`` launcher's Python half (the interpreter runs with ``-I -S``): the hit path, and
    else the whole program with ``site`` loaded as usual."""
    argv = sys.argv[1:]
    if hit(argv, os.environ):
        sys.exit(0)
    import site

    site.main()
    from cloudbk.cli.main import wal_push_main

    wal_push_main()
