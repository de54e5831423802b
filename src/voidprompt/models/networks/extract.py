"""Extract a LoRA from two checkpoints (``voidprompt lora extract A B --rank R``), as kohya's
``networks/extract_lora_from_models.py`` does: for every layer a kohya LoRA targets, the SVD of
``W_B - W_A`` truncated to rank R gives ``lora_up = U_R diag(S_R)`` and ``lora_down = V_R^T``, with
``alpha = R`` so the scale alpha/rank is 1 and applying the LoRA at multiplier 1 adds the best rank-R
approximation of the difference.

Targets (kohya's ``LoRANetwork``): in the UNet every Linear and 1x1 conv inside ``Transformer2DModel``
blocks; with ``conv_rank`` also the ResNet blocks' convs / time projections and the down/up-samplers
(kxk convs at conv_rank, the rest at rank); in the text encoder the Linears of ``CLIPAttention`` and
``CLIPMLP``. As kohya, the text encoders are left out when no element of their difference reaches
``min_diff`` (its default 0.01): a fine-tune that froze CLIP differs there only by save noise.

SDXL (kohya's ``--sdxl``): the same module kinds, named as kohya's SDXL LoRAs name them - the UNet by
its original sgm paths (``lora_unet_input_blocks_4_1_...``, through the loader's key map), CLIP ViT-L
as ``lora_te1_`` and bigG as ``lora_te2_`` with transformers' CLIP paths; bigG's q/k/v are the row
thirds of open_clip's fused ``in_proj_weight``. The metadata's ``ss_base_model_version`` says SDXL, as
A1111 reads it to list the LoRA under SDXL. Both files must be of one family.

Differences from kohya, on purpose: no clamping of U/V^T to their 0.99 quantile by default (pass
``clamp_quantile=0.99`` for kohya's numbers; clamping makes the LoRA inexact even for an exactly
low-rank difference), and layers whose difference is exactly zero are not written.

Only the targeted tensors are read from each file, one layer at a time. The output appears under its
name only when complete (an error, a full disk included, removes the temporary file); temporary files
left in the output folder by extractions or merges that were killed outright are swept first
(:func:`voidprompt.files.sweep_stale_partials`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from voidprompt.errors import ModelLoadError
from voidprompt.files import sweep_stale_partials
from voidprompt.models.arch import ArchConstants, build_modules, infer_arch
from voidprompt.models.arch_sdxl import SDXL_DEFAULTS, infer_sdxl_arch
from voidprompt.models.convert import CheckpointKeyMap, to_module_tensors
from voidprompt.models.convert_sdxl import sdxl_key_map
from voidprompt.models.detect import detect_family, require_supported
from voidprompt.models.load import CheckpointReader, open_checkpoint
from voidprompt.models.networks.lora import unet_compvis_names
from voidprompt.models.safetensors_stream import SafetensorsStreamWriter, TensorSpec

__all__ = ["ExtractResult", "extract_lora", "kohya_targets"]

_UNET_BLOCKS = ("Transformer2DModel",)
_UNET_CONV_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
_TE_BLOCKS = ("CLIPAttention", "CLIPMLP")


@dataclass
class ExtractResult:
    path: Path
    layers: int
    text_encoder_included: bool
    max_rel_error: float  # largest ||ΔW - up@down|| / ||ΔW|| over the written layers


def kohya_targets(
    unet: nn.Module, text_encoder: nn.Module | None, *, conv: bool, text_encoder_2: nn.Module | None = None
) -> list[tuple[str, str, str, nn.Module]]:
    """(kohya name, component, module path, module) of every layer kohya's LoRA trains; with
    ``text_encoder_2`` (SDXL) under kohya's SDXL names (see the module docstring)."""
    sdxl = text_encoder_2 is not None
    compvis = unet_compvis_names(unet) if sdxl else {}
    out: list[tuple[str, str, str, nn.Module]] = []
    blocks = _UNET_BLOCKS + (_UNET_CONV_BLOCKS if conv else ())
    seen: set[str] = set()
    for parent_name, parent in unet.named_modules():
        if type(parent).__name__ not in blocks:
            continue
        for child_name, child in parent.named_modules():
            name = f"{parent_name}.{child_name}" if child_name else parent_name
            if name in seen:
                continue
            is_1x1 = isinstance(child, nn.Conv2d) and child.kernel_size == (1, 1)
            if isinstance(child, nn.Linear) or is_1x1 or (conv and isinstance(child, nn.Conv2d)):
                seen.add(name)
                kohya = compvis[name] if sdxl else name
                out.append(("lora_unet_" + kohya.replace(".", "_"), "unet", name, child))
    encoders = (
        [("lora_te1_", "text_encoder", text_encoder), ("lora_te2_", "text_encoder_2", text_encoder_2)]
        if sdxl
        else [("lora_te_", "text_encoder", text_encoder)]
    )
    for prefix, component, encoder in encoders:
        if encoder is None:
            continue
        for parent_name, parent in encoder.named_modules():
            if type(parent).__name__ not in _TE_BLOCKS:
                continue
            for child_name, child in parent.named_modules():
                if isinstance(child, nn.Linear):
                    name = f"{parent_name}.{child_name}"
                    full = name if name.startswith("text_model.") else "text_model." + name
                    out.append((prefix + full.replace(".", "_"), component, name, child))
    return out


def _module_weight(
    reader: CheckpointReader, keymap: CheckpointKeyMap, component: str, name: str, what: str
) -> Tensor:
    """The weight of module ``name`` as stored in the file: the module's own tensor, or its part of a
    fused one (bigG's q/k/v rows of ``in_proj_weight``)."""
    module_key = name + ".weight"
    key = keymap.reverse[(component, module_key)]  # type: ignore[index]
    if key not in reader.shapes:
        raise ModelLoadError(f"{what}: has no '{key}'; both must be checkpoints of the same model.")
    parts = dict(to_module_tensors(keymap.forward[key], reader.get(key), what=f"{what}: {key}"))
    return parts[module_key]


def _svd_factors(diff: Tensor, rank: int, clamp_quantile: float | None) -> tuple[Tensor, Tensor]:
    mat = diff.reshape(diff.shape[0], -1).to(torch.float64)  # float64: the factors are exact to fp32
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    r = min(rank, s.shape[0])
    up = u[:, :r] * s[:r]
    down = vh[:r]
    if clamp_quantile is not None and clamp_quantile < 1.0:
        values = torch.cat([up.flatten(), down.flatten()])
        hi = torch.quantile(values.abs(), clamp_quantile)
        up, down = up.clamp(-hi, hi), down.clamp(-hi, hi)
    return up.to(torch.float32), down.to(torch.float32)


def extract_lora(
    a: str | Path,
    b: str | Path,
    out: str | Path,
    *,
    rank: int,
    conv_rank: int | None = None,
    min_diff: float = 0.01,
    clamp_quantile: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> ExtractResult:
    """Write ``out`` (kohya LoRA ``.safetensors``) approximating B - A; see the module docstring."""
    if rank < 1 or (conv_rank is not None and conv_rank < 1):
        raise ModelLoadError(f"rank {rank} / conv rank {conv_rank}: ranks must be at least 1.")
    out_path = Path(out)
    sweep_stale_partials(out_path.parent)
    with open_checkpoint(a) as ra, open_checkpoint(b) as rb:
        family = detect_family(ra.shapes)
        require_supported(family, source=str(a))
        family_b = detect_family(rb.shapes)
        if family_b.is_sdxl != family.is_sdxl:
            raise ModelLoadError(
                f"{a} is {family.label} and {b} is {family_b.label}; a LoRA is the difference of two "
                "checkpoints of one family."
            )
        te2: nn.Module | None = None
        if family.is_sdxl:
            constants = ArchConstants.from_metadata(ra.metadata, source=str(a), defaults=SDXL_DEFAULTS)
            unet, vae, te, te2 = infer_sdxl_arch(ra.shapes, constants).build(device="meta")
            keymap = sdxl_key_map(unet, vae, te, te2)
        else:
            arch = infer_arch(ra.shapes, ArchConstants.from_metadata(ra.metadata, source=str(a)))
            unet, vae, te = build_modules(arch, device="meta")
            keymap = CheckpointKeyMap(unet, vae, te)
        targets = kohya_targets(unet, te, conv=conv_rank is not None, text_encoder_2=te2)
        diffs: list[tuple[str, Tensor, int]] = []
        te_max = 0.0
        for kohya, component, name, module in targets:
            weight = module.weight
            assert isinstance(weight, Tensor)
            wa = _module_weight(ra, keymap, component, name, str(a)).to(torch.float32)
            wb = _module_weight(rb, keymap, component, name, str(b)).to(torch.float32)
            diff = wb - wa
            if component != "unet":
                te_max = max(te_max, float(diff.abs().max()))
            is_kxk = weight.ndim == 4 and tuple(weight.shape[2:]) != (1, 1)
            diffs.append((kohya, diff, (conv_rank or rank) if is_kxk else rank))
    include_te = te_max >= min_diff
    tensors: dict[str, Tensor] = {}
    worst = 0.0
    written = 0
    for kohya, diff, r in diffs:
        if kohya.startswith("lora_te") and not include_te:
            continue
        if not bool(diff.any()):
            continue
        up, down = _svd_factors(diff, r, clamp_quantile)
        rr = down.shape[0]
        approx = (up @ down).reshape(diff.shape)
        worst = max(worst, float((approx - diff).norm() / diff.norm()))
        if diff.ndim == 4:
            up = up.reshape(diff.shape[0], rr, 1, 1)
            down = down.reshape(rr, *diff.shape[1:])
        tensors[f"{kohya}.lora_up.weight"] = up.to(dtype).contiguous()
        tensors[f"{kohya}.lora_down.weight"] = down.to(dtype).contiguous()
        tensors[f"{kohya}.alpha"] = torch.tensor(float(rr), dtype=dtype)
        written += 1
    if not written:
        raise ModelLoadError(f"{a} and {b} do not differ in any layer a LoRA can change; nothing to extract.")
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(rank),
        "ss_network_args": json.dumps({"conv_dim": conv_rank, "conv_alpha": conv_rank} if conv_rank else {}),
        "ss_v2": "False",
        **({"ss_base_model_version": "sdxl_base_v1-0"} if family.is_sdxl else {}),
        "voidprompt.extract": json.dumps(
            {
                "a": Path(a).name,
                "b": Path(b).name,
                "rank": rank,
                "conv_rank": conv_rank,
                "clamp_quantile": clamp_quantile,
            }
        ),
    }
    specs = [TensorSpec(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]
    with SafetensorsStreamWriter(out_path, specs, metadata) as w:
        for k, t in tensors.items():
            w.write(k, t)
        w.commit()
    return ExtractResult(out_path, written, include_te, worst)
