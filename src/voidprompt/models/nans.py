"""A1111's NaN check on what the UNet and the VAE produce (its ``devices.test_for_nans``, 1.10).

A1111 1.10 tests the sampled latents of a batch once, after the last step (``"unet"``), and each
decoded image (``"vae"``); a NaN stops the generation with "A tensor with NaNs was produced in
Unet/VAE", unless ``--disable-nan-check``. (Older versions tested every denoiser call's output, and
the whole tensor: "all NaNs".) The first sentence of each message is A1111's, so a user can search
for it; the advice after it names voidprompt's own flags.

The cost is reading one value, a device sync on a GPU, once per batch and once per decoded image.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from voidprompt.errors import NansError

__all__ = ["check_for_nans", "nans_message"]

Where = Literal["unet", "vae"]

_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def check_for_nans(x: Tensor, where: Where, *, dtype: torch.dtype) -> None:
    """Raise :class:`NansError` when ``x`` is NaN where A1111 looks; ``dtype`` is what the model
    computed in (it picks the advice)."""
    # A1111 quirk: only the first value is tested (x[0, 0, 0, 0]: the first image's top-left pixel of
    # its first channel). A NaN model makes NaN everywhere, which this finds; a tensor that is NaN in
    # one patch, or in a later image of the batch only, passes and gives its black patch or picture.
    if bool(torch.isnan(x[(0,) * x.ndim])):
        raise NansError(nans_message(where, dtype))


def nans_message(where: Where, dtype: torch.dtype) -> str:
    """A1111's message for ``where`` (one line), with the voidprompt option that may fix it."""
    name = _NAMES.get(dtype, str(dtype).removeprefix("torch."))
    half = dtype != torch.float32
    if where == "unet":
        message = "A tensor with NaNs was produced in Unet."
        if half:
            message += (
                f" The UNet may overflow {name} with this model and prompt (try --precision fp32), or a "
                "weight in use holds NaN or inf (the checkpoint, a LoRA, an embedding, a hypernetwork)."
            )
        else:
            message += (
                " It ran in fp32, so a weight in use holds NaN or inf or is scaled out of range: the "
                "checkpoint, a LoRA or its multiplier, an embedding or a hypernetwork; generate without "
                "each to find which."
            )
    else:
        message = "A tensor with NaNs was produced in VAE."
        if half:
            message += f" The VAE may overflow {name}; try --precision fp32."
        else:
            message += (
                " It decoded in fp32, so the VAE's weights or the latents it was given hold NaN or inf: "
                "try another VAE (--vae), or generate without LoRAs, embeddings and hypernetworks."
            )
    return message + " Use --disable-nan-check to turn this check off."
