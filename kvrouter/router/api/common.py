"""What every management view needs: the router's context, query parameters, auth."""
from __future__ import annotations

from typing import Any, List

from flask import current_app, request

from kvrouter.control.entry import ModelEntry
from kvrouter.errors import BadRequest, Conflict
from kvrouter.router.auth import require_admin, require_client_key


def router() -> Any:
    """The RouterContext of the running app."""
    return current_app.extensions["kvrouter"]


def entries_for(model: str) -> List[ModelEntry]:
    """The model's engines (all its replicas) by any of its route names, or one engine by
    its key, instance or program name; or 404."""
    return router().routes.admin(model)


def entry_for(model: str) -> ModelEntry:
    """One engine: a model's only one, or a replica by its name; a model with several
    replicas answers 409 naming them (the route wants one engine)."""
    found = entries_for(model)
    if len(found) > 1:
        raise Conflict(f"model {model!r} has {len(found)} replicas "
                       f"({', '.join(e.name for e in found)}): name one", code="replica_needed")
    return found[0]


def number_arg(name: str, default: float, lo: float = 0.0, hi: float = float("inf")) -> float:
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise BadRequest(f"{name} must be a number, got {raw!r}", param=name) from None
    if value != value or value < lo or value > hi:
        raise BadRequest(f"{name} must be between {lo:g} and {hi:g}, got {raw!r}", param=name)
    return value


def api_key_required() -> None:
    require_client_key(request.headers, router().cfg.router.api_keys)


def admin_required() -> None:
    require_admin(request.headers.get("Authorization"), router().cfg.router.admin_token)
