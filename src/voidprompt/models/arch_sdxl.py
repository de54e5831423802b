"""SDXL architecture (base, refiner, inpainting) read from a checkpoint's tensor shapes.

An SDXL checkpoint in the original (sgm) layout holds:

* the UNet under ``model.diffusion_model.``, named as SD1's, plus ``label_emb.0.0`` / ``label_emb.0.2``:
  the MLP that embeds the pooled text vector together with the size numbers (original size, crop,
  target size for the base; original size, crop, aesthetic score for the refiner);
* the VAE under ``first_stage_model.`` (SD1's architecture, other weights);
* CLIP ViT-L under ``conditioner.embedders.0.transformer.text_model.`` (base and inpainting; absent from
  the refiner);
* OpenCLIP ViT-bigG under ``conditioner.embedders.1.model.`` (the refiner's only text encoder, under
  ``conditioner.embedders.0.model.``), in open_clip's layout (:mod:`voidprompt.models.convert_open_clip`).

Shapes tell everything SD1's reading tells, plus: the UNet's input width of ``label_emb``
(``adm_in_channels``: the pooled width + 6 numbers x 256 for the base, 5 x 256 for the refiner), the
transformer depth of each level and of the middle block (SDXL base: none, 2, 10 and 10), and the
bigG tower's width, depth and projection width. What shapes cannot tell comes from
:class:`~voidprompt.models.arch.ArchConstants` with the SDXL defaults :data:`SDXL_DEFAULTS`: SDXL fixes
the attention head *width* at 64 (``unet_head_dim``; a level w wide has w / 64 heads - SD1 fixes the
head *count* at 8), bigG's head width 64 and exact-erf ``gelu``, the VAE scaling factor 0.13025, and
the 1024-pixel nominal size. A file may override them in its ``voidprompt.arch`` metadata (the tiny
test model does).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from voidprompt.errors import ModelLoadError
from voidprompt.models.arch import (
    ARCH_METADATA_KEY,
    UNET_PREFIX,
    ArchConstants,
    ClipArch,
    Shapes,
    UNetArch,
    VaeArch,
    clip_config,
    infer_clip_arch,
    infer_unet_arch,
    infer_vae_arch,
    unet_config,
    vae_config,
)

__all__ = [
    "CLIP_L_PREFIX",
    "OPEN_CLIP_PREFIX",
    "OPEN_CLIP_PREFIX_REFINER",
    "SDXL_DEFAULTS",
    "OpenClipArch",
    "SDXLArch",
    "infer_open_clip_arch",
    "infer_sdxl_arch",
    "is_sdxl_refiner_layout",
]

CLIP_L_PREFIX = "conditioner.embedders.0.transformer.text_model."
OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
OPEN_CLIP_PREFIX_REFINER = "conditioner.embedders.0.model."

# What an SDXL file without ``voidprompt.arch`` metadata means; every other key keeps SD1's value.
SDXL_DEFAULTS = ArchConstants(unet_sample_size=128, vae_sample_size=1024, scaling_factor=0.13025)


@dataclass(frozen=True)
class OpenClipArch:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    vocab_size: int
    max_positions: int
    projection_dim: int


def _need(shapes: Shapes, key: str, what: str) -> torch.Size:
    if key not in shapes:
        raise ModelLoadError(f"checkpoint has no '{key}' ({what}); it is not a complete SDXL checkpoint.")
    return shapes[key]


def _count(shapes: Shapes, pattern: str) -> int:
    rx = re.compile(pattern)
    return len({int(m.group(1)) for k in shapes if (m := rx.match(k))})


def is_sdxl_refiner_layout(shapes: Shapes) -> bool:
    """The refiner keeps bigG as its first (only) embedder; the base has CLIP-L there."""
    return any(k.startswith(OPEN_CLIP_PREFIX_REFINER) for k in shapes)


def infer_open_clip_arch(shapes: Shapes, prefix: str) -> OpenClipArch:
    """OpenCLIP text tower structure from open_clip-layout shapes under ``prefix``."""
    tok = _need(shapes, f"{prefix}token_embedding.weight", "OpenCLIP token embedding")
    pos = _need(shapes, f"{prefix}positional_embedding", "OpenCLIP positional embedding")
    proj = _need(shapes, f"{prefix}text_projection", "OpenCLIP text projection")
    fc = _need(shapes, f"{prefix}transformer.resblocks.0.mlp.c_fc.weight", "OpenCLIP MLP")
    layers = _count(shapes, re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.")
    width = int(tok[1])
    if len(proj) != 2 or int(proj[0]) != width:
        raise ModelLoadError(
            f"'{prefix}text_projection' has shape {tuple(proj)}; it should map the tower's width {width}."
        )
    return OpenClipArch(
        hidden_size=width,
        intermediate_size=int(fc[0]),
        num_layers=layers,
        vocab_size=int(tok[0]),
        max_positions=int(pos[0]),
        projection_dim=int(proj[1]),
    )


@dataclass(frozen=True)
class SDXLArch:
    """Everything needed to build the modules of an SDXL checkpoint (base, refiner or inpainting)."""

    unet: UNetArch
    adm_in_channels: int  # label_emb's input: pooled text width + the size (and aesthetic) embeddings
    mid_depth: int  # transformer blocks in the middle block
    vae: VaeArch
    clip_l: ClipArch | None  # None for the refiner
    clip_g: OpenClipArch
    constants: ArchConstants

    @property
    def is_refiner(self) -> bool:
        return self.clip_l is None

    @property
    def open_clip_prefix(self) -> str:
        return OPEN_CLIP_PREFIX_REFINER if self.is_refiner else OPEN_CLIP_PREFIX

    def unet_config(self) -> dict[str, Any]:
        """diffusers ``UNet2DConditionModel`` keyword arguments."""
        c = self.constants
        cfg = unet_config(self.unet, c)
        widths = cfg["block_out_channels"]
        levels = len(widths)
        for level, width in enumerate(widths):
            # diffusers' middle block takes the last level's head count and depth.
            if (self.unet.attention_levels[level] or level == levels - 1) and width % c.unet_head_dim:
                raise ModelLoadError(
                    f"UNet width {width} is not a multiple of the head width {c.unet_head_dim}; "
                    f"set 'unet_head_dim' in the '{ARCH_METADATA_KEY}' metadata."
                )
        depth = list(self.unet.transformer_depth)
        if self.unet.attention_levels[-1] and depth[-1] != self.mid_depth:
            raise ModelLoadError(
                f"UNet middle block has {self.mid_depth} transformer blocks but the last level has "
                f"{depth[-1]}; this SDXL variant (a distilled UNet?) is not supported."
            )
        depth[-1] = self.mid_depth
        cfg.update(
            # diffusers' legacy name: the number of heads of each level.
            attention_head_dim=tuple(max(1, w // c.unet_head_dim) for w in widths),
            transformer_layers_per_block=tuple(depth),
            addition_embed_type="text_time",
            addition_time_embed_dim=c.unet_addition_time_embed_dim,
            projection_class_embeddings_input_dim=self.adm_in_channels,
        )
        return cfg

    def vae_config(self) -> dict[str, Any]:
        return vae_config(self.vae, self.constants)

    def clip_l_config(self) -> dict[str, Any] | None:
        return None if self.clip_l is None else clip_config(self.clip_l, self.constants)

    def clip_g_config(self) -> dict[str, Any]:
        """transformers ``CLIPTextConfig`` keyword arguments for bigG (built in code; no hub)."""
        g, c = self.clip_g, self.constants
        if g.hidden_size % c.clip_g_head_dim:
            raise ModelLoadError(
                f"OpenCLIP width {g.hidden_size} is not a multiple of head width {c.clip_g_head_dim}; "
                f"set 'clip_g_head_dim' in the '{ARCH_METADATA_KEY}' metadata."
            )
        return {
            "vocab_size": g.vocab_size,
            "hidden_size": g.hidden_size,
            "intermediate_size": g.intermediate_size,
            "num_hidden_layers": g.num_layers,
            "num_attention_heads": g.hidden_size // c.clip_g_head_dim,
            "max_position_embeddings": g.max_positions,
            "hidden_act": c.clip_g_hidden_act,
            "layer_norm_eps": c.clip_g_layer_norm_eps,
            "projection_dim": g.projection_dim,
            # open_clip's tokenizer: start 49406, end 49407, padding 0. transformers pools at the first
            # end token, which is open_clip's argmax position whatever fills the rest.
            "bos_token_id": 49406,
            "eos_token_id": 49407,
            "pad_token_id": 0,
        }

    def build(self, device: torch.device | str = "meta") -> tuple[Any, Any, Any, Any]:
        """(unet, vae, text_encoder or None, text_encoder_2) on ``device`` (meta: no memory)."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        clip_l = self.clip_l_config()
        with torch.device(device):
            unet = UNet2DConditionModel(**self.unet_config())
            vae = AutoencoderKL(**self.vae_config())
            text_encoder = None if clip_l is None else CLIPTextModel(CLIPTextConfig(**clip_l))
            text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**self.clip_g_config()))
        return unet, vae, text_encoder, text_encoder_2


def _check_symmetric_up_path(shapes: Shapes, arch: UNetArch) -> None:
    """SDXL's output blocks mirror its input blocks; a UNet whose do not is another model."""
    per = arch.num_res_blocks + 1
    levels = len(arch.channel_mult)
    for up in range(levels):
        level = levels - 1 - up
        for j in range(per):
            prefix = f"{UNET_PREFIX}output_blocks.{up * per + j}.1."
            depth = _count(shapes, re.escape(prefix) + r"transformer_blocks\.(\d+)\.")
            want = arch.transformer_depth[level] if arch.attention_levels[level] else 0
            if depth != want:
                raise ModelLoadError(
                    f"UNet output block {up * per + j} has {depth} transformer blocks where the input "
                    f"level {level} has {want}; this SDXL variant (a distilled UNet?) is not supported."
                )


def _clip_l_prefix_of(shapes: Shapes) -> str:
    """CLIP-L's prefix as saved: with ``text_model.``, or without it (pre-4.x transformers saves)."""
    if any(k.startswith(CLIP_L_PREFIX) for k in shapes):
        return CLIP_L_PREFIX
    return CLIP_L_PREFIX.removesuffix("text_model.")


def infer_sdxl_arch(shapes: Shapes, constants: ArchConstants | None = None) -> SDXLArch:
    """The whole architecture of an original-layout SDXL checkpoint."""
    unet = infer_unet_arch(shapes)
    _check_symmetric_up_path(shapes, unet)
    adm = _need(shapes, f"{UNET_PREFIX}label_emb.0.0.weight", "UNet size/pooled-text embedding")
    mid_depth = _count(shapes, re.escape(UNET_PREFIX) + r"middle_block\.1\.transformer_blocks\.(\d+)\.")
    if mid_depth == 0:
        raise ModelLoadError("SDXL UNet has no transformer blocks in its middle block; unknown layout.")
    refiner = is_sdxl_refiner_layout(shapes)
    return SDXLArch(
        unet=unet,
        adm_in_channels=int(adm[1]),
        mid_depth=mid_depth,
        vae=infer_vae_arch(shapes),
        clip_l=None if refiner else infer_clip_arch(shapes, _clip_l_prefix_of(shapes)),
        clip_g=infer_open_clip_arch(shapes, OPEN_CLIP_PREFIX_REFINER if refiner else OPEN_CLIP_PREFIX),
        constants=constants or SDXL_DEFAULTS,
    )
