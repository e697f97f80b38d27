"""The route table: every name a client may send as ``model`` (model, served names,
aliases) -> the model's group of replicas. Built once; the proxy and the admin app share
it."""
from __future__ import annotations

from typing import Dict, Iterable, Iterator, List, Optional, Tuple

from kvrouter.config.schema import RoutingConfig
from kvrouter.control.entry import ModelEntry, ModelGroup
from kvrouter.errors import BadRequest, NotFound

# the engines' own JSON routes that name a model in the body (vLLM's tokenizer, pooling,
# scoring and SageMaker routes): routed like /v1, through the same gate, keys and accounting
NATIVE_JSON = frozenset({"/tokenize", "/detokenize", "/pooling", "/classify", "/score",
                         "/rerank", "/v2/rerank", "/invocations"})
# uploads (multipart/form-data) naming a model in a form field: Whisper's on vLLM, SGLang's
UPLOAD_PATHS = frozenset({"/v1/audio/transcriptions", "/v1/audio/translations",
                          "/generate_from_file"})


def client_route(path: str) -> bool:
    """A path clients call with the API key: /v1/*, the engines' own JSON and upload
    routes and the passthrough /upstream/MODEL/PATH."""
    return path.startswith(("/v1/", "/upstream/")) or path in NATIVE_JSON or \
        path in UPLOAD_PATHS


def streamed_body(req) -> bool:
    """A request served as soon as its headers are in, its body passed on as it arrives:
    an upload (read only until its ``model`` field) and a passthrough with a body."""
    headers = req.headers
    if req.path.startswith("/upstream/"):
        return bool(headers.get("transfer-encoding") or
                    headers.get("content-length", "0") not in ("0", ""))
    return req.method == "POST" and req.path in UPLOAD_PATHS and \
        (headers.get("content-type") or "").lower().startswith("multipart/form-data")


def model_route(method: str, path: str) -> bool:
    """A request the proxy routes by the body's ``model`` (a JSON key or a form field)."""
    return method == "POST" and (path.startswith("/v1/") or path in NATIVE_JSON or
                                 path in UPLOAD_PATHS) and \
        not path.startswith("/v1/responses/")


class RouteTable:
    """Every name a client may send as ``model`` -> the model's group of replicas; and each
    engine by its own names, for the management routes."""

    def __init__(self, entries: Iterable[ModelEntry], routing: Optional[RoutingConfig] = None):
        self._by_name: Dict[str, ModelGroup] = {}
        self._groups: List[ModelGroup] = []
        self._entries: List[ModelEntry] = []
        self.rebuild(entries, routing)

    def rebuild(self, entries: Iterable[ModelEntry],
                routing: Optional[RoutingConfig] = None) -> None:
        """Route to these entries from now on (a reload); swapped in one step. A model whose
        replicas and routing settings did not change keeps its group (what its policy
        learned, its breakers)."""
        cfg = routing or RoutingConfig()
        listed = list(entries)
        by_model: Dict[str, List[ModelEntry]] = {}
        for entry in listed:
            by_model.setdefault(entry.model, []).append(entry)
        old = {g.model: g for g in self._groups}
        groups: List[ModelGroup] = []
        for model, reps in by_model.items():
            group = old.get(model)
            if group is not None and group.same_shape(reps, cfg):
                group.take(reps)
            else:
                group = ModelGroup(reps, cfg)
            groups.append(group)
        by_name: Dict[str, ModelGroup] = {}
        for group in groups:
            for name in group.route_names:
                by_name[name] = group
        self._by_name, self._groups, self._entries = by_name, groups, listed

    def get(self, name: str) -> Optional[ModelGroup]:
        return self._by_name.get(name)

    def only(self) -> Optional[ModelGroup]:
        """The model when the router serves exactly one (a request may then leave ``model``
        out, as vLLM allows), else None."""
        return self._groups[0] if len(self._groups) == 1 else None

    def resolve(self, name: Optional[str], missing: str) -> ModelGroup:
        """The group a request names (404 for an unknown name); no name: the one model
        served (as vLLM does), else a 400 that says ``missing`` and lists the models."""
        if name:
            return self.require(name, known=True)
        only = self.only()
        if only is not None:
            return only
        raise BadRequest(f"{missing}; this router serves {', '.join(sorted(self._by_name))}",
                         param="model", code="missing_model")

    def require(self, name: str, known: bool = False) -> ModelGroup:
        """The model's group for ``name`` or 404 (OpenAI's ``model_not_found``)."""
        group = self._by_name.get(name)
        if group is None:
            more = f" Known models: {', '.join(sorted(self._by_name))}" if known else ""
            raise NotFound(f"The model `{name}` does not exist.{more}", param="model",
                           code="model_not_found", type="invalid_request_error")
        return group

    def admin(self, name: str) -> List[ModelEntry]:
        """For the management routes: a model's engines (all its replicas) by any route
        name, else one engine by its key, instance or program name (``engine-llama``,
        ``kvrouter-engine-llama.service``); or 404."""
        group = self._by_name.get(name)
        if group is not None:
            return list(group.entries)
        entry = next((e for e in self._entries if name == e.name or
                      name in e.inst.known_as[len(e.inst.route_names):]), None)
        if entry is None:
            self.require(name)
        return [entry]   # type: ignore[list-item]

    def names(self) -> Iterator[str]:
        return iter(self._by_name)

    def items(self) -> Iterator[Tuple[str, ModelGroup]]:
        return iter(self._by_name.items())

    def groups(self) -> List[ModelGroup]:
        """Each model once, in config order."""
        return list(self._groups)

    def entries(self) -> List[ModelEntry]:
        """Each engine once (every replica), in config order."""
        return list(self._entries)
