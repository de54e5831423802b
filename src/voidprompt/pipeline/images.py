"""Image-space helpers for img2img and hires fix: A1111's ``images.resize_image`` and friends.

Everything here works on PIL images, the way A1111 does, so the rounding of every resize and paste
is Pillow's, as it is in A1111.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from voidprompt.errors import InvalidRequestError

LANCZOS = Image.Resampling.LANCZOS
NEAREST = Image.Resampling.NEAREST

# Pixel-space upscalers available without extra model files (A1111's built-in "None", "Lanczos" and
# "Nearest"). Model upscalers (ESRGAN, SwinIR, ...) are not part of voidprompt.
PIXEL_UPSCALERS: dict[str, Image.Resampling | None] = {"None": None, "Lanczos": LANCZOS, "Nearest": NEAREST}


def check_upscaler(name: str | None) -> None:
    """Raise InvalidRequestError when ``name`` is not a pixel upscaler voidprompt has."""
    if name is not None and name not in PIXEL_UPSCALERS:
        raise InvalidRequestError(
            f"upscaler {name!r} is not available; choose one of {', '.join(PIXEL_UPSCALERS)}"
        )


def _resize(im: Image.Image, width: int, height: int, upscaler: str | None) -> Image.Image:
    # A1111: no upscaler (or "None", or a mask) means one Lanczos resize. An upscaler first scales by
    # the larger of the two ratios (only when enlarging), then Lanczos fixes the exact size.
    if upscaler is None or upscaler == "None" or im.mode == "L":
        return im.resize((width, height), resample=LANCZOS)
    check_upscaler(upscaler)
    scale = max(width / im.width, height / im.height)
    if scale > 1.0:
        resample = PIXEL_UPSCALERS[upscaler]
        assert resample is not None
        # A1111's Upscaler.upscale: one scaling step, then Lanczos to the size floored to a multiple of 8.
        dest_w, dest_h = int((im.width * scale) // 8 * 8), int((im.height * scale) // 8 * 8)
        im = im.resize((int(im.width * scale), int(im.height * scale)), resample=resample)
        if im.size != (dest_w, dest_h):
            im = im.resize((dest_w, dest_h), resample=LANCZOS)
    if im.size != (width, height):
        im = im.resize((width, height), resample=LANCZOS)
    return im


def resize_image(
    resize_mode: int, im: Image.Image, width: int, height: int, upscaler: str | None = None
) -> Image.Image:
    """A1111's ``images.resize_image``.

    0 just resize; 1 crop and resize (scale to cover, centre crop); 2 resize and fill (scale to fit,
    centre, and fill the empty bands by stretching the outermost rows/columns). Mode 3 (latent
    upscale) never comes here: the caller resizes the latent instead.
    """
    if resize_mode == 0:
        return _resize(im, width, height, upscaler)
    ratio = width / height
    src_ratio = im.width / im.height
    if resize_mode == 1:
        src_w = width if ratio > src_ratio else im.width * height // im.height
        src_h = height if ratio <= src_ratio else im.height * width // im.width
    else:
        src_w = width if ratio < src_ratio else im.width * height // im.height
        src_h = height if ratio >= src_ratio else im.height * width // im.width
    resized = _resize(im, src_w, src_h, upscaler)
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
