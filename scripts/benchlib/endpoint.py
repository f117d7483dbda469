"""The one S3 endpoint every tool talks to: SeaweedFS's S3 gateway over HTTPS on 127.0.0.1, and the raw
PUT ceiling measured against it with plain boto3."""

from __future__ import annotations

import os
import resource
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.s3 import REGION, S3Service, start_seaweedfs
from services.tls import TlsFiles, make_loopback_tls


@dataclass
class Endpoint:
    service: S3Service
    tls: TlsFiles

    @property
    def port(self) -> int:
        return self.service.process.port

    @property
    def url(self) -> str:
        return self.service.endpoint_url

    @property
    def bucket(self) -> str:
        return self.service.bucket

    def env(self) -> dict[str, str]:
        """Credentials, region, endpoint and CA bundle for botocore-based tools (cloudbk, barman-cloud)."""
        return self.service.env()

    def pids(self) -> list[int]:
        proc = self.service.process.proc
        return [proc.pid] if proc is not None and proc.poll() is None else []

    def stop(self) -> None:
        self.service.stop()


def start_endpoint(work: Path) -> Endpoint:
    """A throwaway CA and certificate under ``work/tls``, SeaweedFS data under ``work/seaweedfs``."""
    tls_dir, home = work / "tls", work / "seaweedfs"
    tls_dir.mkdir()
    home.mkdir()
    os.chmod(tls_dir, 0o755)
    tls = make_loopback_tls(tls_dir)
    return Endpoint(start_seaweedfs(home, work, tls=tls), tls)


def _boto3_client(endpoint: Endpoint, threads: int) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "s3",
        region_name=REGION,
        endpoint_url=endpoint.url,
        aws_access_key_id=endpoint.service.access_key,
        aws_secret_access_key=endpoint.service.secret_key,
        verify=str(endpoint.tls.ca),
        config=Config(s3={"addressing_style": "path"}, max_pool_connections=threads),
    )


def put_ceiling(endpoint: Endpoint, segments: list[Path], threads: int = 8) -> dict[str, float]:
    """Upload-only ceiling: every segment PUT as is (no compression, no checks) from one process, in threads.

    The files are read into memory first, so only the requests are timed.
    """
    client = _boto3_client(endpoint, threads)
    bodies = [(f"put-ceiling/{seg.name}", seg.read_bytes()) for seg in segments]
    client.head_bucket(Bucket=endpoint.bucket)  # the TLS handshake and credentials, outside the timing
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda kv: client.put_object(Bucket=endpoint.bucket, Key=kv[0], Body=kv[1]), bodies))
    wall = time.perf_counter() - start
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage1.ru_utime - usage0.ru_utime + usage1.ru_stime - usage0.ru_stime
    for key, _ in bodies:  # a GiB of uncompressed copies: give the disk back
        client.delete_object(Bucket=endpoint.bucket, Key=key)
    client.close()
    return {
        "segments": len(segments),
        "threads": threads,
        "wall_s": wall,
        "segments_per_s": len(segments) / wall,
        "cpu_s_per_segment": cpu / len(segments),
    }
