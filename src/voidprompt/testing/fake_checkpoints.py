"""Checkpoints for tests and benchmarks: tiny real ones, and full-size ones made of meta tensors.

* :func:`tiny_sd1_state_dict` - an SD1-shaped model a few MB big in the exact CompVis layout: two UNet
  levels (32, 64 channels; cross attention at the first level only, as SD1 has none at its last),
  one res block per level, a 32-wide two-layer CLIP text tower with the full 49408-token vocabulary and
  77 positions, and a two-level VAE. It is made by building the diffusers/transformers modules with
  seeded random weights and running the reverse conversion, so it round-trips exactly.
* :func:`tiny_sdxl_state_dict` - the same for SDXL, in the original (sgm) layout: two UNet levels (32,
  64 channels, two res blocks each; cross attention at the second level only, two transformer blocks
  deep, as SDXL has none at its first), a small ``label_emb``, a 32-wide CLIP-L tower and a 32-wide
  bigG tower with its projection (both with the full vocabulary and 77 positions), and the tiny VAE.
  Refiner (bigG only, aesthetic score) and inpainting (9 input channels) variants.
* :func:`fake_full_state_dict` - full-size key/shape layouts of each family on the meta device, for
  detection and key-coverage tests (no memory used).
* :func:`write_random_full_size_sd15` - a real full-size SD1.5-layout file of random numbers for the
  loading benchmark.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import torch

from voidprompt.files import atomic_write
from voidprompt.models.arch import (
    ArchConstants,
    ClipArch,
    SD1Arch,
    UNetArch,
    VaeArch,
    build_modules,
)
from voidprompt.models.arch_sdxl import OPEN_CLIP_PREFIX, SDXL_DEFAULTS, OpenClipArch, SDXLArch
from voidprompt.models.convert import modules_to_compvis, unet_rules, vae_module_to_compvis
from voidprompt.models.convert_sdxl import sdxl_modules_to_checkpoint
from voidprompt.models.detect import ModelFamily
from voidprompt.models.load import sd1_alphas_cumprod

__all__ = [
    "SD15_ARCH",
    "SDXL_BASE_ARCH",
    "SDXL_REFINER_ARCH",
    "TINY_ARCH",
    "TINY_SDXL_CONSTANTS",
    "fake_full_state_dict",
    "sd1_alphas_cumprod",
    "tiny_sd1_modules",
    "tiny_sd1_state_dict",
    "tiny_sdxl_arch",
    "tiny_sdxl_modules",
    "tiny_sdxl_state_dict",
    "tiny_vae_state_dict",
    "write_random_full_size",
    "write_random_full_size_sd15",
    "write_tiny_checkpoint",
    "write_tiny_sdxl_checkpoint",
]

# The tiny model's constants differ from SD1 (fewer heads and groups), so its files must carry them in
# the ``voidprompt.arch`` metadata - which also exercises that path in every loading test.
TINY_CONSTANTS = ArchConstants(unet_heads=4, unet_norm_groups=8, vae_norm_groups=8, clip_head_dim=16)


def _tiny_arch(in_channels: int) -> SD1Arch:
    return SD1Arch(
        unet=UNetArch(
            in_channels=in_channels,
            out_channels=4,
            model_channels=32,
            channel_mult=(1, 2),
            num_res_blocks=1,
            attention_levels=(True, False),
            transformer_depth=(1, 1),
            context_dim=32,
            linear_projection=False,
        ),
        vae=VaeArch(
            in_channels=3,
            out_channels=3,
            channels=32,
            channel_mult=(1, 2),
            num_res_blocks=1,
            latent_channels=4,
        ),
        clip=ClipArch(hidden_size=32, intermediate_size=64, num_layers=2, vocab_size=49408, max_positions=77),
        constants=TINY_CONSTANTS,
    )


TINY_ARCH = _tiny_arch(4)

SDXL_BASE_ARCH = SDXLArch(
    unet=UNetArch(
        in_channels=4,
        out_channels=4,
        model_channels=320,
        channel_mult=(1, 2, 4),
        num_res_blocks=2,
        attention_levels=(False, True, True),
        transformer_depth=(1, 2, 10),
        context_dim=2048,
        linear_projection=True,
    ),
    adm_in_channels=2816,
    mid_depth=10,
    vae=VaeArch(
        in_channels=3,
        out_channels=3,
        channels=128,
        channel_mult=(1, 2, 4, 4),
        num_res_blocks=2,
        latent_channels=4,
    ),
    clip_l=ClipArch(
        hidden_size=768, intermediate_size=3072, num_layers=12, vocab_size=49408, max_positions=77
    ),
    clip_g=OpenClipArch(
        hidden_size=1280,
        intermediate_size=5120,
        num_layers=32,
        vocab_size=49408,
        max_positions=77,
        projection_dim=1280,
    ),
    constants=SDXL_DEFAULTS,
)

# The shapes read back from a refiner: levels without attention report depth 1.
SDXL_REFINER_ARCH = replace(
    SDXL_BASE_ARCH,
    unet=UNetArch(
        in_channels=4,
        out_channels=4,
        model_channels=384,
        channel_mult=(1, 2, 4, 4),
        num_res_blocks=2,
        attention_levels=(False, True, True, False),
        transformer_depth=(1, 4, 4, 1),
        context_dim=1280,
        linear_projection=True,
    ),
    adm_in_channels=2560,
    mid_depth=4,
    clip_l=None,
)

SD15_ARCH = SD1Arch(
    unet=UNetArch(
        in_channels=4,
        out_channels=4,
        model_channels=320,
        channel_mult=(1, 2, 4, 4),
        num_res_blocks=2,
        attention_levels=(True, True, True, False),
        transformer_depth=(1, 1, 1, 1),
        context_dim=768,
        linear_projection=False,
    ),
    vae=VaeArch(
        in_channels=3,
        out_channels=3,
        channels=128,
        channel_mult=(1, 2, 4, 4),
        num_res_blocks=2,
        latent_channels=4,
    ),
    clip=ClipArch(hidden_size=768, intermediate_size=3072, num_layers=12, vocab_size=49408, max_positions=77),
    constants=ArchConstants(),
)


_TINY_VAE = VaeArch(
    in_channels=3, out_channels=3, channels=32, channel_mult=(1, 2), num_res_blocks=1, latent_channels=4
)
_CLIP_VOCAB, _CLIP_POSITIONS = 49408, 77

# Read through the file's ``voidprompt.arch`` metadata, relative to SDXL's own defaults.
TINY_SDXL_CONSTANTS = replace(
    SDXL_DEFAULTS,
    unet_head_dim=16,
    unet_norm_groups=8,
    vae_norm_groups=8,
    clip_head_dim=16,
    clip_g_head_dim=16,
)


def tiny_sdxl_arch(*, refiner: bool = False, inpainting: bool = False) -> SDXLArch:
    """The tiny SDXL architecture. The base's context is CLIP-L's and bigG's widths side by side
    (32 + 32) and its ``label_emb`` takes the pooled vector plus 6 size numbers x 256; the refiner's
    context is bigG's alone and its numbers are 5 (the aesthetic score replaces the target size)."""
    width_g = 32
    numbers = 5 if refiner else 6
    return SDXLArch(
        unet=UNetArch(
            in_channels=9 if inpainting else 4,
            out_channels=4,
            model_channels=32,
            channel_mult=(1, 2),
            num_res_blocks=2,
            attention_levels=(False, True),
            transformer_depth=(1, 2),
            context_dim=width_g if refiner else 32 + width_g,
            linear_projection=True,
        ),
        adm_in_channels=width_g + numbers * TINY_SDXL_CONSTANTS.unet_addition_time_embed_dim,
        mid_depth=2,
        vae=_TINY_VAE,
        clip_l=None
        if refiner
        else ClipArch(
            hidden_size=32,
            intermediate_size=64,
            num_layers=2,
            vocab_size=_CLIP_VOCAB,
            max_positions=_CLIP_POSITIONS,
        ),
        clip_g=OpenClipArch(
            hidden_size=width_g,
            intermediate_size=4 * width_g,
            num_layers=2,
            vocab_size=_CLIP_VOCAB,
            max_positions=_CLIP_POSITIONS,
            projection_dim=width_g,
        ),
        constants=TINY_SDXL_CONSTANTS,
    )


def _perturbed(modules: tuple[Any, ...]) -> None:
    # Default inits leave norms at 1/0 and some biases at 0; perturb everything so a tensor
    # loaded into the wrong place cannot go unnoticed.
    with torch.no_grad():
        for module in modules:
            if module is not None:
                for p in module.parameters():
                    p.add_(torch.randn_like(p) * 0.02)


def tiny_sdxl_modules(
    seed: int = 0, *, refiner: bool = False, inpainting: bool = False
) -> tuple[Any, Any, Any, Any]:
    """(unet, vae, text_encoder or None for the refiner, text_encoder_2) of the tiny SDXL architecture
    with seeded random weights, in fp32, eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        modules = tiny_sdxl_arch(refiner=refiner, inpainting=inpainting).build(device="cpu")
        _perturbed(modules)
    return tuple(m.eval() if m is not None else None for m in modules)  # type: ignore[return-value]


def tiny_sdxl_state_dict(
    seed: int = 0, *, refiner: bool = False, inpainting: bool = False, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """A tiny SDXL checkpoint with the original key names (about 4.5M parameters, most of them the two
    token embeddings), plus the ``logit_scale`` that real files carry and no text encoder uses."""
    sd = sdxl_modules_to_checkpoint(*tiny_sdxl_modules(seed, refiner=refiner, inpainting=inpainting))
    prefix = "conditioner.embedders.0.model." if refiner else OPEN_CLIP_PREFIX
    sd[prefix + "logit_scale"] = torch.tensor(4.6052)
    return {k: (v.to(dtype) if v.is_floating_point() else v).contiguous().clone() for k, v in sd.items()}


def write_tiny_sdxl_checkpoint(
    path: str | Path,
    *,
    fmt: Literal["safetensors", "ckpt"] = "safetensors",
    seed: int = 0,
    refiner: bool = False,
    inpainting: bool = False,
    dtype: torch.dtype = torch.float32,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a tiny SDXL checkpoint with its ``voidprompt.arch`` metadata (``.ckpt``: beside the
    ``state_dict``, as voidprompt writes it)."""
    sd = (
        state_dict
        if state_dict is not None
        else tiny_sdxl_state_dict(seed, refiner=refiner, inpainting=inpainting, dtype=dtype)
    )
    meta = TINY_SDXL_CONSTANTS.to_metadata(SDXL_DEFAULTS)
    return _write(Path(path), sd, meta, fmt=fmt, wrap_state_dict=True)


def _write(
    p: Path,
    sd: dict[str, torch.Tensor],
    meta: dict[str, str],
    *,
    fmt: Literal["safetensors", "ckpt"],
    wrap_state_dict: bool,
) -> Path:
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(p), metadata=meta or None)
    else:
        obj: Any = {"state_dict": sd, "global_step": 470000} if wrap_state_dict else dict(sd)
        obj.update(meta)
        torch.save(obj, p)
    return p


def tiny_sd1_modules(seed: int = 0, *, inpainting: bool = False) -> tuple[Any, Any, Any]:
    """(unet, vae, text_encoder) of the tiny architecture with seeded random weights, in fp32, eval mode."""
    arch = _tiny_arch(9 if inpainting else 4)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet, vae, text_encoder = build_modules(arch, device="cpu")
        _perturbed((unet, vae, text_encoder))
    return unet.eval(), vae.eval(), text_encoder.eval()


def tiny_sd1_state_dict(
    seed: int = 0, *, inpainting: bool = False, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """A tiny SD1-structured checkpoint in the exact CompVis layout (about 2M parameters)."""
    unet, vae, text_encoder = tiny_sd1_modules(seed, inpainting=inpainting)
    sd = modules_to_compvis(unet, vae, text_encoder, alphas_cumprod=sd1_alphas_cumprod())
    # Real ldm files carry more schedule buffers and EMA bookkeeping; the loader must skip them.
    sd["betas"] = torch.zeros(1000)
    sd["model_ema.decay"] = torch.tensor(0.9999)
    sd["model_ema.num_updates"] = torch.tensor(0, dtype=torch.int32)
    return {k: (v.to(dtype) if v.is_floating_point() else v).contiguous().clone() for k, v in sd.items()}


def tiny_vae_state_dict(seed: int = 1, *, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A tiny VAE file's state dict (CompVis keys without ``first_stage_model.``)."""
    _, vae, _ = tiny_sd1_modules(seed)
    return {k: v.to(dtype).contiguous().clone() for k, v in vae_module_to_compvis(vae).items()}


def write_tiny_checkpoint(
    path: str | Path,
    *,
    fmt: Literal["safetensors", "ckpt"] = "safetensors",
    arch_metadata: bool = True,
    seed: int = 0,
    inpainting: bool = False,
    dtype: torch.dtype = torch.float32,
    state_dict: dict[str, torch.Tensor] | None = None,
    wrap_state_dict: bool = True,
) -> Path:
    """Write a tiny checkpoint. ``.ckpt`` files get ldm's ``{"state_dict": ...}`` wrapper and a
    ``global_step`` like real ones (unless ``wrap_state_dict=False``)."""
    sd = (
        state_dict
        if state_dict is not None
        else tiny_sd1_state_dict(seed, inpainting=inpainting, dtype=dtype)
    )
    meta = TINY_CONSTANTS.to_metadata() if arch_metadata else {}
    return _write(Path(path), sd, meta, fmt=fmt, wrap_state_dict=wrap_state_dict)


def _meta_compvis_unet(config: dict[str, Any], attention: tuple[bool, ...]) -> dict[str, torch.Tensor]:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet: Any = UNet2DConditionModel(**config)
    rules = unet_rules(len(config["block_out_channels"]), config["layers_per_block"], attention)
    from voidprompt.models.convert import _module_to_compvis_name

    out = {}
    for key, t in unet.state_dict().items():
        name = _module_to_compvis_name(key, rules)
        if name is not None:
            out["model.diffusion_model." + name] = t
    return out


def _meta(*shape: int) -> torch.Tensor:
    return torch.empty(*shape, device="meta")


def _open_clip_keys(prefix: str, width: int, layers: int) -> dict[str, torch.Tensor]:
    out = {
        f"{prefix}token_embedding.weight": _meta(49408, width),
        f"{prefix}positional_embedding": _meta(77, width),
        f"{prefix}ln_final.weight": _meta(width),
        f"{prefix}text_projection": _meta(width, width),
    }
    for i in range(layers):
        out[f"{prefix}transformer.resblocks.{i}.attn.in_proj_weight"] = _meta(3 * width, width)
        out[f"{prefix}transformer.resblocks.{i}.mlp.c_fc.weight"] = _meta(4 * width, width)
    return out


def fake_full_state_dict(family: ModelFamily) -> dict[str, torch.Tensor]:
    """Full-size CompVis key/shape layout of a family, all tensors on the meta device."""
    if family in (ModelFamily.SD1, ModelFamily.SD1_INPAINT):
        arch = SD15_ARCH
        if family is ModelFamily.SD1_INPAINT:
            arch = SD1Arch(
                unet=UNetArch(**{**arch.unet.__dict__, "in_channels": 9}),
                vae=arch.vae,
                clip=arch.clip,
                constants=arch.constants,
            )
        unet, vae, te = build_modules(arch, device="meta")
        sd = modules_to_compvis(unet, vae, te)
        sd["alphas_cumprod"] = _meta(1000)
        return {
            k: v if v.is_meta else torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in sd.items()
        }
    if family.is_sdxl:
        xl_arch = SDXL_REFINER_ARCH if family is ModelFamily.SDXL_REFINER else SDXL_BASE_ARCH
        if family is ModelFamily.SDXL_INPAINT:
            xl_arch = replace(xl_arch, unet=replace(xl_arch.unet, in_channels=9))
        xl = sdxl_modules_to_checkpoint(*xl_arch.build(device="meta"))
        prefix = "conditioner.embedders.0.model." if xl_arch.is_refiner else OPEN_CLIP_PREFIX
        xl[prefix + "logit_scale"] = torch.empty((), device="meta")
        return {
            k: v if v.is_meta else torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in xl.items()
        }
    _, vae, _ = build_modules(SD15_ARCH, device="meta")
    sd = {"first_stage_model." + k: v for k, v in vae_module_to_compvis(vae).items()}
    if family in (ModelFamily.SD2_EPS, ModelFamily.SD2_V):
        cfg = {
            "block_out_channels": (320, 640, 1280, 1280),
            "layers_per_block": 2,
            "cross_attention_dim": 1024,
            "attention_head_dim": (5, 10, 20, 20),
            "use_linear_projection": True,
        }
        sd.update(_meta_compvis_unet(cfg, (True, True, True, False)))
        sd.update(_open_clip_keys("cond_stage_model.model.", 1024, 24))
        return sd
    raise ValueError(f"no fake layout for {family}")


def write_random_full_size(
    path: str | Path, family: ModelFamily, dtype: torch.dtype = torch.float16, seed: int = 0
) -> Path:
    """A full-size safetensors file of ``family``'s layout holding small random numbers (SD1.5: about
    2 GB in fp16; SDXL: about 7 GB), for the loading and merging benchmarks."""
    from safetensors.torch import save_file

    p = Path(path)
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for key, meta in fake_full_state_dict(family).items():
        if key.endswith("position_ids"):
            sd[key] = torch.arange(77, dtype=torch.int64).unsqueeze(0)
        elif key == "alphas_cumprod":
            sd[key] = sd1_alphas_cumprod()
        else:
            sd[key] = (torch.randn(meta.shape, generator=gen) * 0.02).to(dtype)
    metadata = {"voidprompt.note": json.dumps("random weights for benchmarks")}
    return atomic_write(p, lambda temp: save_file(sd, str(temp), metadata=metadata))


def write_random_full_size_sd15(path: str | Path, dtype: torch.dtype = torch.float16, seed: int = 0) -> Path:
    """A full-size SD1.5-layout safetensors file of small random numbers (about 2 GB in fp16)."""
    return write_random_full_size(path, ModelFamily.SD1, dtype, seed)
