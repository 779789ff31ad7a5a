"""The optional API key: with ``FAAR_API_KEY`` set, every ``/v1`` route needs
``Authorization: Bearer <key>``; without it the API is open.

A dependency of the ``/v1`` router (not of the app), so health checks, metrics and the web
page stay public; the page asks for the key and sends it itself. The key is compared in
constant time.
"""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .errors import ApiError
from .gateway import GatewayDep

bearer = HTTPBearer(auto_error=False, description="only when the gateway runs with an API key")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


async def require_api_key(gw: GatewayDep, credentials: Credentials) -> None:
    key = gw.settings.api_key
    if key is None:
        return
    given = credentials.credentials.encode() if credentials else b""
    if not secrets.compare_digest(given, key.get_secret_value().encode()):
        raise ApiError(401, "unauthorized", "missing or wrong API key: send 'Authorization: Bearer <key>'",
                       {"WWW-Authenticate": "Bearer"})
