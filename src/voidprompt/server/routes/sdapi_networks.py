"""A1111's extra-network routes: embeddings, LoRAs and hypernetworks, listed and refreshed."""

from __future__ import annotations

from enum import Enum

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool

from voidprompt.server import models as m
from voidprompt.server.routes import SDAPI
from voidprompt.server.state import App

__all__ = ["router"]


def router(state: App) -> APIRouter:
    router = APIRouter()
    prefix = SDAPI
    tags: list[str | Enum] = ["sdapi"]

    @router.post(f"{prefix}/refresh-embeddings", tags=tags)
    async def refresh_embeddings() -> None:
        await run_in_threadpool(state.networks.refresh_embeddings)
        # The model in memory gets the new files too; on the worker, so no generation sees half of it.
        await state.queue.run("refresh-embeddings", state.host.reload_embeddings)

    @router.get(f"{prefix}/embeddings", tags=tags, response_model=m.EmbeddingsResponse)
    def embeddings() -> m.EmbeddingsResponse:
        # A1111: "loaded" fit the current model's text encoder width, "skipped" do not.
        loaded, skipped = state.networks.embeddings_by_fit(state.text_width())
        return m.EmbeddingsResponse(
            loaded={name: m.EmbeddingItem(**info.api()) for name, info in loaded.items()},
            skipped={name: m.EmbeddingItem(**info.api()) for name, info in skipped.items()},
        )

    @router.post(f"{prefix}/refresh-loras", tags=tags)
    def refresh_loras() -> None:
        state.networks.refresh_loras()

    @router.get(f"{prefix}/loras", tags=tags, response_model=list[m.LoraItem])
    def loras() -> list[m.LoraItem]:
        return [
            m.LoraItem(name=e.name, alias=e.alias, path=str(e.path), metadata=e.metadata)
            for e in state.networks.loras
        ]

    @router.get(f"{prefix}/hypernetworks", tags=tags, response_model=list[m.HypernetworkItem])
    def hypernetworks() -> list[m.HypernetworkItem]:
        return [m.HypernetworkItem(name=e.name, path=str(e.path)) for e in state.networks.hypernetworks()]

    return router
