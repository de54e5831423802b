"""Which model family a checkpoint is, from its key names and tensor shapes alone.

Rules, checked in this order (UNet keys are CompVis ``model.diffusion_model.*``):

* SDXL: a ``label_emb`` (the size/crop conditioning) or ``conditioner.embedders`` keys, or a cross
  attention context width of 2048 (base) / 1280 (refiner). Then, as A1111 tells them apart:
  the refiner keeps OpenCLIP ViT-bigG as its only embedder (``conditioner.embedders.0.model.*``;
  without text encoder keys, a context width of 1280); SDXL inpainting's UNet takes 9 input
  channels; the base takes 4.
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

Prediction type (:func:`detect_prediction`). A1111 1.10 cannot tell a v-prediction SDXL file (such as
NoobAI-XL V-Pred) from an eps one; its later code and reForge read two marker keys that such files
carry (their values do not matter): ``v_pred`` means the UNet predicts v, and ``ztsnr`` asks for the
zero-terminal-SNR schedule (A1111's ``rescale_zero_terminal_snr_abar`` applied to ``alphas_cumprod``,
what its "Zero Terminal SNR" noise-schedule option computes). The two keys are read independently, as
A1111 does; the loader records them and the sampling side applies them.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping

import torch

from voidprompt.errors import ModelLoadError, UnsupportedModelError

__all__ = [
    "V_PRED_KEY",
    "ZTSNR_KEY",
    "ModelFamily",
    "detect_family",
    "detect_prediction",
    "require_supported",
]

_UNET = "model.diffusion_model."
V_PRED_KEY = "v_pred"
ZTSNR_KEY = "ztsnr"


class ModelFamily(enum.Enum):
    SD1 = "sd1"
    SD1_INPAINT = "sd1-inpaint"
    SD2_EPS = "sd2"
    SD2_V = "sd2-v"
    SDXL = "sdxl"
    SDXL_REFINER = "sdxl-refiner"
    SDXL_INPAINT = "sdxl-inpaint"

    @property
    def label(self) -> str:
        return {
            ModelFamily.SD1: "SD1.x",
            ModelFamily.SD1_INPAINT: "SD1.x inpainting",
            ModelFamily.SD2_EPS: "SD2 (eps or v-prediction, undecidable from shapes)",
            ModelFamily.SD2_V: "SD2 v-prediction",
            ModelFamily.SDXL: "SDXL",
            ModelFamily.SDXL_REFINER: "SDXL refiner",
            ModelFamily.SDXL_INPAINT: "SDXL inpainting",
        }[self]

    @property
    def supported(self) -> bool:
        return not self.is_sd2

    @property
    def is_sdxl(self) -> bool:
        return self in (ModelFamily.SDXL, ModelFamily.SDXL_REFINER, ModelFamily.SDXL_INPAINT)

    @property
    def is_sd2(self) -> bool:
        return self in (ModelFamily.SD2_EPS, ModelFamily.SD2_V)


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
    in_channels = int(conv_in[1])
    has_conditioner = any(k.startswith("conditioner.embedders.") for k in shapes)
    if _UNET + "label_emb.0.0.weight" in shapes or has_conditioner or context in (2048, 1280):
        if any(k.startswith("conditioner.embedders.0.model.") for k in shapes) or (
            not has_conditioner and context == 1280
        ):
            return ModelFamily.SDXL_REFINER
        if in_channels == 9:
            return ModelFamily.SDXL_INPAINT
        if in_channels == 4:
            return ModelFamily.SDXL
        raise ModelLoadError(
            f"SDXL checkpoint whose UNet takes {in_channels} input channels; only 4 (txt2img) and "
            "9 (inpainting) are known."
        )
    if context == 1024 or any(k.startswith("cond_stage_model.model.") for k in shapes):
        return ModelFamily.SD2_EPS
    if context == 768 or any(k.startswith("cond_stage_model.transformer.") for k in shapes):
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


def detect_prediction(keys: Iterable[str]) -> tuple[str, bool]:
    """(prediction, zero_terminal_snr) from the marker keys (see the module docstring):
    ``("v", ...)`` when ``v_pred`` is present, else ``("eps", ...)``; True when ``ztsnr`` is."""
    present = set(keys)
    return ("v" if V_PRED_KEY in present else "eps"), ZTSNR_KEY in present


def require_supported(family: ModelFamily, *, source: str) -> None:
    """Raise UnsupportedModelError for a family voidprompt recognises but cannot run yet."""
    if not family.supported:
        raise UnsupportedModelError(
            f"{source}: detected {family.label}: not supported yet; voidprompt runs SD1.x checkpoints "
            "(SD1.4, SD1.5, NovelAI and their merges) and SDXL ones (base, refiner, Pony, Illustrious, "
            "NoobAI, Animagine and their merges), inpainting variants included."
        )
