"""Hires fix with a model upscaler: the second pass starts from the first pass's picture run through
the ESRGAN file (then Lanczos to the hires size), as A1111's resize_image does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import voidprompt.pipeline.engine as engine_module
from voidprompt.models.upscalers.files import load_rrdbnet
from voidprompt.models.upscalers.registry import Upscalers
from voidprompt.models.upscalers.tiled import upscale_with_model
from voidprompt.pipeline.engine import Engine
from voidprompt.pipeline.images import pil_to_tensor
from voidprompt.request import GenerationRequest
from voidprompt.testing.tiny_upscalers import write_tiny_rrdb


def test_hires_with_a_model_upscaler(
    tiny_engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_file = write_tiny_rrdb(tmp_path / "ESRGAN" / "4x-Tiny.pth", "old", seed=7, nf=4, gc=4)
    monkeypatch.setattr(tiny_engine, "upscalers", Upscalers.in_models_dir(tmp_path))
    lowres: list[Image.Image] = []
    encoded: list[torch.Tensor] = []
    real_to_pil, real_encode = engine_module.to_pil_images, engine_module.encode_images

    def to_pil(*args: Any, **kwargs: Any) -> list[Image.Image]:
        out = real_to_pil(*args, **kwargs)
        lowres.extend(out)
        return out

    def encode(components: Any, pixels: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        encoded.append(pixels.detach().cpu())
        return real_encode(components, pixels, *args, **kwargs)

    monkeypatch.setattr(engine_module, "to_pil_images", to_pil)
    monkeypatch.setattr(engine_module, "encode_images", encode)
    request = GenerationRequest(
        prompt="a hill",
        seed=3,
        steps=2,
        width=32,
        height=32,
        enable_hr=True,
        hr_scale=1.5,
        hr_upscaler="4x-Tiny",
        hr_second_pass_steps=1,
    )
    result = tiny_engine.generate(request)
    assert result.images[0].size == (48, 48)
    assert "Hires upscaler: 4x-Tiny" in result.infotexts[0]
    # By hand: one 4x pass of the 32 px picture (128 px >= 48), Lanczos to 48 (already a multiple of 8).
    net = load_rrdbnet(model_file)
    expected = upscale_with_model(net, lowres[0]).resize((48, 48), Image.Resampling.LANCZOS)
    np.testing.assert_array_equal(encoded[0].numpy(), (pil_to_tensor([expected]) * 2.0 - 1.0).numpy())
