#!/usr/bin/env python3
"""Storage benchmark: stream one object up and down through each backend, with throughput and peak RSS.

Each measurement runs in its own child process, so the peak RSS printed is that transfer's alone. Next to
cloudbk's numbers it prints a plain SDK copy of the same bytes (boto3's managed transfer, azure-storage-blob's
upload/download with concurrency, google-cloud-storage's upload/download, a plain file copy): the ceiling on
this machine. Services are started on 127.0.0.1 by the same code the tests use, and stopped by PID.

    /opt/cloudbk-venv/bin/python scripts/bench_storage.py                 # 1 GiB, every backend
    /opt/cloudbk-venv/bin/python scripts/bench_storage.py --size-mib 256 --backends file,s3-seaweedfs
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from services.launch import start_backend  # noqa: E402 - needs the sys.path entries above

MiB = 1024 * 1024
CHUNK = MiB
BACKENDS = ("file", "s3-moto", "s3-seaweedfs", "azure", "gcs")


class Source(io.RawIOBase):
    """``size`` bytes of incompressible-looking data, generated as read: nothing held in memory."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self.pos = 0
        self.block = hashlib.shake_256(b"bench").digest(CHUNK)

    def readable(self) -> bool:
        return True

    def tell(self) -> int:  # the GCS SDK asks where a resumable upload starts
        return self.pos

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), self.size - self.pos)
        if n <= 0:
            return 0
        offset = self.pos % CHUNK
        n = min(n, CHUNK - offset)
        buffer[:n] = self.block[offset : offset + n]
        self.pos += n
        return n


class Sink(io.RawIOBase):
    """Discards what is written; seekable because parallel SDK downloads write ranges out of order."""

    def __init__(self) -> None:
        super().__init__()
        self.size = 0
        self.pos = 0

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos if whence == 0 else self.pos + pos if whence == 1 else self.size + pos
        return self.pos

    def tell(self) -> int:
        return self.pos

    def write(self, data: Any) -> int:
        self.pos += len(data)
        self.size = max(self.size, self.pos)
        return len(data)


# -- child: one transfer --------------------------------------------------------------------------------------


def child(spec: dict[str, Any]) -> None:
    size, url, env, mode, key = spec["size"], spec["url"], spec["env"], spec["mode"], spec["key"]
    os.environ.update(env)
    start = time.monotonic()
    if mode.startswith("cloudbk"):
        from cloudbk.storage.registry import StorageOptions, open_storage

        storage = open_storage(url, StorageOptions(endpoint_url=env.get("CLOUDBK_ENDPOINT_URL"), environ=os.environ))
        if mode == "cloudbk-up":
            src = Source(size)
            with storage.open_write(key) as writer:
                while chunk := src.read(CHUNK):
                    writer.write(chunk)
                writer.commit()
        else:
            got = 0
            with storage.open_read(key) as reader:
                while chunk := reader.read(CHUNK):
                    got += len(chunk)
            assert got == size, (got, size)
    else:
        sdk_copy(spec, mode == "sdk-up")
    print(json.dumps({"seconds": time.monotonic() - start}))


def sdk_copy(spec: dict[str, Any], upload: bool) -> None:
    size, url, env, key, backend = spec["size"], spec["url"], spec["env"], spec["key"], spec["backend"]
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    name = f"{parts.path.strip('/')}/{key}".lstrip("/")
    if backend == "file":
        path = Path(parts.path) / key
        if upload:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as f:
                src = Source(size)
                while chunk := src.read(CHUNK):
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
        else:
            with open(path, "rb") as f:
                while f.read(CHUNK):
                    pass
    elif backend.startswith("s3"):
        import boto3

        client = boto3.client("s3", endpoint_url=env["CLOUDBK_ENDPOINT_URL"])
        if upload:
            client.upload_fileobj(Source(size), parts.netloc, name)
        else:
            client.download_fileobj(parts.netloc, name, Sink())
    elif backend == "azure":
        from azure.storage.blob import BlobServiceClient

        service = BlobServiceClient(
            env["CLOUDBK_ENDPOINT_URL"],
            credential={"account_name": env["AZURE_STORAGE_ACCOUNT"], "account_key": env["AZURE_STORAGE_KEY"]},
        )
        blob = service.get_blob_client(parts.netloc, name)
        if upload:
            blob.upload_blob(Source(size), length=size, overwrite=True, max_concurrency=4)
        else:
            blob.download_blob(max_concurrency=4).readinto(Sink())
    else:
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage as gcs

        client = gcs.Client(
            project="bench",
            credentials=AnonymousCredentials(),
            client_options={"api_endpoint": env["STORAGE_EMULATOR_HOST"]},
        )
        blob = client.bucket(parts.netloc).blob(name, chunk_size=8 * MiB)
        if upload:
            blob.upload_from_file(Source(size), size=size)
        else:
            blob.download_to_file(Sink())


# -- parent: services, children, table ------------------------------------------------------------------------


def run_child(spec: dict[str, Any]) -> tuple[float, float]:
    proc = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(spec)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"{spec['backend']} {spec['mode']} failed")
    seconds = float(json.loads(out.decode().strip().splitlines()[-1])["seconds"])
    return seconds, usage.ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    size = args.size_mib * MiB
    rows = []
    with tempfile.TemporaryDirectory(prefix="cloudbk-bench-") as tmp:
        for name in args.backends.split(","):
            work = Path(tmp) / name
            work.mkdir()
            service, url, env = start_backend(name, work)
            try:
                row: dict[str, Any] = {"backend": name}
                for mode, key in (
                    ("cloudbk-up", "cb.bin"),
                    ("cloudbk-down", "cb.bin"),
                    ("sdk-up", "sdk.bin"),
                    ("sdk-down", "sdk.bin"),
                ):
                    spec = {"size": size, "url": url, "env": env, "mode": mode, "key": key, "backend": name}
                    seconds, rss = run_child(spec)
                    row[mode] = (size / MiB / seconds, rss)
                rows.append(row)
                print(f"  measured {name}", file=sys.stderr)
            finally:
                if service is not None:
                    service.stop()
    print(f"\nStreaming a {args.size_mib} MiB object (MB/s = MiB per second; RSS = peak resident set of the process)\n")
    print("| backend | cloudbk up | cloudbk down | SDK up (ceiling) | SDK down (ceiling) |")
    print("|---|---|---|---|---|")
    for row in rows:
        cells = [
            f"{row[m][0]:.0f} MB/s, {row[m][1]:.0f} MB RSS"
            for m in ("cloudbk-up", "cloudbk-down", "sdk-up", "sdk-down")
        ]
        print(f"| {row['backend']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
