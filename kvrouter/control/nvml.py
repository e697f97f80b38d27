"""GPU memory as NVML measures it, when nvidia-ml-py is installed (``pip install
'kvrouter[nvml]'``) and a GPU is there; otherwise nothing, and kvrouter shows the
config's figures, labelled ``declared``.

Per GPU: total and used bytes. Per engine: the bytes its processes hold on any GPU (the
engine's PID from the process manager, and its descendants: vLLM and SGLang run their
GPU work in child processes).
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, Iterable, Optional, Set

log = logging.getLogger("kvrouter.nvml")


class Nvml:
    def __init__(self, module: Any = None):
        self.nv = module
        self.ok = False
        try:
            if self.nv is None:
                import pynvml  # type: ignore[import-not-found]

                self.nv = pynvml
            self.nv.nvmlInit()
            self.ok = True
        except Exception as err:  # noqa: BLE001 - no library, no driver, no GPU: no NVML
            log.debug("NVML not available: %s", err)

    def gpus(self) -> Dict[str, Dict[str, int]]:
        """{gpu index: {"total_bytes", "used_bytes"}}; {} without NVML."""
        if not self.ok:
            return {}
        out = {}
        try:
            for i in range(self.nv.nvmlDeviceGetCount()):
                mem = self.nv.nvmlDeviceGetMemoryInfo(self.nv.nvmlDeviceGetHandleByIndex(i))
                out[str(i)] = {"total_bytes": int(mem.total), "used_bytes": int(mem.used)}
        except Exception as err:  # noqa: BLE001
            log.warning("NVML: %s", err)
        return out

    def used_by(self, pids: Iterable[int]) -> Optional[int]:
        """GPU bytes held by these processes and their descendants; None without NVML."""
        if not self.ok:
            return None
        wanted = descendants(pids)
        total = 0
        try:
            for i in range(self.nv.nvmlDeviceGetCount()):
                handle = self.nv.nvmlDeviceGetHandleByIndex(i)
                for proc in self.nv.nvmlDeviceGetComputeRunningProcesses(handle):
                    if proc.pid in wanted and proc.usedGpuMemory:
                        total += int(proc.usedGpuMemory)
        except Exception as err:  # noqa: BLE001
            log.warning("NVML: %s", err)
            return None
        return total


def descendants(pids: Iterable[int], proc: str = "/proc") -> Set[int]:
    """The processes and all their descendants (from /proc/*/stat parent links)."""
    children: Dict[int, Set[int]] = {}
    try:
        names = os.listdir(proc)
    except OSError:
        names = []
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(os.path.join(proc, name, "stat")) as fh:
                stat = fh.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, set()).add(int(name))
    out: Set[int] = set()
    todo = [p for p in pids if p]
    while todo:
        pid = todo.pop()
        if pid not in out:
            out.add(pid)
            todo.extend(children.get(pid, ()))
    return out
