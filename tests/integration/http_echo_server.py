"""A test server on kvrouter's HTTP layer: echo, stream and slow handlers, small limits."""
from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import sys  # noqa: E402

import gevent  # noqa: E402

from kvrouter.http.limits import ServerLimits  # noqa: E402
from kvrouter.http.messages import Response, StreamResponse  # noqa: E402
from kvrouter.http.server import HTTPServer  # noqa: E402

STATE = {"stream_closed": 0, "handler_gone": 0}


def handle(req):
    if req.path == "/stream":
        n = int(req.query.split("=")[1]) if req.query.startswith("n=") else 5

        def gen():
            try:
                for i in range(n):
                    yield b"data: %d\n\n" % i
                    gevent.sleep(0.02)
            finally:
                STATE["stream_closed"] += 1
        return StreamResponse(200, [("Content-Type", "text/event-stream")], gen())
    if req.path == "/slow":
        try:
            gevent.sleep(5)
        except BaseException:
            STATE["handler_gone"] += 1
            raise
        return Response(200, [], b"slow done")
    if req.path == "/state":
        return Response(200, [("Content-Type", "application/json")], json.dumps(STATE).encode())
    if req.path == "/boom":
        raise RuntimeError("handler bug")
    body = {"method": req.method, "path": req.path, "query": req.query,
            "headers": req.headers, "body": req.body.decode("latin-1"), "version": req.version}
    return Response(200, [("Content-Type", "application/json")], json.dumps(body).encode())


if __name__ == "__main__":
    limits = ServerLimits(max_header_bytes=4096, max_body_bytes=10000, keepalive_timeout=1.0,
                          max_pending_body_bytes=25000,
                          header_timeout=1.0)
    server = HTTPServer(("127.0.0.1", int(sys.argv[1])), handle, limits)
    server.serve_forever()
