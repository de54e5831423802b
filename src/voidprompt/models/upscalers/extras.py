"""A1111's "Extras" upscale (``scripts/postprocessing_upscale.py``, as its API's ``run_extras``
drives it): scale by a factor or to a size (optionally cropped), a second upscaler blended over the
first, and the ``Postprocess ...`` text it reports."""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from typing import Any

from PIL import Image

from voidprompt.errors import InvalidRequestError
from voidprompt.models.upscalers.registry import Upscalers

__all__ = ["ExtrasUpscale", "extras_infotext", "extras_upscale", "plaintext_to_html"]


@dataclass(frozen=True)
class ExtrasUpscale:
    """The upscale settings of one extras call (A1111's API field names in the comments)."""

    mode: int = 0  # resize_mode: 0 scale by ``upscale_by``, 1 scale to ``to_width`` x ``to_height``
    upscale_by: float = 2.0  # upscaling_resize
    to_width: int = 512  # upscaling_resize_w
    to_height: int = 512  # upscaling_resize_h
    crop: bool = True  # upscaling_crop: mode 1 centres the result on a canvas of exactly that size
    upscaler_1: str = "None"
    upscaler_2: str = "None"
    upscaler_2_visibility: float = 0.0  # extras_upscaler_2_visibility

    def check(self, upscalers: Upscalers) -> None:
        """Refuse bad settings before any work (A1111 asserts on unknown names mid-run)."""
        if self.mode not in (0, 1):
            raise InvalidRequestError(f"resize_mode={self.mode}: use 0 (scale by) or 1 (scale to a size)")
        if self.mode == 0 and not 0 < self.upscale_by <= 8:
            raise InvalidRequestError(f"upscaling_resize={self.upscale_by}: use a factor above 0 and up to 8")
        if self.mode == 1 and (self.to_width < 1 or self.to_height < 1):
            raise InvalidRequestError(
                f"upscaling_resize_w x upscaling_resize_h = {self.to_width}x{self.to_height}: "
                "both must be 1 or more"
            )
        if not 0 <= self.upscaler_2_visibility <= 1:
            raise InvalidRequestError(
                f"extras_upscaler_2_visibility={self.upscaler_2_visibility}: use a value from 0 to 1"
            )
        for name in (self.upscaler_1, self.upscaler_2):
            upscalers.find(name)

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """The size of the result for a ``width`` x ``height`` picture (None upscaler aside)."""
        if self.mode == 1:
            if self.crop:
                return self.to_width, self.to_height
            scale = max(self.to_width / width, self.to_height / height)
        else:
            scale = self.upscale_by
        return int((width * scale) // 8 * 8), int((height * scale) // 8 * 8)


def _one(
    image: Image.Image, info: dict[str, Any], upscalers: Upscalers, name: str, s: ExtrasUpscale
) -> Image.Image:
    if s.mode == 1:
        scale = max(s.to_width / image.width, s.to_height / image.height)
        info["Postprocess upscale to"] = f"{s.to_width}x{s.to_height}"
    else:
        scale = s.upscale_by
        info["Postprocess upscale by"] = s.upscale_by
    # A1111 quirk: the extras upscale always runs the upscaler's passes, shrinking included, and
    # ends at the size floored to a multiple of 8 (Upscaler.upscale), not at the exact target.
    image = upscalers.upscale(image, scale, name)
    if s.mode == 1 and s.crop:
        canvas = Image.new("RGB", (s.to_width, s.to_height))
        canvas.paste(image, box=(s.to_width // 2 - image.width // 2, s.to_height // 2 - image.height // 2))
        image = canvas
        info["Postprocess crop to"] = f"{image.width}x{image.height}"
    return image


def extras_upscale(
    image: Image.Image, settings: ExtrasUpscale, upscalers: Upscalers
) -> tuple[Image.Image, dict[str, Any]]:
    """The upscaled picture and the ``Postprocess ...`` entries A1111 writes for it, in its order."""
    info: dict[str, Any] = {}
    image = image.convert("RGB")
    if settings.upscaler_1 == "None":
        return image, info
    first = _one(image, info, upscalers, settings.upscaler_1, settings)
    info["Postprocess upscaler"] = settings.upscaler_1
    if settings.upscaler_2 != "None" and settings.upscaler_2_visibility > 0:
        second = _one(image, info, upscalers, settings.upscaler_2, settings)
        first = Image.blend(first, second.convert(first.mode), settings.upscaler_2_visibility)
        info["Postprocess upscaler 2"] = settings.upscaler_2
    return first, info


def _quote(value: Any) -> Any:
    # A1111's infotext_utils.quote: JSON-quote a value holding a comma, a colon or a newline.
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return value
    return json.dumps(text, ensure_ascii=False)


def extras_infotext(info: dict[str, Any]) -> str:
    """A1111's postprocessing text: ``key: value`` pairs joined by ", " (a key equal to its value alone)."""
    return ", ".join(k if k == v else f"{k}: {_quote(v)}" for k, v in info.items() if v is not None)


def plaintext_to_html(text: str) -> str:
    """A1111's ``ui_common.plaintext_to_html`` (no class name): the API's ``html_info``."""
    return "<p>" + "<br>\n".join(html.escape(line) for line in text.split("\n")) + "</p>"
