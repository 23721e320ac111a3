"""Test fixtures for the PACS side: one real Orthanc (with DICOMweb) started for the session by
lungsql's own `LocalOrthanc`, and an emptied view of it per test.

tests/conftest.py imports the fixtures by name (`from pacs_fixtures import orthanc, orthanc_clean`).
Orthanc is installed by scripts/bootstrap.sh, so a missing Orthanc fails the tests instead of
skipping them.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from lungsql.client.pacs.orthanc import LocalOrthanc, find_orthanc
from lungsql.errors import ConfigurationError


@pytest.fixture(scope="session")
def orthanc():
    """A running LocalOrthanc (AET ORTHANC, no authentication) under a temporary folder, deleted at the end."""
    try:
        find_orthanc()
    except ConfigurationError as exc:
        pytest.fail(str(exc), pytrace=False)
    # Under /tmp with o+x, like the PostgreSQL cluster's folder, so another OS user may reach it.
    home = Path(tempfile.mkdtemp(prefix="lungsql-orthanc-"))
    home.chmod(0o755)
    local = LocalOrthanc(home)
    try:
        local.start()
    except ConfigurationError as exc:
        shutil.rmtree(home, ignore_errors=True)
        pytest.fail(str(exc), pytrace=False)
    yield local
    local.stop()
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def orthanc_clean(orthanc):
    """The session's Orthanc with every patient deleted first, so a test sees only the studies it sends."""
    for patient in orthanc.request("GET", "/patients"):
        orthanc.request("DELETE", f"/patients/{patient}")
    yield orthanc
