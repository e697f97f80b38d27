"""Where a mistake is in a config file: the loader's context (file, errors, warnings) and
the line and key path of a value, shared by the loader and its checks."""
from __future__ import annotations

import os
import re
from typing import Any, Optional

from kvrouter.config.yamlsrc import LineDict, LineList
from kvrouter.errors import ConfigError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class Ctx:
    """One file being loaded: its source, folder, and the mistakes found so far."""

    def __init__(self, source: str, base_dir: str = "."):
        self.source = source
        self.base_dir = os.path.abspath(base_dir)
        self.errors: list[ConfigError] = []
        self.warnings: list[str] = []

    def error(self, path: str, message: str, line: Optional[int] = None) -> None:
        self.errors.append(ConfigError(message, path=path, source=self.source, line=line))


def line_of(container: Any, key: Any) -> Optional[int]:
    if isinstance(container, LineDict):
        return container.lines.get(key, container.line)
    if isinstance(container, LineList) and isinstance(key, int) and key < len(container.lines):
        return container.lines[key]
    return getattr(container, "line", None)


def join(path: str, key: Any) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


def check_unique(ctx: Ctx, items, what: str, key, paths, datas) -> None:
    seen: dict = {}
    for i, item in enumerate(items):
        for value in key(item):
            if value in seen and seen[value] != i:
                ctx.error(paths(i), f"duplicate {what} {value!r} (also in {paths(seen[value])})",
                          line_of(datas, i))
            seen.setdefault(value, i)


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def no_control_characters(value: Any, path: str, ctx: Ctx, line: Optional[int] = None) -> None:
    """No key or string in the config holds a control character (a newline, a tab, NUL):
    every one reaches a rendered file, a command line or a header, where a newline would
    start a section of its own (``[program:...]`` in supervisord.conf)."""
    if isinstance(value, dict):
        for key, item in value.items():
            where = join(path, key)
            if isinstance(key, str) and _CONTROL.search(key):
                ctx.error(where, f"a key holds a control character: {key!r}",
                          line_of(value, key))
            no_control_characters(item, where, ctx, line_of(value, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            no_control_characters(item, f"{path}[{i}]", ctx, line_of(value, i) or line)
    elif isinstance(value, str) and _CONTROL.search(value):
        char = _CONTROL.search(value).group()  # type: ignore[union-attr]
        ctx.error(path, f"holds a control character ({char!r}); names, arguments and values "
                  f"are single lines: {value!r}", line)
