"""Detached helpers of the WAL commands (the push-ahead worker; later the prefetcher), and the rules they live by.

Work that must outlive one ``archive_command`` call runs in one detached process per (data directory,
repository, server), under a lock file (SPEC §4). The rules, decided here once:

- **One worker per state directory.** The worker holds an exclusive ``flock`` on ``worker.lock`` for its whole
  life and writes its PID into it. A caller tells "running" by probing the lock, never by the PID alone (PIDs
  are reused). A second worker started by a race finds the lock taken and exits at once.
- **Detached.** Started with ``posix_spawn`` in a new session (no controlling terminal, not in PostgreSQL's
  process group), stdin and stdout on ``/dev/null``, stderr into the worker's log file. The caller never waits
  for it; when the caller exits the worker is re-parented to PID 1 (or the nearest subreaper).
- **Never hurt the server.** When PostgreSQL's postmaster is PID 1 (the official container image without an
  init process) it is the re-parented worker's reaper, and any exit status but 0 or 1 (a signal included) makes
  it restart every session. Workers therefore always exit 0, and are not started at all when the postmaster is
  PID 1 (:func:`postmaster_is_pid1`): a ``kill -9`` cannot be made to exit 0.

Standard library only, and cheap to import: the per-call fast path uses it.
"""

from __future__ import annotations

import fcntl
import os
import sys

TYPE_CHECKING = False  # typing itself costs import time on the fast path
if TYPE_CHECKING:
    import logging
    from collections.abc import Callable

LOCK_FILE = "worker.lock"
LOG_FILE = "worker.log"
LOG_KEEP_BYTES = 4 * 1024 * 1024  # a log beyond this is rotated to worker.log.1 when a worker starts


def postmaster_pid(datadir: str) -> int | None:
    """The postmaster's PID from ``postmaster.pid`` (first line), None when there is none or it is unreadable."""
    try:
        with open(os.path.join(datadir, "postmaster.pid"), "rb") as f:
            first = f.readline()
    except OSError:
        return None
    try:
        return int(first.strip() or b"x")
    except ValueError:
        return None


def postmaster_is_pid1(datadir: str) -> bool:
    """Whether the server of ``datadir`` runs as PID 1 (in its PID namespace): no detached worker then."""
    return postmaster_pid(datadir) == 1


def pid1_is_postgres() -> bool:
    """Whether PID 1 (in our PID namespace) is a PostgreSQL server: a worker started where no ``postmaster.pid``
    tells us yet (``restore`` filling the prefetch spool) would be re-parented to it."""
    try:
        with open("/proc/1/comm", "rb") as f:
            return f.read().strip() in (b"postgres", b"postmaster")
    except OSError:
        return False


def lock_path(state_dir: str) -> str:
    return os.path.join(state_dir, LOCK_FILE)


def is_running(state_dir: str) -> bool:
    """Whether a worker holds the lock of ``state_dir``. A brief shared-lock probe; never blocks."""
    try:
        fd = os.open(lock_path(state_dir), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # closing drops a shared lock we may have taken
    return False


def worker_pid(state_dir: str) -> int | None:
    """The PID recorded by the worker that holds (or last held) the lock of ``state_dir``."""
    try:
        with open(lock_path(state_dir), "rb") as f:
            return int(f.read().strip() or b"x")
    except (OSError, ValueError):
        return None


def acquire(state_dir: str, attempts: int = 50) -> int | None:
    """Take the worker lock of ``state_dir`` and record our PID; the open descriptor, or None when another worker
    holds it. Retries briefly, because a caller's :func:`is_running` probe holds a shared lock for microseconds."""
    import time

    fd = os.open(lock_path(state_dir), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    for _ in range(attempts):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            time.sleep(0.01)
            continue
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd
    os.close(fd)
    return None


def spawn_detached(argv: list[str], state_dir: str, environ: dict[str, str]) -> int:
    """Start ``argv`` detached (see the module docstring), its stderr appended to the state directory's log.
    Returns its PID; the caller does not wait for it."""
    log = os.path.join(state_dir, LOG_FILE)
    try:
        if os.path.getsize(log) > LOG_KEEP_BYTES:
            os.replace(log, log + ".1")
    except OSError:
        pass
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
        (os.POSIX_SPAWN_OPEN, 2, log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600),
    ]
    return os.posix_spawn(argv[0], argv, environ, file_actions=actions, setsid=True)


def run_worker(label: str, body: Callable[[], None]) -> None:
    """Run a detached worker's ``body`` with the rules above, and end the process with status 0, always.

    SIGTERM and SIGINT end it at once (status 0), SIGHUP is ignored, log records go to stderr (the worker's log
    file) through the redacting formatter, and any error is logged, never turned into another exit status."""
    import logging
    import signal

    from cloudbk.cli.main import RedactingFormatter

    log = logging.getLogger("cloudbk")

    def stop(signum: int, frame: object) -> None:
        log.info("%s %d stopped by signal %d", label, os.getpid(), signum)
        logging.shutdown()
        os._exit(0)  # at once: what a worker leaves half done is never visible to a call

    try:
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        handler = logging.StreamHandler(sys.stderr)
        fmt = f"%(asctime)s cloudbk {label}[%(process)d]: %(levelname)s: %(message)s"
        handler.setFormatter(RedactingFormatter(fmt))
        log.handlers[:] = [handler]
        log.setLevel(logging.INFO)
        log.propagate = False
        body()
    except BaseException:
        try:
            log.exception("%s stopped", label)
        except BaseException:
            pass
    finally:
        try:
            logging.shutdown()
        finally:
            os._exit(0)


def make_state_dir(path: str, what: str, log: logging.Logger) -> bool:
    """Create a worker's state directory (mode 0700); False, with a warning that ``what`` is off, if it cannot."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as exc:
        log.warning("%s off: cannot create %s (%s)", what, path, exc.strerror)
        return False
    return True


def off_for_pid1(datadir: str, state_root: str, what: str, log: logging.Logger) -> bool:
    """True when the postmaster of ``datadir`` is PID 1, so no ``what`` worker may start; warns once per
    ``state_root`` (a file there remembers it)."""
    if not postmaster_is_pid1(datadir):
        return False
    warned = os.path.join(state_root, "pid1-warned")
    if not os.path.exists(warned):
        log.warning(
            "%s is off: PostgreSQL runs as PID 1, and a background process it reaps could make it restart every "
            "session. Run the container with an init process (docker run --init, tini) to get it back; every "
            "file is still handled, one call at a time",
            what,
        )
        try:
            with open(warned, "x"):
                pass
        except OSError:
            pass
    return True
