"""voidprompt's own generation routes: ``txt2img`` and ``img2img`` take A1111's bodies plus
``explain`` and answer A1111's response plus ``explanations``, one id per image, kept in the
server's memory (:class:`~voidprompt.server.explanations.ExplanationCache`) and served by
:mod:`voidprompt.server.routes.voidprompt_explain`. They run through A1111's routes' own code
(:func:`~voidprompt.server.routes.sdapi_generation.run_generation`), so the pictures, the info and
the saved files are the same; A1111's routes never see the new fields."""

from __future__ import annotations

from enum import Enum

from fastapi import APIRouter

from voidprompt.server import models as m
from voidprompt.server.explanations import explain_options
from voidprompt.server.routes import VOIDPROMPT
from voidprompt.server.routes.sdapi_generation import run_generation
from voidprompt.server.state import App

__all__ = ["router"]


def router(state: App) -> APIRouter:
    router = APIRouter()
    prefix = VOIDPROMPT
    tags: list[str | Enum] = ["voidprompt"]

    async def explained(
        kind: str, body: m.VoidpromptTxt2ImgRequest | m.VoidpromptImg2ImgRequest, img2img: bool
    ) -> m.VoidpromptGenerationResponse:
        wanted = body.explain
        options = None
        if wanted is not None:
            options = explain_options(wanted.per_token, wanted.preview_every, wanted.vae_calls)
        response, generated = await run_generation(state, kind, body, img2img, options)
        result = generated.result
        refs = []
        # The capture's explanations are the pictures' own, one each in image order.
        for i, explanation in enumerate(result.explanations):
            seed = result.seeds[i]
            key = state.explanations.add(explanation, result.images[i])
            refs.append(m.ExplanationRef(id=key, url=f"{prefix}/explanations/{key}", image=i, seed=seed))
        return m.VoidpromptGenerationResponse(**response.model_dump(), explanations=refs)

    @router.post(f"{prefix}/txt2img", tags=tags, response_model=m.VoidpromptGenerationResponse)
    async def txt2img(body: m.VoidpromptTxt2ImgRequest) -> m.VoidpromptGenerationResponse:
        return await explained("txt2img", body, img2img=False)

    @router.post(f"{prefix}/img2img", tags=tags, response_model=m.VoidpromptGenerationResponse)
    async def img2img(body: m.VoidpromptImg2ImgRequest) -> m.VoidpromptGenerationResponse:
        return await explained("img2img", body, img2img=True)

    return router
