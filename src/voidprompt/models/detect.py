"""Which model family a checkpoint is, from its key names and tensor shapes alone.

Rules, checked in this order (UNet keys are CompVis ``model.diffusion_model.*``):

* SDXL: a ``label_emb`` (the size/crop conditioning) or ``conditioner.embedders`` keys, or a cross
  attention context width of 2048 (base) / 1280 (refiner).
* SD2: context width 1024 (OpenCLIP ViT-H), usually with linear ``proj_in`` and
  ``cond_stage_model.model.*`` OpenCLIP keys.
  **eps vs v-prediction cannot be told from shapes** (SD2.x-768-v and SD2.x-base have identical
  tensors; A1111 decides by running the UNet once). We report :attr:`ModelFamily.SD2_EPS` for every
  SD2 file and label it "SD2 (eps or v-prediction, undecidable from shapes)"; :attr:`ModelFamily.SD2_V`
  exists for callers that know better (e.g. from a config or metadata).
* SD1: context width 768 with ``cond_stage_model.transformer.*`` (OpenAI CLIP ViT-L/14);
  SD1-inpainting when the UNet's first convolution takes 9 channels (4 latent + 1 mask + 4 masked).

Anything else raises :class:`ModelLoadError` naming what the file looks like instead (a VAE, a LoRA,
an embedding) when that can be told.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

import torch

from voidprompt.errors import ModelLoadError, UnsupportedModelError

__all__ = ["ModelFamily", "detect_family", "require_supported"]

_UNET = "model.diffusion_model."


class ModelFamily(enum.Enum):
    SD1 = "sd1"
    SD1_INPAINT = "sd1-inpaint"
    SD2_EPS = "sd2"
    SD2_V = "sd2-v"
    SDXL = "sdxl"

    @property
    def label(self) -> str:
        return {
            ModelFamily.SD1: "SD1.x",
            ModelFamily.SD1_INPAINT: "SD1.x inpainting",
            ModelFamily.SD2_EPS: "SD2 (eps or v-prediction, undecidable from shapes)",
            ModelFamily.SD2_V: "SD2 v-prediction",
            ModelFamily.SDXL: "SDXL",
        }[self]

    @property
    def supported(self) -> bool:
        return self in (ModelFamily.SD1, ModelFamily.SD1_INPAINT)


def _context_width(shapes: Mapping[str, torch.Size]) -> int | None:
    for key, shape in shapes.items():
        if key.startswith(_UNET) and key.endswith(".attn2.to_k.weight") and len(shape) == 2:
            return int(shape[1])
    return None


def _looks_like(shapes: Mapping[str, torch.Size]) -> str:
    keys = list(shapes)
    if any(k.startswith(("encoder.down.", "decoder.up.")) for k in keys):
        return "a VAE file (pass it as the VAE, not as the model)"
    if any("lora_" in k for k in keys):
        return "a LoRA / LyCORIS network"
    if any(k in ("string_to_param", "emb_params", "clip_l") or k.startswith("string_to_param") for k in keys):
        return "a textual-inversion embedding"
    return f"an unknown file ({len(keys)} tensors, e.g. {keys[:3]})"


def detect_family(shapes: Mapping[str, torch.Size]) -> ModelFamily:
    """The family of a CompVis-layout state dict, given only its keys and shapes."""
    conv_in = shapes.get(_UNET + "input_blocks.0.0.weight")
    if conv_in is None:
        raise ModelLoadError(
            f"not a Stable Diffusion checkpoint: no '{_UNET}input_blocks.0.0.weight'; it looks like "
            f"{_looks_like(shapes)}."
        )
    context = _context_width(shapes)
    if (
        _UNET + "label_emb.0.0.weight" in shapes
        or any(k.startswith("conditioner.embedders.") for k in shapes)
        or context in (2048, 1280)
    ):
        return ModelFamily.SDXL
    if context == 1024 or any(k.startswith("cond_stage_model.model.") for k in shapes):
        return ModelFamily.SD2_EPS
    if context == 768 or any(k.startswith("cond_stage_model.transformer.") for k in shapes):
        in_channels = int(conv_in[1])
        if in_channels == 9:
            return ModelFamily.SD1_INPAINT
        if in_channels == 4:
            return ModelFamily.SD1
        raise ModelLoadError(
            f"SD1-like checkpoint whose UNet takes {in_channels} input channels; only 4 (txt2img) and "
            "9 (inpainting) are known."
        )
    raise ModelLoadError(
        f"unknown Stable Diffusion variant: cross-attention context width {context}, UNet input "
        f"channels {int(conv_in[1])}; voidprompt knows SD1 (768), SD2 (1024) and SDXL (2048)."
    )


def require_supported(family: ModelFamily, *, source: str) -> None:
    """Raise UnsupportedModelError for a family voidprompt recognises but cannot run yet."""
    if not family.supported:
        raise UnsupportedModelError(
            f"{source}: detected {family.label}: not supported yet; voidprompt runs SD1.x and SD1.x "
            "inpainting checkpoints (SD1.4, SD1.5, NovelAI and their merges)."
        )
