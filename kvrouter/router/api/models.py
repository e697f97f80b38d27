"""Models: kvrouter's view (/models) and OpenAI's list (/v1/models, API key when set)."""
from __future__ import annotations

from flask import Blueprint, Response, jsonify

from kvrouter.control import report
from kvrouter.router.api.common import api_key_required, entry_for, router

bp = Blueprint("models", __name__)


@bp.get("/models")
def models():
    return jsonify({"models": {e.name: {"endpoint": e.inst.base_url, "instance": e.inst.name,
                                        "engine": e.inst.engine,
                                        "aliases": list(e.inst.route_names[1:]),
                                        "state": e.state.value,
                                        "kv_pool": report.kv_pool(e)}
                               for e in router().routes.entries()}})


def model_card(name, entry) -> dict:
    return {"id": name, "object": "model", "created": int(router().started),
            "owned_by": entry.inst.dialect if entry.inst.engine != "sim" else "kvrouter-sim",
            "root": entry.inst.model,
            "max_model_len": entry.info.get("max_model_len"),
            "state": entry.state.value}


@bp.get("/v1/models")
def v1_models():
    api_key_required()
    return jsonify({"object": "list",
                    "data": [model_card(n, e) for n, e in router().routes.items()]})


@bp.get("/v1/models/<path:model>")
def v1_model(model):
    api_key_required()
    return jsonify(model_card(model, entry_for(model)))


@bp.get("/metrics")
def metrics():
    body, ctype = router().metrics.exposition()
    return Response(body, content_type=ctype)
