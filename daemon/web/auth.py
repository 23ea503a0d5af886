"""Who may use the console: one token, generated at first start into the state directory (0600), as Jupyter does.

Accepted as `Authorization: Bearer <token>`, as `?token=<token>` on any page (which sets an HttpOnly, SameSite=Strict
cookie and redirects to the same URL without it, so the token leaves the address bar and the history), or as that
cookie; required by every page, API call and WebSocket. A write (any method but GET/HEAD) authenticated by the
cookie must come from the console's own origin (`Origin`, else `Referer`); a WebSocket upgrade whose `Origin` is
another site is refused (a browser sends the cookie with it). Every answer carries a Content-Security-Policy
without inline script.
"""

from __future__ import annotations

import hmac
import os
import re
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import web

TOKEN_FILE = "web-token"
COOKIE = "vigild_token"
TOKEN_PATTERN = re.compile(r"^[A-Za-z0-9_-]{16,256}$")
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")  # fmt: skip
SAFE_METHODS = frozenset({"GET", "HEAD"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def load_or_create_token(directory: Path) -> tuple[str, bool]:
    """The console's token from `directory/web-token`, made (URL-safe, 32 characters, mode 0600) if there is none
    or it is not a token: (token, made now)."""
    path = directory / TOKEN_FILE
    try:
        token = path.read_text().strip()
        if TOKEN_PATTERN.match(token):
            return token, False
    except FileNotFoundError:
        pass
    directory.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(24)
    temporary = path.with_name(f".{TOKEN_FILE}.{os.getpid()}.part")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(token + "\n")
    os.replace(temporary, path)
    return token, True


class Guard:
    """The aiohttp middleware that enforces the above."""

    def __init__(self, token: str, secure: bool):
        self._token = token.encode()
        self._secure = secure

    def _valid(self, candidate: str | None) -> bool:
        return candidate is not None and hmac.compare_digest(candidate.encode(), self._token)

    def _same_origin(self, request: web.Request) -> bool:
        origin = request.headers.get("Origin")
        if origin is None:
            referer = request.headers.get("Referer")
            if referer is None:
                return False
            parts = urlsplit(referer)
            origin = f"{parts.scheme}://{parts.netloc}"
        return origin == f"{request.scheme}://{request.host}"

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            response = await self._checked(request, handler)
        except web.HTTPException as exc:
            response = exc
        response.headers.setdefault("Content-Security-Policy", CSP)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        response.headers.setdefault("X-Frame-Options", "DENY")
        if isinstance(response, web.HTTPException):
            raise response
        return response

    async def _checked(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        authorization = request.headers.get("Authorization", "")
        bearer = authorization[7:].strip() if authorization.lower().startswith("bearer ") else None
        query_token = request.query.get("token")
        if "Origin" in request.headers and not self._same_origin(request):
            raise web.HTTPForbidden(text="a request from another origin is refused\n")  # a browser on another site
        if self._valid(bearer):
            return await handler(request)  # a script (no cookie: no cross-site request can carry it)
        if query_token is not None:
            if not self._valid(query_token):
                raise _refused(request, "the token is not this console's")
            if request.method in SAFE_METHODS and request.headers.get("Upgrade", "").lower() != "websocket":
                query = request.rel_url.query.copy()
                del query["token"]
                target = request.rel_url.with_query(query)
                response = web.HTTPSeeOther(location=str(target))
                response.set_cookie(COOKIE, query_token, httponly=True, samesite="Strict", secure=self._secure,
                                    path="/")  # fmt: skip
                raise response
        elif not self._valid(request.cookies.get(COOKIE)):
            raise _refused(request, "open the console with the URL the daemon logged (…/?token=…)")
        if request.method not in SAFE_METHODS and not self._same_origin(request):
            raise web.HTTPForbidden(text="a write from another origin is refused\n")
        return await handler(request)


def _refused(request: web.Request, why: str) -> web.HTTPException:
    if request.path.startswith("/api/"):
        return web.HTTPUnauthorized(text=f'{{"error": "unauthorized", "message": "{why}"}}',
                                    content_type="application/json")  # fmt: skip
    return web.HTTPUnauthorized(text=f"401 Unauthorized: {why}\n")
