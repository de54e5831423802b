"""A1111 settings that reach the sampler: img2img_fix_steps and the Beta schedule's shape."""

from __future__ import annotations

import pytest

from voidprompt.errors import InvalidRequestError
from voidprompt.server.generation import Options, build_request
from voidprompt.server.limits import Limits
from voidprompt.server.models import Txt2ImgRequest


def test_defaults_are_a1111s() -> None:
    values = Options().snapshot()
    assert values["img2img_fix_steps"] is False
    assert (values["beta_dist_alpha"], values["beta_dist_beta"]) == (0.6, 0.6)
    request = build_request(Txt2ImgRequest(prompt="x"), Options(), Limits()).request
    assert request.img2img_fix_steps is False
    assert (request.beta_dist_alpha, request.beta_dist_beta) == (0.6, 0.6)


def test_settings_and_overrides_reach_the_request() -> None:
    options = Options({"img2img_fix_steps": True, "beta_dist_alpha": 0.5})
    request = build_request(Txt2ImgRequest(prompt="x"), options, Limits()).request
    assert request.img2img_fix_steps is True and request.beta_dist_alpha == 0.5
    body = Txt2ImgRequest(prompt="x", override_settings={"beta_dist_beta": 0.8, "img2img_fix_steps": False})
    request = build_request(body, options, Limits()).request
    assert request.img2img_fix_steps is False
    assert (request.beta_dist_alpha, request.beta_dist_beta) == (0.5, 0.8)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"beta_dist_alpha": 0}, r"beta_dist_alpha=0\.0: the Beta schedule needs a shape above 0"),
        ({"img2img_fix_steps": "yes"}, r"img2img_fix_steps='yes': must be bool"),
    ],
)
def test_bad_values_are_refused(changes: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        Options.normalise(changes)
