"""Configured limits on what one request may ask for, checked before any work is queued."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from voidprompt.request import MAX_PROMPT_CHARS

__all__ = ["BodySizeLimitMiddleware", "LimitError", "Limits"]


class LimitError(Exception):
    """A request exceeds a configured limit; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    # 2048x2048 per image: four times SD1's training area is already far outside what it can draw.
    max_pixels: int = 2048 * 2048
    max_steps: int = 150  # A1111's UI slider maximum
    max_batch_size: int = 8
    max_n_iter: int = 100
    max_images: int = 100  # batch_size * n_iter
    max_body_bytes: int = 64 * 1024 * 1024  # a few base64 init images and a mask
    max_input_pixels: int = 4096 * 4096  # decoded init images / masks / png-info uploads
    max_prompt_chars: int = MAX_PROMPT_CHARS  # a server may lower it; requests never exceed it
    max_queued: int = 64
    # Jobs of one study queued on the server (each job is also checked against the limits above).
    max_study_jobs: int = 10_000
    # A1111's slider stops at 30; far beyond 100 the output is saturated noise and inf/NaN poison it.
    max_cfg_scale: float = 100.0
    # Connections (voidprompt.server.serving): open sockets at once; seconds a client has to send a
    # request's head (from connecting, or from the previous response); the slowest request body
    # accepted, in bytes per second after that grace; seconds an idle keep-alive connection stays.
    max_connections: int = 256
    header_timeout: float = 10.0
    min_body_rate: int = 16 * 1024
    keep_alive_timeout: int = 5
    max_header_bytes: int = 16 * 1024  # h11's own default, stated so it is one of these limits

    def check_generation(
        self, *, width: int, height: int, steps: int, batch_size: int, n_iter: int, hr_pixels: int = 0
    ) -> None:
        if width * height > self.max_pixels:
            raise LimitError(
                f"width x height = {width}x{height} = {width * height} pixels is over this server's "
                f"limit of {self.max_pixels} pixels (--max-pixels)"
            )
        if hr_pixels > self.max_pixels:
            raise LimitError(
                f"the hires fix target of {hr_pixels} pixels is over this server's limit of "
                f"{self.max_pixels} pixels (--max-pixels)"
            )
        if steps > self.max_steps:
            raise LimitError(f"steps={steps} is over this server's limit of {self.max_steps} (--max-steps)")
        if batch_size > self.max_batch_size:
            raise LimitError(
                f"batch_size={batch_size} is over this server's limit of {self.max_batch_size} "
                "(--max-batch-size)"
            )
        if n_iter > self.max_n_iter:
            raise LimitError(f"n_iter={n_iter} is over this server's limit of {self.max_n_iter}")
        if batch_size * n_iter > self.max_images:
            raise LimitError(
                f"batch_size x n_iter = {batch_size * n_iter} images is over this server's limit of "
                f"{self.max_images} per request"
            )


class BodySizeLimitMiddleware:
    """413 for bodies over ``max_bytes``: by Content-Length up front, and by counting the bytes as
    they stream in (a chunked body declares no length)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.max_bytes
            except ValueError:
                too_big = True  # an unparsable length is refused rather than trusted
            if too_big:
                await self._refuse(send)
                return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge()
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        body = (
            f'{{"detail":"request body over this server\'s limit of {self.max_bytes} bytes '
            f'(--max-body-bytes)"}}'
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


class _BodyTooLarge(HTTPException):
    # An HTTPException so FastAPI's body reader passes it through to its 413 handler instead of
    # turning it into a generic "error parsing the body" 400.
    def __init__(self) -> None:
        super().__init__(413, "request body over this server's limit (--max-body-bytes)")
