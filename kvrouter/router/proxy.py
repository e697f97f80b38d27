"""The /v1 proxy path: parse once, resolve the model, wait until ready, relay bytes.

One code path serves streaming and non-streaming responses: the engine's body
is relayed chunk by chunk as it arrives; a non-streamed (Content-Length) body
is joined before answering so the client gets a Content-Length too.
"""
from __future__ import annotations

import json
import logging
import re
import time
from collections import OrderedDict
from typing import Any, Callable, Optional, Union
from urllib.parse import unquote

from kvrouter import logs
from kvrouter.config.schema import Config
from kvrouter.control.controller import Controller
from kvrouter.control.entry import ModelEntry, ModelGroup
from kvrouter.control.routing import RouteKey
from kvrouter.errors import (
    ApiError,
    BadGateway,
    BadRequest,
    Forbidden,
    GatewayTimeout,
    NotFound,
    ServiceUnavailable,
)
from kvrouter.http import multipart
from kvrouter.http.body import StreamBody
from kvrouter.http.client import UpstreamError, UpstreamPool, UpstreamTimeout
from kvrouter.http.messages import ClientGone, Request, Response, StreamResponse
from kvrouter.router import request_id
from kvrouter.router.auth import require_client_key
from kvrouter.router.errors import (
    anthropic_path,
    anthropic_stream_error,
    error_response,
    normalize_error_body,
    stream_error_event,
    to_anthropic,
)
from kvrouter.router.replicas import Chooser
from kvrouter.router.route_key import EMPTY, route_key
from kvrouter.router.routes import RouteTable
from kvrouter.router.uploads import parse_upload
from kvrouter.traffic import TrafficMonitor

log = logging.getLogger("kvrouter.proxy")
# OpenAI's usage names, and the Responses and Anthropic Messages APIs' ones
_PROMPT_RE = re.compile(rb'"(?:prompt|input)_tokens"\s*:\s*(\d+)')
_COMPLETION_RE = re.compile(rb'"(?:completion|output)_tokens"\s*:\s*(\d+)')
_JSON_HEADERS = [("Content-Type", "application/json")]
_RESPONSE_ID_RE = re.compile(rb'"id"\s*:\s*"(resp_[^"]+)"')
RESPONSES_KEPT = 100_000
# client headers the engine gets (Anthropic's clients send their key and API version)
_PASSED = ("authorization", "accept", "x-api-key", "anthropic-version", "anthropic-beta")
_PASSED_UPSTREAM = _PASSED + ("content-type",)   # ... and through /upstream/, its body type
UPSTREAM = "/upstream/"
# what the router alone calls on an engine (its memory and lifecycle): refused through
# /upstream/, where they would fight the controller
LIFECYCLE_PATHS = frozenset({
    "/sleep", "/wake_up", "/collective_rpc", "/release_memory_occupation",
    "/resume_memory_occupation", "/pause_generation", "/continue_generation",
    "/update_weights_from_disk", "/update_weights_from_tensor",
    "/update_weights_from_distributed"})


def _usage(data: bytes):
    """(prompt, completion) tokens: the last counts in ``data``. They are read from its last
    ``"usage"`` on (the end of a body; no scan of all of it), unless a count is not there
    (Anthropic's stream counts input in its first event, output in its last)."""
    at = data.rfind(b'"usage"')
    if at < 0:
        return 0, 0
    p = _PROMPT_RE.search(data, at)
    c = _COMPLETION_RE.search(data, at)
    if p is not None and c is not None:
        return int(p.group(1)), int(c.group(1))
    ps = _PROMPT_RE.findall(data)
    cs = _COMPLETION_RE.findall(data)
    return (int(ps[-1]) if ps else 0), (int(cs[-1]) if cs else 0)


def _json(data: bytes):
    """A request body's JSON. One that starts as an object does in UTF-8 is read as UTF-8
    (as HTTP's JSON is, RFC 8259) without json.loads's sniffing for UTF-16 and 32 and a
    byte order mark; any other goes through that sniffing."""
    if data[:1] == b"{":
        try:
            return json.loads(data.decode("utf-8"))
        except UnicodeDecodeError:
            pass
    return json.loads(data)


def answered_whole(body) -> bool:
    """A request whose answer is not streamed (``stream`` absent or false)."""
    return isinstance(body, dict) and body.get("stream") not in (True, "true")


def _shaped(req: Request, resp: Response) -> Response:
    """An error on /v1/messages in the shape Anthropic's clients parse."""
    if resp.status >= 400 and anthropic_path(req.path):
        return to_anthropic(resp)
    return resp


def _pool_of(entry: ModelEntry) -> UpstreamPool:
    return entry.pool


class Proxy:
    """The /v1 path. Its collaborators come from outside: the controller (the gate), the
    traffic monitor, the route table and ``pool_for`` (entry -> its upstream pool), so a
    unit test can drive it with fakes and no sockets."""

    def __init__(self, cfg: Config, controller: Controller, traffic: TrafficMonitor,
                 routes: RouteTable, clock: Callable[[], float] = time.monotonic,
                 pool_for: Callable[[ModelEntry], UpstreamPool] = _pool_of):
        self.cfg = cfg
        self.controller = controller
        self.traffic = traffic
        self.routes = routes
        self.clock = clock
        self.pool_for = pool_for
        self.responses: "OrderedDict[str, ModelEntry]" = OrderedDict()
        self.shared_responses: Any = None   # the cluster's map, so any router can answer
        self.chooser = Chooser(controller.is_ready, controller.load, clock,
                               getattr(controller, "breaker_moved", None))
        self.configure(cfg)

    def configure(self, cfg: Config) -> None:
        """Settings from the config (again after a reload)."""
        self.cfg = cfg
        r = cfg.router
        self.timeouts = (r.connect_timeout_seconds, r.request_timeout_seconds,
                         r.stream_idle_timeout_seconds)

    # --- request parsing -----------------------------------------------------------------------
    def _parse(self, req: Request):
        require_client_key(req.headers, self.cfg.router.api_keys)
        if multipart.is_multipart(req.headers):
            return parse_upload(req, self.routes,
                                int(self.cfg.router.max_upload_mb * 1024 * 1024))
        try:
            body = _json(req.body) if req.body else None
        except ValueError as err:
            raise BadRequest(f"request body is not valid JSON: {err}", code="invalid_json") \
                from None
        except RecursionError:
            raise BadRequest("request body is nested too deeply", code="invalid_json") from None
        if not isinstance(body, dict):
            raise BadRequest("request body must be a JSON object", code="invalid_body")
        model = body.get("model")
        if model not in (None, "") and not isinstance(model, str):
            raise BadRequest(f"model must be a string, got {type(model).__name__}",
                             param="model", code="invalid_model")
        group = self.routes.resolve(model, "you must provide a model parameter")
        payload = req.body
        if model and model != group.upstream_model:  # an alias: the engine knows another name
            body["model"] = group.upstream_model
            payload = json.dumps(body).encode()
        return group, payload, body

    # --- the route -----------------------------------------------------------------------------
    def handle(self, req: Request):
        try:
            group, payload, body = self._parse(req)
        except ApiError as err:
            self.traffic.unrouted += 1
            if self.cfg.router.access_log:
                logs.ACCESS.write(f"{req.method} {req.path} model=- status={err.status} "
                                  f"rid=- outcome=unrouted ({err.code or err.type})")
            return _shaped(req, error_response(err))
        whole = answered_whole(body)
        if len(group.entries) == 1:   # the common case: no replica to choose
            return self._run(req, group, payload, whole=whole)
        return self._run(req, group, payload, key=self.route_key(group, req, body),
                         whole=whole)

    def route_key(self, group: ModelGroup, req: Request, body) -> RouteKey:
        """What the model's routing policy needs of the request (nothing for most)."""
        if len(group.entries) == 1 or not group.policy.needs_key:
            return EMPTY
        r = self.cfg.routing
        return route_key(body, req.headers, r.session_header.lower(), r.block_tokens,
                         blocks=group.policy.name == "cache_aware")

    # --- /upstream/{model}/{path}: anything else an engine serves -----------------------------
    def handle_upstream(self, req: Request):
        """Any method and body to ``{path}`` of the model's engine (query kept, the answer
        streamed back as the engine sends it), through the same key, gate and accounting;
        the engine's lifecycle endpoints are the router's to call."""
        try:
            require_client_key(req.headers, self.cfg.router.api_keys)
            group, target = self._upstream_target(req.path)
        except ApiError as err:
            self.traffic.unrouted += 1
            return error_response(err)
        return self._run(req, group, StreamBody.of(req), target)

    def _upstream_target(self, path: str):
        rest = unquote(path[len(UPSTREAM):])
        names = sorted((n for n in self.routes.names()
                        if rest == n or rest.startswith(n + "/")), key=len, reverse=True)
        if not names:
            raise NotFound(f"no model in {path!r}: /upstream/MODEL/PATH, MODEL one of "
                           f"{', '.join(sorted(self.routes.names()))}", param="model",
                           code="model_not_found", type="invalid_request_error")
        target = rest[len(names[0]):] or "/"
        if target.rstrip("/") in LIFECYCLE_PATHS:
            raise Forbidden(f"{target} changes the engine's memory or state, which the router "
                            "manages: use POST /model/sleep/{model} or /model/wake/{model}",
                            code="lifecycle_endpoint")
        return self.routes.require(names[0]), target

    def _run(self, req: Request, group: ModelGroup, payload: Union[bytes, StreamBody],
             target: Optional[str] = None, key: RouteKey = EMPTY,
             pinned: Optional[ModelEntry] = None, whole: bool = False):
        """``pinned``: the one replica that may serve it (a response id's); ``whole``: its
        answer is not streamed (``UpstreamPool.request``)."""
        rid = req.headers.get("x-request-id") or request_id.new()
        entries = group.entries
        if pinned is not None or len(entries) == 1:
            entry = pinned or entries[0]
            rec = self.traffic.start(entry.name)
        else:
            entry = self.chooser.pick(group, key) or self.chooser.waiting_on(group)
            rec = self.traffic.start(entry.name)   # (none ready: wait on the one closest)
            self.controller.scale(group, self.chooser)
        try:
            resp = self._forward(req, group, entry, payload, rid, rec, target, key,
                                 pinned is not None, whole)
        except ClientGone:
            self.traffic.end(rec, "disconnect")
            self.access(req, group.model, 499, 0, rec, rid)
            raise
        except ApiError as err:   # a streamed body broke a limit while it was sent on
            self.traffic.end(rec, "client_error")
            resp = error_response(err)
        if isinstance(resp, Response):  # a stream logs its line when it ends
            self.access(req, group.model, resp.status, len(resp.body), rec, rid)
            return _shaped(req, resp)
        return resp

    def access(self, req: Request, model: str, status: int, nbytes: int, rec,
               rid: str) -> None:
        """One access-log line per /v1 request (``router.access_log``), at its end; the
        replica that served it ends the line when the model has several."""
        if not self.cfg.router.access_log:
            return
        ttft = rec.ttft if rec.stream else None
        tokens = f" tokens={rec.prompt_tokens}/{rec.completion_tokens}" \
            if rec.prompt_tokens or rec.completion_tokens else ""
        if rec.group is not None:
            tokens += f" replica={rec.model.name}"
        logs.ACCESS.write(f"{req.method} {req.path} model={model} status={status} "
                          f"bytes={nbytes} duration={self.clock() - rec.start:.3f}s"
                          f"{f' ttft={ttft:.3f}s' if ttft else ''} rid={rid} "
                          f"outcome={rec.outcome or 'open'}{tokens}")

    # --- /v1/responses/{id}: stateful, must go to the engine that made the response ---------
    def remember_response(self, response_id: str, entry: ModelEntry) -> None:
        self.responses[response_id] = entry
        self.responses.move_to_end(response_id)
        while len(self.responses) > RESPONSES_KEPT:
            self.responses.popitem(last=False)
        if self.shared_responses is not None:
            self.shared_responses.remember_response(response_id, entry.name)   # its key

    def _response_entry(self, response_id: str):
        entry = self.responses.get(response_id)
        if entry is None and self.shared_responses is not None:
            key = self.shared_responses.response_model(response_id)   # another router's
            entry = next((e for e in self.routes.entries() if e.name == key), None) \
                if key else None
        return entry

    def handle_response_id(self, req: Request):
        """GET/DELETE /v1/responses/{id}[/...] and POST .../cancel: to the engine that
        created the response (engines keep responses in memory; lost on restart)."""
        try:
            require_client_key(req.headers, self.cfg.router.api_keys)
            response_id = req.path[len("/v1/responses/"):].split("/", 1)[0]
            entry = self._response_entry(response_id)
            if entry is None:
                raise NotFound(f"Response with id '{response_id}' not found (kvrouter routes a "
                               "response id to the engine that created it through this router)",
                               type="invalid_request_error", code="response_not_found",
                               param="response_id")
        except ApiError as err:
            self.traffic.unrouted += 1
            return error_response(err)
        group = self.routes.get(entry.model) or self.routes.require(entry.model)
        return self._run(req, group, req.body, pinned=entry)

    def await_ready(self, entry: ModelEntry, rec):
        """Wait (the gate) until ``entry`` can serve: (None, seconds waited), or (the error
        answer, 0) when it cannot, the request's record ended as rejected."""
        try:
            waited = self.controller.ensure_ready(entry)
        except ApiError as err:
            self.traffic.end(rec, "rejected")
            return error_response(err), 0.0
        if waited:
            self.traffic.waited(rec, waited)
        return None, waited

    def _forward(self, req, group, entry, payload, rid, rec, target=None, key=EMPTY,
                 pinned=False, whole=False):
        """``target``: a passthrough's path on the engine (its content type and error
        bodies kept as they are). Until a byte reached the engine, or while an engine
        answers an error that another replica may not, the request may go to another
        replica of the model (``pinned``: never)."""
        headers = {"Content-Type": "application/json", "X-Request-Id": rid}
        passed = _PASSED if target is None and not multipart.is_multipart(req.headers) \
            else _PASSED_UPSTREAM   # an upload keeps its multipart type and boundary
        for name in passed:
            value = req.headers.get(name)
            if value is not None:
                headers["Content-Type" if name == "content-type" else name] = value
        connect, first_byte, idle = self.timeouts
        path = req.url.decode("latin-1") if target is None else \
            target + (f"?{req.query}" if req.query else "")
        tried: set = set()
        retried_connect = False
        chooser, several = self.chooser, len(group.entries) > 1 and not pinned
        while True:
            if several and chooser.ready(entry) and not chooser.routable(group, entry):
                ejected = chooser.ejected(group)
                if ejected:
                    self.traffic.end(rec, "rejected")
                    return error_response(ServiceUnavailable(
                        f"model {group.model!r}: every ready replica is ejected: {ejected}",
                        code="replicas_ejected", headers={"Retry-After": "2"}))
            refused, waited = self.await_ready(entry, rec)
            if refused is not None:
                return refused
            if waited and several:   # the load that waited may want another replica; and
                self.controller.scale(group)   # another may have come back first
                better = chooser.pick(group, key, frozenset(tried))
                if better is not None and better is not entry:
                    entry = better
                    self.traffic.move(rec, entry.name)
            try:
                resp = self.pool_for(entry).request(req.method, path, headers, payload,
                                                    connect, first_byte, idle, whole)
            except UpstreamTimeout as err:
                chooser.outcome(group, entry, False, "timeout")
                self.traffic.end(rec, "timeout")
                return error_response(GatewayTimeout(f"model {entry.name!r}: {err}",
                                                     code="upstream_timeout"))
            except UpstreamError as err:
                if err.local:
                    log.warning("%s: out of file descriptors (%s): answering 503", entry.name, err)
                    self.traffic.end(rec, "rejected")
                    return error_response(ServiceUnavailable(
                        "the router has run out of file descriptors (open files limit); retry",
                        code="router_overloaded", headers={"Retry-After": "1"}))
                self.controller.upstream_failed(entry, str(err))
                chooser.outcome(group, entry, False, str(err))
                resendable = not (isinstance(payload, StreamBody) and payload.started)
                if err.phase == "connect" or resendable and self.pool_for(entry).refuses():
                    # Nothing reached the engine (it died or is restarting), or the engine
                    # that had it is gone (so is all it did with it): another replica, else
                    # wait until this one is ready again, bounded like any wait, and send
                    # the request once more.
                    other = None
                    if several:
                        tried.add(entry.name)
                        other = chooser.pick(group, key, frozenset(tried))
                    if other is not None:
                        entry = other
                        self.traffic.move(rec, entry.name)
                        continue
                    if not retried_connect:
                        retried_connect = True
                        if several:
                            entry = chooser.waiting_on(group)
                            self.traffic.move(rec, entry.name)
                        continue
                self.traffic.end(rec, "upstream_error")
                return error_response(ServiceUnavailable(
                    f"model {entry.name!r} is unreachable: {err}", code="model_unreachable",
                    headers={"Retry-After": "2"}))
            if several and (resp.status >= 500 or resp.status == 429):
                chooser.outcome(group, entry, False, f"answered {resp.status}")
                tried.add(entry.name)
                other = None if isinstance(payload, StreamBody) and payload.started else \
                    chooser.pick(group, key, frozenset(tried))
                if other is not None:   # nothing reached the client yet: another replica
                    resp.close()
                    entry = other
                    self.traffic.move(rec, entry.name)
                    continue
            elif several:
                chooser.outcome(group, entry, True)
            break
        rec.first_byte = self.clock()
        out_headers = [("Content-Type", resp.header("content-type", "application/json")),
                       ("X-Request-Id", rid)]
        if resp.status >= 400:
            try:
                body = resp.read()
            except UpstreamError:
                body = b""
            outcome = "client_error" if resp.status < 500 else "upstream_error"
            self.traffic.end(rec, outcome)
            if target is not None:   # the engine's own route: its own error shape
                return Response(resp.status, out_headers, body)
            return Response(resp.status, _JSON_HEADERS + [("X-Request-Id", rid)],
                            normalize_error_body(resp.status, body))
        if resp.header("content-length") is not None:
            try:
                body = resp.read()
            except UpstreamError as err:
                self.traffic.end(rec, "timeout" if isinstance(err, UpstreamTimeout)
                                 else "upstream_error")
                return error_response(BadGateway(f"model {entry.name!r}: {err}",
                                                 code="upstream_broken"))
            prompt, completion = _usage(body)
            self.traffic.end(rec, "success", prompt, completion)
            if req.path == "/v1/responses":
                found = _RESPONSE_ID_RE.search(body)
                if found:
                    self.remember_response(found.group(1).decode(), entry)
            return Response(resp.status, out_headers, body)
        rec.stream = True
        out_headers += [("Cache-Control", "no-cache"), ("X-Accel-Buffering", "no")]
        return StreamResponse(resp.status, out_headers, self._relay(
            req, rid, resp, rec, entry, track_id=req.path == "/v1/responses",
            sse=target is None or (resp.header("content-type") or "").startswith(
                "text/event-stream")), resp.at_hand(), resp.complete)

    def _relay(self, req, rid, resp, rec, entry, track_id=False, sse=True):
        outcome = "disconnect"
        prompt = completion = 0
        chunks = 0
        sent = 0
        first = last = None
        clean = True
        try:
            try:
                for chunk in resp.chunks():
                    now = self.clock()
                    if first is None:
                        first = now
                        rec.first_byte = now
                    last = now
                    chunks += 1
                    if b'"usage":{' in chunk or b'"usage": {' in chunk:
                        # (Anthropic's stream counts input in its first event, output
                        # in its last)
                        p, c = _usage(chunk)
                        prompt, completion = p or prompt, c or completion
                    if chunks == 1 and track_id:
                        found = _RESPONSE_ID_RE.search(chunk)
                        if found:
                            self.remember_response(found.group(1).decode(), entry)
                    clean = chunk.endswith(b"\n\n")
                    sent += len(chunk)
                    yield chunk
                outcome = "success"
            except UpstreamError as err:
                outcome = "timeout" if isinstance(err, UpstreamTimeout) else "upstream_error"
                if outcome == "upstream_error":
                    self.controller.upstream_failed(entry, str(err))
                log.warning("%s: stream broke off: %s", entry.name, err)
                if not sse:
                    return   # not an event stream: the connection ends short
                message = f"model {entry.name!r}: {err}"
                yield (b"" if clean else b"\n\n") + (
                    anthropic_stream_error(message) if anthropic_path(req.path) else
                    stream_error_event(message, "server_error", "upstream_timeout"
                                       if outcome == "timeout" else "upstream_error"))
        finally:
            resp.close()
            itl = (last - first) / (chunks - 1) \
                if chunks > 1 and first is not None and last is not None else None
            self.traffic.end(rec, outcome, prompt, completion, itl)
            self.access(req, entry.model, resp.status, sent, rec, rid)
