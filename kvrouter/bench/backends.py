"""Processes for ``make bench``: a fixed-JSON fast backend and an aiohttp proxy baseline.

    python -m kvrouter.bench.backends fast --port P [--events N --interval-ms T | --burst]
    python -m kvrouter.bench.backends aiohttp-proxy --port P --upstream http://127.0.0.1:Q

The aiohttp proxy does what the seed project's router does: parse the JSON body,
look at ``model``, forward with a pooled aiohttp ClientSession and stream the
response back. It is the baseline kvrouter is measured against.
"""
from __future__ import annotations

import argparse
import sys

FIXED = (b'{"id":"cmpl-bench","object":"text_completion","created":1700000000,'
         b'"model":"bench/model","choices":[{"index":0,"text":" ok","logprobs":null,'
         b'"finish_reason":"length"}],"usage":{"prompt_tokens":3,"completion_tokens":1,'
         b'"total_tokens":4}}')
EVENT = (b'data: {"id":"cmpl-bench","object":"text_completion","created":1700000000,'
         b'"model":"bench/model","choices":[{"index":0,"text":" tok","logprobs":null,'
         b'"finish_reason":null}]}\n\n')
MODELS = (b'{"object":"list","data":[{"id":"bench/model","object":"model","created":1700000000,'
          b'"owned_by":"bench","max_model_len":4096}]}')


def fast(port: int, events: int, interval_ms: float, burst: bool = False) -> None:
    """``burst``: a stream's events all in one write (as an engine under load, or a cached
    answer, delivers them), else one write per event, ``interval_ms`` apart."""
    from gevent import monkey

    monkey.patch_all()
    import gevent

    from kvrouter.http.messages import Response, StreamResponse
    from kvrouter.http.server import HTTPServer

    json_h = [("Content-Type", "application/json")]
    sse_h = [("Content-Type", "text/event-stream")]

    def stream():
        if burst:
            yield EVENT * events + b"data: [DONE]\n\n"
            return
        for _ in range(events):
            yield EVENT
            if interval_ms:
                gevent.sleep(interval_ms / 1000.0)
        yield b"data: [DONE]\n\n"

    def handle(req):
        if req.method == "POST":
            if b'"stream": true' in req.body or b'"stream":true' in req.body:
                return StreamResponse(200, sse_h, stream())
            return Response(200, json_h, FIXED)
        if req.path == "/v1/models":
            return Response(200, json_h, MODELS)
        return Response(200, [], b"")

    HTTPServer(("127.0.0.1", port), handle).serve_forever()


def aiohttp_proxy(port: int, upstream: str) -> None:
    import json

    import aiohttp
    from aiohttp import web

    async def on_startup(app):
        app["session"] = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60))

    async def proxy(request: web.Request):
        raw = await request.read()
        body = json.loads(raw)
        if "model" not in body:
            return web.json_response({"error": "no model"}, status=400)
        session = request.app["session"]
        async with session.post(upstream + request.path, data=raw,
                                headers={"Content-Type": "application/json"}) as up:
            if up.headers.get("Content-Type", "").startswith("text/event-stream"):
                resp = web.StreamResponse(status=up.status,
                                          headers={"Content-Type": "text/event-stream"})
                await resp.prepare(request)
                async for chunk in up.content.iter_any():
                    await resp.write(chunk)
                await resp.write_eof()
                return resp
            data = await up.read()
            return web.Response(body=data, status=up.status, content_type="application/json")

    app = web.Application()
    app.on_startup.append(on_startup)
    app.router.add_post("/v1/completions", proxy)
    app.router.add_post("/v1/chat/completions", proxy)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fast")
    f.add_argument("--port", type=int, required=True)
    f.add_argument("--events", type=int, default=100)
    f.add_argument("--interval-ms", type=float, default=0.0)
    f.add_argument("--burst", action="store_true")
    a = sub.add_parser("aiohttp-proxy")
    a.add_argument("--port", type=int, required=True)
    a.add_argument("--upstream", required=True)
    args = p.parse_args(argv)
    if args.cmd == "fast":
        fast(args.port, args.events, args.interval_ms, args.burst)
    else:
        aiohttp_proxy(args.port, args.upstream)


if __name__ == "__main__":
    main(sys.argv[1:])
