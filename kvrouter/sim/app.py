"""HTTP API of the simulated engine, in vLLM's or SGLang's dialect."""
from __future__ import annotations

import atexit
import json
import logging
import os
import re
import signal
import sys
import time
from typing import Any, Callable, Dict, Optional, Tuple
from urllib.parse import parse_qs

import gevent

from kvrouter.http.messages import Request, Response, StreamResponse
from kvrouter.http.server import HTTPServer
from kvrouter.http.sockio import raise_open_files_limit
from kvrouter.sim import anthropic, audio, native, realtime, scoring
from kvrouter.sim import text as T
from kvrouter.sim.generate import Generator, SimError
from kvrouter.sim.metrics import EngineMetrics
from kvrouter.sim.options import SimConfig
from kvrouter.sim.state import SGLANG_TAGS, EngineState, KvcachedSegment, crash

log = logging.getLogger("kvrouter.sim")
JSON = [("Content-Type", "application/json")]
SSE = [("Content-Type", "text/event-stream"), ("Cache-Control", "no-cache")]


_SURROGATE_RE = re.compile(rb"\\ud[89a-f]", re.I)  # a \uD800-\uDFFF escape in the body


def _json(status: int, obj) -> Response:
    return Response(status, JSON, json.dumps(obj).encode())


class SimEngine:
    def __init__(self, cfg: SimConfig, state: Optional[EngineState] = None):
        self.cfg = cfg
        self.state = state or EngineState(cfg)
        self.metrics = EngineMetrics()
        self.gen = Generator(self.state, self.metrics)
        self.routes: Dict[Tuple[str, str], Callable] = {}
        self.stored_responses: Dict[str, dict] = {}
        self._build_routes()

    # --- errors in each dialect's shape -------------------------------------------------------
    def error(self, status: int, message: str, type: str = "BadRequestError",
              param: Optional[str] = None) -> Response:
        body: Dict[str, Any]
        if self.cfg.dialect == "vllm":
            body = {"error": {"message": message, "type": type, "param": param, "code": status}}
        else:
            body = {"object": "error", "message": message, "type": type, "param": param,
                    "code": status}
        return _json(status, body)

    def _body(self, req: Request):
        if self.cfg.dialect == "sglang":
            ctype = req.header("content-type") or ""
            if req.body and "application/json" not in ctype:
                raise SimError(400, "Content-Type must be application/json")
        if not req.body:
            return {}
        try:
            body = json.loads(req.body)
        except ValueError as err:
            raise SimError(400, f"Invalid JSON body: {err}") from None
        except RecursionError:
            raise SimError(400, "Invalid JSON body: nested too deeply") from None
        if _SURROGATE_RE.search(req.body):
            try:  # a lone surrogate cannot be tokenized (the engines answer 400)
                json.dumps(body, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError as err:
                raise SimError(400, f"request contains invalid Unicode: {err.reason} at "
                                    f"position {err.start}") from None
        return body

    # --- routing -------------------------------------------------------------------------------
    def _build_routes(self) -> None:
        r = self.routes
        common = {
            ("POST", "/v1/completions"): self.completions,
            ("POST", "/v1/chat/completions"): self.chat,
            ("POST", "/v1/embeddings"): self.embeddings,
            ("POST", "/v1/responses"): self.responses_create,
            ("GET", "/v1/models"): self.models,
            ("GET", "/metrics"): self.metrics_text,
            ("POST", "/tokenize"): self.tokenize,
            ("POST", "/detokenize"): self.detokenize,
            ("GET", "/sim/stats"): self.sim_stats,
            ("POST", "/sim/fail"): self.sim_fail,
        }
        if self.cfg.dialect == "vllm":
            # vLLM registers the OpenAI routes of the model's tasks only: a generative model
            # has no /v1/embeddings (404), a pooling model no completions or chat
            generate = ("/v1/completions", "/v1/chat/completions", "/v1/responses")
            for path in (generate if self.cfg.runner == "pooling" else ("/v1/embeddings",)):
                common.pop(("POST", path))
        r.update(common)
        if self.cfg.dialect == "vllm":
            r[("GET", "/health")] = self.vllm_health
            r[("GET", "/ping")] = r[("POST", "/ping")] = self.vllm_health
            r[("GET", "/version")] = lambda req: _json(200, {"version": self.cfg.version})
            if self.cfg.runner == "pooling":   # vLLM's scoring routes: pooling models only
                for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
                    r[("POST", path)] = lambda req: _json(
                        200, scoring.rerank(self.gen, self._body(req)))
                for path in ("/score", "/v1/score"):
                    r[("POST", path)] = lambda req: _json(
                        200, scoring.score(self.gen, self._body(req)))
            if self.cfg.runner != "pooling":
                r[("POST", "/v1/messages")] = lambda req: self._anthropic(
                    anthropic.messages, req)
                r[("POST", "/v1/messages/count_tokens")] = lambda req: self._anthropic(
                    anthropic.count_tokens, req)
            r[("GET", "/v1/realtime")] = lambda req: realtime.handle(
                req, self.gen.check_model, self.state.counters)
            r[("POST", "/v1/audio/transcriptions")] = lambda req: audio.transcribe(
                req, self.gen.check_model, self.state.counters)
            r[("POST", "/v1/audio/translations")] = lambda req: audio.transcribe(
                req, self.gen.check_model, self.state.counters, translate=True)
            if self.cfg.sleep_endpoints:
                r[("POST", "/sleep")] = self.vllm_sleep
                r[("POST", "/wake_up")] = self.vllm_wake
                r[("GET", "/is_sleeping")] = lambda req: _json(
                    200, {"is_sleeping": self.state.is_sleeping()})
                r[("POST", "/collective_rpc")] = self.vllm_rpc
                r[("POST", "/reset_prefix_cache")] = lambda req: Response(200)
            if self.cfg.dev_mode:
                r[("GET", "/server_info")] = self.server_info
        else:
            r[("GET", "/health")] = self.sglang_health
            r[("GET", "/health_generate")] = self.sglang_health_generate
            for path in ("/model_info", "/get_model_info"):
                r[("GET", path)] = self.model_info
            for path in ("/server_info", "/get_server_info"):
                r[("GET", path)] = self.server_info
            r[("GET", "/get_load")] = lambda req: _json(200, [{
                "dp_rank": 0, "num_reqs": self.state.running + self.state.waiting,
                "num_waiting_reqs": self.state.waiting, "num_tokens": self.state.tokens_in_flight}])
            r[("POST", "/generate")] = lambda req: native.generate(self.gen, self._body(req))
            r[("POST", "/v1/tokenize")] = self.tokenize
            r[("POST", "/v1/detokenize")] = self.detokenize
            for m in ("GET", "POST"):
                r[(m, "/flush_cache")] = self.flush_cache
            if self.cfg.sleep_endpoints:
                for m in ("GET", "POST"):
                    r[(m, "/release_memory_occupation")] = self.sglang_release
                    r[(m, "/resume_memory_occupation")] = self.sglang_resume
                r[("POST", "/pause_generation")] = self.sglang_pause
                r[("POST", "/continue_generation")] = self.sglang_continue
            r[("POST", "/update_weights_from_disk")] = self.sglang_update_weights

    def handle(self, req: Request):
        fn = self.routes.get((req.method, req.path))
        if fn is None:
            if req.method == "GET" and req.path.startswith("/v1/models/"):
                return self.model_one(req, req.path[len("/v1/models/"):])
            if req.method == "GET" and req.path.startswith("/v1/responses/"):
                return self.responses_get(req.path[len("/v1/responses/"):])
            if any(path == req.path for _, path in self.routes):
                return self.error(405, "Method Not Allowed", "MethodNotAllowed")
            return _json(404, {"detail": "Not Found"})
        try:
            return fn(req)
        except SimError as err:
            return self.error(err.status, err.message, err.type, err.param)

    def _anthropic(self, fn, req: Request):
        """vLLM's Anthropic routes: errors in Anthropic's shape."""
        try:
            body = self._body(req)   # (a body that is not JSON: the OpenAI envelope too)
        except SimError as err:
            return self.error(err.status, err.message, err.type, err.param)
        try:
            return fn(self.gen, body)
        except anthropic.Invalid as err:
            return self.error(err.status, err.message, err.type, err.param)
        except SimError as err:
            return anthropic.error(err)

    # --- OpenAI --------------------------------------------------------------------------------
    def _starting_guard(self) -> Optional[Response]:
        if self.cfg.dialect == "sglang" and self.state.is_starting():
            return self.error(503, "The server is starting.", "ServiceUnavailableError")
        return None

    def _generate(self, req: Request, chat: bool):
        guard = self._starting_guard()
        if guard:
            return guard
        body = self._body(req)
        fail = body.get("sim_fail_status") if isinstance(body, dict) else None
        if isinstance(fail, int) and 400 <= fail <= 599:  # test hook: answer this error
            raise SimError(fail, "simulated failure (sim_fail_status)", "InternalServerError")
        parsed = self.gen.parse(body, chat)
        if parsed["stream"]:
            return StreamResponse(200, SSE, self.gen.stream(parsed))
        return _json(200, self.gen.complete(parsed))

    def completions(self, req):
        return self._generate(req, chat=False)

    def chat(self, req):
        return self._generate(req, chat=True)

    def embeddings(self, req):
        return _json(200, self.gen.embeddings(self._body(req)))

    # --- /v1/responses (stateful: kept in this process's memory, like the engines) ---------
    def _response_object(self, rid: str, model: str, text: str, usage: dict) -> dict:
        return {"id": rid, "object": "response", "created_at": int(time.time()),
                "model": model, "status": "completed",
                "output": [{"type": "message", "id": f"msg_{rid[5:]}", "status": "completed",
                            "role": "assistant", "content": [
                                {"type": "output_text", "text": text, "annotations": []}]}],
                "usage": {"input_tokens": usage["prompt_tokens"],
                          "output_tokens": usage["completion_tokens"],
                          "total_tokens": usage["total_tokens"]}}

    def responses_create(self, req):
        body = self._body(req)
        if not isinstance(body, dict) or "input" not in body:
            raise SimError(400, "input is required", param="input")
        inp = body["input"]
        messages = ([{"role": "user", "content": inp}] if isinstance(inp, str) else inp)
        chat = {"model": body.get("model"), "messages": messages,
                "max_tokens": body.get("max_output_tokens", 16),
                "ignore_eos": body.get("ignore_eos", False)}
        parsed = self.gen.parse(chat, chat=True)
        rid = f"resp_{os.urandom(12).hex()}"
        out = self.gen.complete(parsed)
        obj = self._response_object(rid, parsed["model"], out["choices"][0]["message"]["content"],
                                    out["usage"])
        self.stored_responses[rid] = obj
        if not body.get("stream"):
            return _json(200, obj)
        created = dict(obj, status="in_progress", output=[])

        def events():
            yield ("event: response.created\ndata: " + json.dumps(
                {"type": "response.created", "response": created}) + "\n\n").encode()
            yield ("event: response.output_text.delta\ndata: " + json.dumps(
                {"type": "response.output_text.delta", "delta":
                 obj["output"][0]["content"][0]["text"]}) + "\n\n").encode()
            yield ("event: response.completed\ndata: " + json.dumps(
                {"type": "response.completed", "response": obj}) + "\n\n").encode()

        return StreamResponse(200, SSE, events())

    def responses_get(self, rid: str):
        obj = self.stored_responses.get(rid.split("/", 1)[0])
        if obj is None:
            return self.error(404, f"Response with id '{rid}' not found.", "NotFoundError")
        return _json(200, obj)

    def _model_card(self, name: str) -> dict:
        card = {"id": name, "object": "model", "created": int(self.state.started_at),
                "owned_by": self.cfg.dialect, "root": self.cfg.model, "parent": None,
                "max_model_len": self.cfg.max_model_len}
        if self.cfg.dialect == "vllm":
            card["permission"] = [{
                "id": f"modelperm-{abs(hash(name)) % 10**12}", "object": "model_permission",
                "created": int(self.state.started_at), "allow_create_engine": False,
                "allow_sampling": True, "allow_logprobs": True, "allow_search_indices": False,
                "allow_view": True, "allow_fine_tuning": False, "organization": "*",
                "group": None, "is_blocking": False}]
        return card

    def models(self, req):
        names = self.cfg.names if self.cfg.dialect == "vllm" else self.cfg.names[:1]
        return _json(200, {"object": "list", "data": [self._model_card(n) for n in names]})

    def model_one(self, req, name):
        if name in self.cfg.names:
            return _json(200, self._model_card(name))
        if self.cfg.dialect == "sglang":
            return _json(404, {"error": {"message": f"The model '{name}' does not exist",
                                         "type": "invalid_request_error", "param": "model",
                                         "code": "model_not_found"}})
        return _json(404, {"detail": "Not Found"})

    def tokenize(self, req):
        body = self._body(req)
        if "messages" in body:
            from kvrouter.sim.generate import _chat_prompt

            prompt = _chat_prompt(body["messages"])
        else:
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                raise SimError(400, "prompt must be a string", param="prompt")
        ids = T.tokenize(prompt)
        out = {"count": len(ids), "max_model_len": self.cfg.max_model_len, "tokens": ids,
               "token_strs": None}   # vLLM's shape: the key is always there
        if body.get("return_token_strs"):
            out["token_strs"] = [T.tokens(prompt)[k] for k in range(len(ids))]
        return _json(200, out)

    def detokenize(self, req):
        body = self._body(req)
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            raise SimError(400, "tokens must be a list of integers", param="tokens")
        return _json(200, {"prompt": T.detokenize(tokens)} if self.cfg.dialect == "vllm"
                     else {"text": T.detokenize(tokens)})

    def metrics_text(self, req):
        return Response(200, [("Content-Type", "text/plain; version=0.0.4; charset=utf-8")],
                        self.metrics.render(self.state).encode())

    # --- sim-only helpers for tests --------------------------------------------------------------
    def sim_stats(self, req):
        st = self.state
        return _json(200, {**st.counters, "running": st.running, "waiting": st.waiting,
                           "sleeping": st.is_sleeping(), "asleep_tags": sorted(st.asleep_tags),
                           "released": sorted(st.released), "weights_valid": st.weights_valid,
                           "gpu_memory_bytes": st.gpu_memory_bytes(), "pid": os.getpid(),
                           "kv_limit_bytes": st.kv_limit_bytes(),
                           "kv_used_bytes": st.kv_used_bytes(),
                           "kv_capacity_tokens": st.kv_capacity_tokens(),
                           "tokens_in_flight": st.tokens_in_flight})

    def sim_fail(self, req):
        """Make the engine dead: /health 503, generations 500; ?exit=1 also ends the process.
        ?status=N (429, 503, ...): generations answer N while /health passes (an engine
        overloaded or broken in a way its health check misses); ?status=0 ends that."""
        q = parse_qs(req.query)
        if "status" in q:
            try:
                self.state.refuse_status = int(q["status"][0])
            except ValueError:
                raise SimError(400, "status must be an integer", param="status") from None
            return _json(200, {"refuse_status": self.state.refuse_status})
        self.state.dead = True
        if "exit=1" in req.query:
            gevent.spawn_later(0.05, crash, "simulated engine death (/sim/fail?exit=1)")
        return _json(200, {"dead": True})

    # --- vLLM ----------------------------------------------------------------------------------
    def vllm_health(self, req):
        return Response(503 if self.state.dead else 200)

    def vllm_sleep(self, req):
        q = parse_qs(req.query)
        try:
            level = int(q.get("level", ["1"])[0])
        except ValueError:
            raise SimError(400, "level must be an integer", param="level") from None
        if level not in (0, 1, 2):
            raise SimError(400, f"invalid sleep level {level}", param="level")
        self.state.vllm_sleep(level)  # a JSON body is ignored, as in vLLM
        return _json(200, {"status": "sleeping", "level": level})

    def vllm_wake(self, req):
        tags = parse_qs(req.query).get("tags") or None
        self.state.vllm_wake(tags)
        return _json(200, {"status": "awake" if not self.state.asleep_tags else "partial",
                           "tags": tags})

    def vllm_rpc(self, req):
        body = self._body(req)
        method = body.get("method")
        if method == "reload_weights":
            if "weights" in self.state.asleep_tags:
                raise SimError(500, "cannot reload weights while they are asleep",
                               "InternalServerError")
            self.state.reload_weights()
            return _json(200, {"results": [None]})
        raise SimError(400, f"unknown collective_rpc method {method!r}", param="method")

    def server_info(self, req):
        st = self.state
        return _json(200, {
            "version": self.cfg.version, "model_path": self.cfg.model,
            "served_model_name": self.cfg.served_name, "dialect": self.cfg.dialect,
            "max_model_len": self.cfg.max_model_len,
            "memory": {"weights_bytes": int(self.cfg.weights_gb * 1024 ** 3),
                       "kv_cache_bytes": int(self.cfg.kv_cache_gb * 1024 ** 3),
                       "gpu_memory_bytes": st.gpu_memory_bytes(),
                       "kv_used_bytes": st.kv_used_bytes()},
            "is_sleeping": st.is_sleeping(), "released_tags": sorted(st.released),
            "internal_states": [{"num_running_reqs": st.running,
                                 "num_queue_reqs": st.waiting}],
            "enable_memory_saver": self.cfg.enable_memory_saver,
            "enable_weights_cpu_backup": self.cfg.weights_cpu_backup})

    # --- SGLang --------------------------------------------------------------------------------
    def _sglang_probe_generation(self) -> None:
        if self.state.released:
            crash("generation on released memory (health check): illegal memory access")

    def sglang_health(self, req):
        if self.state.dead or self.state.is_starting():
            return Response(503)
        if self.cfg.health_generates:
            self._sglang_probe_generation()
        return Response(200)

    def sglang_health_generate(self, req):
        if self.state.dead or self.state.is_starting():
            return Response(503)
        self._sglang_probe_generation()
        return Response(200)

    def model_info(self, req):
        return _json(200, {"model_path": self.cfg.model, "tokenizer_path": self.cfg.model,
                           "is_generation": True, "preferred_sampling_params": None,
                           "weight_version": "default", "has_image_understanding": False,
                           "has_audio_understanding": False, "model_type": "sim"})

    def flush_cache(self, req):
        if self.state.running or self.state.waiting:
            return Response(400, [("Content-Type", "text/plain")],
                            b"Cache not flushed. Please check for running requests.")
        return Response(200, [("Content-Type", "text/plain")], b"Cache flushed.")

    def _tags(self, req):
        body = self._body(req) if req.body else {}
        tags = body.get("tags") if isinstance(body, dict) else None
        if tags is None or tags == []:
            return list(SGLANG_TAGS)
        if not isinstance(tags, list) or any(t not in SGLANG_TAGS + ("weights_drafter",)
                                             for t in tags):
            raise SimError(400, f"invalid tags {tags!r}", param="tags")
        return tags

    def sglang_release(self, req):
        self.state.sglang_release(self._tags(req))
        return _json(200, None)

    def sglang_resume(self, req):
        self.state.sglang_resume(self._tags(req))
        return _json(200, None)

    def sglang_pause(self, req):
        self.state.paused = True
        return _json(200, {"message": "Generation paused successfully.", "status": "ok"})

    def sglang_continue(self, req):
        self.state.paused = False
        return _json(200, {"message": "Generation continued successfully.", "status": "ok"})

    def sglang_update_weights(self, req):
        body = self._body(req)
        if not isinstance(body.get("model_path"), str):
            raise SimError(400, "model_path is required", param="model_path")
        if "weights" in self.state.released:
            raise SimError(400, "weights are released; resume them first")
        self.state.reload_weights()
        return _json(200, {"success": True, "message": "Succeeded to update model weights.",
                           "num_paused_requests": 0})


def serve(cfg: SimConfig) -> None:
    """Run until SIGTERM/SIGINT. vLLM binds only after loading; SGLang answers 503 meanwhile."""
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="%(asctime)s %(levelname)s sim[%(name)s] %(message)s")
    if cfg.ignored:
        log.info("ignoring engine flags the simulator does not use: %s", " ".join(cfg.ignored))
    raise_open_files_limit()
    engine = SimEngine(cfg)
    ipc = os.environ.get("KVCACHED_IPC_NAME")
    if ipc and os.environ.get("ENABLE_KVCACHED", "").lower() in ("1", "true"):
        try:
            engine.state.segment = KvcachedSegment(ipc, int(cfg.kv_cache_gb * 1024 ** 3),
                                                   groups=cfg.kv_groups)
            atexit.register(engine.state.segment.close)
        except OSError as err:
            log.warning("cannot create kvcached segment %s: %s", ipc, err)
    if cfg.dialect == "vllm" and cfg.startup_seconds:
        log.info("Loading weights of %s (%.1fs)...", cfg.model, cfg.startup_seconds)
        time.sleep(cfg.startup_seconds)
    # uploads reach the handler as they arrive, as uvicorn hands an ASGI app its body
    server = HTTPServer((cfg.host, cfg.port), engine.handle, stream_body=audio.streamed)
    server.start()
    if cfg.dialect == "sglang":
        engine.state.ready_at = time.monotonic() + cfg.startup_seconds
    log.info("%s dialect engine for %s on http://%s:%d (pid %d). Application startup complete.",
             cfg.dialect, cfg.served_name, cfg.host, server.address[1], os.getpid())

    def _stop(*_):
        log.info("shutting down")
        server.stop(timeout=1)
        if engine.state.segment:
            engine.state.segment.close()
        os._exit(0)

    gevent.signal_handler(signal.SIGTERM, _stop)
    gevent.signal_handler(signal.SIGINT, _stop)
    server.serve_forever()
