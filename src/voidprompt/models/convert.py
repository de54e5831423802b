"""CompVis (ldm / A1111) checkpoint keys <-> diffusers / transformers module state dicts, both ways.

One table drives both directions: :func:`unet_rules` and :func:`vae_rules` list, module by module, the
CompVis prefix, the diffusers prefix and the renames inside that module. :class:`CheckpointKeyMap`
applies the rules backwards to every key of the *built* modules, which yields the exact CompVis name
of each module tensor; the forward map is that dictionary inverted. A module key the rules cannot
name raises at once (a diffusers/transformers upgrade that renamed something), instead of loading a
model with silently uninitialised weights.

The text encoder keeps its names; only the prefix changes. transformers 5.6 flattened
``CLIPTextModel`` (no ``text_model.`` level in its state dict); older versions had it - both work,
because the CompVis name is computed from whatever keys the module has.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from voidprompt.errors import ModelLoadError
from voidprompt.models.arch import CLIP_PREFIX, CLIP_PREFIX_OLD, UNET_PREFIX, VAE_PREFIX

__all__ = [
    "POSITION_IDS_KEY",
    "CheckpointKeyMap",
    "Component",
    "ConvertedStateDicts",
    "KeyTarget",
    "compvis_to_modules",
    "modules_to_compvis",
    "unet_rules",
    "vae_module_to_compvis",
    "vae_rules",
]

Component = Literal["unet", "vae", "text_encoder"]
Rule = tuple[str, str, Mapping[str, str]]  # (compvis prefix, module prefix, inner renames)

POSITION_IDS_KEY = CLIP_PREFIX + "embeddings.position_ids"

_RES = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_NONE: Mapping[str, str] = {}
_VAE_RES = {"nin_shortcut": "conv_shortcut"}
_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def unet_rules(levels: int, res_blocks: int, attention_levels: tuple[bool, ...]) -> list[Rule]:
    """CompVis ``model.diffusion_model.`` (without the prefix) <-> diffusers UNet2DConditionModel."""
    per = res_blocks + 1
    rules: list[Rule] = [
        ("time_embed.0", "time_embedding.linear_1", _NONE),
        ("time_embed.2", "time_embedding.linear_2", _NONE),
        ("input_blocks.0.0", "conv_in", _NONE),
        ("middle_block.0", "mid_block.resnets.0", _RES),
        ("middle_block.1", "mid_block.attentions.0", _NONE),
        ("middle_block.2", "mid_block.resnets.1", _RES),
        ("out.0", "conv_norm_out", _NONE),
        ("out.2", "conv_out", _NONE),
    ]
    for level in range(levels):
        for j in range(res_blocks):
            i = 1 + level * per + j
            rules.append((f"input_blocks.{i}.0", f"down_blocks.{level}.resnets.{j}", _RES))
            if attention_levels[level]:
                rules.append((f"input_blocks.{i}.1", f"down_blocks.{level}.attentions.{j}", _NONE))
        if level < levels - 1:
            rules.append(
                (f"input_blocks.{level * per + per}.0.op", f"down_blocks.{level}.downsamplers.0.conv", _NONE)
            )
    # Output blocks run from the deepest level up; each level has one more res block (the skip).
    for up in range(levels):
        attn = attention_levels[levels - 1 - up]
        for j in range(per):
            o = up * per + j
            rules.append((f"output_blocks.{o}.0", f"up_blocks.{up}.resnets.{j}", _RES))
            if attn:
                rules.append((f"output_blocks.{o}.1", f"up_blocks.{up}.attentions.{j}", _NONE))
            if j == res_blocks and up < levels - 1:
                rules.append(
                    (f"output_blocks.{o}.{2 if attn else 1}.conv", f"up_blocks.{up}.upsamplers.0.conv", _NONE)
                )
    return rules


def vae_rules(levels: int, res_blocks: int) -> list[Rule]:
    """CompVis ``first_stage_model.`` (without the prefix) <-> diffusers AutoencoderKL."""
    rules: list[Rule] = [
        ("quant_conv", "quant_conv", _NONE),
        ("post_quant_conv", "post_quant_conv", _NONE),
    ]
    for part in ("encoder", "decoder"):
        rules += [
            (f"{part}.conv_in", f"{part}.conv_in", _NONE),
            (f"{part}.conv_out", f"{part}.conv_out", _NONE),
            (f"{part}.norm_out", f"{part}.conv_norm_out", _NONE),
            (f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", _VAE_RES),
            (f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0", _VAE_ATTN),
            (f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", _VAE_RES),
        ]
    for level in range(levels):
        for j in range(res_blocks):
            rules.append(
                (f"encoder.down.{level}.block.{j}", f"encoder.down_blocks.{level}.resnets.{j}", _VAE_RES)
            )
        if level < levels - 1:
            rules.append(
                (
                    f"encoder.down.{level}.downsample.conv",
                    f"encoder.down_blocks.{level}.downsamplers.0.conv",
                    _NONE,
                )
            )
    # CompVis numbers decoder levels from the lowest resolution *last*; diffusers from the first.
    for up in range(levels):
        c = levels - 1 - up
        for j in range(res_blocks + 1):
            rules.append((f"decoder.up.{c}.block.{j}", f"decoder.up_blocks.{up}.resnets.{j}", _VAE_RES))
        if c > 0:
            rules.append(
                (f"decoder.up.{c}.upsample.conv", f"decoder.up_blocks.{up}.upsamplers.0.conv", _NONE)
            )
    return rules


def _module_to_compvis_name(key: str, rules: Iterable[Rule]) -> str | None:
    for compvis, module, inner in rules:
        if key.startswith(module + "."):
            rest = key[len(module) + 1 :]
            for c_in, m_in in inner.items():
                if rest.startswith(m_in + "."):
                    rest = c_in + rest[len(m_in) :]
                    break
            return f"{compvis}.{rest}"
    return None


@dataclass(frozen=True)
class KeyTarget:
    """Where one checkpoint tensor goes: a component, its state-dict key and its shape there."""

    component: Component
    module_key: str
    shape: torch.Size


def fit_shape(tensor: torch.Tensor, shape: torch.Size, *, what: str) -> torch.Tensor:
    """The tensor in the target layout: equal shapes pass; a 1x1 conv weight and a linear weight
    (CompVis VAE attention) convert either way; anything else is a mismatch."""
    if tensor.shape == shape:
        return tensor
    if tuple(tensor.shape) == (*shape, 1, 1) or tuple(shape) == (*tensor.shape, 1, 1):
        return tensor.reshape(shape)
    raise ModelLoadError(f"{what}: shape {tuple(tensor.shape)} does not fit the model's {tuple(shape)}.")


def _unet_layout(unet: Any) -> tuple[int, int, tuple[bool, ...]]:
    cfg = unet.config
    attn = tuple(t.startswith("CrossAttn") for t in cfg.down_block_types)
    return len(cfg.block_out_channels), int(cfg.layers_per_block), attn


def _vae_layout(vae: Any) -> tuple[int, int]:
    return len(vae.config.block_out_channels), int(vae.config.layers_per_block)


def _clip_compvis_name(key: str) -> str:
    return CLIP_PREFIX + (key[len("text_model.") :] if key.startswith("text_model.") else key)


class CheckpointKeyMap:
    """The exact CompVis name of every tensor of the given modules, and its inverse.

    ``vae_prefix`` is ``first_stage_model.`` for full checkpoints and ``""`` for VAE files.
    Any of the modules may be None (VAE files only need the VAE).
    """

    def __init__(
        self, unet: Any = None, vae: Any = None, text_encoder: Any = None, *, vae_prefix: str = VAE_PREFIX
    ):
        self.forward: dict[str, KeyTarget] = {}
        self.reverse: dict[tuple[Component, str], str] = {}
        if unet is not None:
            rules = unet_rules(*_unet_layout(unet))
            self._add("unet", unet, lambda k: _prefixed(UNET_PREFIX, _module_to_compvis_name(k, rules)))
        if vae is not None:
            vrules = vae_rules(*_vae_layout(vae))
            self._add("vae", vae, lambda k: _prefixed(vae_prefix, _module_to_compvis_name(k, vrules)))
        if text_encoder is not None:
            self._add("text_encoder", text_encoder, _clip_compvis_name)

    def _add(self, component: Component, module: Any, name_of: Any) -> None:
        for key, tensor in module.state_dict(keep_vars=True).items():
            name = name_of(key)
            if name is None:
                raise ModelLoadError(
                    f"no CompVis name for {component} key '{key}': the installed diffusers/transformers "
                    "renamed a module; use the versions pinned in pyproject.toml."
                )
            self.forward[name] = KeyTarget(component, key, tensor.shape)
            self.reverse[(component, key)] = name

    def target(self, checkpoint_key: str) -> KeyTarget | None:
        if checkpoint_key in self.forward:
            return self.forward[checkpoint_key]
        if checkpoint_key.startswith(CLIP_PREFIX_OLD) and not checkpoint_key.startswith(CLIP_PREFIX):
            # Pre-4.x transformers saves: cond_stage_model.transformer.embeddings... (no text_model.)
            return self.forward.get(CLIP_PREFIX + checkpoint_key[len(CLIP_PREFIX_OLD) :])
        return None


def _prefixed(prefix: str, name: str | None) -> str | None:
    return None if name is None else prefix + name


@dataclass
class ConvertedStateDicts:
    """Module state dicts made from a CompVis state dict, with the keys that went nowhere."""

    unet: dict[str, torch.Tensor]
    vae: dict[str, torch.Tensor]
    text_encoder: dict[str, torch.Tensor]
    unused: list[str]


def compvis_to_modules(
    state_dict: Mapping[str, torch.Tensor], unet: Any, vae: Any, text_encoder: Any
) -> ConvertedStateDicts:
    """Convert an in-memory CompVis state dict for the given (possibly meta) modules.

    Keys that name no module tensor (schedule buffers, EMA, position_ids) are listed in ``unused``;
    the loader decides which of those are expected.
    """
    keymap = CheckpointKeyMap(unet, vae, text_encoder)
    out: dict[str, dict[str, torch.Tensor]] = {"unet": {}, "vae": {}, "text_encoder": {}}
    unused = []
    for key, tensor in state_dict.items():
        target = keymap.target(key)
        if target is None:
            unused.append(key)
            continue
        out[target.component][target.module_key] = fit_shape(tensor, target.shape, what=key)
    return ConvertedStateDicts(out["unet"], out["vae"], out["text_encoder"], unused)


def modules_to_compvis(
    unet: Any,
    vae: Any,
    text_encoder: Any,
    *,
    alphas_cumprod: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The reverse conversion: modules -> a CompVis (ldm/A1111) state dict.

    Writes the int64 ``position_ids`` buffer that real SD1 checkpoints carry and, if given, the
    ``alphas_cumprod`` schedule. Tensors are shared with the modules, not copied.
    """
    keymap = CheckpointKeyMap(unet, vae, text_encoder)
    out: dict[str, torch.Tensor] = {}
    parts: tuple[tuple[Component, Any], ...] = (("unet", unet), ("vae", vae), ("text_encoder", text_encoder))
    for component, module in parts:
        for key, tensor in module.state_dict().items():
            name = keymap.reverse[(component, key)]
            out[name] = _compvis_layout(name, tensor)
    positions = int(text_encoder.config.max_position_embeddings)
    out[POSITION_IDS_KEY] = torch.arange(positions, dtype=torch.int64).unsqueeze(0)
    if alphas_cumprod is not None:
        out["alphas_cumprod"] = alphas_cumprod.to(torch.float32)
    return out


def vae_module_to_compvis(vae: Any, *, prefix: str = "") -> dict[str, torch.Tensor]:
    """A VAE module as a CompVis VAE state dict (``prefix=""`` gives the layout of ``*.vae.pt`` files)."""
    keymap = CheckpointKeyMap(vae=vae, vae_prefix=prefix)
    return {
        keymap.reverse[("vae", key)]: _compvis_layout(keymap.reverse[("vae", key)], tensor)
        for key, tensor in vae.state_dict().items()
    }


def _compvis_layout(name: str, tensor: torch.Tensor) -> torch.Tensor:
    # CompVis VAE attention projections are 1x1 convolutions; diffusers made them linear layers.
    leaf = name.rsplit(".", 2)
    is_proj = ".mid.attn_1." in name and leaf[-2] in ("q", "k", "v", "proj_out") and leaf[-1] == "weight"
    if is_proj and tensor.ndim == 2:
        return tensor.reshape(*tensor.shape, 1, 1)
    return tensor
