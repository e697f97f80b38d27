"""Exceptions that know how they are shown: CLI exit code, HTTP status, OpenAI error type."""
from __future__ import annotations


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


class ApiError(Exception):
    """An error answered to an HTTP client in the OpenAI envelope."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None,
                 headers: dict | None = None):
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}
        super().__init__(message)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type,
                          "param": self.param, "code": self.code}}
