"""voidprompt's explanation routes, the same four for a generation's explanation (by the id its
answer gave) and for a study image's (its ``NAME.explain.npz``):

- ``.../`` the JSON description: tags with weight and measures per window, windows, calls,
  guidance differences, previews and the URLs of their pictures;
- ``.../heatmap.png?tag=KEY&window=all``: a tag's attention over the picture (``overlay=false``:
  the map alone at its own size; ``token=INDEX`` in place of ``tag`` with per-token maps);
- ``.../previews/{index}/{subject}.png``: a trajectory step's prompt / negative / combined picture
  or difference map;
- ``.../vae/{call}.png``: a full-VAE preview.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import Response

from voidprompt.explain.record import WINDOW_ALL
from voidprompt.server.explanations import (
    ExplanationSource,
    StudyExplanations,
    describe,
    heatmap_png,
    preview_png,
    vae_png,
)
from voidprompt.server.routes import VOIDPROMPT
from voidprompt.server.routes.voidprompt_studies import image_id_param
from voidprompt.server.state import App

__all__ = ["router"]

# A generation's explanation never changes under its id; a study's file may be captured again.
_KEPT = {"Cache-Control": "private, max-age=86400"}
_FILE = {"Cache-Control": "no-cache"}


def _png(data: bytes, headers: dict[str, str]) -> Response:
    return Response(content=data, media_type="image/png", headers=headers)


@dataclass
class HeatmapQuery:
    """The heatmap routes' query: which map, in which window, drawn how."""

    tag: str | None = Query(None, description="a tag's key, e.g. negative:lowres")
    token: int | None = Query(None, description="a token's index (per-token maps only)")
    window: str = Query(WINDOW_ALL, description="all, early, middle, late (hires with hires fix)")
    overlay: bool = Query(True, description="over the picture (false: the map alone)")
    alpha: float = Query(0.6, ge=0.0, le=1.0, description="the heatmap's weight over the picture")

    def png(self, source: ExplanationSource) -> bytes:
        return heatmap_png(
            source,
            tag=self.tag,
            token=self.token,
            window=self.window,
            over_picture=self.overlay,
            alpha=self.alpha,
        )


def router(state: App) -> APIRouter:
    router = APIRouter()
    prefix = VOIDPROMPT
    tags: list[str | Enum] = ["voidprompt"]
    study_files = StudyExplanations()

    def kept(explanation_id: str) -> ExplanationSource:
        return state.explanations.get(explanation_id)

    def study(study_id: str, image_id: int) -> ExplanationSource:
        entry = state.studies.get(study_id)
        image, explanation = state.studies.explanation_file(entry, image_id)
        return study_files.source(image, explanation)

    # ------------------------------------------------------------------ a generation's explanation

    memory = f"{prefix}/explanations/{{explanation_id}}"

    @router.get(memory, tags=tags)
    def explanation(explanation_id: str) -> dict[str, Any]:
        return describe(kept(explanation_id).explanation, f"{prefix}/explanations/{explanation_id}")

    @router.get(f"{memory}/heatmap.png", tags=tags, response_class=Response)
    def heatmap(explanation_id: str, query: Annotated[HeatmapQuery, Depends()]) -> Response:
        return _png(query.png(kept(explanation_id)), _KEPT)

    @router.get(f"{memory}/previews/{{index}}/{{subject}}.png", tags=tags, response_class=Response)
    def preview(explanation_id: str, index: int, subject: str) -> Response:
        return _png(preview_png(kept(explanation_id), index, subject), _KEPT)

    @router.get(f"{memory}/vae/{{call}}.png", tags=tags, response_class=Response)
    def vae(explanation_id: str, call: int) -> Response:
        return _png(vae_png(kept(explanation_id), call), _KEPT)

    # ------------------------------------------------------------------- a study image's explanation

    studied = f"{prefix}/studies/{{study_id}}/images/{{image_id}}/explanation"

    @router.get(studied, tags=tags)
    def study_explanation(study_id: str, image_id: int = image_id_param()) -> dict[str, Any]:
        base = f"{prefix}/studies/{study_id}/images/{image_id}/explanation"
        return describe(study(study_id, image_id).explanation, base)

    @router.get(f"{studied}/heatmap.png", tags=tags, response_class=Response)
    def study_heatmap(
        study_id: str, query: Annotated[HeatmapQuery, Depends()], image_id: int = image_id_param()
    ) -> Response:
        return _png(query.png(study(study_id, image_id)), _FILE)

    @router.get(f"{studied}/previews/{{index}}/{{subject}}.png", tags=tags, response_class=Response)
    def study_preview(study_id: str, index: int, subject: str, image_id: int = image_id_param()) -> Response:
        return _png(preview_png(study(study_id, image_id), index, subject), _FILE)

    @router.get(f"{studied}/vae/{{call}}.png", tags=tags, response_class=Response)
    def study_vae(study_id: str, call: int, image_id: int = image_id_param()) -> Response:
        return _png(vae_png(study(study_id, image_id), call), _FILE)

    return router
