"""Fixtures of the integration tier (helpers are in tests/helpers.py)."""
import shutil
import tempfile

import pytest


@pytest.fixture
def short_tmp():
    """A short folder for unix sockets (supervisord's path must stay under ~100 chars)."""
    path = tempfile.mkdtemp(prefix="kvr-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)
