"""A1111's ``/sdapi/v1/interrogate``: ``{"image", "model"}`` in, ``{"caption"}`` out.

``model`` is A1111's ``deepdanbooru`` (its ``model-resnet_custom_v3.pt``, looked for where A1111
keeps it, ``models/torch_deepdanbooru``; ``serve --deepdanbooru-dir``), or the name of a WD14 tagger
folder (``models/wd14/<name>/`` holding ``model.onnx`` and ``selected_tags.csv``; ``serve
--wd14-dir``). A1111's default, ``clip`` (BLIP captions ranked by CLIP), is not something voidprompt
runs: it answers an error naming what it would need and what to use instead. Any other name is
A1111's 404 ``Model not found``. Names are looked up in the scanned folder, never joined onto a path.
"""

from __future__ import annotations

import threading
from enum import Enum
from pathlib import Path

import torch
from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from voidprompt.models.taggers.deepdanbooru import DEFAULT_FILE
from voidprompt.models.taggers.result import TaggerError
from voidprompt.pipeline.interrogate import DEEPDANBOORU, Tagger, open_tagger, scan_wd14_folder
from voidprompt.server.generation import decode_image
from voidprompt.server.routes import SDAPI
from voidprompt.server.state import App

__all__ = ["CLIP", "InterrogateRequest", "InterrogateResponse", "TaggerHost", "router"]

CLIP = "clip"


class InterrogateRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    image: str = Field("", description="base64 image (PNG, JPEG, WebP; data: URLs accepted)")
    model: str = Field(CLIP, description='"deepdanbooru" or a WD14 tagger folder name ("clip" is not run)')


class InterrogateResponse(BaseModel):
    caption: str


class UnknownTaggerError(TaggerError):
    """A model name that is neither DeepDanbooru nor a WD14 tagger found in the folder."""


class TaggerHost:
    """The taggers the server can open, each opened once on first use and kept."""

    def __init__(self, deepdanbooru_dir: Path, wd14_dir: Path, device: torch.device | str = "cpu") -> None:
        self.deepdanbooru_file = deepdanbooru_dir / DEFAULT_FILE.name
        self.wd14_dir = wd14_dir
        self.device = device
        self._open: dict[str, Tagger] = {}
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        return [DEEPDANBOORU, *scan_wd14_folder(self.wd14_dir)]

    def get(self, name: str) -> Tagger:
        if name == CLIP:
            raise TaggerError(
                'interrogate model "clip": A1111\'s CLIP interrogator (a BLIP captioner, '
                "model_base_caption_capfilt_large.pth, ranked by OpenCLIP ViT-L/14) is not available in "
                f'voidprompt; use model "{DEEPDANBOORU}" (place {DEFAULT_FILE.name} in '
                f"{self.deepdanbooru_file.parent}) or a WD14 tagger folder in {self.wd14_dir}"
            )
        with self._lock:
            if name not in self._open:
                self._open[name] = self._load(name)
            return self._open[name]

    def _load(self, name: str) -> Tagger:
        if name == DEEPDANBOORU:
            return open_tagger(self.deepdanbooru_file, device=self.device)
        folder = scan_wd14_folder(self.wd14_dir).get(name)
        if folder is None:
            raise UnknownTaggerError(f"interrogate model {name!r}: not found; available: {self.names()}")
        return open_tagger(folder, device=self.device)


def _model_not_found() -> JSONResponse:
    # A1111 raises HTTPException(404, "Model not found"); its handler answers in this shape.
    detail = "Model not found"
    return JSONResponse(
        status_code=404,
        content={"error": "HTTPException", "detail": detail, "body": "", "errors": f"404: {detail}"},
    )


def router(state: App) -> APIRouter:
    router = APIRouter()
    tags: list[str | Enum] = ["sdapi"]
    config = state.config
    host = TaggerHost(config.deepdanbooru_dir, config.wd14_dir, state.host.device)

    @router.post(f"{SDAPI}/interrogate", tags=tags, response_model=InterrogateResponse)
    async def interrogate(body: InterrogateRequest) -> InterrogateResponse | JSONResponse:
        image: Image.Image = await run_in_threadpool(
            decode_image, body.image, "image", config.limits.max_pixels
        )
        try:
            tagger = await run_in_threadpool(host.get, body.model)
        except UnknownTaggerError:
            return _model_not_found()

        def run() -> str:
            return tagger.caption(tagger.tag(image.convert("RGB")))

        # A1111 interrogates under its queue lock: never beside a generation.
        return InterrogateResponse(caption=await state.queue.run("interrogate", run))

    return router
