"""A real `systemd --user` and journald, started by the repository's own launcher
(tests/systemd/user_manager.py, as root; systemd is not PID 1 on these machines). Where
the machine cannot run it a bare `pytest` skips this tier and says why; `make test` sets
KVROUTER_REQUIRE_SYSTEMD, so there it fails instead."""
import os

import pytest

from tests.systemd import user_manager


def pytest_collection_modifyitems(config, items):
    why = user_manager.why_not()
    if why is None:
        return
    if os.environ.get("KVROUTER_REQUIRE_SYSTEMD"):
        raise pytest.UsageError(why)
    for item in items:
        if "systemd" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=why))


@pytest.fixture(scope="session")
def user_systemd():
    """Start the user manager; export XDG_RUNTIME_DIR to this process (and its children)."""
    os.environ["XDG_RUNTIME_DIR"] = user_manager.start()
    yield os.environ["XDG_RUNTIME_DIR"]
    user_manager.stop()
