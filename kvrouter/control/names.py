"""The sleep policies' names, and the parameter some take (``lru:30``): declared once, for
the config's checks and ``control.policies`` alike. Pure: no import beyond typing."""
from __future__ import annotations

from typing import Optional

SLEEP_POLICIES = ("lru", "seed", "ttl", "ollama", "static", "static-sized", "adaptive",
                  "slo")  # their classes: control/policies.py
# policies that take a parameter (``lru:30``): what it is, and its range
SLEEP_POLICY_PARAMS = {"lru": ("idle threshold (seconds)", 0.0, 1e7),
                       "ttl": ("idle threshold (seconds)", 0.0, 1e7),
                       "slo": ("attainment target", 0.5, 0.9999)}


def policy_param_problem(name: str) -> Optional[str]:
    """Why ``name`` (``policy:N``) is not a valid sleep policy with a parameter; None when it
    is; "" when its base is no policy at all (the caller lists the choices)."""
    base, _, raw = name.partition(":")
    if base not in SLEEP_POLICIES:
        return ""
    if base not in SLEEP_POLICY_PARAMS:
        return (f"sleep policy {base!r} takes no parameter ({name!r}); " +
                ", ".join(f"{k}:N" for k in SLEEP_POLICY_PARAMS) + " do")
    what, lo, hi = SLEEP_POLICY_PARAMS[base]
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not lo <= value <= hi:   # also false for nan
        return f"{name!r}: the {what} N of {base}:N must be from {lo:g} to {hi:g}"
    return None
