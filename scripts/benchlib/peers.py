"""The peers the benchmark runs next to cloudbk, on the same endpoint: pgBackRest (async archiving, Debian
package ``pgbackrest``) and, optionally, barman-cloud (PyPI ``barman[cloud]`` in a virtualenv of its own)."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from pgcluster import PG_BIN, run_as_pg

from cloudbk.repo.compression import ZSTD_LEVEL

from .endpoint import Endpoint
from .runner import chown_tree

BARMAN_VENV = Path(os.environ.get("BENCH_BARMAN_VENV", "/opt/barman-venv"))
GET_QUEUE_BYTES = 8 * 16 * 1024 * 1024  # archive-get-queue-max: 8 segments ahead, like cloudbk's default prefetch


def pgbackrest_binary() -> str:
    found = shutil.which("pgbackrest")
    if not found:
        raise SystemExit("pgBackRest is not installed: apt-get install pgbackrest")
    return found


@dataclass(frozen=True)
class PgBackRest:
    """One pgBackRest configuration file (repository on the endpoint) and one stanza."""

    config: Path
    stanza: str

    def argv(self, *args: str) -> list[str]:
        return [pgbackrest_binary(), f"--config={self.config}", f"--stanza={self.stanza}", *args]

    def archive_command(self) -> str:
        return " ".join(self.argv("archive-push", "%p"))

    def create_stanza(self) -> None:
        """stanza-create against the running cluster named in the configuration."""
        run_as_pg(self.argv("--log-level-console=warn", "stanza-create"))


def write_pgbackrest_config(
    home: Path, endpoint: Endpoint, stanza: str, datadir: Path, port: int, socket_dir: str
) -> PgBackRest:
    """``home/pgbackrest.conf`` (mode 0600, the secret is in it) and its spool, log and lock directories."""
    for sub in ("spool", "log", "lock"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    svc = endpoint.service
    settings = {
        "repo1-type": "s3",
        "repo1-path": f"/pgbackrest-{stanza}",
        "repo1-s3-endpoint": "127.0.0.1",
        "repo1-s3-port": str(endpoint.port),
        "repo1-s3-uri-style": "path",
        "repo1-s3-bucket": endpoint.bucket,
        "repo1-s3-key": svc.access_key,
        "repo1-s3-key-secret": svc.secret_key,
        "repo1-s3-region": "us-east-1",
        "repo1-s3-ca-file": str(endpoint.tls.ca),
        "archive-async": "y",
        "process-max": "2",
        "archive-get-queue-max": str(GET_QUEUE_BYTES),
        "spool-path": str(home / "spool"),
        "log-path": str(home / "log"),
        "lock-path": str(home / "lock"),
        "log-level-console": "warn",
        "log-level-file": "info",
        "compress-type": "zst",
        "compress-level": str(ZSTD_LEVEL),
    }
    lines = ["[global]", *(f"{k}={v}" for k, v in settings.items()), ""]
    lines += [f"[{stanza}]", f"pg1-path={datadir}", f"pg1-port={port}", f"pg1-socket-path={socket_dir}"]
    config = home / "pgbackrest.conf"
    config.write_text("\n".join(lines) + "\n")
    config.chmod(0o600)
    chown_tree(home)
    return PgBackRest(config, stanza)


def barman_available() -> bool:
    return (BARMAN_VENV / "bin" / "barman-cloud-wal-archive").exists()


@dataclass(frozen=True)
class Barman:
    """barman-cloud's WAL commands against ``s3://bucket/barman``, server name ``server``."""

    endpoint: Endpoint
    spool: Path
    server: str = "bench"

    def _common(self, tool: str) -> list[str]:
        return [str(BARMAN_VENV / "bin" / tool), "--endpoint-url", self.endpoint.url, "--addressing-style", "path"]

    @property
    def url(self) -> str:
        return f"s3://{self.endpoint.bucket}/barman"

    def archive(self, path: str) -> list[str]:
        level = str(ZSTD_LEVEL)
        return [*self._common("barman-cloud-wal-archive"), "--zstd", "--compression-level", level, self.url,
                self.server, path]  # fmt: skip

    def restore(self, name: str, dest: str, parallel: int) -> list[str]:
        return [*self._common("barman-cloud-wal-restore"), "--parallel", str(parallel), "--spool-dir",
                str(self.spool), self.url, self.server, name, dest]  # fmt: skip


def pg_bin(tool: str) -> str:
    return str(PG_BIN / tool)
