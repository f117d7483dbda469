"""Services whose data survives a restart: an outage is a TransientError, and the data is there afterwards."""

from __future__ import annotations

import pytest
from backends import Backend, selected
from services.proc import RestartableService

from cloudbk.errors import TransientError

# moto keeps its objects in memory only, so it is not among them
RESTART_KEEPS_DATA = ("s3-seaweedfs", "azure", "gcs")


@pytest.mark.parametrize("backend", selected(RESTART_KEEPS_DATA), indirect=True)
def test_outage_is_transient_and_restart_keeps_data(backend: Backend) -> None:
    service = backend.service
    assert isinstance(service, RestartableService)
    driver = backend.open_driver()
    driver.put_bytes("restart/k", b"kept")
    service.stop()
    try:
        with pytest.raises(TransientError):
            driver.stat("restart/k")
    finally:
        service.start()
    assert driver.get_bytes("restart/k") == b"kept"
    driver.close()
