"""Version strings as comparable tuples (one parser for engines' /version and dist-info names)."""
from __future__ import annotations

import re
from typing import Tuple

Version = Tuple[int, ...]


def parse_version(text: str) -> Version:
    """``"0.10.2rc1+cpu"`` -> ``(0, 10, 2)``; ``()`` when there is no number."""
    return tuple(int(n) for n in re.findall(r"\d+", text or "")[:3])


def dotted(version: Version) -> str:
    return ".".join(map(str, version))
