"""voidprompt's prompt routes: ``tokens``, the web page's token counter and chunk report."""

from __future__ import annotations

from enum import Enum

from fastapi import APIRouter

from voidprompt.prompts.chunks import CHUNK_LENGTH, target_token_count, token_report, tokenize_line
from voidprompt.server import models as m
from voidprompt.server.limits import LimitError
from voidprompt.server.routes import VOIDPROMPT
from voidprompt.server.state import App

__all__ = ["router"]


def router(state: App) -> APIRouter:
    router = APIRouter()
    prefix = VOIDPROMPT
    tags: list[str | Enum] = ["voidprompt"]

    @router.post(f"{prefix}/tokens", tags=tags, response_model=m.TokensResponse)
    def tokens(body: m.TokensRequest) -> m.TokensResponse:
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

    return router
