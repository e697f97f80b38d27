"""Bearer tokens: one check for the API keys on /v1 and the admin token on state changes."""
from __future__ import annotations

import hmac
from typing import Iterable, Optional

from kvrouter.errors import Unauthorized


def bearer_ok(authorization: Optional[str], secrets: Iterable[str]) -> bool:
    """True when ``Authorization: Bearer X`` names one of ``secrets`` (constant time)."""
    auth = authorization or ""
    given = auth[7:].strip().encode() if auth[:7].lower() == "bearer " else b""
    ok = False
    for secret in secrets:
        ok |= hmac.compare_digest(given, secret.encode())
    return ok and bool(given)


def require_api_key(authorization: Optional[str], keys: Iterable[str],
                    x_api_key: Optional[str] = None) -> None:
    """Raise 401 unless keys are off (empty) or the request names one of them, as
    ``Authorization: Bearer KEY`` (OpenAI's clients) or ``X-Api-Key: KEY`` (Anthropic's)."""
    keys = tuple(keys)
    if keys and not bearer_ok(authorization, keys) and \
            not (x_api_key and bearer_ok("Bearer " + x_api_key, keys)):
        raise Unauthorized("missing or invalid API key (Authorization: Bearer ... or "
                           "X-Api-Key: ...)", code="invalid_api_key")


def require_client_key(headers, keys: Iterable[str]) -> None:
    """``require_api_key`` on a request's headers (a dict of lower-case names, or Flask's)."""
    require_api_key(headers.get("authorization"), keys, headers.get("x-api-key"))


def require_admin(authorization: Optional[str], token: Optional[str]) -> None:
    """Raise 401 unless no admin token is set or the request carries it."""
    if token and not bearer_ok(authorization, (token,)):
        raise Unauthorized("admin token required (Authorization: Bearer ...)",
                           code="invalid_admin_token")
