"""The settings a drill's server runs with, over whatever the restored backup carries (docs/drill.md).

They are given on the server's command line (``postgres -c name=value``), which outranks ``postgresql.conf``,
its ``include`` files and ``postgresql.auto.conf``: nothing the production cluster configured can point the
drill at production. Each one says why it is there.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

#: small memory: a drill shares its host with whatever runs there
MEMORY = {
    "shared_buffers": "32MB",
    "work_mem": "4MB",
    "maintenance_work_mem": "32MB",
    "max_connections": "20",
    "huge_pages": "off",
    "max_parallel_workers": "2",
    "max_worker_processes": "8",
}


def safety_settings(
    datadir: str, scratch: str, port: int, socket_dir: str, keep_preload: bool, major: int = 15
) -> dict[str, str]:
    """Name -> value for ``postgres -c``: reach nothing but the scratch directory, disturb nothing."""
    settings = {
        "data_directory": datadir,  # a restored postgresql.conf may name production's (Debian's does)
        "hba_file": os.path.join(scratch, "pg_hba.conf"),  # local socket only: see write_auth_files
        "ident_file": os.path.join(scratch, "pg_ident.conf"),
        "external_pid_file": "",  # production's would be overwritten
        "listen_addresses": "127.0.0.1",
        "port": str(port),
        "unix_socket_directories": socket_dir,  # private (0700), inside the scratch directory
        "unix_socket_permissions": "0700",
        "unix_socket_group": "",
        "ssl": "off",  # production's certificate paths need not exist here
        "archive_mode": "off",  # never archives into the repository, never starts push-ahead
        "archive_command": "",
        "archive_library": "",
        "archive_cleanup_command": "",  # production's could prune a real archive
        "recovery_end_command": "",
        "max_wal_senders": "0",  # no replication connections
        "primary_conninfo": "",
        "primary_slot_name": "",
        "synchronous_standby_names": "",  # commits after the promotion must not wait for a standby
        "max_logical_replication_workers": "0",  # a restored subscriber must not consume its publisher's slot
        "max_sync_workers_per_subscription": "0",
        "hot_standby": "off",  # no connections before the target: the checks see the promoted server only
        "recovery_target_action": "promote",
        "logging_collector": "off",  # the log goes to the scratch directory's server.log
        "log_destination": "stderr",
        "cluster_name": "cloudbk-drill",
        **MEMORY,
    }
    if major < 15:
        del settings["archive_library"]  # PostgreSQL 15 added it; an unknown name stops the server
    if not keep_preload:  # schedulers such as pg_cron run their jobs from preloaded libraries
        settings.update(shared_preload_libraries="", session_preload_libraries="", local_preload_libraries="")
    return settings


def command_line(settings: Mapping[str, str]) -> list[str]:
    """``-c name=value`` for each setting: an argument vector, no shell involved."""
    return [arg for name, value in settings.items() for arg in ("-c", f"{name}={value}")]


def write_auth_files(scratch: str, owner: tuple[int, int] | None) -> None:
    """The drill's pg_hba.conf: trust on the private socket only; TCP, even on 127.0.0.1, is rejected."""
    files = {
        "pg_hba.conf": "# written by cloudbk drill\nlocal all all trust\nhost all all 0.0.0.0/0 reject\n"
        "host all all ::/0 reject\n",
        "pg_ident.conf": "# written by cloudbk drill\n",
    }
    for name, text in files.items():
        _write(os.path.join(scratch, name), text, owner)


def ensure_postgresql_conf(datadir: str, owner: tuple[int, int] | None) -> bool:
    """Write a ``postgresql.conf`` when the backup has none (its cluster kept it outside PGDATA, as Debian
    does); the drill's settings are on the command line. Returns whether one was written."""
    path = os.path.join(datadir, "postgresql.conf")
    if os.path.lexists(path):
        return False
    _write(path, "# written by cloudbk drill: the backup holds no postgresql.conf\n", owner)
    return True


def _write(path: str, text: str, owner: tuple[int, int] | None) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    if owner is not None:
        os.chown(path, *owner)
