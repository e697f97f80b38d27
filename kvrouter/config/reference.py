"""The config reference, generated from the schema (``kvrouter config-reference``)."""
from __future__ import annotations

import dataclasses
import typing

from kvrouter.config import schema

SECTIONS = [("(top level)", schema.Config), ("router", schema.RouterConfig),
            ("sleep_manager", schema.SleepPolicy), ("instances[]", schema.Instance),
            ("instances[].sleep", schema.InstanceSleep), ("instances[].sim", schema.SimOptions),
            ("benchmark", schema.BenchmarkConfig), ("benchmark.clients[]", schema.BenchClient)]


def _type(tp) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:
        return _type([a for a in args if a is not type(None)][0]) + " or null"
    if origin is tuple:
        return f"list of {_type(args[0])}"
    if origin is dict:
        return "mapping"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    return {bool: "bool", int: "int", float: "number", str: "string"}.get(tp, str(tp))


def _default(f) -> str:
    if f.metadata.get("required"):
        return "required"
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        return "{}" if isinstance(value, dict) else ("see below" if dataclasses.is_dataclass(value)
                                                      else repr(value))
    value = f.default
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value == ():
        return "[]"
    return repr(value) if isinstance(value, str) else f"{value:g}" if isinstance(value, float) \
        else str(value)


def markdown() -> str:
    out = ["# kvrouter configuration reference", "",
           "Generated from `kvrouter/config/schema.py` by `kvrouter config-reference`. "
           "Every key is optional unless marked required.", ""]
    for title, cls in SECTIONS:
        hints = typing.get_type_hints(cls)
        out += [f"## {title}", "", "| key | type | default | limits | meaning |",
                "|---|---|---|---|---|"]
        for f in dataclasses.fields(cls):
            if f.metadata.get("derived"):
                continue
            m = f.metadata
            limits = []
            if m.get("choices"):
                limits.append(" \\| ".join(str(c) for c in m["choices"]))
            if m.get("min") is not None:
                limits.append(f">= {m['min']:g}")
            if m.get("max") is not None:
                limits.append(f"<= {m['max']:g}")
            out.append(f"| `{f.name}` | {_type(hints[f.name])} | {_default(f)} | "
                       f"{', '.join(limits)} | {m.get('help', '')} |")
        out.append("")
    return "\n".join(out)
