"""The API's ``infotext`` field: the fields come from infotext.to_request, the client's own win."""

from __future__ import annotations

from typing import Any

import pytest

from voidprompt.errors import InfotextError
from voidprompt.infotext import request_fields_from_infotext
from voidprompt.request import GenerationRequest
from voidprompt.server.generation import Options, build_request
from voidprompt.server.limits import LimitError, Limits
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


def test_a_huge_infotext_is_refused_before_it_is_parsed() -> None:
    with pytest.raises(InfotextError, match=r"^the infotext is 4000000 characters, over the limit of 80000"):
        _built(infotext="a " * 2_000_000)


def test_the_server_prompt_limit_holds_for_a_prompt_from_the_infotext() -> None:
    limits = Limits(max_prompt_chars=50)
    text = "x" * 40 + "\nNegative prompt: " + "y" * 11 + "\nSteps: 20, Sampler: Euler, Seed: 1, Size: 64x64"
    with pytest.raises(LimitError, match="over this server's limit of 50 characters"):
        build_request(Txt2ImgRequest(infotext=text), Options(), limits)
    with pytest.raises(LimitError, match="over this server's limit of 50 characters"):
        build_request(Txt2ImgRequest(prompt="x" * 40, negative_prompt="y" * 11), Options(), limits)
    # The client's own prompt replaces the infotext's, and the pair then fits.
    built = build_request(Txt2ImgRequest(infotext=text, negative_prompt="short"), Options(), limits)
    assert (built.request.prompt, built.request.negative_prompt) == ("x" * 40, "short")
