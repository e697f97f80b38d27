"""OpenAI completions, chat and embeddings of the simulated engine: validation, timing, output.

Timing model (``timing.py``, shared with ``kvrouter simulate``): a request waits for a
slot (max concurrency) and room in the KV pool, prefills, then gets one token per decode
step for every running request (continuous batching). One decode clock per engine ticks
the steps on absolute deadlines and wakes every running request at once, as a real
engine's batch does; this is also what lets one process hold hundreds of streams (one
timer, not one each).
"""
from __future__ import annotations

import json
import time
import typing
import uuid
from typing import Any, Iterator, List, Optional, Tuple

import gevent
from gevent.event import Event

from kvrouter.sim import text as T
from kvrouter.sim.metrics import EngineMetrics
from kvrouter.sim.state import EngineState, crash

_JSON_PIECES: dict = {}


def _json_piece(piece: str) -> str:
    """json.dumps of a token's text, cached: the vocabulary is small."""
    out = _JSON_PIECES.get(piece)
    if out is None:
        out = json.dumps(piece)
        if len(_JSON_PIECES) < 4096:
            _JSON_PIECES[piece] = out
    return out


class SimError(Exception):
    def __init__(self, status: int, message: str, type: str = "BadRequestError",
                 param: Optional[str] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param


def _bad(message: str, param: Optional[str] = None) -> SimError:
    return SimError(400, message, "BadRequestError", param)


def _int_field(body: dict, name: str, default: Optional[int], lo: int = 1) -> Optional[int]:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool):
        raise _bad(f"{name} must be an integer, got {value!r}", name)
    if value < lo:
        raise _bad(f"{name} must be at least {lo}, got {value}. (parameter={name}, "
                   f"value={value})", name)
    return value


def _chat_prompt(messages: Any) -> str:
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty list", "messages")
    parts = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise _bad(f"messages[{i}] must be an object with a role", "messages")
        content = m.get("content")
        if isinstance(content, list):
            content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        parts.append(f"<|{m['role']}|> {content or ''}")
    return "\n".join(parts) + "\n<|assistant|>"


def _completion_prompts(prompt: Any) -> List[str]:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, int) for p in prompt):
            return [T.detokenize(prompt)]
        if all(isinstance(p, str) for p in prompt):
            return list(prompt)
        if all(isinstance(p, list) for p in prompt):
            return [T.detokenize(p) for p in prompt]
    raise _bad("prompt must be a string, a list of strings or a list of token ids", "prompt")


class DecodeClock:
    """Ticks decode steps while requests run; ``wait()`` returns at the next step."""

    def __init__(self, state: EngineState):
        self.state = state
        self.timing = state.timing
        self._tick = Event()
        self._loop: Optional[gevent.Greenlet] = None

    def _run(self) -> None:
        deadline = time.monotonic()
        while self.state.running > 0:
            deadline += self.timing.step_seconds(self.state.running)
            delay = deadline - time.monotonic()
            gevent.sleep(delay if delay > 0 else 0)
            tick, self._tick = self._tick, Event()
            tick.set()
        self._loop = None

    def wait(self) -> None:
        if self._loop is None:
            self._loop = gevent.spawn(self._run)
        self._tick.wait()


class Generator:
    def __init__(self, state: EngineState, metrics: EngineMetrics):
        self.state = state
        self.cfg = state.cfg
        self.metrics = metrics
        self.clock = DecodeClock(state)

    # --- validation --------------------------------------------------------------------------
    def check_model(self, body: dict) -> str:
        model = body.get("model")
        if model is None:
            return self.cfg.served_name
        if model not in self.cfg.names:
            raise SimError(404, f"The model `{model}` does not exist. Valid aliases: "
                           f"{', '.join(self.cfg.names)}.", "NotFoundError", "model")
        return model

    def parse(self, body: Any, chat: bool) -> dict:
        if not isinstance(body, dict):
            raise _bad("the request body must be a JSON object")
        model = self.check_model(body)
        if chat:
            prompts = [_chat_prompt(body.get("messages"))]
        else:
            if "prompt" not in body:
                raise _bad("prompt is required", "prompt")
            prompts = _completion_prompts(body["prompt"])
        max_tokens = _int_field(body, "max_completion_tokens" if chat and
                                "max_completion_tokens" in body else "max_tokens", None)
        n = _int_field(body, "n", 1) or 1
        if n > 16:
            raise _bad("n must be at most 16", "n")
        if n > 1 and body.get("temperature") == 0:
            raise _bad(f"n must be 1 when using greedy sampling, got {n}.")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise _bad("stream must be a boolean", "stream")
        opts = body.get("stream_options")
        if opts is not None and not stream:
            raise _bad("Stream options can only be defined when `stream=True`.", "stream_options")
        include_usage = bool(isinstance(opts, dict) and opts.get("include_usage"))
        prompt_tokens = sum(T.count_tokens(p) for p in prompts)
        per_prompt = max(T.count_tokens(p) for p in prompts)
        limit = self.cfg.max_model_len
        if per_prompt > limit or (max_tokens is not None and per_prompt + max_tokens > limit):
            raise _bad(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{per_prompt + (max_tokens or 0)} tokens ({per_prompt} in the messages, "
                f"{max_tokens or 0} in the completion). Please reduce the length of the messages "
                "or completion.", "max_tokens" if max_tokens else "messages")
        if max_tokens is None:  # vLLM's and SGLang's defaults: 16 for completions (as
            # OpenAI's), the rest of the context for chat
            max_tokens = limit - per_prompt if chat else min(16, limit - per_prompt)
        return {"model": model, "prompts": prompts, "max_tokens": max_tokens, "n": n,
                "stream": stream, "include_usage": include_usage, "chat": chat,
                "ignore_eos": bool(body.get("ignore_eos", False)),
                "prompt_tokens": prompt_tokens}

    # --- the engine loop for one request -------------------------------------------------------
    def _wait_admitted(self, need_tokens: int) -> float:
        """Gate on sleep (the quirks), wait for a slot and for room in the KV pool for
        ``need_tokens`` (prompt + output; with kvcached the pool's limit can change while
        it runs); return the queue time."""
        st = self.state
        if st.dead:
            raise SimError(500, "EngineCore encountered an issue. See stack trace for the root "
                           "cause.", "InternalServerError")
        if st.refuse_status:   # overloaded or broken while its health check passes
            raise SimError(st.refuse_status, "The engine is overloaded; try again later."
                           if st.refuse_status == 429 else "Internal server error",
                           "TooManyRequests" if st.refuse_status == 429 else
                           "InternalServerError")
        if self.cfg.dialect == "vllm" and st.is_sleeping():
            if self.cfg.crash_on_sleeping_request:
                crash("request scheduled on a sleeping engine: CUDA error: an illegal memory "
                      "access was encountered")
            st.awake.wait()  # vLLM >= 0.17: queued until wake_up
        queued = time.monotonic()
        st.waiting += 1
        try:
            while st.paused:
                gevent.sleep(0.01)
            st.slots.acquire()
            polls = 0
            # with kvcached the pool's limit gates admission (a request larger than the
            # whole pool runs alone rather than never); without it, only the slots do
            while st.segment is not None and st.tokens_in_flight and \
                    st.tokens_in_flight + need_tokens > st.kv_capacity_tokens():
                gevent.sleep(0.01)
                polls += 1
                if polls % 5 == 0:
                    st.segment.refresh()  # the limit may have been raised meanwhile
        except BaseException:
            st.slots.release()
            raise
        finally:
            st.waiting -= 1
        return time.monotonic() - queued

    def _lengths(self, req: dict, prompt: str) -> int:
        if req["ignore_eos"]:
            return req["max_tokens"]
        natural = T.natural_length(self.cfg.seed, prompt, self.cfg.min_output_tokens,
                                   self.cfg.max_output_tokens)
        return min(natural, req["max_tokens"])

    def run(self, req: dict) -> typing.Generator[list, None, None]:
        """Yield, per decode step, a list of (choice index, text, finish_reason or None)."""
        st, cfg = self.state, self.cfg
        st.counters["requests"] += 1
        start = time.monotonic()
        lengths = [self._lengths(req, prompt) for prompt in req["prompts"]
                   for _ in range(req["n"])]
        need = req["prompt_tokens"] + sum(lengths)
        queue_time = self._wait_admitted(need)
        st.running += 1
        st.tokens_in_flight += need   # no yield since the room was found: it is still there
        reserved = need
        produced = 0
        finished_reason: Optional[str] = "abort"
        try:  # from here on, whatever happens, the bookkeeping is released in `finally`
            epoch = st.abort_epoch
            choices = []
            for p_i, prompt in enumerate(req["prompts"]):
                for k in range(req["n"]):
                    index = p_i * req["n"] + k
                    gib = not st.weights_valid or (cfg.dialect == "sglang" and bool(st.released))
                    choices.append([index, T.TokenStream(cfg.seed, prompt, k, gib),
                                    lengths[index], 0])
            st.update_segment()
            cached = 0
            if st.prefix is not None:   # a prefix already computed is not prefilled again
                cached = sum(st.prefix.lookup(p) for p in req["prompts"])
            req["cached_tokens"] = cached
            gevent.sleep(st.timing.prefill_seconds(req["prompt_tokens"] - cached))
            if st.prefix is not None:
                for p in req["prompts"]:
                    st.prefix.insert(p, st.prefix_capacity_blocks())
            first = time.monotonic()
            self.metrics.hist["queue"].observe(queue_time)
            self.metrics.hist["ttft"].observe(first - start)
            last_emit = first
            itl_hist = self.metrics.hist["itl"]
            max_tokens = req["max_tokens"]
            remaining = sum(1 for c in choices if c[2] > 0)
            n_choices = len(choices)
            monotonic = time.monotonic
            wait = self.clock.wait
            while remaining:
                aborted = st.abort_epoch != epoch
                step: List[Tuple[int, str, Optional[str]]] = []
                for c in choices:
                    if c[3] >= c[2]:
                        continue
                    if aborted:
                        c[3] = c[2]
                        remaining -= 1
                        step.append((c[0], "", "abort"))
                        continue
                    c[3] += 1
                    produced += 1
                    reason = None
                    if c[3] >= c[2]:
                        remaining -= 1
                        reason = "length" if c[2] >= max_tokens else "stop"
                    step.append((c[0], c[1].next_text(), reason))
                now = monotonic()
                if produced > n_choices:
                    itl_hist.observe(now - last_emit)
                last_emit = now
                yield step
                if aborted or not remaining:
                    finished_reason = "abort" if aborted else step[-1][2]
                    break
                wait()
        finally:
            st.running -= 1
            st.tokens_in_flight -= reserved
            st.slots.release()
            st.counters["prompt_tokens"] += req["prompt_tokens"]
            st.counters["generation_tokens"] += produced
            if finished_reason == "abort":
                st.counters["aborted"] += 1
            else:
                st.counters["success"] += 1
            self.metrics.finished[finished_reason if finished_reason in
                                  self.metrics.finished else "stop"] += 1
            self.metrics.hist["e2e"].observe(time.monotonic() - start)
            st.update_segment()

    # --- OpenAI objects ------------------------------------------------------------------------
    def usage(self, req: dict, completion: int, details: bool = True) -> dict:
        out = {"prompt_tokens": req["prompt_tokens"], "total_tokens":
               req["prompt_tokens"] + completion, "completion_tokens": completion}
        if details:  # vLLM 0.32 leaves the details out of a stream's usage chunk
            out["prompt_tokens_details"] = None
            out["completion_tokens_details"] = None
        if self.cfg.prompt_tokens_details and (details or self.cfg.dialect == "vllm"):
            # only with --enable-prompt-tokens-details (vLLM) / --enable-cache-report (SGLang)
            cached = req.get("cached_tokens", 0)
            out["prompt_tokens_details"] = {"cached_tokens": cached} \
                if self.cfg.dialect == "sglang" else \
                {"cached_tokens": cached, "created_cache_tokens": None,
                 "multimodal_tokens": None}
        return out

    @property
    def fingerprint(self) -> str:
        return f"{self.cfg.dialect}-{self.cfg.version}-sim"

    def complete(self, req: dict) -> dict:
        texts: dict = {}
        reasons: dict = {}
        produced = 0
        for step in self.run(req):
            for index, piece, reason in step:
                texts[index] = texts.get(index, "") + piece
                if piece:
                    produced += 1
                if reason:
                    reasons[index] = reason
        created = int(time.time())
        indices = sorted(reasons)
        # the shapes of vLLM 0.32 (checked against it by tests/engine/test_fidelity.py)
        if req["chat"]:
            choices = [{"index": i, "message": {
                "role": "assistant", "content": texts.get(i, ""), "refusal": None,
                "annotations": None, "audio": None, "function_call": None, "reasoning": None},
                "logprobs": None, "finish_reason": reasons[i], "stop_reason": None,
                "token_ids": None, "routed_experts": None} for i in indices]
            return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
                    "created": created, "model": req["model"], "choices": choices,
                    "service_tier": None, "system_fingerprint": self.fingerprint,
                    "usage": self.usage(req, produced), "prompt_logprobs": None,
                    "prompt_token_ids": None, "prompt_text": None, "kv_transfer_params": None,
                    "ec_transfer_params": None, "metrics": None}
        choices = [{"index": i, "text": texts.get(i, ""), "logprobs": None,
                    "finish_reason": reasons[i], "stop_reason": None, "token_ids": None,
                    "prompt_logprobs": None, "prompt_token_ids": None, "routed_experts": None}
                   for i in indices]
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                "created": created, "model": req["model"], "choices": choices,
                "service_tier": None, "system_fingerprint": self.fingerprint,
                "usage": self.usage(req, produced), "kv_transfer_params": None,
                "ec_transfer_params": None, "metrics": None}

    def stream(self, req: dict) -> Iterator[bytes]:
        created = int(time.time())
        chat = req["chat"]
        rid = (f"chatcmpl-{uuid.uuid4().hex}" if chat else f"cmpl-{uuid.uuid4().hex}")
        obj = "chat.completion.chunk" if chat else "text_completion"
        model = json.dumps(req["model"])
        head = (f'data: {{"id":"{rid}","object":"{obj}","created":{created},"model":{model},'
                f'"choices":[')
        tail = "]}\n\n"
        role_tail = ('],"prompt_token_ids":null,"prompt_text":null}\n\n' if chat else tail)
        produced = 0
        gen = self.run(req)
        total = len(req["prompts"]) * req["n"]
        finished = 0
        try:
            first = True
            for step in gen:
                parts = []
                for index, piece, reason in step:
                    if piece:
                        produced += 1
                    if chat:
                        fr = ('"finish_reason":null,' if reason is None else
                              f'"finish_reason":"{reason}","stop_reason":null,')
                        if first:
                            parts.append(f'{{"index":{index},"delta":{{"role":"assistant",'
                                         f'"content":""}},"logprobs":null,"finish_reason":null}}')
                        parts.append(f'{{"index":{index},"delta":{{"content":'
                                     f'{_json_piece(piece)}}},"logprobs":null,'
                                     f'{fr}"token_ids":null}}')
                    else:
                        fr = "null" if reason is None else f'"{reason}"'
                        parts.append(f'{{"index":{index},"text":{_json_piece(piece)},'
                                     f'"logprobs":null,"finish_reason":{fr},"stop_reason":null,'
                                     f'"prompt_token_ids":null,"token_ids":null}}')
                if first and chat:
                    # role chunks first, one per choice, then the content chunks
                    roles = [p for p in parts if '"role"' in p]
                    parts = [p for p in parts if '"role"' not in p]
                    yield "".join(head + r + role_tail for r in roles).encode()
                first = False
                last_tail = tail
                finished += sum(1 for _, _, reason in step if reason)
                if not req["include_usage"] and finished >= total:
                    last_tail = f'],"system_fingerprint":"{self.fingerprint}"}}\n\n'
                yield ("".join(head + p + tail for p in parts[:-1]) + head + parts[-1]
                       + last_tail).encode()
            if req["include_usage"]:
                usage = json.dumps(self.usage(req, produced, details=False))
                yield (f'data: {{"id":"{rid}","object":"{obj}","created":{created},'
                       f'"model":{model},"choices":[],"usage":{usage},'
                       f'"system_fingerprint":"{self.fingerprint}"}}\n\n').encode()
            yield b"data: [DONE]\n\n"
        finally:
            gen.close()

    def embeddings(self, body: Any) -> dict:
        if not isinstance(body, dict):
            raise _bad("the request body must be a JSON object")
        model = self.check_model(body)
        inputs = body.get("input")
        if isinstance(inputs, str):
            inputs = [inputs]
        elif isinstance(inputs, list) and inputs and all(isinstance(i, int) for i in inputs):
            inputs = [T.detokenize(inputs)]
        elif isinstance(inputs, list) and inputs and all(isinstance(i, list) for i in inputs):
            inputs = [T.detokenize(i) for i in inputs]
        if not isinstance(inputs, list) or not inputs or \
                not all(isinstance(i, str) for i in inputs):
            raise _bad("input must be a string, a list of strings or token ids", "input")
        fmt = body.get("encoding_format", "float")
        if fmt not in ("float", "base64"):
            raise _bad(f"encoding_format must be float or base64, got {fmt!r}", "encoding_format")
        data = []
        tokens = 0
        for i, text in enumerate(inputs):
            vec = T.embedding(text, self.cfg.embedding_dim)
            tokens += T.count_tokens(text)
            data.append({"index": i, "object": "embedding",
                         "embedding": T.encode_base64(vec) if fmt == "base64" else vec})
        self.state.counters["prompt_tokens"] += tokens
        return {"id": f"embd-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
                "model": model, "data": data,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens,
                          "completion_tokens": 0, "prompt_tokens_details": None}}
