"""Misconfigurations get messages that say what is wrong and what to do: a missing bucket or container, a
malformed Azure key or connection string."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from backends import selected

from cloudbk.errors import ExitCode, PermanentError, UsageError
from cloudbk.storage.registry import StorageOptions, open_storage

BIN = Path(sys.executable).parent
MISSING = "cloudbk-no-such-bucket"


@pytest.mark.parametrize("name", selected(("s3-moto", "azure", "gcs")))
def test_missing_bucket_or_container_is_named(name: str, request: pytest.FixtureRequest) -> None:
    service = request.getfixturevalue(f"{name.replace('-', '_')}_service")
    backend = service.make("p")
    scheme, rest = backend.url.split("://", 1)
    url = f"{scheme}://{MISSING}/{rest.split('/', 1)[1]}"
    storage = open_storage(url, backend.options())
    with pytest.raises(PermanentError) as info:
        storage.exists("main/index.json")
    assert MISSING in str(info.value) and "HINT: create" in str(info.value)
    storage.close()
    if name != "s3-moto":
        return
    # what `cloudbk check` says (it used to be "no main/index.json", as a HEAD's 404 carries no error code)
    env = {**os.environ, **backend.env, "CLOUDBK_REPO": url}
    result = subprocess.run([str(BIN / "cloudbk"), "check"], env=env, capture_output=True, text=True, timeout=60)
    repository = next(line for line in result.stdout.splitlines() if "repository:" in line)
    assert f"bucket {MISSING} does not exist" in repository, result.stdout
    assert "no main/index.json" not in result.stdout


def _azure_options(**env: str) -> StorageOptions:
    environ = {
        "AZURE_STORAGE_ACCOUNT": "devstoreaccount1",
        "AZURE_STORAGE_KEY": "",
        "AZURE_STORAGE_SAS_TOKEN": "",
        "AZURE_STORAGE_CONNECTION_STRING": "",
        **env,
    }
    return StorageOptions(endpoint_url="http://127.0.0.1:9/devstoreaccount1", environ=environ)


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"AZURE_STORAGE_KEY": "not base64!!"}, "AZURE_STORAGE_KEY"),
        (
            {"AZURE_STORAGE_CONNECTION_STRING": "DefaultEndpointsProtocol=http;AccountName=a;AccountKey=###"},
            "AccountKey of AZURE_STORAGE_CONNECTION_STRING",
        ),
        ({"AZURE_STORAGE_CONNECTION_STRING": "garbage"}, "AZURE_STORAGE_CONNECTION_STRING is malformed"),
    ],
)
def test_malformed_azure_credentials_are_a_usage_error(env: dict[str, str], named: str) -> None:
    with pytest.raises(UsageError) as info:
        open_storage("azure://container/p", _azure_options(**env))
    assert named in str(info.value) and "HINT:" in str(info.value)
    assert "HTTP None" not in str(info.value)


def test_malformed_azure_key_exits_with_usage_error() -> None:
    env = {**os.environ, **_azure_options(AZURE_STORAGE_KEY="not base64!!").environ}
    env.update(CLOUDBK_REPO="azure://container/p", CLOUDBK_ENDPOINT_URL="http://127.0.0.1:9/devstoreaccount1")
    result = subprocess.run([str(BIN / "cloudbk"), "backup-list"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == ExitCode.USAGE, result.stderr
    assert "AZURE_STORAGE_KEY is not a valid Azure storage account key" in result.stderr
