"""Every test belongs to a tier, named by its folder: unit, integration, systemd or engine. The
marker is applied here (``pytest -m unit`` selects a tier; ``--strict-markers`` is on)."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
TIERS = ("unit", "integration", "systemd", "engine")
TESTS = os.path.join(ROOT, "tests")


def pytest_collection_modifyitems(config, items):
    for item in items:
        rel = os.path.relpath(str(item.path), TESTS)
        tier = rel.split(os.sep, 1)[0]
        if tier not in TIERS:
            raise pytest.UsageError(f"{rel}: tests live in a tier folder ({', '.join(TIERS)})")
        item.add_marker(getattr(pytest.mark, tier))
