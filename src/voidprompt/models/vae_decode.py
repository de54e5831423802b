"""The VAE decode with A1111's fp16 NaN fallback.

Some VAEs (SD1's original one among them) overflow fp16 in the decoder's last blocks,
and the image comes out black. A1111 offers ``--no-half-vae`` and "automatically revert VAE to
32-bit floats"; here it is the default: :func:`decode_with_nan_fallback` decodes in the VAE's dtype,
and if any value is NaN or inf, logs a warning and decodes again in float32.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["VaeDecode", "decode_with_nan_fallback"]

log = logging.getLogger(__name__)

@dataclass
class VaeDecode:
    sample: Tensor  # float32 decoder output (in [-1, 1] for a working VAE)
    upcast: bool  # True when the half-precision decode overflowed and float32 was used
    message: str | None = None


@torch.no_grad()
def decode_with_nan_fallback(vae: Any, z: Tensor, *, keep_fp32: bool = False) -> VaeDecode:
    """``vae.decode(z).sample`` in float32, redone in float32 when a half-precision decode gives
    NaN/inf. ``z`` is the VAE's input (latents already divided by the scaling factor).

    The fallback casts the VAE to float32 in place for the second decode and back afterwards (exact:
    fp16 -> fp32 -> fp16 returns the same bits) unless ``keep_fp32``, which leaves it in float32 as
    A1111 does for the rest of the session.
    """
    dtype = next(vae.parameters()).dtype
    out = vae.decode(z.to(dtype)).sample
    if dtype == torch.float32 or bool(torch.isfinite(out).all()):
        return VaeDecode(out.float(), False)
    # A1111 quirk: A1111 only reacts when *all* values are NaN; any NaN/inf already spoils the image.
    bad = int((~torch.isfinite(out)).sum())
    message = (
        f"VAE decode in {str(dtype).removeprefix('torch.')} produced {bad} NaN/inf values of {out.numel()} "
        "(the VAE overflows half precision); decoded again in float32. Use a fixed VAE (such as "
        "vae-ft-mse-840000-ema-pruned) or run the VAE in float32 to avoid the extra decode."
    )
    log.warning(message)
    vae.to(torch.float32)
    try:
        out32 = vae.decode(z.to(torch.float32)).sample
    finally:
        if not keep_fp32:
            vae.to(dtype)
    return VaeDecode(out32.float(), True, message)
