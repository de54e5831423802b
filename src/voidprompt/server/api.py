"""The FastAPI application: A1111's ``/sdapi/v1`` routes, voidprompt's ``/voidprompt/v1`` routes
and the web UI at ``/``. The routes live in :mod:`voidprompt.server.routes`, one module per API
surface; this module builds the app around them (error answers, middleware, the UI).

Errors: every :class:`voidprompt.errors.VoidpromptError` becomes a 4xx JSON answer in A1111's
error shape (``{"error", "detail", "body", "errors"}``) with the message naming the valid choices;
pydantic validation errors stay FastAPI's 422. Nothing a client sends can produce a 500 on
purpose; an unexpected exception is logged and answered 500 without internals. The one exception
is A1111's own: a generation that produced NaN is its 500 ``"error": "NansException"``, which its
clients recognise.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from voidprompt import __version__
from voidprompt.errors import (
    InfotextError,
    InvalidRequestError,
    ModelLoadError,
    NansError,
    PromptError,
    StudyError,
    VoidpromptError,
)
from voidprompt.explain.store import ExplanationFileError
from voidprompt.imagemeta import ImageTooLargeError
from voidprompt.lab.catalog import DiskFullError
from voidprompt.server.auth import BasicAuthMiddleware
from voidprompt.server.checkpoints import NotFoundError
from voidprompt.server.generation import ScriptNotFoundError
from voidprompt.server.limits import BodySizeLimitMiddleware, LimitError
from voidprompt.server.queue import QueueFullError
from voidprompt.server.routes import (
    sdapi_extras,
    sdapi_generation,
    sdapi_interrogate,
    sdapi_models,
    sdapi_networks,
    sdapi_system,
    voidprompt_explain,
    voidprompt_generation,
    voidprompt_studies,
    voidprompt_tokens,
)
from voidprompt.server.state import App, ServerConfig
from voidprompt.server.studies import CatalogBusyError, ReportUnavailableError
from voidprompt.server.xyz import ScriptArgsError

__all__ = ["create_app"]

UI_DIR = Path(__file__).with_name("ui")


def _status_for(error: Exception) -> int:
    if isinstance(error, LimitError):
        return error.status
    if isinstance(error, ImageTooLargeError):
        return 413
    if isinstance(error, NotFoundError):
        return 404
    if isinstance(error, ReportUnavailableError):
        return 501
    if isinstance(error, DiskFullError):
        return 507
    if isinstance(error, CatalogBusyError | QueueFullError):
        return 409 if isinstance(error, CatalogBusyError) else 503
    if isinstance(error, ModelLoadError | ScriptNotFoundError | ScriptArgsError | ExplanationFileError):
        return 422
    if isinstance(error, NansError):
        return 500
    if isinstance(error, InvalidRequestError | PromptError | InfotextError | StudyError | VoidpromptError):
        return 400
    return 500


def _error_response(status: int, error: Exception) -> JSONResponse:
    kind = {
        400: "BadRequest",
        404: "NotFound",
        409: "Conflict",
        413: "PayloadTooLarge",
        422: "Unprocessable",
        501: "NotImplemented",
        503: "ServiceUnavailable",
        507: "InsufficientStorage",
    }.get(status, "NansException" if isinstance(error, NansError) else type(error).__name__)
    # A1111's shape for errors raised in its API handlers; "detail" also satisfies FastAPI clients.
    return JSONResponse(
        status_code=status, content={"error": kind, "detail": str(error), "body": "", "errors": str(error)}
    )


def create_app(config: ServerConfig) -> FastAPI:
    if config.threads:
        # Torch's intra-op pool is process-wide; pinning it keeps a shared machine responsive.
        torch.set_num_threads(config.threads)
    state = App(config)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        state.study_queue.close()  # first: its scheduler must not start the next study
        state.studies.stop_all()
        state.queue.close()

    app = FastAPI(
        lifespan=lifespan,
        title="voidprompt",
        version=__version__,
        description=(
            "A1111-compatible Stable Diffusion API (/sdapi/v1) and voidprompt's own routes "
            "(/voidprompt/v1): generation with explanations, studies, tokens."
        ),
    )
    app.state.voidprompt = state

    @app.exception_handler(VoidpromptError)
    async def _voidprompt_error(_request: Request, error: VoidpromptError) -> JSONResponse:
        return _error_response(_status_for(error), error)

    @app.exception_handler(LimitError)
    async def _limit_error(_request: Request, error: LimitError) -> JSONResponse:
        return _error_response(error.status, error)

    @app.exception_handler(QueueFullError)
    async def _queue_full(_request: Request, error: QueueFullError) -> JSONResponse:
        return _error_response(503, error)

    for routes in (sdapi_generation, sdapi_extras, sdapi_interrogate, sdapi_models, sdapi_networks,
                   sdapi_system, voidprompt_generation, voidprompt_tokens, voidprompt_studies,
                   voidprompt_explain):
        app.include_router(routes.router(state))

    if config.ui and UI_DIR.is_dir():
        app.mount("/ui", StaticFiles(directory=UI_DIR), name="ui")

        @app.get("/", include_in_schema=False)
        def index() -> FileResponse:
            return FileResponse(UI_DIR / "index.html")

    app.add_middleware(BodySizeLimitMiddleware, max_bytes=config.limits.max_body_bytes)
    if config.cors_allow_origins or config.cors_allow_origin_regex:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=config.cors_allow_origins,
            allow_origin_regex=config.cors_allow_origin_regex,
            allow_methods=["*"],
            allow_credentials=True,
            allow_headers=["*"],
        )
    if config.credentials:
        # Added last, so it runs first: nothing (not even CORS preflight handling) is served without it.
        app.add_middleware(BasicAuthMiddleware, credentials=config.credentials)
    return app
