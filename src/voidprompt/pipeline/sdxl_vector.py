"""SDXL's vector conditioning: the pooled text vector followed by the picture's size numbers.

A1111's ``get_learned_conditioning`` for SDXL (``sd_models_xl.py``) hands sgm's conditioner, next to the
text, the numbers that the UNet's ``label_emb`` turns into a 256-wide sinusoidal embedding each:

* base model: original size (height, width), crop (top, left), target size (height, width) - 6 numbers,
  where original and target size are both the size of the pass being sampled (the request's size in the
  first pass; in hires fix's second pass the upscaled size) and the crop is A1111's ``sdxl_crop_top`` /
  ``sdxl_crop_left`` options;
* refiner: original size, crop, aesthetic score - 5 numbers, the score being
  ``sdxl_refiner_high_aesthetic_score`` for the positive prompt and ``..._low_...`` for the negative.

diffusers' UNet takes the same numbers as ``added_cond_kwargs["time_ids"]`` and the pooled vector as
``text_embeds``, and embeds them as sgm does (cos before sin, frequencies ``10000^(-i/128)``). Here the
two travel as one row, ``pooled ++ numbers``, in :attr:`ScheduledCond.pooled`, and
:func:`split_vector` takes them apart before the UNet call. The numbers are appended after the
encoder's cache, so one encoded prompt serves every size. A1111's zeroing of an empty negative prompt
zeroes the pooled part only; the numbers stay.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from voidprompt.conditioning import CondSchedule, MultiCond
from voidprompt.errors import InvalidRequestError
from voidprompt.request import GenerationRequest

__all__ = ["SizeConditioning", "size_numbers", "split_vector", "with_numbers", "with_numbers_multi"]

# Numbers per kind of SDXL UNet: label_emb's input is pooled width + 256 per number.
BASE_NUMBERS = 6
REFINER_NUMBERS = 5


class SizeConditioning:
    """What an SDXL UNet wants besides the text: how many numbers, and the pooled vector's width."""

    def __init__(self, unet: object, pooled_width: int) -> None:
        config = getattr(unet, "config", None)
        total = int(getattr(config, "projection_class_embeddings_input_dim", 0) or 0)
        per_number = int(getattr(config, "addition_time_embed_dim", 0) or 0)
        if per_number <= 0 or (total - pooled_width) % per_number:
            raise InvalidRequestError(
                f"the UNet's added conditioning ({total} wide, {per_number} per number) does not fit a "
                f"{pooled_width}-wide pooled text vector; this is not an SDXL UNet"
            )
        self.pooled_width = pooled_width
        self.count = (total - pooled_width) // per_number
        if self.count not in (BASE_NUMBERS, REFINER_NUMBERS):
            raise InvalidRequestError(
                f"the UNet takes {self.count} size numbers; SDXL base takes {BASE_NUMBERS} and the "
                f"refiner {REFINER_NUMBERS}"
            )

    @property
    def is_refiner(self) -> bool:
        return self.count == REFINER_NUMBERS


def size_numbers(
    size: SizeConditioning, request: GenerationRequest, *, height: int, width: int, negative: bool
) -> Tensor:
    """The numbers A1111 passes for one pass of ``request`` at ``height`` x ``width`` (float32)."""
    crop = [float(request.sdxl_crop_top), float(request.sdxl_crop_left)]
    if size.is_refiner:
        low, high = request.sdxl_refiner_low_aesthetic_score, request.sdxl_refiner_high_aesthetic_score
        score = low if negative else high
        values = [float(height), float(width), *crop, float(score)]
    else:
        values = [float(height), float(width), *crop, float(height), float(width)]
    return torch.tensor(values, dtype=torch.float32)


def _append(pooled: Tensor | None, numbers: Tensor) -> Tensor:
    if pooled is None:
        raise InvalidRequestError("an SDXL conditioning lacks its pooled text vector; encode it for SDXL")
    return torch.cat([pooled, numbers.to(device=pooled.device, dtype=pooled.dtype)])


def with_numbers(schedule: CondSchedule, numbers: Tensor) -> CondSchedule:
    """``schedule`` with ``numbers`` appended to every entry's pooled vector."""
    return tuple(replace(entry, pooled=_append(entry.pooled, numbers)) for entry in schedule)


def with_numbers_multi(multi: MultiCond, numbers: Tensor) -> MultiCond:
    """:func:`with_numbers` for every AND-ed sub-prompt."""
    return MultiCond(tuple((with_numbers(schedule, numbers), weight) for schedule, weight in multi.parts))


def split_vector(y: Tensor, pooled_width: int) -> tuple[Tensor, Tensor]:
    """(text_embeds, time_ids) for diffusers' UNet from rows of ``pooled ++ numbers``."""
    return y[:, :pooled_width], y[:, pooled_width:]
