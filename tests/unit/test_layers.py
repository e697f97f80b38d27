"""Imports only point down (docs/design.md, "Layers"): checked on the source, so a new
upward import fails here rather than in a reviewer's head."""
import ast
import os
import sys

from tests.helpers import ROOT

# module prefix -> layer; the longest matching prefix wins
LAYERS = {
    "kvrouter": 1, "kvrouter.errors": 1, "kvrouter.versions": 1, "kvrouter.http": 1,
    "kvrouter.config": 1, "kvrouter.traffic": 1, "kvrouter.control.states": 1,
    "kvrouter.control.names": 1,
    "kvrouter.kvpool": 1, "kvrouter.logs": 1, "kvrouter.timing": 1,
    "kvrouter.sim": 2, "kvrouter.render": 2,
    "kvrouter.control.policy": 2, "kvrouter.control.kvplan": 2, "kvrouter.control.process": 2,
    "kvrouter.control.routing": 2, "kvrouter.control.prefix": 2, "kvrouter.control.ejection": 2,
    "kvrouter.control.supervisor": 2, "kvrouter.control.memo": 2, "kvrouter.engines": 2,
    "kvrouter.control": 3, "kvrouter.metrics": 3, "kvrouter.cluster": 3,
    "kvrouter.router": 4,
    "kvrouter.control.policies": 2,
    "kvrouter.cli": 5, "kvrouter.admin": 5, "kvrouter.stack": 5, "kvrouter.entry": 5,
    "kvrouter.__main__": 5, "kvrouter.bench": 5,
    "kvrouter.lab": 5, "kvrouter.top": 5, "kvrouter.ui": 5,
}
# side packages on the foundations only, and peers that must not know each other
FORBIDDEN = {
    "kvrouter.sim": ("kvrouter.control", "kvrouter.engines", "kvrouter.router",
                     "kvrouter.render", "kvrouter.metrics"),
    "kvrouter.render": ("kvrouter.control", "kvrouter.engines", "kvrouter.router",
                        "kvrouter.sim", "kvrouter.metrics"),
    "kvrouter.bench": ("kvrouter.router", "kvrouter.control"),
    "kvrouter.metrics": ("kvrouter.control.controller",),
    # the cluster implements the controller's Coordinator; the router wires it in
    "kvrouter.cluster": ("kvrouter.router", "kvrouter.metrics"),
    # the policy lab runs the policies' pure code, never the live controller or a socket
    "kvrouter.lab": ("kvrouter.router", "kvrouter.control.controller",
                     "kvrouter.control.transitions", "kvrouter.control.kvsteer",
                     "kvrouter.engines", "kvrouter.http"),
}
PURE = ("kvrouter.control.states", "kvrouter.control.names", "kvrouter.control.policy",
        "kvrouter.control.kvplan", "kvrouter.control.policies", "kvrouter.timing", "kvrouter.control.routing",
        "kvrouter.control.prefix", "kvrouter.control.ejection")
# what a pure module may not import from the standard library either: clocks, randomness,
# sockets, the file system, threads (the caller passes `now` and an `rng`)
IMPURE = ("time", "random", "socket", "os", "threading")


def _layer(module):
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[best]


def _modules():
    for d, _, files in os.walk(os.path.join(ROOT, "kvrouter")):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(d, f)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                yield rel[:-len(".__init__")] if rel.endswith(".__init__") else rel, path


def _imports(path, module):
    with open(path) as fh:
        tree = ast.parse(fh.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative
                base = module.rsplit(".", node.level)[0]
                yield f"{base}.{node.module}" if node.module else base, node.lineno
            elif node.module:
                yield node.module, node.lineno
                for alias in node.names:  # `from kvrouter.control import policy`
                    yield f"{node.module}.{alias.name}", node.lineno


def test_imports_point_down():
    wrong = []
    for module, path in _modules():
        for target, line in _imports(path, module):
            if not target.startswith("kvrouter") or target == module:
                continue
            if not any(target == p or target.startswith(p + ".") for p in LAYERS):
                continue
            if _layer(target) > _layer(module):
                wrong.append(f"{path}:{line}: {module} (layer {_layer(module)}) imports "
                             f"{target} (layer {_layer(target)})")
            for prefix, banned in FORBIDDEN.items():
                if module == prefix or module.startswith(prefix + "."):
                    if any(target == b or target.startswith(b + ".") for b in banned):
                        wrong.append(f"{path}:{line}: {module} must not import {target}")
    assert not wrong, "\n".join(wrong)


def test_states_and_policy_are_pure():
    stdlib = set(sys.stdlib_module_names)
    for module, path in _modules():
        if module not in PURE:
            continue
        for target, line in _imports(path, module):
            top = target.split(".")[0]
            ok = (top in stdlib and top not in IMPURE) or top == "__future__" or any(
                target == p or target.startswith(p + ".") for p in PURE)
            assert ok, f"{path}:{line}: {module} imports {target}"


def _runtime_imports(path, module, modules):
    """The kvrouter modules ``module`` imports when it runs (anywhere in the file, functions
    included; not under ``if TYPE_CHECKING:``); ``from pkg import mod`` counts as ``mod``."""
    with open(path) as fh:
        tree = ast.parse(fh.read())
    typing_only = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
            typing_only.update(id(n) for b in node.body for n in ast.walk(b))
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            subs = [f"{node.module}.{a.name}" for a in node.names]
            names = [n for n in subs if n in modules] or [node.module]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module:
                yield name


def test_no_module_imports_itself_through_others():
    """No import circle (docs/design.md): each module can be read, tested and replaced
    below the ones that use it."""
    modules = dict(_modules())
    graph = {m: set(_runtime_imports(p, m, modules)) for m, p in modules.items()}
    circles = []
    for start in graph:
        stack, seen = [(start, (start,))], set()
        while stack:
            node, trail = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    circles.append(" -> ".join(trail + (start,)))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, trail + (nxt,)))
    assert circles == [], circles[:5]
