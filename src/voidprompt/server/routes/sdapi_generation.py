"""A1111's generation routes: ``txt2img``, ``img2img``, ``png-info``, ``progress``, ``interrupt`` and
``skip``."""

from __future__ import annotations

import datetime
import json
import logging
from enum import Enum
from typing import Any

import torch
from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from PIL import Image

from voidprompt.errors import InvalidRequestError
from voidprompt.explain.record import ExplainOptions
from voidprompt.explain.store import explanation_path, save_explanation
from voidprompt.imagemeta import read_infotext, save_numbered
from voidprompt.infotext import parse_generation_parameters
from voidprompt.lab.catalog import disk_full_stops
from voidprompt.models.latent_rgb import CHEAP_SD1, LatentRGB, latent_rgb_for
from voidprompt.server import models as m
from voidprompt.server import xyz
from voidprompt.server.generation import (
    BuiltRequest,
    Generated,
    build_request,
    decode_image,
    encode_png,
    processed_info,
)
from voidprompt.server.routes import SDAPI
from voidprompt.server.state import App

__all__ = ["router", "run_generation"]

log = logging.getLogger(__name__)


async def run_generation(
    state: App, kind: str, body: m.Txt2ImgRequest, img2img: bool, explain: ExplainOptions | None = None
) -> tuple[m.GenerationResponse, Generated]:
    """One txt2img / img2img call as A1111 answers it, and what was generated; voidprompt's own
    generation routes run through here too (``explain``: the capture, which they alone ask for)."""
    if xyz.is_xyz_plot(body.script_name):
        return await _run_plot(state, kind, body, img2img, explain)
    built: BuiltRequest = await run_in_threadpool(
        build_request, body, state.options, state.config.limits, img2img=img2img, upscalers=state.upscalers
    )
    built.explain = explain
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
    response = m.GenerationResponse(
        images=images if images is not None else [], parameters=_echo(body), info=json.dumps(info)
    )
    return response, generated


def _echo(body: m.Txt2ImgRequest) -> dict[str, Any]:
    parameters = body.model_dump()
    if isinstance(body, m.Img2ImgRequest) and not body.include_init_images:
        # A1111 leaves the (large) input images out of the echo unless asked.
        parameters["init_images"] = None
        parameters["mask"] = None
    return parameters


async def _run_plot(
    state: App, kind: str, body: m.Txt2ImgRequest, img2img: bool, explain: ExplainOptions | None
) -> tuple[m.GenerationResponse, Generated]:
    """A1111's X/Y/Z plot script (``script_name``): its cells as one job, answered with its grid."""
    if explain is not None:
        raise InvalidRequestError("explain: not available with the X/Y/Z plot; generate its cells one by one")
    limits = state.config.limits
    plan = await run_in_threadpool(
        xyz.plan_plot,
        body,
        state.options,
        limits,
        state.registry,
        img2img=img2img,
        upscalers=state.upscalers,
    )
    result = await state.queue.run(kind, lambda: xyz.run_plot(state.host, kind, plan))
    answer = xyz.plot_answer(result)
    images: list[str] = []
    if body.send_images:
        images = await run_in_threadpool(
            lambda: [encode_png(im, text) for im, text in zip(answer.images, answer.infotexts, strict=True)]
        )
    if body.save_images:
        for generated in xyz.cells_generated(result):
            await run_in_threadpool(_save_images, state, kind, generated)
    response = m.GenerationResponse(images=images, parameters=_echo(body), info=json.dumps(answer.info))
    return response, result.first


def router(state: App) -> APIRouter:
    router = APIRouter()
    prefix = SDAPI
    tags: list[str | Enum] = ["sdapi"]

    @router.post(f"{prefix}/txt2img", tags=tags, response_model=m.GenerationResponse)
    async def txt2img(body: m.Txt2ImgRequest) -> m.GenerationResponse:
        return (await run_generation(state, "txt2img", body, img2img=False))[0]

    @router.post(f"{prefix}/img2img", tags=tags, response_model=m.GenerationResponse)
    async def img2img(body: m.Img2ImgRequest) -> m.GenerationResponse:
        return (await run_generation(state, "img2img", body, img2img=True))[0]

    @router.post(f"{prefix}/png-info", tags=tags, response_model=m.PngInfoResponse)
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
        parameters = parse_generation_parameters(text, style_db=state.styles) if text else {}
        return m.PngInfoResponse(info=text, items=safe, parameters=parameters)

    @router.get(f"{prefix}/progress", tags=tags, response_model=m.ProgressResponse)
    def progress(skip_current_image: bool = False) -> m.ProgressResponse:
        st = state.queue.state
        value, eta = st.progress()
        current_image = None
        latent = st.latent
        if not skip_current_image and latent is not None:
            engine = state.host.engine
            mapping = CHEAP_SD1 if engine is None else latent_rgb_for(engine.components)
            current_image = _preview(latent, mapping)
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

    @router.post(f"{prefix}/interrupt", tags=tags)
    def interrupt() -> dict[str, Any]:
        state.queue.interrupt()
        return {}

    @router.post(f"{prefix}/skip", tags=tags)
    def skip() -> dict[str, Any]:
        state.queue.skip()
        return {}

    return router


def _preview(latent: torch.Tensor, mapping: LatentRGB) -> str | None:
    """A1111's "Approx cheap" live preview of the batch's first latent (PNG, base64)."""
    if latent.ndim != 4 or latent.shape[1] != mapping.channels:
        return None
    pixels = mapping.to_rgb(latent[:1])[0].numpy()
    return encode_png(Image.fromarray(pixels), None)


def _save_images(state: App, kind: str, generated: Generated) -> None:
    if state.config.outdir is None:
        log.info("save_images ignored: this server was configured with no output folder")
        return
    # A1111's layout: outdir_<kind>_samples, then its "[date]" folder (the local date when saved).
    folder = state.config.outdir / f"{kind}-images" / datetime.date.today().isoformat()
    result = generated.result
    # A full disk is a 507 naming the folder, not a 500.
    with disk_full_stops(folder, retry="generate again"):
        folder.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(result.images):
            path = save_numbered(image, folder, str(result.seeds[i]), result.infotexts[i])
            if result.explanations:
                # Beside the picture, as the lab keeps a study image's.
                save_explanation(explanation_path(path), result.explanations[i])
