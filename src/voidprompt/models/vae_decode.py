"""The VAE decode with A1111's half-precision NaN fallback (its ``auto_vae_precision``).

Some VAEs (SD1's original one among them) overflow fp16 in the decoder's last blocks, and the
image comes out black. A1111 decodes in the VAE's dtype outside autocast, tests each image, and on
NaN converts the VAE to float32, decodes that image again, and keeps the VAE in float32 for the rest
of the process (the rest of its batch included). :func:`decode_with_nan_fallback` does the same:
the VAE module itself stays float32 afterwards, so every later decode (and encode) of that model
runs in float32; nothing global changes.

Which values are tested is a choice. A1111 1.10 looks at one value per image, the first
(``x[0, 0, 0]``): it costs nothing on the GPU, but a decode that overflows only in part of the
picture (a black or speckled patch, or inf, which the clamp turns white) passes. Here every value
is tested, for NaN and for inf: one reduction over the decoded batch, small beside the decode
itself, and no damaged picture is ever stored. Pictures A1111 redoes are redone here too; a few
that A1111 would keep damaged are repaired.

Then A1111's VAE check (:func:`voidprompt.models.nans.check_for_nans`, on that same first value):
a NaN image stops the generation with its "A tensor with NaNs was produced in VAE" error. A1111 does
not test the image it redid in float32 (a VAE whose weights are NaN then gives one black picture
before its next decode fails); here the redone image is tested too, so that picture is not stored.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from voidprompt.models.nans import check_for_nans

__all__ = ["VaeDecode", "decode_with_nan_fallback", "vae_dtype"]

log = logging.getLogger(__name__)


@dataclass
class VaeDecode:
    sample: Tensor  # float32 decoder output (in [-1, 1] for a working VAE)
    upcast: bool  # True when a half-precision decode overflowed and float32 was used from then on
    message: str | None = None
    first_redone: int | None = None  # the first image of the batch decoded again in float32


def vae_dtype(vae: Any) -> torch.dtype:
    """The dtype the VAE computes in: its parameters' (float32 after a fallback)."""
    dtype: torch.dtype = next(vae.parameters()).dtype
    return dtype


@contextlib.contextmanager
def _without_autocast(device_type: str) -> Iterator[None]:
    # A1111's devices.without_autocast around the decode: the VAE runs in its own dtype throughout.
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type, enabled=False):
            yield
    else:
        yield


@torch.no_grad()
def decode_with_nan_fallback(vae: Any, z: Tensor, *, nan_check: bool = True) -> VaeDecode:
    """``vae.decode(z).sample`` as float32, one image at a time as A1111's ``decode_latent_batch``;
    ``z`` is the VAE's input (latents already divided by the scaling factor), a batch.

    A half-precision VAE (fp16 or bf16) whose decode of image ``i`` has any NaN or inf is converted
    to float32 in place and image ``i`` is decoded again; the VAE stays float32 (sticky), so the
    images after it decode in float32 too, and images before ``i`` keep their half-precision decode.
    Then an image whose first value is NaN raises :class:`~voidprompt.errors.NansError`.

    ``nan_check=False`` is A1111's ``--disable-nan-check``: neither the fallback nor the check runs.

    One image per decode is A1111's rule, and on a CPU also the faster one: a whole batch's
    full-resolution activations do not fit in the caches (measured on the miniature model at 128 px:
    58 ms per picture against 85 ms with two threads, 91 against 120 with one).
    """
    samples: list[Tensor] = []
    first_redone: int | None = None
    message: str | None = None
    for index in range(z.shape[0]):
        dtype = vae_dtype(vae)
        with _without_autocast(z.device.type):
            out = vae.decode(z[index : index + 1].to(dtype)).sample
        # A1111 quirk: its fallback is started by the NaN check's exception, so --disable-nan-check
        # turns the fallback off too, and a half-precision VAE that overflows gives its black picture.
        may_fall_back = nan_check and dtype != torch.float32
        finite = may_fall_back and bool(torch.isfinite(out).all())
        if may_fall_back and not finite:
            bad = int((~torch.isfinite(out)).sum())
            message = (
                f"VAE decode in {str(dtype).removeprefix('torch.')} produced {bad} NaN/inf values in image "
                f"{index} of the batch (the VAE overflows half precision); converted the VAE to float32 for "
                "the rest of this run and decoded again. Use a VAE that is stable in half precision (such "
                "as vae-ft-mse-840000-ema-pruned) to keep it fast."
            )
            log.warning(message)
            vae.float()  # not .to(float32): diffusers' .to() warns about fp32 modules on every dtype change
            first_redone = index
            with _without_autocast(z.device.type):
                out = vae.decode(z[index : index + 1].to(torch.float32)).sample
        if nan_check and not finite:  # an all-finite half decode has no NaN to find
            check_for_nans(out, "vae", dtype=vae_dtype(vae))
        samples.append(out.float())
    return VaeDecode(torch.cat(samples), first_redone is not None, message, first_redone)
