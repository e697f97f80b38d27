"""Typed conversion of parsed YAML against the schema's settings (``schema.setting``):
scalars, lists, mappings and dataclasses, each mistake reported with its key path and
line (``located.Ctx``), every mistake of one pass together. ``load.py`` builds on it.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import typing
from typing import Any

from kvrouter.config.located import Ctx, join, line_of
from kvrouter.control.names import policy_param_problem

_ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {value!r}".replace("True", "true").replace("False", "false")
    if isinstance(value, (int, float)):
        return f"number {value!r}"
    if isinstance(value, str):
        return f"string {value!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def _convert_scalar(tp, value, meta, path, line, ctx) -> Any:
    """Convert one YAML value to ``tp``; on mistakes record an error and return a sentinel."""
    kind = meta.get("kind")
    if kind == "gpus":
        if isinstance(value, bool):
            ctx.error(path, f"expected a GPU id, a list of ids or \"0,1\", found {type_name(value)}",
                      line)
            return BAD
        if isinstance(value, int):
            return str(value)
        if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool)
                                           for v in value):
            return ",".join(str(v) for v in value)
        if isinstance(value, str) and re.fullmatch(r"\s*\d+(\s*,\s*\d+)*\s*", value):
            return ",".join(p.strip() for p in value.split(","))
        ctx.error(path, f"expected a GPU id, a list of ids or \"0,1\", found {type_name(value)}",
                  line)
        return BAD
    if kind == "workers":
        if value == "auto":
            return 0
        if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 256:
            return value
        ctx.error(path, f"expected a number of processes (1 to 256) or auto, found "
                  f"{value!r}", line)
        return BAD
    if kind == "path":
        if not isinstance(value, str) or not value:
            ctx.error(path, f"expected a path, found {type_name(value)}", line)
            return BAD
        return os.path.normpath(os.path.join(ctx.base_dir, os.path.expanduser(value)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        ctx.error(path, f"expected true or false, found {type_name(value)}", line)
        return BAD
    result: Any
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            result = value
        else:
            ctx.error(path, f"expected an integer, found {type_name(value)}", line)
            return BAD
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            result = float(value)
            if not math.isfinite(result):
                ctx.error(path, f"expected a finite number, found {value!r}", line)
                return BAD
        else:
            ctx.error(path, f"expected a number, found {type_name(value)}", line)
            return BAD
    elif tp is str:
        if isinstance(value, str):
            result = value
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            result = str(value)
        else:
            ctx.error(path, f"expected a string, found {type_name(value)}", line)
            return BAD
        if kind == "secret" and not result.strip():
            ctx.error(path, "must not be empty (an empty secret would let anyone in)", line)
            return BAD
    else:  # pragma: no cover - schema bug
        raise TypeError(f"unsupported setting type {tp!r} at {path}")
    lo, hi, choices = meta.get("min"), meta.get("max"), meta.get("choices")
    if choices is not None and kind == "parametrized" and ":" in str(result):
        problem = policy_param_problem(result)
        if problem is None:
            return result
        if problem:
            ctx.error(path, problem, line)
            return BAD
    if choices is not None and result not in choices:
        close = difflib.get_close_matches(str(result), [str(c) for c in choices], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        ctx.error(path, f"expected one of {', '.join(map(str, choices))}, found "
                  f"{type_name(value)}{hint}", line)
        return BAD
    if lo is not None and result < lo:
        ctx.error(path, f"must be at least {lo:g}, found {value!r}", line)
        return BAD
    if hi is not None and result > hi:
        ctx.error(path, f"must be at most {hi:g}, found {value!r}", line)
        return BAD
    return result


class _Bad:
    def __repr__(self):
        return "<invalid>"


BAD = _Bad()


def _convert(tp, value, meta, path, line, ctx):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        inner = [a for a in args if a is not type(None)][0]
        if value is None:
            return None
        return _convert(inner, value, meta, path, line, ctx)
    if dataclasses.is_dataclass(tp):
        if value is None:
            return tp()  # type: ignore[operator]
        if not isinstance(value, dict):
            ctx.error(path, f"expected a mapping, found {type_name(value)}", line)
            return BAD
        return build(tp, value, path, ctx)
    if origin is tuple:
        item_tp = args[0]
        if value is None:
            return ()
        if not isinstance(value, list):
            ctx.error(path, f"expected a list, found {type_name(value)}", line)
            return BAD
        out = []
        for i, item in enumerate(value):
            item_meta = meta if not dataclasses.is_dataclass(item_tp) else {}
            item_meta = {**item_meta, "choices": None} if item_meta else item_meta
            v = _convert(item_tp, item, item_meta, join(path, i), line_of(value, i), ctx)
            if meta.get("kind") == "keyvalue" and isinstance(v, str):
                v = _check_keyvalue(v, join(path, i), line_of(value, i), ctx)
            out.append(v)
        return tuple(out)
    if origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            ctx.error(path, f"expected a mapping, found {type_name(value)}", line)
            return BAD
        val_tp = args[1]
        mapping: dict = {}
        for k, v in value.items():
            kline = line_of(value, k)
            if val_tp is typing.Any:
                if isinstance(v, (dict, list)):
                    ctx.error(join(path, str(k)), f"expected a scalar value, found {type_name(v)}",
                              kline)
                    continue
                mapping[str(k)] = v
            else:
                mapping[str(k)] = _convert(val_tp, v, {}, join(path, str(k)), kline, ctx)
        return mapping
    if value is None:
        if meta.get("required"):
            ctx.error(path, "is required, found null", line)
        return BAD
    return _convert_scalar(tp, value, meta, path, line, ctx)


def _check_keyvalue(item: str, path: str, line, ctx) -> Any:
    key, sep, _ = item.partition("=")
    if not sep or not _ENV_KEY_RE.match(key.strip()):
        ctx.error(path, f"expected KEY=VALUE with KEY a variable name, found {item!r}", line)
        return BAD
    return item


def build(cls, data: dict, path: str, ctx: Ctx):
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if not f.metadata.get("derived")]
    names = [f.name for f in fields]
    kwargs = {}
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            where = path or "top level"
            ctx.error(join(path, str(key)), f"unknown key{hint}; known keys in {where}: "
                      f"{', '.join(names)}", line_of(data, key))
    for f in fields:
        fpath = join(path, f.name)
        if f.name not in data:
            if f.metadata.get("required"):
                ctx.error(fpath, "is required", getattr(data, "line", None))
            continue
        value = _convert(hints[f.name], data[f.name], dict(f.metadata), fpath,
                         line_of(data, f.name), ctx)
        if value is not BAD:
            kwargs[f.name] = value
    try:
        return cls(**kwargs)
    except TypeError:
        return BAD  # required fields missing: already reported
