"""Exceptions that know how they are shown: CLI exit code, HTTP status, OpenAI error type."""
from __future__ import annotations

import json


class KvrouterError(Exception):
    """Base class: a user-facing error. The CLI prints ``Error: <message>`` and exits 2."""

    exit_code = 2


class ConfigError(KvrouterError):
    """A configuration mistake, located by file and key path.

    ``str(err)`` reads ``FILE: KEY.PATH: message`` (file and key path each when known).
    """

    def __init__(self, message: str, path: str = "", source: str = "", line: int | None = None):
        self.message = message
        self.path = path
        self.source = source
        self.line = line
        super().__init__(self.format())

    def format(self) -> str:
        where = []
        if self.source:
            where.append(self.source + (f":{self.line}" if self.line else ""))
        if self.path:
            where.append(self.path)
        return ": ".join(where + [self.message])


class ConfigErrors(KvrouterError):
    """Several configuration errors found in one pass; each keeps its own location."""

    def __init__(self, errors: list[ConfigError]):
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))


class RenderError(KvrouterError):
    pass


# --- HTTP errors: one vocabulary for every route -------------------------------------------------
# Each class carries its status, OpenAI error type and default code, and renders itself
# (Werkzeug's HTTPException and Click's exceptions are the model). The HTTP server, the
# proxy, the admin app and the controller all raise these; nothing else builds an envelope.

def envelope(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    """The OpenAI error envelope: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class ApiError(Exception):
    """An error answered to an HTTP client in the OpenAI envelope."""

    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None,
                 headers: dict | None = None, extra: dict | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if type is not None:
            self.type = type
        self.param = param
        self.headers = headers or {}
        self.extra = extra or {}   # more top-level keys beside "error" (e.g. a model's status)

    dialect = "openai"   # "anthropic": the shape Anthropic's clients parse (/v1/messages)

    def body(self) -> dict:
        if self.dialect == "anthropic":
            return {"type": "error", "error": {"type": anthropic_type(self.status),
                                               "message": self.message}}
        out = envelope(self.message, self.type, self.param, self.code)
        out.update(self.extra)
        return out

    def for_anthropic(self) -> "ApiError":
        """This error, answered in Anthropic's shape."""
        self.dialect = "anthropic"
        return self

    def to_json(self) -> bytes:
        return json.dumps(self.body()).encode()


class BadRequest(ApiError):
    status, type = 400, "invalid_request_error"


class Unauthorized(ApiError):
    status, type = 401, "authentication_error"


class Forbidden(ApiError):
    status, type = 403, "permission_error"


class NotFound(ApiError):
    status, type = 404, "not_found_error"


class MethodNotAllowed(ApiError):
    status, type = 405, "invalid_request_error"


class Conflict(ApiError):
    status, type = 409, "conflict_error"


class PayloadTooLarge(ApiError):
    status, type = 413, "invalid_request_error"


class UriTooLong(ApiError):
    status, type = 414, "invalid_request_error"


class HeadersTooLarge(ApiError):
    status, type = 431, "invalid_request_error"


class InternalError(ApiError):
    status, type = 500, "internal_server_error"


class BadGateway(ApiError):
    status, type = 502, "server_error"


class ServiceUnavailable(ApiError):
    status, type = 503, "service_unavailable"


class GatewayTimeout(ApiError):
    status, type = 504, "timeout_error"


_BY_STATUS = {cls.status: cls for cls in (
    BadRequest, Unauthorized, Forbidden, NotFound, MethodNotAllowed, Conflict, PayloadTooLarge,
    UriTooLong, HeadersTooLarge, InternalError, BadGateway, ServiceUnavailable, GatewayTimeout)}
_TYPES_BY_STATUS = {422: "invalid_request_error", 429: "rate_limit_error"}


def error_type(status: int) -> str:
    """The OpenAI error type for an HTTP status."""
    cls = _BY_STATUS.get(status)
    if cls is not None:
        return cls.type
    return _TYPES_BY_STATUS.get(status, "server_error" if status >= 500
                                else "invalid_request_error")


ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                   403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                   429: "rate_limit_error", 503: "overloaded_error", 529: "overloaded_error"}


def anthropic_type(status: int) -> str:
    """Anthropic's error type (``{"type": "error", "error": {"type", "message"}}``), which
    follows the HTTP status in Anthropic's API."""
    return ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def api_error(status: int, message: str, **kw) -> ApiError:
    """An ApiError for any status (the class of that status where there is one)."""
    cls = _BY_STATUS.get(status)
    if cls is not None:
        return cls(message, **kw)
    err = ApiError(message, **kw)
    err.status = status
    if "type" not in kw:
        err.type = error_type(status)
    return err
