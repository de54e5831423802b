"""A GenerationRequest from an infotext alone, as A1111 does when regenerating an image.

The parsed parameters map onto request fields (``infotext.request_fields_from_params``); then the
compatibility switches A1111 turns on for infotexts written by older versions are applied
(``sampling.compat.backcompat_overrides``: old prompt-editing timelines, Pad conds v0, downcast
alphas_cumprod). voidprompt's own ``Version: voidprompt-x.y`` never triggers them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from voidprompt.infotext import parse_generation_parameters, request_fields_from_params
from voidprompt.request import GenerationRequest
from voidprompt.sampling.compat import backcompat_overrides

_REQUEST_FIELDS = frozenset(f.name for f in dataclasses.fields(GenerationRequest))


def request_from_infotext(text: str, **overrides: Any) -> GenerationRequest:
    """The request that regenerates the image ``text`` describes; ``overrides`` win over it."""
    params = parse_generation_parameters(text)
    fields = {k: v for k, v in request_fields_from_params(params).items() if k in _REQUEST_FIELDS}
    fields.update(
        backcompat_overrides(params.get("Version"), str(fields.get("prompt", "")), fields.get("sampler_name"))
    )
    fields.update(overrides)
    return GenerationRequest(**fields)
