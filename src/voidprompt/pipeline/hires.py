"""Hires fix arithmetic: the target size, latent upscaling and truncation (A1111's
``StableDiffusionProcessingTxt2Img.calculate_target_resolution`` and ``sample_hr_pass``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from voidprompt.errors import InvalidRequestError
from voidprompt.models.upscalers.registry import Upscalers
from voidprompt.request import GenerationRequest

# A1111's shared.latent_upscale_modes: name -> (torch interpolate mode, antialias).
LATENT_UPSCALE_MODES: dict[str, tuple[str, bool]] = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}

DEFAULT_HIRES_DENOISING = 0.7  # A1111's UI default for the hires pass


def hires_upscalers(upscalers: Upscalers | None = None) -> list[str]:
    """Every ``hr_upscaler`` name voidprompt accepts: the latent modes, the built-in pixel upscalers
    and the model upscalers found in ``upscalers``' folders."""
    return [*LATENT_UPSCALE_MODES, *(upscalers or Upscalers()).names()]


def check_hr_upscaler(name: str, upscalers: Upscalers | None = None) -> None:
    """Raise InvalidRequestError when ``name`` is no latent mode and no upscaler of ``upscalers``."""
    if name in LATENT_UPSCALE_MODES:
        return
    registry = upscalers or Upscalers()
    if name in registry.names():
        return
    hint = registry.missing_hint(name)
    if hint is not None:
        raise InvalidRequestError(f"hr_upscaler={name!r}: {hint}")
    raise InvalidRequestError(
        f"hr_upscaler={name!r} is not available; choose one of {', '.join(hires_upscalers(registry))}"
    )


@dataclass(frozen=True)
class HiresTarget:
    """Where the second pass goes: the upscale size in pixels and the latent cells to cut off
    (A1111's ``hr_upscale_to_x/y`` and ``truncate_x/y``)."""

    upscale_width: int
    upscale_height: int
    truncate_x: int = 0
    truncate_y: int = 0


def hires_target(request: GenerationRequest, latent_factor: int = 8) -> HiresTarget:
    """A1111's ``calculate_target_resolution`` for ``request``.

    With ``hr_resize_x`` and ``hr_resize_y`` both set, the image is upscaled to cover the target at
    its own aspect ratio, and the excess is cut from the latent (centred). ``latent_factor`` is
    A1111's ``opt_f``.
    """
    w, h = request.width, request.height
    rx, ry = request.hr_resize_x, request.hr_resize_y
    if rx == 0 and ry == 0:
        return HiresTarget(int(w * request.hr_scale), int(h * request.hr_scale))
    if ry == 0:
        return HiresTarget(rx, rx * h // w)
    if rx == 0:
        return HiresTarget(ry * w // h, ry)
    if w / h < rx / ry:
        up_w, up_h = rx, rx * h // w
    else:
        up_w, up_h = ry * w // h, ry
    return HiresTarget(up_w, up_h, (up_w - rx) // latent_factor, (up_h - ry) // latent_factor)


def upscale_latent(latent: Tensor, upscaler: str, height: int, width: int) -> Tensor:
    """Resize (B, C, h, w) latents to (height, width) cells with a latent upscale mode."""
    mode, antialias = LATENT_UPSCALE_MODES[upscaler]
    return torch.nn.functional.interpolate(latent, size=(height, width), mode=mode, antialias=antialias)


def truncate_latent(latent: Tensor, truncate_x: int, truncate_y: int) -> Tensor:
    """Cut ``truncate_x`` columns and ``truncate_y`` rows, the odd one from the far side (A1111)."""
    h, w = latent.shape[2], latent.shape[3]
    return latent[
        :, :, truncate_y // 2 : h - (truncate_y + 1) // 2, truncate_x // 2 : w - (truncate_x + 1) // 2
    ]
