"""Understand an instance's engine_args: split items into argv, find --host, --port, names."""
from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Optional, Tuple


@dataclass(frozen=True)
class EngineArgs:
    argv: Tuple[str, ...]
    host: Optional[str]
    port: Optional[str]
    served_model_names: Tuple[str, ...]


def split_items(items) -> Tuple[str, ...]:
    """Split items like ``"--gpu-memory-utilization 0.5"`` into argv tokens, shell-style."""
    argv: list[str] = []
    for item in items:
        argv.extend(shlex.split(str(item)))
    return tuple(argv)


def flag_values(argv, flag: str, nargs_many: bool = False) -> Optional[Tuple[str, ...]]:
    """Values of the last ``flag`` in argv (``--flag=v`` or ``--flag v [v ...]``); None if absent."""
    found: Optional[Tuple[str, ...]] = None
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok == flag:
            vals = []
            j = i + 1
            while j < len(argv) and not argv[j].startswith("--"):
                vals.append(argv[j])
                j += 1
                if not nargs_many:
                    break
            found = tuple(vals)
            i = j
            continue
        if tok.startswith(flag + "="):
            found = (tok[len(flag) + 1:],)
        i += 1
    return found


def parse_engine_args(items) -> EngineArgs:
    argv = split_items(items)
    host = flag_values(argv, "--host")
    port = flag_values(argv, "--port")
    names = flag_values(argv, "--served-model-name", nargs_many=True) or ()
    return EngineArgs(
        argv=argv,
        host=host[0] if host else None,
        port=port[0] if port else ("" if port is not None else None),
        served_model_names=tuple(names),
    )
