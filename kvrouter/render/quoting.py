"""Quote argv and environment so supervisord and systemd parse them back exactly."""
from __future__ import annotations

import re
import shlex

from kvrouter.errors import RenderError

_SYSTEMD_SAFE = re.compile(r"^[A-Za-z0-9_@%+=:,./-]+$")


def supervisor_command(argv) -> str:
    """supervisord expands ``%(name)s`` then splits with POSIX shlex: quote, then double ``%``."""
    return " ".join(shlex.quote(a) for a in argv).replace("%", "%%")


def supervisor_environment(env, where: str = "") -> str:
    """``KEY="value",...``: supervisord splits with non-POSIX shlex and strips outer quotes."""
    parts = []
    for key, value in env:
        if '"' not in value:
            quoted = f'"{value}"'
        elif "'" not in value:
            quoted = f"'{value}'"
        else:
            raise RenderError(f"{where}{key}: supervisord cannot express a value holding both "
                              f"quote characters: {value!r}")
        if value[-1:] in ("'", '"') or value[:1] in ("'", '"'):
            raise RenderError(f"{where}{key}: supervisord strips quotes at the ends of a value: "
                              f"{value!r}")
        parts.append(f"{key}={quoted}".replace("%", "%%"))
    return ",".join(parts)


def _systemd_word(arg: str) -> str:
    if arg and _SYSTEMD_SAFE.match(arg) and "%" not in arg:
        return arg
    escaped = arg.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def systemd_exec(argv) -> str:
    """ExecStart= words: C-style escapes in double quotes, ``%`` and ``$`` doubled."""
    return " ".join(_systemd_word(a) for a in argv).replace("%", "%%").replace("$", "$$")


def systemd_environment(key: str, value: str) -> str:
    """One ``Environment=`` assignment, quoted as a whole; ``%`` specifiers doubled."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{key}={escaped}"'.replace("%", "%%")
