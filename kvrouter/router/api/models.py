"""Models: kvrouter's view (/models) and OpenAI's list (/v1/models, API key when set)."""
from __future__ import annotations

from flask import Blueprint, Response, jsonify

from kvrouter.control import report
from kvrouter.control.states import group_state
from kvrouter.engines.routes import client_routes
from kvrouter.router.api.common import api_key_required, router

bp = Blueprint("models", __name__)


def _engine(e) -> dict:
    return {"endpoint": e.inst.base_url, "instance": e.inst.name, "engine": e.inst.engine,
            "aliases": list(e.inst.route_names[1:]), "state": e.state.value,
            "kv_pool": report.kv_pool(e), "routes": client_routes(e.inst.dialect)}


def _model(group) -> dict:
    """A model: its engine's facts; with several replicas, the first's, the model's state,
    and each replica's under ``replicas``."""
    body = _engine(group.entries[0])
    if len(group.entries) > 1:
        body["state"] = group_state(e.state for e in group.entries).value
        body["routing_policy"] = group.policy_name
        body["replicas"] = {e.name: _engine(e) for e in group.entries}
    return body


@bp.get("/models")
def models():
    return jsonify({"models": {g.model: _model(g) for g in router().routes.groups()}})


def model_card(name, group) -> dict:
    first = group.entries[0]
    lens = [e.info.get("max_model_len") for e in group.entries if e.info.get("max_model_len")]
    card = {"id": name, "object": "model", "created": int(router().started),
            "owned_by": first.inst.dialect if first.inst.engine != "sim" else "kvrouter-sim",
            "root": group.model,
            "max_model_len": min(lens) if lens else None,
            "state": group_state(e.state for e in group.entries).value,
            "routes": client_routes(first.inst.dialect)}
    if len(group.entries) > 1:
        card["replicas"] = len(group.entries)
    return card


@bp.get("/v1/models")
def v1_models():
    api_key_required()
    return jsonify({"object": "list",
                    "data": [model_card(n, e) for n, e in router().routes.items()]})


@bp.get("/v1/models/<path:model>")
def v1_model(model):
    api_key_required()
    return jsonify(model_card(model, router().routes.require(model)))


@bp.get("/metrics")
def metrics():
    body, ctype = router().metrics.exposition()
    return Response(body, content_type=ctype)
