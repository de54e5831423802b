"""The FastAPI application: A1111's ``/sdapi/v1`` routes, voidprompt's ``/voidprompt/v1`` routes
and the web UI at ``/``.

Errors: every :class:`voidprompt.errors.VoidpromptError` becomes a 4xx JSON answer in A1111's
error shape (``{"error", "detail", "body", "errors"}``) with the message naming the valid choices;
pydantic validation errors stay FastAPI's 422. Nothing a client sends can produce a 500 on
purpose; an unexpected exception is logged and answered 500 without internals.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from voidprompt import __version__
from voidprompt.errors import (
    InfotextError,
    InvalidRequestError,
    ModelLoadError,
    PromptError,
    StudyError,
    VoidpromptError,
)
from voidprompt.imagemeta import ImageTooLargeError, read_infotext
from voidprompt.infotext import parse_generation_parameters
from voidprompt.pipeline.hires import LATENT_UPSCALE_MODES, hires_upscalers
from voidprompt.sampling.registry import SAMPLERS, SCHEDULERS
from voidprompt.server import models as m
from voidprompt.server.auth import BasicAuthMiddleware
from voidprompt.server.checkpoints import ModelRegistry, NotFoundError
from voidprompt.server.generation import (
    BuiltRequest,
    Generated,
    ModelHost,
    Options,
    build_request,
    decode_image,
    encode_png,
    processed_info,
)
from voidprompt.server.limits import BodySizeLimitMiddleware, LimitError, Limits
from voidprompt.server.networks import NetworkFolders, checkpoint_text_width
from voidprompt.server.queue import GenerationQueue, QueueFullError
from voidprompt.server.studies import (
    CatalogBusyError,
    ReportUnavailableError,
    StudyRegistry,
    human_labeled,
    image_record,
)

log = logging.getLogger(__name__)

UI_DIR = Path(__file__).with_name("ui")


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 7860
    ckpt_dirs: list[Path] = field(default_factory=lambda: [Path("models/Stable-diffusion")])
    extra_checkpoints: list[Path] = field(default_factory=list)
    vae_dirs: list[Path] = field(default_factory=lambda: [Path("models/VAE")])
    # A1111's default folders (--lora-dir, --embeddings-dir, --hypernetwork-dir); None: no folder.
    lora_dir: Path | None = Path("models/Lora")
    embeddings_dir: Path | None = Path("embeddings")
    hypernetwork_dir: Path | None = Path("models/hypernetworks")
    default_model: str | None = None
    studies_dir: Path | None = None
    outdir: Path | None = None
    credentials: dict[str, str] = field(default_factory=dict)
    cors_allow_origins: list[str] = field(default_factory=list)
    cors_allow_origin_regex: str | None = None
    limits: Limits = field(default_factory=Limits)
    device: str = "cpu"
    threads: int | None = None
    ui: bool = True


def _status_for(error: Exception) -> int:
    if isinstance(error, LimitError):
        return error.status
    if isinstance(error, ImageTooLargeError):
        return 413
    if isinstance(error, NotFoundError):
        return 404
    if isinstance(error, ReportUnavailableError):
        return 501
    if isinstance(error, CatalogBusyError | QueueFullError):
        return 409 if isinstance(error, CatalogBusyError) else 503
    if isinstance(error, ModelLoadError):
        return 422
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
    }.get(status, type(error).__name__)
    # A1111's shape for errors raised in its API handlers; "detail" also satisfies FastAPI clients.
    return JSONResponse(
        status_code=status, content={"error": kind, "detail": str(error), "body": "", "errors": str(error)}
    )


class App:
    """Server state: settings, the model host, the queue and the studies."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.options = Options()
        self.queue = GenerationQueue(max_queued=config.limits.max_queued)
        self.registry = ModelRegistry(config.ckpt_dirs, config.extra_checkpoints, config.vae_dirs)
        self.registry.refresh()
        self.networks = NetworkFolders(config.lora_dir, config.embeddings_dir, config.hypernetwork_dir)
        self.networks.refresh()
        self.host = ModelHost(
            self.registry, self.options, self.queue.state, device=config.device, networks=self.networks
        )
        if config.default_model:
            self.host.select(config.default_model)
        self.studies = StudyRegistry(config.studies_dir)
        self._tokenizer: Any = None
        self._widths: dict[tuple[str, int, int], int | None] = {}

    def tokenizer(self) -> Any:
        if self.host.engine is not None:
            return self.host.engine.components.tokenizer
        if self._tokenizer is None:
            from voidprompt.models.tokenizer import load_clip_tokenizer

            self._tokenizer = load_clip_tokenizer()
        return self._tokenizer

    def text_width(self) -> int | None:
        """The current model's text-encoder width (None when there is no checkpoint): from the
        model in memory, else from the selected checkpoint's tensor shapes (header only)."""
        selected = self.host.selected
        engine, loaded = self.host.engine, self.host.loaded
        if engine is not None and loaded is not None and (selected is None or loaded[0] is selected):
            return int(engine.encoder.width)
        if selected is None:
            return None
        try:
            stat = selected.path.stat()
        except OSError:
            return None
        key = (str(selected.path), stat.st_size, stat.st_mtime_ns)
        if key not in self._widths:
            self._widths[key] = checkpoint_text_width(selected.path)
        return self._widths[key]

    def options_dict(self) -> dict[str, Any]:
        values: dict[str, Any] = self.options.snapshot()
        selected = self.host.selected
        values["sd_model_checkpoint"] = selected.title if selected is not None else None
        values["sd_checkpoint_hash"] = selected.sha256 if selected is not None else None
        values["sd_vae"] = self.host.selected_vae
        return values


def create_app(config: ServerConfig) -> FastAPI:
    if config.threads:
        # Torch's intra-op pool is process-wide; pinning it keeps a shared machine responsive.
        torch.set_num_threads(config.threads)
    state = App(config)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        state.studies.stop_all()
        state.queue.close()

    app = FastAPI(
        lifespan=lifespan,
        title="voidprompt",
        version=__version__,
        description=(
            "A1111-compatible Stable Diffusion 1.x API (/sdapi/v1) and voidprompt's study routes "
            "(/voidprompt/v1)."
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

    _sdapi_routes(app, state)
    _voidprompt_routes(app, state)

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


# ---------------------------------------------------------------------------------------- /sdapi/v1


def _sdapi_routes(app: FastAPI, state: App) -> None:
    prefix = "/sdapi/v1"
    tags: list[str | Enum] = ["sdapi"]

    async def run_generation(kind: str, body: m.Txt2ImgRequest, img2img: bool) -> m.GenerationResponse:
        built: BuiltRequest = await run_in_threadpool(
            build_request, body, state.options, state.config.limits, img2img=img2img
        )
        generated: Generated = await state.queue.run(kind, lambda: state.host.generate(kind, built))
        info = processed_info(generated)
        images: list[str] | None = None
        if body.send_images:
            images = await run_in_threadpool(
                lambda: [
                    encode_png(image, text)
                    for image, text in zip(generated.result.images, generated.result.infotexts, strict=True)
                ]
            )
        if body.save_images:
            await run_in_threadpool(_save_images, state, kind, generated)
        parameters = body.model_dump()
        if isinstance(body, m.Img2ImgRequest) and not body.include_init_images:
            # A1111 leaves the (large) input images out of the echo unless asked.
            parameters["init_images"] = None
            parameters["mask"] = None
        import json

        return m.GenerationResponse(
            images=images if images is not None else [], parameters=parameters, info=json.dumps(info)
        )

    @app.post(f"{prefix}/txt2img", tags=tags, response_model=m.GenerationResponse)
    async def txt2img(body: m.Txt2ImgRequest) -> m.GenerationResponse:
        return await run_generation("txt2img", body, img2img=False)

    @app.post(f"{prefix}/img2img", tags=tags, response_model=m.GenerationResponse)
    async def img2img(body: m.Img2ImgRequest) -> m.GenerationResponse:
        return await run_generation("img2img", body, img2img=True)

    @app.post(f"{prefix}/png-info", tags=tags, response_model=m.PngInfoResponse)
    def png_info(body: m.PngInfoRequest) -> m.PngInfoResponse:
        if not body.image.strip():
            return m.PngInfoResponse(info="")
        image = decode_image(body.image, "image", state.config.limits.max_input_pixels)
        try:
            geninfo, items = read_infotext(image)
        finally:
            image.close()
        text = geninfo or ""
        # Only JSON-safe items go back (A1111 returns image.info; binary chunks would not serialise).
        safe = {k: v for k, v in items.items() if isinstance(v, str | int | float | bool)}
        return m.PngInfoResponse(
            info=text, items=safe, parameters=parse_generation_parameters(text) if text else {}
        )

    @app.get(f"{prefix}/progress", tags=tags, response_model=m.ProgressResponse)
    def progress(skip_current_image: bool = False) -> m.ProgressResponse:
        st = state.queue.state
        value, eta = st.progress()
        current_image = None
        latent = st.latent
        if not skip_current_image and latent is not None:
            current_image = _preview(latent)
        with st.lock:
            snapshot = m.ProgressState(
                skipped=st.skipped,
                interrupted=st.interrupted,
                job=st.job,
                job_count=st.job_count,
                job_timestamp=st.job_timestamp,
                job_no=st.job_no,
                sampling_step=st.sampling_step,
                sampling_steps=st.sampling_steps,
                queued=max(0, state.queue.pending - (1 if st.job else 0)),
            )
            textinfo = st.textinfo
        return m.ProgressResponse(
            progress=value, eta_relative=eta, state=snapshot, current_image=current_image, textinfo=textinfo
        )

    @app.post(f"{prefix}/interrupt", tags=tags)
    def interrupt() -> dict[str, Any]:
        state.queue.interrupt()
        return {}

    @app.post(f"{prefix}/skip", tags=tags)
    def skip() -> dict[str, Any]:
        state.queue.skip()
        return {}

    @app.get(f"{prefix}/options", tags=tags)
    def get_options() -> dict[str, Any]:
        return state.options_dict()

    @app.post(f"{prefix}/options", tags=tags)
    async def set_options(body: dict[str, Any]) -> None:
        normalised = Options.normalise(body)
        model = normalised.get("sd_model_checkpoint")
        vae = normalised.get("sd_vae")
        if model is not None:
            state.registry.find(model)  # 404 naming the titles before anything changes
        if vae is not None:
            state.registry.find_vae(vae)

        def apply() -> None:
            if model is not None:
                entry = state.host.select(model)
                # A1111 loads the new checkpoint right away; so does this (under the queue).
                state.host.ensure_loaded(entry, state.registry.find_vae(vae or state.host.selected_vae))
            if vae is not None:
                state.host.selected_vae = vae
            state.options.update(normalised)

        await state.queue.run("options", apply)
        return None

    @app.get(f"{prefix}/cmd-flags", tags=tags)
    def cmd_flags() -> dict[str, Any]:
        c = state.config
        return {
            "listen": c.host not in ("127.0.0.1", "localhost", "::1"),
            "port": c.port,
            "ckpt_dir": [str(p) for p in c.ckpt_dirs],
            "vae_dir": [str(p) for p in c.vae_dirs],
            "lora_dir": str(c.lora_dir) if c.lora_dir else None,
            "embeddings_dir": str(c.embeddings_dir) if c.embeddings_dir else None,
            "hypernetwork_dir": str(c.hypernetwork_dir) if c.hypernetwork_dir else None,
            "api": True,
            "nowebui": not c.ui,
            "api_auth": "***" if c.credentials else None,
            "cors_allow_origins": ",".join(c.cors_allow_origins) or None,
            "device": c.device,
            "studies_dir": str(c.studies_dir) if c.studies_dir else None,
        }

    @app.get(f"{prefix}/samplers", tags=tags, response_model=list[m.SamplerItem])
    def samplers() -> list[m.SamplerItem]:
        out = []
        for spec in SAMPLERS:
            options: dict[str, Any] = dict(spec.options)
            if spec.default_scheduler:
                options["scheduler"] = spec.default_scheduler
            for flag in ("second_order", "uses_ensd", "discard_next_to_last_sigma", "brownian_noise"):
                if getattr(spec, flag):
                    options[flag] = True
            out.append(m.SamplerItem(name=spec.label, aliases=list(spec.aliases), options=options))
        return out

    @app.get(f"{prefix}/schedulers", tags=tags, response_model=list[m.SchedulerItem])
    def schedulers() -> list[m.SchedulerItem]:
        return [
            m.SchedulerItem(
                name=s.name,
                label=s.label,
                aliases=list(s.aliases) or None,
                default_rho=s.default_rho if s.default_rho is not None else -1.0,
                need_inner_model=s.needs_model,
            )
            for s in SCHEDULERS
        ]

    @app.get(f"{prefix}/upscalers", tags=tags, response_model=list[m.UpscalerItem])
    def upscalers() -> list[m.UpscalerItem]:
        return [
            m.UpscalerItem(name=name, scale=None)
            for name in hires_upscalers()
            if name not in LATENT_UPSCALE_MODES
        ]

    @app.get(f"{prefix}/latent-upscale-modes", tags=tags, response_model=list[m.LatentUpscalerModeItem])
    def latent_upscale_modes() -> list[m.LatentUpscalerModeItem]:
        return [m.LatentUpscalerModeItem(name=name) for name in LATENT_UPSCALE_MODES]

    @app.get(f"{prefix}/sd-models", tags=tags, response_model=list[m.SDModelItem])
    def sd_models() -> list[m.SDModelItem]:
        return [
            m.SDModelItem(
                title=e.title,
                model_name=e.model_name,
                hash=e.shorthash,
                sha256=e.sha256,
                filename=str(e.path),
                config=None,
            )
            for e in state.registry.checkpoints
        ]

    @app.get(f"{prefix}/sd-vae", tags=tags, response_model=list[m.SDVaeItem])
    def sd_vae() -> list[m.SDVaeItem]:
        return [m.SDVaeItem(model_name=e.name, filename=str(e.path)) for e in state.registry.vaes]

    @app.post(f"{prefix}/refresh-checkpoints", tags=tags)
    def refresh_checkpoints() -> None:
        state.registry.refresh()
        if state.host.selected is None and state.registry.checkpoints:
            state.host.selected = state.registry.checkpoints[0]

    @app.post(f"{prefix}/refresh-vae", tags=tags)
    def refresh_vae() -> None:
        state.registry.refresh_vaes()

    @app.post(f"{prefix}/refresh-embeddings", tags=tags)
    async def refresh_embeddings() -> None:
        await run_in_threadpool(state.networks.refresh_embeddings)
        # The model in memory gets the new files too; on the worker, so no generation sees half of it.
        await state.queue.run("refresh-embeddings", state.host.reload_embeddings)

    @app.get(f"{prefix}/embeddings", tags=tags, response_model=m.EmbeddingsResponse)
    def embeddings() -> m.EmbeddingsResponse:
        # A1111: "loaded" fit the current model's text encoder width, "skipped" do not.
        loaded, skipped = state.networks.embeddings_by_fit(state.text_width())
        return m.EmbeddingsResponse(
            loaded={name: m.EmbeddingItem(**info.api()) for name, info in loaded.items()},
            skipped={name: m.EmbeddingItem(**info.api()) for name, info in skipped.items()},
        )

    @app.post(f"{prefix}/refresh-loras", tags=tags)
    def refresh_loras() -> None:
        state.networks.refresh_loras()

    @app.get(f"{prefix}/loras", tags=tags, response_model=list[m.LoraItem])
    def loras() -> list[m.LoraItem]:
        return [
            m.LoraItem(name=e.name, alias=e.alias, path=str(e.path), metadata=e.metadata)
            for e in state.networks.loras
        ]

    @app.get(f"{prefix}/hypernetworks", tags=tags, response_model=list[m.HypernetworkItem])
    def hypernetworks() -> list[m.HypernetworkItem]:
        return [m.HypernetworkItem(name=e.name, path=str(e.path)) for e in state.networks.hypernetworks()]

    @app.get(f"{prefix}/prompt-styles", tags=tags, response_model=list[m.PromptStyleItem])
    def prompt_styles() -> list[m.PromptStyleItem]:
        return []

    @app.get(f"{prefix}/face-restorers", tags=tags)
    def face_restorers() -> list[dict[str, Any]]:
        return []

    @app.get(f"{prefix}/realesrgan-models", tags=tags)
    def realesrgan_models() -> list[dict[str, Any]]:
        return []

    @app.get(f"{prefix}/scripts", tags=tags, response_model=m.ScriptsList)
    def scripts() -> m.ScriptsList:
        return m.ScriptsList()

    @app.get(f"{prefix}/script-info", tags=tags)
    def script_info() -> list[dict[str, Any]]:
        return []

    @app.get(f"{prefix}/extensions", tags=tags)
    def extensions() -> list[dict[str, Any]]:
        return []

    @app.get(f"{prefix}/memory", tags=tags, response_model=m.MemoryResponse)
    def memory() -> m.MemoryResponse:
        return m.MemoryResponse(
            ram=_ram(), cuda={"error": "no CUDA device in use"} if state.config.device == "cpu" else _cuda()
        )


def _preview(latent: torch.Tensor) -> str | None:
    """A1111's "Approx cheap" live preview: a fixed linear map from the 4 SD1 latent channels to RGB."""
    from PIL import Image

    if latent.ndim != 4 or latent.shape[1] != 4:
        return None
    # The widely used SD1 latent->RGB factors (one row per latent channel).
    coefs = torch.tensor(
        [[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264], [-0.184, -0.271, -0.473]]
    )
    rgb = torch.einsum("chw,cr->hwr", latent[0].float(), coefs)
    pixels = ((rgb + 1.0) * 127.5).clamp(0, 255).to(torch.uint8).numpy()
    return encode_png(Image.fromarray(pixels), None)


def _ram() -> dict[str, Any]:
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError):
        return {"error": "unknown"}
    return {"free": free, "used": total - free, "total": total}


def _cuda() -> dict[str, Any]:
    if not torch.cuda.is_available():
        return {"error": "CUDA is not available"}
    free, total = torch.cuda.mem_get_info()
    return {"system": {"free": free, "used": total - free, "total": total}}


def _save_images(state: App, kind: str, generated: Generated) -> None:
    if state.config.outdir is None:
        log.info("save_images ignored: start the server with --outdir to save images")
        return
    from voidprompt.imagemeta import save_numbered

    folder = state.config.outdir / f"{kind}-images"
    folder.mkdir(parents=True, exist_ok=True)
    for image, text, seed in zip(
        generated.result.images, generated.result.infotexts, generated.result.seeds, strict=True
    ):
        save_numbered(image, folder, str(seed), text)


# ------------------------------------------------------------------------------------ /voidprompt/v1


def _voidprompt_routes(app: FastAPI, state: App) -> None:
    prefix = "/voidprompt/v1"
    tags: list[str | Enum] = ["voidprompt"]

    @app.post(f"{prefix}/tokens", tags=tags, response_model=m.TokensResponse)
    def tokens(body: m.TokensRequest) -> m.TokensResponse:
        from voidprompt.prompts.chunks import CHUNK_LENGTH, target_token_count, token_report, tokenize_line

        if len(body.text) > state.config.limits.max_prompt_chars:
            raise LimitError(
                f"text is over this server's limit of {state.config.limits.max_prompt_chars} characters"
            )
        tokenizer = state.tokenizer()
        embeddings = state.host.engine.encoder.embeddings if state.host.engine is not None else None
        emphasis, backtrack = body.emphasis, body.comma_padding_backtrack
        line = tokenize_line(
            body.text, tokenizer, embeddings, emphasis=emphasis, comma_padding_backtrack=backtrack
        )
        chunks = []
        for chunk in line.chunks:
            body_tokens = chunk.tokens[1:-1]
            used = len(body_tokens)
            while used > 0 and body_tokens[used - 1] == tokenizer.eos_id:
                used -= 1
            chunks.append(m.TokenChunk(tokens=used, padding=CHUNK_LENGTH - used))
        report = token_report(
            body.text, tokenizer, embeddings, emphasis=emphasis, comma_padding_backtrack=backtrack
        )
        return m.TokensResponse(
            token_count=line.token_count,
            target=target_token_count(line.token_count),
            chunks=chunks,
            report=report,
        )

    @app.get(f"{prefix}/studies", tags=tags, response_model=list[m.StudyItem])
    def studies() -> list[m.StudyItem]:
        state.studies.refresh()
        return [m.StudyItem(**state.studies.summary(entry)) for entry in state.studies.entries.values()]

    @app.get(f"{prefix}/studies/{{study_id}}", tags=tags, response_model=m.StudyItem)
    def study(study_id: str) -> m.StudyItem:
        return m.StudyItem(**state.studies.summary(state.studies.get(study_id)))

    @app.get(f"{prefix}/studies/{{study_id}}/images", tags=tags, response_model=m.StudyImagesResponse)
    def study_images(
        study_id: str,
        where: list[str] = Query(  # noqa: B008 - FastAPI's way to declare a repeatable query parameter
            default=[], description="axis=value filters (repeatable; values compared as text)"
        ),
        label: str | None = Query(None, description="only images whose effective label is this class"),
        unlabeled: bool = Query(False, description="only images without a human label"),
        offset: int = Query(0, ge=0),
        limit: int = Query(500, ge=1, le=5000),
    ) -> m.StudyImagesResponse:
        entry = state.studies.get(study_id)
        filters: dict[str, str] = {}
        for item in where:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise InvalidRequestError(f"where={item!r}: write axis=value, e.g. where=W=1.5")
            filters[key] = value
        with state.studies.open_readonly(entry) as catalog:
            classes, _axis_names = state.studies.scheme(entry, catalog)
            rows = catalog.images()
            labels = catalog.all_labels()
            labeled = human_labeled(catalog)
        axes: dict[str, list[Any]] = {}
        for row in rows:
            for key, value in row["axis_values"].items():
                values = axes.setdefault(key, [])
                if value not in values:
                    values.append(value)
        unknown = set(filters) - set(axes)
        if unknown:
            raise InvalidRequestError(
                f"where: unknown axis {sorted(unknown)[0]!r}; axes: {', '.join(axes) or '(none)'}"
            )
        selected = []
        for row in rows:
            if any(str(row["axis_values"].get(k)) != v for k, v in filters.items()):
                continue
            image_labels = labels.get(row["id"], {})
            record = image_record(row, image_labels, f"{prefix}/studies/{study_id}/images/{row['id']}/file")
            if label is not None and record["label"] != label:
                continue
            if unlabeled and image_labels.get("human", (None, []))[0] is not None:
                continue
            selected.append(record)
        return m.StudyImagesResponse(
            study=study_id,
            total=len(selected),
            labeled=labeled,
            all_images=len(rows),
            classes=list(classes),
            axes=axes,
            images=[m.StudyImage(**r) for r in selected[offset : offset + limit]],
        )

    @app.get(
        f"{prefix}/studies/{{study_id}}/images/{{image_id}}", tags=tags, response_model=m.StudyImageDetail
    )
    def study_image(study_id: str, image_id: int) -> m.StudyImageDetail:
        entry = state.studies.get(study_id)
        with state.studies.open_readonly(entry) as catalog:
            rows = [r for r in catalog.images() if r["id"] == image_id]
            if not rows:
                raise NotFoundError(f"study {study_id!r} has no image {image_id}")
            labels = catalog.labels(image_id)
            measures = catalog.measures(image_id)
        row = rows[0]
        record = image_record(row, labels, f"{prefix}/studies/{study_id}/images/{image_id}/file")
        return m.StudyImageDetail(
            **record, infotext=row["infotext"], settings=row["settings"], measures=dict(measures)
        )

    @app.get(
        f"{prefix}/studies/{{study_id}}/images/{{image_id}}/file", tags=tags, response_class=FileResponse
    )
    def study_image_file(study_id: str, image_id: int) -> FileResponse:
        entry = state.studies.get(study_id)
        return FileResponse(state.studies.image_file(entry, image_id))

    @app.get(f"{prefix}/studies/{{study_id}}/measures", tags=tags)
    def study_measures(study_id: str) -> dict[str, dict[str, float | None]]:
        entry = state.studies.get(study_id)
        with state.studies.open_readonly(entry) as catalog:
            return {str(k): dict(v) for k, v in catalog.all_measures().items()}

    @app.get(f"{prefix}/studies/{{study_id}}/labels", tags=tags)
    def study_labels(study_id: str) -> dict[str, dict[str, m.LabelValue]]:
        entry = state.studies.get(study_id)
        with state.studies.open_readonly(entry) as catalog:
            labels = catalog.all_labels()
        return {
            str(i): {s: m.LabelValue(label_class=c, tags=t) for s, (c, t) in v.items()}
            for i, v in labels.items()
        }

    @app.put(f"{prefix}/studies/{{study_id}}/labels/{{image_id}}", tags=tags, response_model=m.LabelValue)
    def put_label(study_id: str, image_id: int, body: m.LabelPut) -> m.LabelValue:
        entry = state.studies.get(study_id)
        if not body.source or len(body.source) > 64:
            raise InvalidRequestError("source: 1 to 64 characters, e.g. human")
        state.studies.set_label(entry, image_id, body.label_class, body.tags, body.source)
        return m.LabelValue(label_class=body.label_class, tags=body.tags)

    def report_response(study_id: str, stamp: dict[str, Any]) -> m.ReportResponse:
        base = f"{prefix}/studies/{study_id}/report"
        names = list(stamp["figures"])
        figures = []
        for name in names:
            if not name.lower().endswith(".png"):
                continue
            stem = name[: -len(".png")]
            kind = next((k for k in ("grid", "plot", "outcomes") if stem.startswith(k + "-")), "figure")
            svg = f"{stem}.svg"
            figures.append(
                m.ReportFigure(
                    name=name,
                    kind=kind,
                    url=f"{base}/figures/{name}",
                    svg_url=f"{base}/figures/{svg}" if svg in names else None,
                )
            )
        files = [m.ReportFile(name=name, url=f"{base}/{name}") for name in stamp["files"]]
        html = next((f.url for f in files if f.name.endswith(".html")), None)
        return m.ReportResponse(
            study=study_id,
            generated=str(stamp.get("generated", "")),
            built=bool(stamp.get("built")),
            html_url=html,
            figures=figures,
            files=files,
        )

    @app.get(f"{prefix}/studies/{{study_id}}/report", tags=tags, response_model=m.ReportResponse)
    def study_report(
        study_id: str, rebuild: bool = Query(False, description="build it again even if up to date")
    ) -> m.ReportResponse:
        """The lab's report of a study (figures, report.html, CSVs); built first when missing or
        older than the catalog's images, measures and labels."""
        entry = state.studies.get(study_id)
        return report_response(study_id, state.studies.report(entry, rebuild=rebuild))

    @app.post(f"{prefix}/studies/{{study_id}}/report", tags=tags, response_model=m.ReportResponse)
    def rebuild_study_report(study_id: str) -> m.ReportResponse:
        entry = state.studies.get(study_id)
        return report_response(study_id, state.studies.report(entry, rebuild=True))

    @app.get(f"{prefix}/studies/{{study_id}}/report/figures/{{name}}", tags=tags, response_class=FileResponse)
    def study_report_figure(study_id: str, name: str) -> FileResponse:
        entry = state.studies.get(study_id)
        return FileResponse(state.studies.report_file(entry, name, figure=True))

    @app.get(f"{prefix}/studies/{{study_id}}/report/{{name}}", tags=tags, response_class=FileResponse)
    def study_report_file(study_id: str, name: str) -> FileResponse:
        entry = state.studies.get(study_id)
        return FileResponse(state.studies.report_file(entry, name, figure=False))

    @app.get(f"{prefix}/studies/{{study_id}}/run", tags=tags, response_model=m.RunStatus)
    def run_status(study_id: str) -> m.RunStatus:
        entry = state.studies.get(study_id)
        handle = state.studies.runs.get(entry.id)
        if handle is None:
            return m.RunStatus(study=study_id, running=False)
        return m.RunStatus(
            study=study_id,
            running=handle.process.poll() is None,
            returncode=handle.process.poll(),
            log_tail="\n".join(handle.log),
        )

    @app.post(f"{prefix}/studies/{{study_id}}/run", tags=tags, response_model=m.RunStatus)
    def start_run(study_id: str, max_jobs: int | None = None, batch_size: int | None = None) -> m.RunStatus:
        entry = state.studies.get(study_id)
        state.studies.start_run(entry, max_jobs=max_jobs, batch_size=batch_size)
        return m.RunStatus(study=study_id, running=True)

    @app.post(f"{prefix}/studies/{{study_id}}/stop", tags=tags, response_model=m.RunStatus)
    def stop_run(study_id: str) -> m.RunStatus:
        entry = state.studies.get(study_id)
        handle = state.studies.stop_run(entry)
        if handle is None:
            return m.RunStatus(study=study_id, running=False)
        return m.RunStatus(
            study=study_id, running=False, returncode=handle.process.poll(), log_tail="\n".join(handle.log)
        )
