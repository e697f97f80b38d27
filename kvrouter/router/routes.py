"""The route table: every name a client may send as ``model`` (model, served names,
aliases) -> the model's entry. Built once; the proxy and the admin app share it."""
from __future__ import annotations

from typing import Dict, Iterable, Iterator, List, Optional, Tuple

from kvrouter.control.entry import ModelEntry
from kvrouter.errors import NotFound

# the engines' own JSON routes that name a model in the body (vLLM's tokenizer, pooling,
# scoring and SageMaker routes): routed like /v1, through the same gate, keys and accounting
NATIVE_JSON = frozenset({"/tokenize", "/detokenize", "/pooling", "/classify", "/score",
                         "/rerank", "/v2/rerank", "/invocations"})


def client_route(path: str) -> bool:
    """A path clients call with the API key: /v1/*, the engines' own JSON routes and the
    passthrough /upstream/MODEL/PATH."""
    return path.startswith(("/v1/", "/upstream/")) or path in NATIVE_JSON


def model_route(method: str, path: str) -> bool:
    """A request the proxy routes by the body's ``model``."""
    return method == "POST" and (path.startswith("/v1/") or path in NATIVE_JSON) and \
        not path.startswith("/v1/responses/")


class RouteTable:
    def __init__(self, entries: Iterable[ModelEntry]):
        self._by_name: Dict[str, ModelEntry] = {}
        self._entries: List[ModelEntry] = []
        self.rebuild(entries)

    def rebuild(self, entries: Iterable[ModelEntry]) -> None:
        """Route to these entries from now on (a reload); swapped in one step."""
        by_name: Dict[str, ModelEntry] = {}
        listed = list(entries)
        for entry in listed:
            for name in entry.inst.route_names:
                by_name[name] = entry
        self._by_name, self._entries = by_name, listed

    def get(self, name: str) -> Optional[ModelEntry]:
        return self._by_name.get(name)

    def only(self) -> Optional[ModelEntry]:
        """The model when the router serves exactly one (a request may then leave ``model``
        out, as vLLM allows), else None."""
        return self._entries[0] if len(self._entries) == 1 else None

    def require(self, name: str, known: bool = False) -> ModelEntry:
        """The entry for ``name`` or 404 (OpenAI's ``model_not_found``)."""
        entry = self._by_name.get(name)
        if entry is None:
            more = f" Known models: {', '.join(sorted(self._by_name))}" if known else ""
            raise NotFound(f"The model `{name}` does not exist.{more}", param="model",
                           code="model_not_found", type="invalid_request_error")
        return entry

    def admin(self, name: str) -> ModelEntry:
        """For the management routes: a model by any route name, else by its instance or
        program name (``engine-llama``, ``kvrouter-engine-llama.service``); or 404."""
        entry = self._by_name.get(name)
        if entry is None:
            entry = next((e for e in self._entries if name in e.inst.known_as), None)
        return entry if entry is not None else self.require(name)

    def names(self) -> Iterator[str]:
        return iter(self._by_name)

    def items(self) -> Iterator[Tuple[str, ModelEntry]]:
        return iter(self._by_name.items())

    def entries(self) -> List[ModelEntry]:
        """Each model once, in config order."""
        return list(self._entries)
