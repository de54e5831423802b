"""Inpainting masks, A1111's way (``processing.StableDiffusionProcessingImg2Img.init``, ``masking.py``).

Masks are 8-bit "L" images: 255 = regenerate, 0 = keep. The blur is a separable Gaussian written here
in numpy (A1111 uses OpenCV, which voidprompt does not depend on).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from voidprompt.errors import InvalidRequestError
from voidprompt.pipeline.images import resize_image

CropRegion = tuple[int, int, int, int]  # x1, y1, x2, y2 (x2, y2 exclusive)

# A1111's masking.fill: (blur radius, how many times the blurred layer is composited), coarse to fine.
_FILL_PASSES = ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1))


def create_binary_mask(image: Image.Image, round_mask: bool = True) -> Image.Image:
    """A1111's ``create_binary_mask``: an RGBA mask with real transparency is read from its alpha
    (thresholded at > 128 when ``round_mask``); anything else is converted to L as it is.

    A1111 quirk: ``mask_round`` only thresholds alpha masks; a grey L/RGB mask stays grey.
    """
    if image.mode == "RGBA" and image.getextrema()[-1] != (255, 255):
        alpha = image.split()[-1].convert("L")
        return alpha.point(lambda v: 255 if v > 128 else 0) if round_mask else alpha
    return image.convert("L")


def gaussian_kernel(sigma: float) -> np.ndarray:
    """The 1-D kernel A1111's mask blur uses: OpenCV's ``getGaussianKernel`` for
    ``ksize = 2*int(2.5*sigma + 0.5) + 1``: ``exp(-x^2 / (2 sigma^2))`` over ``x = -r..r``, normalised."""
    if sigma <= 0:
        raise InvalidRequestError(f"mask blur sigma={sigma}: must be > 0 (0 means no blur; skip the call)")
    radius = int(2.5 * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-(x * x) / (2.0 * sigma * sigma))
    return kernel / kernel.sum()


def _blur_axis(values: np.ndarray, sigma: float, axis: int) -> np.ndarray:
    kernel = gaussian_kernel(sigma)
    radius = len(kernel) // 2
    pad = [(0, 0), (0, 0)]
    pad[axis] = (radius, radius)
    # OpenCV's default border is BORDER_REFLECT_101 (gfedcb|abcdefgh|gfedcba), numpy's "reflect".
    padded = np.pad(values.astype(np.float64), pad, mode="reflect")
    out = np.zeros(values.shape, dtype=np.float64)
    size = values.shape[axis]
    for k, weight in enumerate(kernel):
        window = padded[k : k + size, :] if axis == 0 else padded[:, k : k + size]
        out += weight * window
    # OpenCV writes 8-bit results with round-to-nearest; its 8-bit path uses a fixed-point kernel, so a
    # value can differ from OpenCV's by one level where the exact result sits near .5.
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def blur_mask(mask: Image.Image, blur_x: float, blur_y: float) -> Image.Image:
    """A1111's mask blur: a horizontal Gaussian of sigma ``blur_x``, then a vertical one of sigma
    ``blur_y`` (each rounded back to 8 bits, as two separate OpenCV calls do); 0 skips an axis."""
    values = np.asarray(mask.convert("L"))
    if blur_x > 0:
        values = _blur_axis(values, blur_x, axis=1)
    if blur_y > 0:
        values = _blur_axis(values, blur_y, axis=0)
    return Image.fromarray(values, mode="L")


def get_crop_region(mask: Image.Image, pad: int = 0) -> CropRegion | None:
    """The bounding box of the mask's non-zero pixels grown by ``pad`` on every side and clipped to
    the image (A1111's ``get_crop_region_v2``); None for an empty mask."""
    box = mask.convert("L").getbbox()
    if box is None:
        return None
    x1, y1, x2, y2 = box
    if not pad:
        return x1, y1, x2, y2
    return max(x1 - pad, 0), max(y1 - pad, 0), min(x2 + pad, mask.width), min(y2 + pad, mask.height)


def expand_crop_region(
    region: CropRegion, processing_width: int, processing_height: int, image_width: int, image_height: int
) -> CropRegion:
    """Grow ``region`` along one axis to the processing aspect ratio, centred, shifted back inside the
    image where it sticks out (A1111's ``expand_crop_region``)."""
    x1, y1, x2, y2 = region
    if (x2 - x1) / (y2 - y1) > processing_width / processing_height:
        y1, y2 = _grow(
            y1, y2, int((x2 - x1) / (processing_width / processing_height) - (y2 - y1)), image_height
        )
    else:
        x1, x2 = _grow(
            x1, x2, int((y2 - y1) * (processing_width / processing_height) - (x2 - x1)), image_width
        )
    return x1, y1, x2, y2


def _grow(lo: int, hi: int, diff: int, limit: int) -> tuple[int, int]:
    lo -= diff // 2
    hi += diff - diff // 2
    if hi >= limit:
        lo -= hi - limit
        hi = limit
    if lo < 0:
        hi -= lo
        lo = 0
    # A1111 quirk: when the grown region is taller (wider) than the image it is clipped only at the far
    # side, so the region no longer has the processing aspect ratio.
    return lo, min(hi, limit)


def fill(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's "fill" masked content: the masked area is painted with ever less blurred copies of the
    unmasked pixels (premultiplied alpha, so the masked area contributes nothing)."""
    keep = ImageOps.invert(mask.convert("L"))
    source = Image.new("RGBa", image.size)
    source.paste(image.convert("RGBA").convert("RGBa"), mask=keep)
    result = Image.new("RGBA", image.size)
    for radius, repeats in _FILL_PASSES:
        layer = source.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            result.alpha_composite(layer)
    return result.convert("RGB")


def overlay_image(image: Image.Image, mask_for_overlay: Image.Image) -> Image.Image:
    """The original with the masked area made transparent: what is composited over the result
    (A1111's ``overlay_images``: RGBa paste with the inverted mask)."""
    layer = Image.new("RGBa", image.size)
    layer.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask_for_overlay.convert("L")))
    return layer.convert("RGBA")


def apply_overlay(
    image: Image.Image, paste_to: CropRegion | None, overlay: Image.Image | None
) -> Image.Image:
    """The final composite (A1111's ``apply_overlay``). With ``paste_to`` = (x, y, w, h) ("only
    masked") the result is first fitted to w x h (crop and resize) and placed on a transparent
    canvas the size of the original."""
    if overlay is None:
        return image
    if paste_to is not None:
        x, y, w, h = paste_to
        canvas = Image.new("RGBA", overlay.size)
        canvas.paste(resize_image(1, image, w, h), (x, y))
        image = canvas
    out = image.convert("RGBA")
    out.alpha_composite(overlay)
    return out.convert("RGB")


def latent_mask(mask: Image.Image, latent_width: int, latent_height: int, round_mask: bool) -> np.ndarray:
    """The (H, W) float mask in latent space, 1 = regenerate: A1111 resizes the (blurred) mask as an
    RGB image with Pillow's default filter and rounds it to 0/1 when ``mask_round``."""
    small = mask.convert("RGB").resize((latent_width, latent_height))
    values = np.asarray(small, dtype=np.float32)[:, :, 0] / 255.0
    return np.around(values) if round_mask else values
