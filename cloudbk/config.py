"""Settings from flags, environment variables and an optional TOML file: flags win over env over file.

| setting        | flag               | env                                          | TOML key        |
|----------------|--------------------|----------------------------------------------|-----------------|
| repo           | --repo             | CLOUDBK_REPO                                 | repo            |
| server         | --server           | CLOUDBK_SERVER                               | server          |
| endpoint_url   | --endpoint-url     | CLOUDBK_ENDPOINT_URL, AWS_ENDPOINT_URL       | endpoint_url    |
| compression    | --compression      | CLOUDBK_COMPRESSION                          | compression     |
| dbname         | --dbname           | (libpq's own PGHOST, PGPORT, ...)            | dbname          |
| pgdata         | --pgdata           | PGDATA                                       | pgdata          |
| retry_deadline | --retry-deadline   | CLOUDBK_RETRY_DEADLINE                       | retry_deadline  |
| config file    | --config           | CLOUDBK_CONFIG                               |                 |

Command-specific tables (e.g. ``[retention]``) are kept in ``Settings.sections`` for those commands to read.
Secrets are never read from or written to the config file by cloudbk: credentials follow each SDK's chain.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cloudbk.errors import UsageError
from cloudbk.repo.compression import DEFAULT_ALGORITHM, check_algorithm
from cloudbk.repo.layout import check_server
from cloudbk.storage.registry import StorageOptions, parse_url

DEFAULT_SERVER = "main"
WAL_RETRY_DEADLINE = 60.0
_SCALARS = ("repo", "server", "endpoint_url", "compression", "dbname", "pgdata", "retry_deadline")
_ENV = {
    "repo": ("CLOUDBK_REPO",),
    "server": ("CLOUDBK_SERVER",),
    "endpoint_url": ("CLOUDBK_ENDPOINT_URL", "AWS_ENDPOINT_URL"),
    "compression": ("CLOUDBK_COMPRESSION",),
    "pgdata": ("PGDATA",),
    "retry_deadline": ("CLOUDBK_RETRY_DEADLINE",),
}


@dataclass
class Settings:
    repo: str | None = None
    server: str = DEFAULT_SERVER
    endpoint_url: str | None = None
    compression: str = DEFAULT_ALGORITHM
    dbname: str | None = None
    pgdata: str | None = None
    retry_deadline: float | None = None
    verbose: bool = False
    config_file: str | None = None
    sections: dict[str, dict[str, Any]] = field(default_factory=dict)
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))

    def require_repo(self) -> str:
        if not self.repo:
            raise UsageError(
                "no repository configured",
                hint="pass --repo URL or set CLOUDBK_REPO (e.g. s3://bucket/prefix or file:///var/lib/cloudbk)",
            )
        return self.repo

    def storage_options(self, default_deadline: float = WAL_RETRY_DEADLINE) -> StorageOptions:
        deadline = self.retry_deadline if self.retry_deadline is not None else default_deadline
        return StorageOptions(endpoint_url=self.endpoint_url, retry_deadline=deadline, environ=self.environ)


def _read_toml(path: str) -> dict[str, Any]:
    import tomllib

    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise UsageError(f"config file {path} does not exist", hint="fix --config / CLOUDBK_CONFIG") from None
    except OSError as exc:
        raise UsageError(f"cannot read config file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"config file {path} is not valid TOML: {exc}") from exc


def resolve(flags: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Settings:
    """Build the settings. ``flags`` holds parsed command-line values, None where a flag was not given."""
    env = dict(os.environ) if environ is None else dict(environ)
    config_file = flags.get("config") or env.get("CLOUDBK_CONFIG")
    file_values: dict[str, Any] = _read_toml(config_file) if config_file else {}
    sections = {k: v for k, v in file_values.items() if isinstance(v, dict)}
    unknown = [k for k, v in file_values.items() if not isinstance(v, dict) and k not in _SCALARS]
    if unknown:
        raise UsageError(
            f"config file {config_file} has unknown settings: {', '.join(sorted(unknown))}",
            hint=f"known settings: {', '.join(_SCALARS)}",
        )
    values: dict[str, Any] = {}
    for name in _SCALARS:
        value = flags.get(name)
        if value is None:
            value = next((env[e] for e in _ENV.get(name, ()) if env.get(e)), None)
        if value is None:
            value = file_values.get(name)
        if value is not None:
            values[name] = value

    settings = Settings(verbose=bool(flags.get("verbose")), config_file=config_file, sections=sections, environ=env)
    if "repo" in values:
        settings.repo = str(values["repo"])
        parse_url(settings.repo)  # fail early, as a usage error, on a malformed URL
    if "server" in values:
        settings.server = check_server(str(values["server"]))
    if "endpoint_url" in values:
        settings.endpoint_url = str(values["endpoint_url"])
    if "compression" in values:
        settings.compression = check_algorithm(str(values["compression"]))
    if "dbname" in values:
        settings.dbname = str(values["dbname"])
    if "pgdata" in values:
        settings.pgdata = str(values["pgdata"])
    if "retry_deadline" in values:
        try:
            settings.retry_deadline = float(values["retry_deadline"])
        except (TypeError, ValueError):
            raise UsageError(f"retry deadline {values['retry_deadline']!r} is not a number of seconds") from None
        if settings.retry_deadline < 0:
            raise UsageError("retry deadline must not be negative")
    return settings
