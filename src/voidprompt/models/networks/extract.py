"""Extract a LoRA from two checkpoints (``voidprompt lora extract A B --rank R``), as kohya's
``networks/extract_lora_from_models.py`` does: for every layer a kohya LoRA targets, the SVD of
``W_B - W_A`` truncated to rank R gives ``lora_up = U_R diag(S_R)`` and ``lora_down = V_R^T``, with
``alpha = R`` so the scale alpha/rank is 1 and applying the LoRA at multiplier 1 adds the best rank-R
approximation of the difference.

Targets (kohya's ``LoRANetwork``): in the UNet every Linear and 1x1 conv inside ``Transformer2DModel``
blocks; with ``conv_rank`` also the ResNet blocks' convs / time projections and the down/up-samplers
(kxk convs at conv_rank, the rest at rank); in the text encoder the Linears of ``CLIPAttention`` and
``CLIPMLP``. As kohya, the text encoder is left out when no element of its difference reaches
``min_diff`` (its default 0.01): a fine-tune that froze CLIP differs there only by save noise.

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
from voidprompt.models.convert import CheckpointKeyMap, fit_shape
from voidprompt.models.load import open_checkpoint
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
    unet: nn.Module, text_encoder: nn.Module, *, conv: bool
) -> list[tuple[str, str, str, nn.Module]]:
    """(kohya name, component, module path, module) of every layer kohya's LoRA trains."""
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
                out.append(("lora_unet_" + name.replace(".", "_"), "unet", name, child))
    for parent_name, parent in text_encoder.named_modules():
        if type(parent).__name__ not in _TE_BLOCKS:
            continue
        for child_name, child in parent.named_modules():
            if isinstance(child, nn.Linear):
                name = f"{parent_name}.{child_name}"
                full = name if name.startswith("text_model.") else "text_model." + name
                out.append(("lora_te_" + full.replace(".", "_"), "text_encoder", name, child))
    return out


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
        arch = infer_arch(ra.shapes, ArchConstants.from_metadata(ra.metadata, source=str(a)))
        unet, vae, te = build_modules(arch, device="meta")
        keymap = CheckpointKeyMap(unet, vae, te)
        targets = kohya_targets(unet, te, conv=conv_rank is not None)
        diffs: list[tuple[str, Tensor, int]] = []
        te_max = 0.0
        for kohya, component, name, module in targets:
            weight = module.weight
            assert isinstance(weight, Tensor)
            key = keymap.reverse[(component, name + ".weight")]  # type: ignore[index]
            if key not in rb.shapes:
                raise ModelLoadError(
                    f"{b}: has no '{key}' (A has it); both must be checkpoints of the same model."
                )
            wa = fit_shape(ra.get(key), weight.shape, what=f"{a}: {key}").to(torch.float32)
            wb = fit_shape(rb.get(key), weight.shape, what=f"{b}: {key}").to(torch.float32)
            if wa.shape != wb.shape:
                raise ModelLoadError(
                    f"'{key}': shape {tuple(wa.shape)} in A, {tuple(wb.shape)} in B; the models differ."
                )
            diff = wb - wa
            if component == "text_encoder":
                te_max = max(te_max, float(diff.abs().max()))
            is_kxk = weight.ndim == 4 and tuple(weight.shape[2:]) != (1, 1)
            diffs.append((kohya, diff, (conv_rank or rank) if is_kxk else rank))
    include_te = te_max >= min_diff
    tensors: dict[str, Tensor] = {}
    worst = 0.0
    written = 0
    for kohya, diff, r in diffs:
        if kohya.startswith("lora_te_") and not include_te:
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
