"""SDXL checkpoints (original sgm key names) <-> diffusers / transformers modules, both ways.

The UNet and VAE convert exactly as SD1's (plus ``label_emb``, in
:func:`voidprompt.models.convert.unet_rules`); CLIP ViT-L keeps transformers' names under
``conditioner.embedders.0.transformer.text_model.``; bigG is in open_clip's layout
(:mod:`voidprompt.models.convert_open_clip`). One key map serves the loader and the reverse
conversion (saving, merging, the tiny test checkpoints).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from voidprompt.models.arch import VAE_PREFIX
from voidprompt.models.arch_sdxl import CLIP_L_PREFIX, OPEN_CLIP_PREFIX, OPEN_CLIP_PREFIX_REFINER
from voidprompt.models.convert import (
    CheckpointKeyMap,
    ConvertedStateDicts,
    convert_state_dict,
    modules_to_checkpoint,
)

__all__ = [
    "SDXL_POSITION_IDS_KEY",
    "sdxl_checkpoint_to_modules",
    "sdxl_key_map",
    "sdxl_modules_to_checkpoint",
]

SDXL_POSITION_IDS_KEY = CLIP_L_PREFIX + "embeddings.position_ids"


def sdxl_key_map(
    unet: Any, vae: Any, text_encoder: Any, text_encoder_2: Any, *, vae_prefix: str = VAE_PREFIX
) -> CheckpointKeyMap:
    """The key map of an SDXL model; ``text_encoder`` None means the refiner (bigG is embedder 0)."""
    return CheckpointKeyMap(
        unet,
        vae,
        text_encoder,
        vae_prefix=vae_prefix,
        clip_prefix=CLIP_L_PREFIX,
        text_encoder_2=text_encoder_2,
        open_clip_prefix=OPEN_CLIP_PREFIX_REFINER if text_encoder is None else OPEN_CLIP_PREFIX,
    )


def sdxl_checkpoint_to_modules(
    state_dict: Mapping[str, torch.Tensor], unet: Any, vae: Any, text_encoder: Any, text_encoder_2: Any
) -> ConvertedStateDicts:
    """Convert an in-memory SDXL state dict for the given (possibly meta) modules."""
    return convert_state_dict(sdxl_key_map(unet, vae, text_encoder, text_encoder_2), state_dict)


def sdxl_modules_to_checkpoint(
    unet: Any, vae: Any, text_encoder: Any, text_encoder_2: Any
) -> dict[str, torch.Tensor]:
    """The reverse conversion: SDXL modules -> an original-layout state dict.

    Writes the int64 ``position_ids`` buffer that sgm's CLIP-L carries, as real SDXL files do. No
    schedule: sgm computes it (see :func:`voidprompt.models.load.sd1_alphas_cumprod`).
    """
    keymap = sdxl_key_map(unet, vae, text_encoder, text_encoder_2)
    modules = {"unet": unet, "vae": vae, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    out = modules_to_checkpoint(keymap, modules)
    if text_encoder is not None:
        positions = int(text_encoder.config.max_position_embeddings)
        out[SDXL_POSITION_IDS_KEY] = torch.arange(positions, dtype=torch.int64).unsqueeze(0)
    return out
