"""HTTP Basic authentication for every route (A1111's ``--api-auth user:pass[,user2:pass2]``)."""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Mapping

from starlette.types import ASGIApp, Receive, Scope, Send

from voidprompt.errors import VoidpromptError

__all__ = ["BasicAuthMiddleware", "parse_credentials"]


def parse_credentials(text: str) -> dict[str, str]:
    """``"user:pass,user2:pass2"`` -> {user: pass}. Passwords may contain ':' (split at the first)."""
    out: dict[str, str] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        user, sep, password = item.partition(":")
        if not sep or not user or not password:
            raise VoidpromptError(
                f"--api-auth entry {user or item!r}: write user:password (several separated by commas)"
            )
        out[user] = password
    if not out:
        raise VoidpromptError("--api-auth: no credentials given; write user:password")
    return out


class BasicAuthMiddleware:
    """Rejects requests without valid Basic credentials (401 with a WWW-Authenticate challenge).

    A plain ASGI middleware rather than a FastAPI dependency so the web UI, the static files and
    the OpenAPI document are covered too, not only the API routes.
    """

    def __init__(self, app: ASGIApp, credentials: Mapping[str, str]) -> None:
        self.app = app
        # Compared as bytes with hmac.compare_digest: no timing hint about how much matched.
        self.credentials = {u.encode(): p.encode() for u, p in credentials.items()}

    def _allowed(self, header: bytes | None) -> bool:
        if not header or header[:6].lower() != b"basic ":
            return False
        try:
            decoded = base64.b64decode(header[6:].strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        user, sep, password = decoded.partition(b":")
        if not sep:
            return False
        ok = False
        for known_user, known_password in self.credentials.items():
            # Every entry is compared so the time taken does not reveal which user exists.
            match = hmac.compare_digest(user, known_user) & hmac.compare_digest(password, known_password)
            ok = ok or match
        return ok

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        header = dict(scope.get("headers") or []).get(b"authorization")
        if self._allowed(header):
            await self.app(scope, receive, send)
            return
        body = b'{"detail":"Incorrect username or password"}'
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b'Basic realm="voidprompt"'),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
