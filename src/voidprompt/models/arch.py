"""SD1.x architecture read from a checkpoint's tensor shapes, plus the constants shapes cannot tell.

Shapes give widths, levels, res blocks per level, which levels have attention, transformer depth,
context width, UNet in/out channels (4, or 9 for inpainting), VAE widths and latent channels, and the
CLIP text tower's width, layers, MLP width, vocabulary and positions. Shapes cannot give the constants
below; they default to the SD1 values and a safetensors file may override them in its metadata under
the key ``voidprompt.arch``, a JSON object (the miniature model uses it). Every key is optional:

================================  ============  ==========================================================
key                               SD1 default   meaning
================================  ============  ==========================================================
``unet_heads``                    8             attention heads in every UNet transformer (SD1 fixes the
                                                count; diffusers calls it ``attention_head_dim`` for
                                                historical reasons)
``unet_norm_groups``              32            GroupNorm groups in the UNet (res blocks, transformers,
                                                output)
``unet_norm_eps``                 1e-5          GroupNorm eps of UNet res blocks and output norm
``unet_sample_size``              64            nominal latent size (a config label only; any size runs)
``vae_norm_groups``               32            GroupNorm groups in the VAE
``vae_sample_size``               512           nominal image size (diffusers uses it as the VAE tiling
                                                size)
``clip_head_dim``                 64            CLIP head width; heads = hidden width / this
``clip_hidden_act``               "quick_gelu"  CLIP MLP activation (transformers ACT2FN name)
``clip_layer_norm_eps``           1e-5          CLIP LayerNorm eps
``scaling_factor``                0.18215       VAE latent scaling factor
``unet_head_dim``                 64            SDXL only: the width of every UNet attention head (SDXL
                                                fixes the width: a level w wide has w / 64 heads)
``unet_addition_time_embed_dim``  256           SDXL only: sinusoidal width of each size, crop and
                                                aesthetic-score number fed to the UNet
``clip_g_head_dim``               64            SDXL only: OpenCLIP ViT-bigG head width
``clip_g_hidden_act``             "gelu"        SDXL only: OpenCLIP ViT-bigG MLP activation
``clip_g_layer_norm_eps``         1e-5          SDXL only: OpenCLIP ViT-bigG LayerNorm eps
================================  ============  ==========================================================

An SDXL file starts from other defaults for three keys (``unet_sample_size`` 128, ``vae_sample_size``
1024, ``scaling_factor`` 0.13025; see :mod:`voidprompt.models.arch_sdxl`); its metadata overrides
those defaults, key by key, exactly as an SD1 file's overrides SD1's.

A ``.ckpt`` has no metadata block; there the same JSON string may sit in the top-level pickled dict
under the same key, next to ``state_dict``.

Unknown keys or values of the wrong type are refused with :class:`ModelLoadError` rather than ignored,
so a typo cannot silently change a model.

FROZEN: this shape -> config mapping, the defaults and the metadata key names are part of the file
format of every checkpoint voidprompt has written (the shipped miniature model included). Changing any
of them would make those files load into a different network. Add new keys with defaults that reproduce
today's behaviour; never change an existing one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch

from voidprompt.errors import ModelLoadError

__all__ = [
    "ARCH_METADATA_KEY",
    "CLIP_PREFIX",
    "UNET_PREFIX",
    "VAE_PREFIX",
    "ArchConstants",
    "ClipArch",
    "SD1Arch",
    "UNetArch",
    "VaeArch",
    "build_modules",
    "infer_arch",
    "infer_clip_arch",
    "infer_unet_arch",
    "infer_vae_arch",
]

ARCH_METADATA_KEY = "voidprompt.arch"
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."
# Checkpoints saved with pre-4.x transformers lack the ``text_model.`` level.
CLIP_PREFIX_OLD = "cond_stage_model.transformer."

Shapes = Mapping[str, torch.Size]


@dataclass(frozen=True)
class ArchConstants:
    """The SD1 constants shapes cannot tell; see the module docstring for each key."""

    unet_heads: int = 8
    unet_norm_groups: int = 32
    unet_norm_eps: float = 1e-5
    unet_sample_size: int = 64
    vae_norm_groups: int = 32
    vae_sample_size: int = 512
    clip_head_dim: int = 64
    clip_hidden_act: str = "quick_gelu"
    clip_layer_norm_eps: float = 1e-5
    scaling_factor: float = 0.18215
    unet_head_dim: int = 64
    unet_addition_time_embed_dim: int = 256
    clip_g_head_dim: int = 64
    clip_g_hidden_act: str = "gelu"
    clip_g_layer_norm_eps: float = 1e-5

    @classmethod
    def from_metadata(
        cls,
        metadata: Mapping[str, str] | None,
        *,
        source: str = "checkpoint",
        defaults: ArchConstants | None = None,
    ) -> ArchConstants:
        """Read the ``voidprompt.arch`` override from safetensors metadata (absent -> ``defaults``,
        which are SD1's unless the family has its own)."""
        base = defaults if defaults is not None else cls()
        if not metadata or ARCH_METADATA_KEY not in metadata:
            return base
        try:
            data = json.loads(metadata[ARCH_METADATA_KEY])
        except json.JSONDecodeError as exc:
            raise ModelLoadError(
                f"{source}: metadata '{ARCH_METADATA_KEY}' is not valid JSON ({exc}); fix or remove it."
            ) from exc
        if not isinstance(data, dict):
            raise ModelLoadError(f"{source}: metadata '{ARCH_METADATA_KEY}' must be a JSON object.")
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in data.items():
            if key not in known:
                raise ModelLoadError(
                    f"{source}: unknown key '{key}' in metadata '{ARCH_METADATA_KEY}'; "
                    f"known keys: {', '.join(sorted(known))}."
                )
            default = getattr(cls(), key)
            ok = (
                isinstance(value, str)
                if isinstance(default, str)
                else isinstance(value, int) and not isinstance(value, bool)
                if isinstance(default, int)
                else isinstance(value, int | float) and not isinstance(value, bool)
            )
            if not ok:
                raise ModelLoadError(
                    f"{source}: '{ARCH_METADATA_KEY}' key '{key}' has value {value!r}; "
                    f"expected a {type(default).__name__}."
                )
            values[key] = float(value) if isinstance(default, float) else value
        return replace(base, **values)

    def to_metadata(self, defaults: ArchConstants | None = None) -> dict[str, str]:
        """Metadata entry that reproduces these constants; only keys that differ from ``defaults``
        (SD1's unless given) are written."""
        default = defaults if defaults is not None else ArchConstants()
        diff = {k: v for k, v in asdict(self).items() if getattr(default, k) != v}
        return {ARCH_METADATA_KEY: json.dumps(diff, sort_keys=True)} if diff else {}


@dataclass(frozen=True)
class UNetArch:
    in_channels: int
    out_channels: int
    model_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    attention_levels: tuple[bool, ...]
    transformer_depth: tuple[int, ...]
    context_dim: int
    linear_projection: bool


@dataclass(frozen=True)
class VaeArch:
    in_channels: int
    out_channels: int
    channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    latent_channels: int


@dataclass(frozen=True)
class ClipArch:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    vocab_size: int
    max_positions: int


@dataclass(frozen=True)
class SD1Arch:
    """Everything needed to build the three modules of an SD1.x checkpoint."""

    unet: UNetArch
    vae: VaeArch
    clip: ClipArch
    constants: ArchConstants

    def unet_config(self) -> dict[str, Any]:
        return unet_config(self.unet, self.constants)

    def vae_config(self) -> dict[str, Any]:
        return vae_config(self.vae, self.constants)

    def clip_config(self) -> dict[str, Any]:
        return clip_config(self.clip, self.constants)


def _need(shapes: Shapes, key: str, what: str) -> torch.Size:
    if key not in shapes:
        raise ModelLoadError(
            f"checkpoint has no '{key}' ({what}); it is not a complete Stable Diffusion checkpoint."
        )
    return shapes[key]


def _indices(shapes: Shapes, pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in shapes if (m := rx.match(k))})


def infer_unet_arch(shapes: Shapes, prefix: str = UNET_PREFIX) -> UNetArch:
    """UNet structure from CompVis ``model.diffusion_model.*`` shapes."""
    p = prefix
    conv_in = _need(shapes, f"{p}input_blocks.0.0.weight", "UNet input convolution")
    model_channels, in_channels = int(conv_in[0]), int(conv_in[1])
    out_channels = int(_need(shapes, f"{p}out.2.weight", "UNet output convolution")[0])
    inputs = _indices(shapes, re.escape(p) + r"input_blocks\.(\d+)\.")
    ops = _indices(shapes, re.escape(p) + r"input_blocks\.(\d+)\.0\.op\.weight")
    # Each level holds num_res_blocks res blocks then (except the last level) a downsampler.
    num_res_blocks = ops[0] - 1 if ops else len(inputs) - 1
    per_level = num_res_blocks + 1
    if num_res_blocks < 1 or len(inputs) % per_level:
        raise ModelLoadError(f"UNet input blocks {inputs} do not form whole levels; unknown layout.")
    levels = len(inputs) // per_level
    mult: list[int] = []
    attention: list[bool] = []
    depth: list[int] = []
    context_dim = 0
    linear = False
    for level in range(levels):
        first = 1 + level * per_level
        out_w = _need(shapes, f"{p}input_blocks.{first}.0.out_layers.3.weight", "UNet res block")
        if int(out_w[0]) % model_channels:
            raise ModelLoadError(
                f"UNet level {level} width {int(out_w[0])} is not a multiple of {model_channels}."
            )
        mult.append(int(out_w[0]) // model_channels)
        attn = f"{p}input_blocks.{first}.1."
        has_attn = f"{attn}proj_in.weight" in shapes
        attention.append(has_attn)
        if has_attn:
            blocks = _indices(shapes, re.escape(attn) + r"transformer_blocks\.(\d+)\.")
            depth.append(len(blocks))
            context_dim = int(shapes[f"{attn}transformer_blocks.0.attn2.to_k.weight"][1])
            linear = len(shapes[f"{attn}proj_in.weight"]) == 2
        else:
            depth.append(1)
    if not any(attention):
        mid = f"{p}middle_block.1.transformer_blocks.0.attn2.to_k.weight"
        context_dim = int(_need(shapes, mid, "UNet cross attention")[1])
    time_dim = int(_need(shapes, f"{p}time_embed.0.weight", "UNet time embedding")[0])
    if time_dim != 4 * model_channels:
        raise ModelLoadError(
            f"UNet time embedding width {time_dim} is not 4 x {model_channels}; unknown layout."
        )
    return UNetArch(
        in_channels=in_channels,
        out_channels=out_channels,
        model_channels=model_channels,
        channel_mult=tuple(mult),
        num_res_blocks=num_res_blocks,
        attention_levels=tuple(attention),
        transformer_depth=tuple(depth),
        context_dim=context_dim,
        linear_projection=linear,
    )


def infer_vae_arch(shapes: Shapes, prefix: str = VAE_PREFIX) -> VaeArch:
    """VAE structure from CompVis ``first_stage_model.*`` shapes (or a bare VAE file with prefix "")."""
    p = prefix
    conv_in = _need(shapes, f"{p}encoder.conv_in.weight", "VAE encoder input convolution")
    levels = _indices(shapes, re.escape(p) + r"encoder\.down\.(\d+)\.")
    blocks = _indices(shapes, re.escape(p) + r"encoder\.down\.0\.block\.(\d+)\.")
    if not levels or not blocks:
        raise ModelLoadError("VAE encoder has no down blocks; unknown layout.")
    channels = int(conv_in[0])
    mult = []
    for level in levels:
        w = _need(shapes, f"{p}encoder.down.{level}.block.{blocks[-1]}.conv2.weight", "VAE res block")
        mult.append(int(w[0]) // channels)
    return VaeArch(
        in_channels=int(conv_in[1]),
        out_channels=int(_need(shapes, f"{p}decoder.conv_out.weight", "VAE output convolution")[0]),
        channels=channels,
        channel_mult=tuple(mult),
        num_res_blocks=len(blocks),
        latent_channels=int(_need(shapes, f"{p}post_quant_conv.weight", "VAE post-quant convolution")[0]),
    )


def infer_clip_arch(shapes: Shapes, prefix: str = CLIP_PREFIX) -> ClipArch:
    """CLIP text tower structure from ``cond_stage_model.transformer.text_model.*`` shapes."""
    p = prefix
    tok = _need(shapes, f"{p}embeddings.token_embedding.weight", "CLIP token embedding")
    pos = _need(shapes, f"{p}embeddings.position_embedding.weight", "CLIP position embedding")
    layers = _indices(shapes, re.escape(p) + r"encoder\.layers\.(\d+)\.")
    if not layers:
        raise ModelLoadError("CLIP text encoder has no layers; unknown layout.")
    fc1 = _need(shapes, f"{p}encoder.layers.0.mlp.fc1.weight", "CLIP MLP")
    return ClipArch(
        hidden_size=int(tok[1]),
        intermediate_size=int(fc1[0]),
        num_layers=len(layers),
        vocab_size=int(tok[0]),
        max_positions=int(pos[0]),
    )


def clip_prefix_of(shapes: Shapes) -> str:
    """Which CLIP prefix a checkpoint uses (with or without ``text_model.``)."""
    if any(k.startswith(CLIP_PREFIX) for k in shapes):
        return CLIP_PREFIX
    return CLIP_PREFIX_OLD


def infer_arch(shapes: Shapes, constants: ArchConstants | None = None) -> SD1Arch:
    """The whole SD1.x architecture of a CompVis-layout checkpoint."""
    return SD1Arch(
        unet=infer_unet_arch(shapes),
        vae=infer_vae_arch(shapes),
        clip=infer_clip_arch(shapes, clip_prefix_of(shapes)),
        constants=constants or ArchConstants(),
    )


def unet_config(arch: UNetArch, constants: ArchConstants) -> dict[str, Any]:
    """diffusers ``UNet2DConditionModel`` keyword arguments."""
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in arch.attention_levels)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(arch.attention_levels))
    widths = tuple(arch.model_channels * m for m in arch.channel_mult)
    for w in widths:
        if w % constants.unet_norm_groups:
            raise ModelLoadError(
                f"UNet width {w} is not divisible by {constants.unet_norm_groups} GroupNorm groups; "
                f"set 'unet_norm_groups' in the '{ARCH_METADATA_KEY}' metadata."
            )
    return {
        "sample_size": constants.unet_sample_size,
        "in_channels": arch.in_channels,
        "out_channels": arch.out_channels,
        "down_block_types": down,
        "up_block_types": up,
        "block_out_channels": widths,
        "layers_per_block": arch.num_res_blocks,
        "cross_attention_dim": arch.context_dim,
        # diffusers' legacy name: for SD1 this value is the number of heads.
        "attention_head_dim": constants.unet_heads,
        "transformer_layers_per_block": arch.transformer_depth,
        "use_linear_projection": arch.linear_projection,
        "norm_num_groups": constants.unet_norm_groups,
        "norm_eps": constants.unet_norm_eps,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "act_fn": "silu",
    }


def vae_config(arch: VaeArch, constants: ArchConstants) -> dict[str, Any]:
    """diffusers ``AutoencoderKL`` keyword arguments."""
    levels = len(arch.channel_mult)
    return {
        "in_channels": arch.in_channels,
        "out_channels": arch.out_channels,
        "down_block_types": ("DownEncoderBlock2D",) * levels,
        "up_block_types": ("UpDecoderBlock2D",) * levels,
        "block_out_channels": tuple(arch.channels * m for m in arch.channel_mult),
        "layers_per_block": arch.num_res_blocks,
        "latent_channels": arch.latent_channels,
        "norm_num_groups": constants.vae_norm_groups,
        "sample_size": constants.vae_sample_size,
        "scaling_factor": constants.scaling_factor,
        "act_fn": "silu",
    }


def clip_config(arch: ClipArch, constants: ArchConstants) -> dict[str, Any]:
    """transformers ``CLIPTextConfig`` keyword arguments (built in code; no hub)."""
    if arch.hidden_size % constants.clip_head_dim:
        raise ModelLoadError(
            f"CLIP width {arch.hidden_size} is not a multiple of head width {constants.clip_head_dim}; "
            f"set 'clip_head_dim' in the '{ARCH_METADATA_KEY}' metadata."
        )
    return {
        "vocab_size": arch.vocab_size,
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.intermediate_size,
        "num_hidden_layers": arch.num_layers,
        "num_attention_heads": arch.hidden_size // constants.clip_head_dim,
        "max_position_embeddings": arch.max_positions,
        "hidden_act": constants.clip_hidden_act,
        "layer_norm_eps": constants.clip_layer_norm_eps,
        "projection_dim": arch.hidden_size,
        # SD1's tokenizer: BOS 49406, EOS 49407, padding with EOS. Only pooling reads eos_token_id.
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 49407,
    }


def build_modules(arch: SD1Arch, device: torch.device | str = "meta") -> tuple[Any, Any, Any]:
    """(unet, vae, text_encoder) built from ``arch``; on the meta device by default (no memory)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device(device):
        unet = UNet2DConditionModel(**arch.unet_config())
        vae = AutoencoderKL(**arch.vae_config())
        text_encoder = CLIPTextModel(CLIPTextConfig(**arch.clip_config()))
    return unet, vae, text_encoder
