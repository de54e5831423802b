"""A1111's remaining routes that clients probe: prompt styles, face restorers, RealESRGAN models,
scripts (the X/Y/Z plot), extensions (none here, so an empty list), and memory use."""

from __future__ import annotations

import os
from enum import Enum
from typing import Any

import torch
from fastapi import APIRouter

from voidprompt.server import models as m
from voidprompt.server.routes import SDAPI
from voidprompt.server.state import App
from voidprompt.server.xyz import SCRIPT_NAME
from voidprompt.server.xyz import script_info as xyz_script_info

__all__ = ["router"]


def router(state: App) -> APIRouter:
    router = APIRouter()
    prefix = SDAPI
    tags: list[str | Enum] = ["sdapi"]

    @router.get(f"{prefix}/prompt-styles", tags=tags, response_model=list[m.PromptStyleItem])
    def prompt_styles() -> list[m.PromptStyleItem]:
        return [
            m.PromptStyleItem(name=s.name, prompt=s.prompt, negative_prompt=s.negative_prompt)
            for s in state.styles.styles
        ]

    @router.get(f"{prefix}/face-restorers", tags=tags)
    def face_restorers() -> list[dict[str, Any]]:
        return []

    @router.get(f"{prefix}/realesrgan-models", tags=tags)
    def realesrgan_models() -> list[dict[str, Any]]:
        return []

    @router.get(f"{prefix}/scripts", tags=tags, response_model=m.ScriptsList)
    def scripts() -> m.ScriptsList:
        return m.ScriptsList(txt2img=[SCRIPT_NAME], img2img=[SCRIPT_NAME])

    @router.get(f"{prefix}/script-info", tags=tags)
    def script_info() -> list[dict[str, Any]]:
        return [xyz_script_info(img2img=False), xyz_script_info(img2img=True)]

    @router.get(f"{prefix}/extensions", tags=tags)
    def extensions() -> list[dict[str, Any]]:
        return []

    @router.get(f"{prefix}/memory", tags=tags, response_model=m.MemoryResponse)
    def memory() -> m.MemoryResponse:
        return m.MemoryResponse(
            ram=_ram(), cuda={"error": "no CUDA device in use"} if state.config.device == "cpu" else _cuda()
        )

    return router


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
