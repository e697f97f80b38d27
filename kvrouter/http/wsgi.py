"""A WSGI app (Flask, for the management routes) as a handler of kvrouter's HTTP server."""
from __future__ import annotations

import io
import sys
from typing import Any, Callable, Dict

from kvrouter.http.messages import Request, Response, StreamResponse


def wsgi_handler(app, server_name: str = "localhost", server_port: int = 0) -> Callable:
    """Adapt a WSGI app to the server's handler interface."""

    def handle(req: Request):
        environ = {
            "REQUEST_METHOD": req.method,
            "SCRIPT_NAME": "",
            "PATH_INFO": req.path,
            "QUERY_STRING": req.query,
            "RAW_URI": req.url.decode("latin-1"),
            "REQUEST_URI": req.url.decode("latin-1"),
            "SERVER_NAME": server_name,
            "SERVER_PORT": str(server_port),
            "SERVER_PROTOCOL": f"HTTP/{req.version}",
            "REMOTE_ADDR": req.remote[0] if req.remote else "",
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "http",
            "wsgi.input": io.BytesIO(req.body),
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": False,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
        }
        for k, v in req.headers.items():
            if k == "content-type":
                environ["CONTENT_TYPE"] = v
            elif k == "content-length":
                environ["CONTENT_LENGTH"] = v
            else:
                environ["HTTP_" + k.upper().replace("-", "_")] = v
        if "CONTENT_LENGTH" not in environ and req.body:
            environ["CONTENT_LENGTH"] = str(len(req.body))
        state: Dict[str, Any] = {}

        def start_response(status, headers, exc_info=None):
            state["status"] = int(status.split(" ", 1)[0])
            state["headers"] = headers
            return lambda data: None  # write() callable: unused by Flask

        result = app(environ, start_response)
        headers = [(k, v) for k, v in state["headers"]
                   if k.lower() not in ("content-length", "connection", "transfer-encoding")]
        has_length = any(k.lower() == "content-length" for k, _ in state["headers"])
        if has_length:
            try:
                body = b"".join(result)
            finally:
                if hasattr(result, "close"):
                    result.close()
            return Response(state["status"], headers, body)
        return StreamResponse(state["status"], headers, result)

    return handle
