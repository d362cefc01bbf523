"""The body limit: bodies above HARMONICA_MAX_BODY_BYTES get 413 before the app buffers them."""

from __future__ import annotations

from contextlib import suppress

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.contract.settings import get_settings

from . import telemetry
from .errors import problem


class BodyTooLarge(Exception):
    """Raised into the app by `LimitBody`'s receive once the body passes the limit."""


class LimitBody:
    """Refuse bodies above HARMONICA_MAX_BODY_BYTES with 413: by Content-Length before reading anything, else
    (chunked) by counting what the app receives, so no body is ever buffered beyond the limit."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = get_settings().max_body_bytes
        length = Headers(scope=scope).get("content-length")
        if length is not None and not (length.isascii() and length.isdigit() and int(length) <= limit):
            return await too_large(limit)(scope, receive, send)
        received, refused, started = 0, False, False

        async def counted() -> Message:
            nonlocal received, refused
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                refused = True
                raise BodyTooLarge
            return message

        async def unless_refused(message: Message) -> None:
            nonlocal started
            if refused and not started:  # the app's own answer to BodyTooLarge (FastAPI makes it a 400)
                return
            started = True
            await send(message)

        with suppress(BodyTooLarge):
            await self.app(scope, counted, unless_refused)
        if refused and not started:
            await too_large(limit)(scope, receive, send)


def too_large(limit: int) -> JSONResponse:
    telemetry.rejected("too_large")
    return problem(413, "Request body too large", f"bodies are limited to {limit} bytes")
