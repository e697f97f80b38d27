"""What every management view needs: the router's context, query parameters, auth."""
from __future__ import annotations

from typing import Any

from flask import current_app, request

from kvrouter.control.entry import ModelEntry
from kvrouter.errors import BadRequest
from kvrouter.router.auth import require_admin, require_api_key


def router() -> Any:
    """The RouterContext of the running app."""
    return current_app.extensions["kvrouter"]


def entry_for(model: str) -> ModelEntry:
    """The model's entry (any of its route names, its instance or program name) or 404."""
    return router().routes.admin(model)


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
    require_api_key(request.headers.get("Authorization"), router().cfg.router.api_keys)


def admin_required() -> None:
    require_admin(request.headers.get("Authorization"), router().cfg.router.admin_token)
