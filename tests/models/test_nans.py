"""A1111 1.10's NaN test (``devices.test_for_nans``): which value it looks at, and its messages."""

from __future__ import annotations

import pytest
import torch

from voidprompt.errors import NansError, VoidpromptError
from voidprompt.models.nans import check_for_nans, nans_message

SHAPE = (2, 4, 8, 8)


def test_a_nan_first_value_fails_in_every_dtype() -> None:
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = torch.zeros(SHAPE, dtype=dtype)
        x[0, 0, 0, 0] = float("nan")
        with pytest.raises(NansError):
            check_for_nans(x, "unet", dtype=dtype)
    assert issubclass(NansError, VoidpromptError)  # every front end shows it as one line


def test_a1111_looks_at_the_first_value_only() -> None:
    # A1111 quirk: NaN anywhere but x[0, 0, 0, 0] (even a whole second image), and inf, pass.
    x = torch.full(SHAPE, float("nan"))
    x[0, 0, 0, 0] = 1.0
    check_for_nans(x, "unet", dtype=torch.float32)
    check_for_nans(torch.full(SHAPE, float("inf")), "vae", dtype=torch.float32)
    check_for_nans(torch.zeros(SHAPE), "unet", dtype=torch.float32)
    image = torch.zeros(3, 16, 16)  # a decoded image as A1111 tests it: (channels, height, width)
    image[0, 0, 0] = float("nan")
    with pytest.raises(NansError, match="in VAE"):
        check_for_nans(image, "vae", dtype=torch.float32)


def test_the_messages_start_as_a1111s_and_name_voidprompts_options() -> None:
    messages = {
        (where, dtype): nans_message(where, dtype)
        for where in ("unet", "vae")
        for dtype in (torch.float32, torch.float16, torch.bfloat16)
    }
    for (where, dtype), message in messages.items():
        assert "\n" not in message
        assert message.startswith(
            f"A tensor with NaNs was produced in {'Unet' if where == 'unet' else 'VAE'}."
        )
        assert message.endswith(" Use --disable-nan-check to turn this check off.")
        # Half precision may be the cause, and float32 the fix; in float32 it is the weights.
        assert ("--precision fp32" in message) == (dtype != torch.float32)
    assert "overflow fp16" in messages["unet", torch.float16]
    assert "overflow bf16" in messages["vae", torch.bfloat16]
    assert "LoRA or its multiplier" in messages["unet", torch.float32]
    assert "--vae" in messages["vae", torch.float32]
