"""Image-space helpers for img2img and hires fix: A1111's ``images.resize_image`` and friends.

Everything here works on PIL images, the way A1111 does, so the rounding of every resize and paste
is Pillow's, as it is in A1111.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from voidprompt.models.upscalers.registry import PIXEL_UPSCALERS, Upscalers
from voidprompt.models.upscalers.tiled import model_upscale

__all__ = ["PIXEL_UPSCALERS", "check_upscaler", "flatten", "pil_to_tensor", "resize_image", "tensor_to_pil"]

LANCZOS = Image.Resampling.LANCZOS
NEAREST = Image.Resampling.NEAREST


def check_upscaler(name: str | None, upscalers: Upscalers | None = None) -> None:
    """Raise InvalidRequestError when ``name`` is neither a built-in upscaler nor a model upscaler in
    ``upscalers``' folders (the message names the file to place for A1111's own model names)."""
    if name is not None:
        (upscalers or Upscalers()).find(name)


def _resize(
    im: Image.Image, width: int, height: int, upscaler: str | None, upscalers: Upscalers | None
) -> Image.Image:
    # A1111: no upscaler (or "None", or a mask) means one Lanczos resize. An upscaler first scales by
    # the larger of the two ratios (only when enlarging; A1111's Upscaler.upscale: up to three passes,
    # then Lanczos to the size floored to a multiple of 8), then Lanczos fixes the exact size.
    if upscaler is None or upscaler == "None" or im.mode == "L":
        return im.resize((width, height), resample=LANCZOS)
    registry = upscalers or Upscalers()
    entry = registry.find(upscaler)
    scale = max(width / im.width, height / im.height)
    if scale > 1.0:
        im = model_upscale(registry.one_pass(entry, scale), im, scale)
    if im.size != (width, height):
        im = im.resize((width, height), resample=LANCZOS)
    return im


def resize_image(
    resize_mode: int,
    im: Image.Image,
    width: int,
    height: int,
    upscaler: str | None = None,
    upscalers: Upscalers | None = None,
) -> Image.Image:
    """A1111's ``images.resize_image``.

    0 just resize; 1 crop and resize (scale to cover, centre crop); 2 resize and fill (scale to fit,
    centre, and fill the empty bands by stretching the outermost rows/columns). Mode 3 (latent
    upscale) never comes here: the caller resizes the latent instead. ``upscalers`` is where model
    upscaler names are looked up (without it, only the built-ins are known).
    """
    if resize_mode == 0:
        return _resize(im, width, height, upscaler, upscalers)
    ratio = width / height
    src_ratio = im.width / im.height
    if resize_mode == 1:
        src_w = width if ratio > src_ratio else im.width * height // im.height
        src_h = height if ratio <= src_ratio else im.height * width // im.width
    else:
        src_w = width if ratio < src_ratio else im.width * height // im.height
        src_h = height if ratio >= src_ratio else im.height * width // im.width
    resized = _resize(im, src_w, src_h, upscaler, upscalers)
    # A1111 quirk: the canvas is always RGB, even for masks (callers convert back to L).
    res = Image.new("RGB", (width, height))
    res.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if resize_mode == 2:
        # A zero-height (or zero-width) source box makes Pillow stretch the edge row (column) over the
        # band, A1111's way of filling the sides.
        if ratio < src_ratio:
            band = height // 2 - src_h // 2
            if band > 0:
                res.paste(resized.resize((width, band), box=(0, 0, width, 0)), box=(0, 0))
                bottom = resized.resize((width, band), box=(0, resized.height, width, resized.height))
                res.paste(bottom, box=(0, band + src_h))
        elif ratio > src_ratio:
            band = width // 2 - src_w // 2
            if band > 0:
                res.paste(resized.resize((band, height), box=(0, 0, 0, height)), box=(0, 0))
                right = resized.resize((band, height), box=(resized.width, 0, resized.width, height))
                res.paste(right, box=(band + src_w, 0))
    return res


def flatten(im: Image.Image, background: str = "#ffffff") -> Image.Image:
    """A1111's ``images.flatten``: transparency composited over ``background``, returned as RGB."""
    if im.mode == "RGBA":
        canvas = Image.new("RGBA", im.size, background)
        canvas.paste(im, mask=im)
        im = canvas
    return im.convert("RGB")


def pil_to_tensor(images: list[Image.Image]) -> Tensor:
    """RGB images -> (B, 3, H, W) float32 in [0, 1] (A1111: ``np.array(image) / 255``)."""
    arrays = [np.moveaxis(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0, 2, 0) for im in images]
    return torch.from_numpy(np.stack(arrays))


def tensor_to_pil(pixels: Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [0, 1] -> 8-bit RGB images, x255 then truncation as A1111."""
    arrays = (255.0 * pixels.detach().float().cpu().permute(0, 2, 3, 1).numpy()).astype(np.uint8)
    return [Image.fromarray(a, mode="RGB") for a in arrays]
