"""A writer process killed midway (SIGKILL, no cleanup) leaves nothing visible under its key."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from backends import PROCESS_BACKENDS, Backend, selected

from cloudbk.errors import NotFound

WRITER = r"""
import os, sys, json
from cloudbk.storage.registry import open_storage, StorageOptions
url, key, endpoint = sys.argv[1], sys.argv[2], sys.argv[3] or None
storage = open_storage(url, StorageOptions(endpoint_url=endpoint, retry_deadline=5))
writer = storage.open_write(key)
chunk = os.urandom(1024 * 1024)
written = 0
while True:
    writer.write(chunk)
    written += len(chunk)
    if written == 24 * 1024 * 1024:   # past the first parts of every multipart driver
        print("midway", flush=True)
"""


@pytest.mark.parametrize("backend", selected(PROCESS_BACKENDS), indirect=True)
def test_killed_writer_leaves_nothing(backend: Backend) -> None:
    env = dict(os.environ, **backend.env)
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, backend.url, "killed/object", env.get("CLOUDBK_ENDPOINT_URL", "")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == b"midway", proc.stderr.read() if proc.stderr else b""
        time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    storage = backend.open()
    with pytest.raises(NotFound):
        storage.stat("killed/object")
    assert [i.key for i in storage.list("killed/")] == []
