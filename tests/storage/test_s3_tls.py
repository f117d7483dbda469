"""SeaweedFS's S3 gateway over HTTPS (``start_seaweedfs(tls=...)``, the WAL benchmark's endpoint): cloudbk
trusts the throwaway CA through ``AWS_CA_BUNDLE`` and refuses the endpoint without it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from backends import selected, unique_prefix
from services.s3 import S3Service, start_seaweedfs
from services.tls import make_loopback_tls

pytestmark = pytest.mark.skipif(not selected(("s3-seaweedfs",)), reason="s3-seaweedfs not selected")

ROUND_TRIP = """
import os
import sys
from cloudbk.storage.base import CREATE_ONLY
from cloudbk.storage.registry import StorageOptions, open_storage
storage = open_storage(sys.argv[1], StorageOptions(endpoint_url=os.environ["CLOUDBK_ENDPOINT_URL"],
                                                   environ=dict(os.environ), retry_deadline=5))
writer = storage.open_write("probe", mode=CREATE_ONLY)
writer.write(b"over https")
writer.commit()
with storage.open_read("probe") as reader:
    assert reader.read() == b"over https"
"""


@pytest.fixture(scope="module")
def https_seaweedfs(service_logs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Service]:
    tls = make_loopback_tls(tmp_path_factory.mktemp("tls"))
    service = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs-https"), service_logs, tls=tls)
    try:
        yield service
    finally:
        service.stop()


def _round_trip(service: S3Service, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    url = f"s3://{service.bucket}/{unique_prefix('https')}"
    return subprocess.run([sys.executable, "-c", ROUND_TRIP, url], env=env, capture_output=True, text=True)


def _env(service: S3Service, with_ca: bool) -> dict[str, str]:
    env = {**os.environ, **service.env()}
    if not with_ca:
        del env["AWS_CA_BUNDLE"]
    return env


def test_the_endpoint_speaks_https_with_a_certificate_for_127_0_0_1(https_seaweedfs: S3Service) -> None:
    assert https_seaweedfs.endpoint_url.startswith("https://127.0.0.1:")
    proc = _round_trip(https_seaweedfs, _env(https_seaweedfs, with_ca=True))
    assert proc.returncode == 0, proc.stderr


def test_without_the_ca_the_certificate_is_refused(https_seaweedfs: S3Service) -> None:
    env = _env(https_seaweedfs, with_ca=False)
    proc = _round_trip(https_seaweedfs, env)
    assert proc.returncode != 0 and "CERTIFICATE_VERIFY_FAILED" in proc.stderr
