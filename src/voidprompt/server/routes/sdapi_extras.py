"""A1111's extras routes: ``/sdapi/v1/extra-single-image`` and ``/sdapi/v1/extra-batch-images``
(its ``ExtrasSingleImageRequest`` / ``ExtrasBatchImagesRequest`` bodies and responses), upscaling
through :mod:`voidprompt.models.upscalers`. Face restoration (GFPGAN, CodeFormer) is not part of
voidprompt: a visibility above 0 is refused instead of being silently skipped."""

from __future__ import annotations

import base64
import io
from enum import Enum
from typing import Literal

from fastapi import APIRouter
from PIL import Image, PngImagePlugin
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from voidprompt.errors import InvalidRequestError
from voidprompt.models.upscalers.extras import (
    ExtrasUpscale,
    extras_infotext,
    extras_upscale,
    plaintext_to_html,
)
from voidprompt.server.generation import decode_image
from voidprompt.server.limits import LimitError
from voidprompt.server.routes import SDAPI
from voidprompt.server.state import App

__all__ = ["ExtrasBatchImagesRequest", "ExtrasSingleImageRequest", "router"]

# An extras result may be this many times the server's per-picture pixel limit (--max-pixels): a 4x
# upscale of a picture at the limit is what the route is for, within memory for Pillow's pastes.
OUTPUT_PIXELS_FACTOR = 16


class ExtrasBaseRequest(BaseModel):
    resize_mode: Literal[0, 1] = 0
    show_extras_results: bool = True
    gfpgan_visibility: float = Field(default=0, ge=0, le=1, allow_inf_nan=False)
    codeformer_visibility: float = Field(default=0, ge=0, le=1, allow_inf_nan=False)
    codeformer_weight: float = Field(default=0, ge=0, le=1, allow_inf_nan=False)
    upscaling_resize: float = Field(default=2, gt=0, le=8, allow_inf_nan=False)
    upscaling_resize_w: int = Field(default=512, ge=1)
    upscaling_resize_h: int = Field(default=512, ge=1)
    upscaling_crop: bool = True
    upscaler_1: str = "None"
    upscaler_2: str = "None"
    extras_upscaler_2_visibility: float = Field(default=0, ge=0, le=1, allow_inf_nan=False)
    upscale_first: bool = False  # A1111 1.10 accepts it and ignores it: its scripts run in a fixed order


class ExtrasSingleImageRequest(ExtrasBaseRequest):
    image: str = ""


class FileData(BaseModel):
    data: str
    name: str


class ExtrasBatchImagesRequest(ExtrasBaseRequest):
    imageList: list[FileData]


class ExtrasSingleImageResponse(BaseModel):
    html_info: str
    image: str | None = None


class ExtrasBatchImagesResponse(BaseModel):
    html_info: str
    images: list[str]


def _settings(body: ExtrasBaseRequest) -> ExtrasUpscale:
    for name, value in (
        ("gfpgan_visibility", body.gfpgan_visibility),
        ("codeformer_visibility", body.codeformer_visibility),
    ):
        if value > 0:
            raise InvalidRequestError(
                f"{name}={value}: no face restorer is installed (A1111's are GFPGAN and CodeFormer; "
                f"voidprompt has neither); send {name}=0"
            )
    return ExtrasUpscale(
        mode=body.resize_mode,
        upscale_by=body.upscaling_resize,
        to_width=body.upscaling_resize_w,
        to_height=body.upscaling_resize_h,
        crop=body.upscaling_crop,
        upscaler_1=body.upscaler_1,
        upscaler_2=body.upscaler_2,
        upscaler_2_visibility=body.extras_upscaler_2_visibility,
    )


def _encode(image: Image.Image, texts: dict[str, str]) -> str:
    # A1111 writes the picture's own text chunks back with "postprocessing" added.
    info = PngImagePlugin.PngInfo()
    for key, value in texts.items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def router(state: App) -> APIRouter:
    router = APIRouter()
    tags: list[str | Enum] = ["sdapi"]
    limits = state.config.limits

    def decode_all(data: list[tuple[str, str]], settings: ExtrasUpscale) -> list[Image.Image]:
        images = [decode_image(raw, what, limits.max_pixels) for what, raw in data]
        cap = limits.max_pixels * OUTPUT_PIXELS_FACTOR
        for (what, _), im in zip(data, images, strict=True):
            w, h = settings.output_size(im.width, im.height)
            if w * h > cap:
                raise LimitError(
                    f"{what}: the upscaled picture would be {w}x{h} = {w * h} pixels, over this server's "
                    f"limit of {cap} ({OUTPUT_PIXELS_FACTOR} x --max-pixels); ask for a smaller scale"
                )
        return images

    def process(images: list[Image.Image], settings: ExtrasUpscale) -> tuple[list[str], str]:
        out: list[str] = []
        infotext = ""
        for image in images:
            texts = {k: v for k, v in image.info.items() if isinstance(k, str) and isinstance(v, str)}
            result, info = extras_upscale(image, settings, state.upscalers)
            infotext = extras_infotext(info)
            texts["postprocessing"] = infotext
            out.append(_encode(result, texts))
        return out, plaintext_to_html(infotext)

    async def run(data: list[tuple[str, str]], body: ExtrasBaseRequest) -> tuple[list[str], str]:
        settings = _settings(body)
        settings.check(state.upscalers)
        images = await run_in_threadpool(decode_all, data, settings)
        return await state.queue.run("extras", lambda: process(images, settings))

    @router.post(f"{SDAPI}/extra-single-image", tags=tags, response_model=ExtrasSingleImageResponse)
    async def extra_single_image(body: ExtrasSingleImageRequest) -> ExtrasSingleImageResponse:
        images, html_info = await run([("image", body.image)], body)
        return ExtrasSingleImageResponse(html_info=html_info, image=images[0])

    @router.post(f"{SDAPI}/extra-batch-images", tags=tags, response_model=ExtrasBatchImagesResponse)
    async def extra_batch_images(body: ExtrasBatchImagesRequest) -> ExtrasBatchImagesResponse:
        data = [(f"imageList[{i}] ({f.name})", f.data) for i, f in enumerate(body.imageList)]
        images, html_info = await run(data, body)
        return ExtrasBatchImagesResponse(html_info=html_info, images=images)

    return router
