"""What happens to a request before any byte of its body is read (README "Security").

A plain ASGI middleware (BaseHTTPMiddleware would put every request and response through an
extra task and stream copy):

1. A request that carries a body to `/api/` is authenticated first, from its headers alone:
   a stranger gets its 401 (or 429) without the server reading, parsing or spooling anything
   it sent. The route's dependency (api/deps.py) reuses the caller found here and does the
   per-route tenant checks.
2. Body bytes are counted as they stream in, whether or not Content-Length was sent, and the
   request is answered 413 (naming the limit) the moment its route's limit is passed: uploads
   get MAX_UPLOAD_BYTES plus room for the multipart framing, everything else
   MAX_JSON_BODY_BYTES.
"""

from __future__ import annotations

from collections.abc import Mapping

from fastapi import HTTPException, status
from fastapi.responses import JSONResponse
from fastapi.security.utils import get_authorization_scheme_param
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.deps import PRINCIPAL_STATE, authenticate
from tenanttune.settings import Settings

UPLOAD_PREFIXES = ("/api/ai/datasets/",)
MULTIPART_ALLOWANCE = 64 * 1024  # boundaries and part headers around the uploaded file
_BODYLESS_METHODS = {"GET", "HEAD", "OPTIONS"}


class BodyTooLarge(HTTPException):
    """Raised from `receive` once the body passes its limit. An HTTPException, so FastAPI's body
    parsing re-raises it and the app answers 413; the middleware answers it otherwise."""

    def __init__(self, detail: str) -> None:
        super().__init__(status.HTTP_413_CONTENT_TOO_LARGE, detail)


class RequestGuard:
    """Authenticate before the body, and cap the body while it streams."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if scope["method"] in _BODYLESS_METHODS and not _declares_body(headers):
            await self.app(scope, receive, send)  # the route's dependency authenticates it
            return
        if scope["path"].startswith("/api/"):
            scheme, token = get_authorization_scheme_param(headers.get("authorization"))
            client = scope.get("client")
            try:
                principal = await authenticate(
                    scope["app"].state,
                    token if scheme.lower() == "bearer" else None,
                    client[0] if client else None,
                )
            except HTTPException as exc:
                await _answer(scope, receive, send, exc.status_code, exc.detail, exc.headers)
                return
            scope.setdefault("state", {})[PRINCIPAL_STATE] = principal

        limit, message = self._limit(scope["path"])
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await _answer(scope, receive, send, status.HTTP_413_CONTENT_TOO_LARGE, message)
            return
        received = 0
        started = False

        async def counted_receive() -> Message:
            nonlocal received
            event = await receive()
            if event["type"] == "http.request":
                received += len(event.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(message)
            return event

        async def watched_send(event: Message) -> None:
            nonlocal started
            started = started or event["type"] == "http.response.start"
            await send(event)

        try:
            await self.app(scope, counted_receive, watched_send)
        except BodyTooLarge:
            if started:
                raise
            await _answer(scope, receive, send, status.HTTP_413_CONTENT_TOO_LARGE, message)

    def _limit(self, path: str) -> tuple[int, str]:
        """The most body bytes a request to `path` may send, and the 413's reason."""
        s = self.settings
        if path.startswith(UPLOAD_PREFIXES):
            return (
                s.max_upload_bytes + MULTIPART_ALLOWANCE,
                f"request body over the upload limit: files up to {s.max_upload_bytes} bytes "
                "(MAX_UPLOAD_BYTES)",
            )
        return (
            s.max_json_body_bytes,
            f"request body over the {s.max_json_body_bytes} byte limit (MAX_JSON_BODY_BYTES)",
        )


def _declares_body(headers: Headers) -> bool:
    return "transfer-encoding" in headers or headers.get("content-length", "0") != "0"


async def _answer(
    scope: Scope,
    receive: Receive,
    send: Send,
    status_code: int,
    detail: str,
    headers: Mapping[str, str] | None = None,
) -> None:
    await JSONResponse({"detail": detail}, status_code=status_code, headers=headers)(
        scope, receive, send
    )
