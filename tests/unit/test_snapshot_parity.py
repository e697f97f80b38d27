"""The live controller and the policy lab build the policy's snapshot apart; every field of
``ModelView`` and ``Snapshot`` must be filled on both sides, or a policy learns in the lab
what it never sees live (the live snapshot once left ``requests`` at 0: live ``slo`` never
learned)."""
import ast
import dataclasses
import inspect

from kvrouter.control import controller, policy
from kvrouter.lab import views


def _keywords(module, callee: str) -> set:
    tree = ast.parse(inspect.getsource(module))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else \
                getattr(node.func, "id", "")
            if name == callee:
                found |= {k.arg for k in node.keywords}
                found.add(len(node.args))   # positional ones, by count
    return found


def _fields(cls, given: set) -> set:
    """The fields a call filled: by keyword, or by position (the largest count seen)."""
    names = [f.name for f in dataclasses.fields(cls)]
    positional = max((n for n in given if isinstance(n, int)), default=0)
    return set(names[:positional]) | {n for n in given if isinstance(n, str)}


def test_both_sides_fill_every_field_of_the_model_view():
    every = {f.name for f in dataclasses.fields(policy.ModelView)}
    live = _fields(policy.ModelView, _keywords(controller, "ModelView"))
    lab = _fields(policy.ModelView, _keywords(views, "ModelView"))
    assert every - live == set(), "the live snapshot leaves these at their defaults"
    assert every - lab == set(), "the lab's snapshot leaves these at their defaults"


def test_both_sides_fill_every_field_of_the_snapshot():
    every = {f.name for f in dataclasses.fields(policy.Snapshot)}
    assert _fields(policy.Snapshot, _keywords(controller, "Snapshot")) == every
    assert _fields(policy.Snapshot, _keywords(views, "Snapshot")) == every
