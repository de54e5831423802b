"""Test helpers that watch the Engine from outside."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from voidprompt.pipeline import engine as engine_module
from voidprompt.pipeline.engine import Engine
from voidprompt.request import GenerationRequest


def sampled_latents(
    engine: Engine, request: GenerationRequest, monkeypatch: pytest.MonkeyPatch
) -> torch.Tensor:
    """The latents ``engine.generate(request)`` hands to the VAE (the sampler's result)."""
    captured: dict[str, torch.Tensor] = {}
    original = engine_module.decode_latents

    def spy(components: Any, latents: torch.Tensor, **options: Any) -> torch.Tensor:
        captured["latents"] = latents.clone()
        return original(components, latents, **options)

    monkeypatch.setattr(engine_module, "decode_latents", spy)
    engine.generate(request)
    monkeypatch.setattr(engine_module, "decode_latents", original)
    return captured["latents"]
