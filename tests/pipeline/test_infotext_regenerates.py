"""An image's own infotext is enough to regenerate it, through the path the HTTP API's infotext takes."""

from __future__ import annotations

import numpy as np

from voidprompt.infotext import request_fields_from_infotext
from voidprompt.pipeline.engine import Engine
from voidprompt.request import GenerationRequest


def test_our_infotext_regenerates_our_image(tiny_engine: Engine) -> None:
    request = GenerationRequest(
        prompt="a [b:c:2]",
        negative_prompt="(lowres:1.1)",
        seed=77,
        steps=4,
        width=64,
        height=64,
        sampler_name="Euler a",
        clip_skip=2,
        eta_noise_seed_delta=31337,
    )
    first = tiny_engine.generate(request)
    again = tiny_engine.generate(GenerationRequest(**request_fields_from_infotext(first.infotexts[0])))
    assert np.array_equal(np.asarray(first.images[0]), np.asarray(again.images[0]))
    assert again.infotexts == first.infotexts
