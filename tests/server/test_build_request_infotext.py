"""The API's ``infotext`` field: the fields come from infotext.to_request, the client's own win."""

from __future__ import annotations

from typing import Any

import pytest

from voidprompt.infotext import request_fields_from_infotext
from voidprompt.request import GenerationRequest
from voidprompt.server.generation import Options, build_request
from voidprompt.server.limits import Limits
from voidprompt.server.models import Txt2ImgRequest

OLD = (
    "a [cat:dog:0.5]\nNegative prompt: lowres\n"
    "Steps: 20, Sampler: DDIM, CFG scale: 7, Seed: 965400086, Size: 512x512, Model hash: 45dee52b, "
    "Clip skip: 2, ENSD: 31337, Version: v1.5.1"
)
SWITCHES = ("use_old_scheduling", "pad_cond_uncond_v0", "use_downcasted_alpha_bar")


def _built(**body: Any) -> GenerationRequest:
    return build_request(Txt2ImgRequest(**body), Options(), Limits()).request


def test_client_fields_win_over_the_infotext() -> None:
    request = _built(infotext=OLD, steps=5, width=64)
    assert (request.steps, request.width) == (5, 64)
    assert (request.sampler_name, request.seed, request.height) == ("DDIM", 965400086, 512)
    assert request.clip_skip == 2


@pytest.mark.parametrize(
    ("version", "on"),
    [
        ("v1.5.1", set(SWITCHES)),
        # A post-release of 1.6.0: only the downcast switch (A1111 reads it as above 1.6.0).
        ("1.6.0.post1.dev2", {"use_downcasted_alpha_bar"}),
        ("v1.6.0-RC-12-gabc", set(SWITCHES)),
        ("voidprompt-0.1.0", set()),
        ("v1.10.1", set()),
    ],
)
def test_version_switches_reach_the_request(version: str, on: set[str]) -> None:
    text = OLD.replace("v1.5.1", version)
    request = _built(infotext=text)
    assert {name for name in SWITCHES if getattr(request, name)} == on
    # The server takes exactly what the infotext mapping gives.
    fields = request_fields_from_infotext(text)
    assert {name for name in SWITCHES if fields.get(name)} == on
