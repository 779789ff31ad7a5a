"""The optional API key: with ``FAAR_API_KEY`` set, every ``/v1`` route (and ``/metrics``, unless
``--metrics-public``) needs ``Authorization: Bearer <key>``; without it the API is open.

Checked by ``middleware.ApiKeyMiddleware`` on the request's headers, before a byte of the
body is read: a client without the key cannot make the gateway receive, parse or buffer
an upload (issue 14). Health checks and the web page stay public; the page asks for the
key and sends it itself. The key is compared in constant time. ``bearer`` declares the
scheme to the OpenAPI schema, so ``/docs`` offers to send it.
"""

from __future__ import annotations

import secrets

from fastapi.security import HTTPBearer
from pydantic import SecretStr

bearer = HTTPBearer(auto_error=False, description="only when the gateway runs with an API key")
SCHEME = b"bearer "


def key_matches(key: SecretStr, authorization: bytes | None) -> bool:
    """``Authorization: Bearer <key>`` (the scheme in any case) carries ``key``."""
    given = b""
    if authorization and authorization[:len(SCHEME)].lower() == SCHEME:
        given = authorization[len(SCHEME):].strip()
    return secrets.compare_digest(given, key.get_secret_value().encode())


def needs_key(path: str, metrics_public: bool) -> bool:
    return path.startswith("/v1/") or path == "/v1" or (path == "/metrics" and not metrics_public)
