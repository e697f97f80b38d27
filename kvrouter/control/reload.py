"""A new config for a running controller (SIGHUP reload), touching only what changed."""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, List

import gevent

from kvrouter.config.schema import Config
from kvrouter.control.entry import ModelEntry
from kvrouter.control.states import ASLEEP

if TYPE_CHECKING:
    from kvrouter.control.controller import Controller


def reconfigure(ctl: "Controller", cfg: Config) -> Dict[str, List[str]]:
    """Take a new config without touching what did not change (SIGHUP reload).

    A model whose engine address is the same keeps its entry, state and traffic (its
    settings, aliases and sleep overrides are replaced); a new model gets an entry and a
    health loop; a removed one is forgotten (requests already on it finish); a model
    whose engine moved (host or port) starts over as a new entry."""
    old = ctl.entries
    new: Dict[str, ModelEntry] = {}
    report: Dict[str, List[str]] = {"added": [], "removed": [], "changed": [], "kept": []}
    for inst in cfg.instances:
        entry = old.get(inst.key)
        if entry is not None and entry.inst.base_url == inst.base_url:
            if entry.inst != inst:
                report["changed"].append(inst.key)
                entry.inst = entry.adapter.inst = inst
                if entry.state not in ASLEEP:  # a sleeping model keeps the level it slept at
                    entry.level = inst.sleep_level
            else:
                report["kept"].append(inst.key)
            new[inst.key] = entry
        else:
            new[inst.key] = ModelEntry(inst, ctl.adapter_factory(inst), ctl.clock())
            report["added" if entry is None else "changed"].append(inst.key)
    report["removed"] = [name for name in old if name not in new]
    for name, entry in old.items():
        if new.get(name) is not entry:
            loop = ctl.health_loops.pop(name, None)
            if loop is not None:
                loop.kill(block=False)
            entry.pool.close_idle()
    ctl.cfg = cfg
    ctl.entries = new
    ctl.policy_poke.set()
    if ctl.loops:  # running: probe the new entries
        for name, entry in new.items():
            if name not in ctl.health_loops:
                ctl.health_loops[name] = gevent.spawn(ctl.health_loop, entry)
    return report
