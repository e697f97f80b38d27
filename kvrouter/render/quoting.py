"""Quote argv and environment so supervisord and systemd parse them back exactly."""
from __future__ import annotations

import re
import shlex

from kvrouter.errors import RenderError

_SYSTEMD_SAFE = re.compile(r"^[A-Za-z0-9_@%+=:,./-]+$")


# supervisord's config parser ends a value at ";" or "#" after whitespace (an inline comment)
_INLINE_COMMENT = re.compile(r"\s[;#]")
HERE = "%(here)s"   # supervisord puts its folder there, in any value, before anything else


def supervisor_command(argv) -> str:
    """supervisord expands ``%(name)s`` then splits with POSIX shlex: quote, then double ``%``.
    ``;`` and ``#`` (inside the single quotes shlex.quote puts around them) are written as
    ``'";"'``: shlex reads the same character back, and the config parser never sees
    whitespace before them, which would cut the line there as a comment."""
    words = []
    for arg in argv:
        word = shlex.quote(arg)
        if ";" in arg or "#" in arg:
            word = word.replace(";", "'\";\"'").replace("#", "'\"#\"'")
        if HERE in arg:   # supervisord replaces that text wherever it is (expand_here)
            word = word.replace("%(", "%'\"(\"'")
        words.append(word)
    return " ".join(words).replace("%", "%%")


def supervisor_value(value: str, where: str = "") -> str:
    """A value on a supervisord.conf line (a path, a name): ``%`` doubled for its expansion,
    and no whitespace before ``;`` or ``#``, which would cut it as an inline comment."""
    if _INLINE_COMMENT.search(value):
        raise RenderError(f"{where}supervisord would read the end of {value!r} as a comment "
                          "(whitespace before ; or #): rename it")
    if HERE in value:
        raise RenderError(f"{where}supervisord replaces {HERE} in {value!r}: rename it")
    return value.replace("%", "%%")


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
        if _INLINE_COMMENT.search(value):
            raise RenderError(f"{where}{key}: supervisord would read the end of {value!r} as a "
                              "comment (whitespace before ; or #)")
        if HERE in value:
            raise RenderError(f"{where}{key}: supervisord replaces {HERE} in {value!r}")
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
