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

SDXL adds a second text encoder, OpenCLIP ViT-bigG, saved in open_clip's layout: its names come from
:func:`voidprompt.models.convert_open_clip.open_clip_name`, and some of its tensors are not one module
tensor each - a fused q/k/v projection feeds three, and the text projection is stored transposed.
A :class:`KeyTarget` says which (``layout``); :func:`to_module_tensors` and
:func:`from_module_tensors` apply it in the two directions.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from voidprompt.errors import ModelLoadError
from voidprompt.models.arch import CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX
from voidprompt.models.convert_open_clip import Layout, open_clip_name, qkv_parts

__all__ = [
    "POSITION_IDS_KEY",
    "CheckpointKeyMap",
    "Component",
    "ConvertedStateDicts",
    "KeyTarget",
    "compvis_to_modules",
    "convert_state_dict",
    "from_module_tensors",
    "modules_to_checkpoint",
    "modules_to_compvis",
    "to_module_tensors",
    "unet_rules",
    "vae_module_to_compvis",
    "vae_rules",
]

Component = Literal["unet", "vae", "text_encoder", "text_encoder_2"]
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
        # SDXL's size/crop (and refiner aesthetic) embedding; SD1 UNets have no such module.
        ("label_emb.0.0", "add_embedding.linear_1", _NONE),
        ("label_emb.0.2", "add_embedding.linear_2", _NONE),
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
    """Where one checkpoint tensor goes: a component, its state-dict key and the shape the checkpoint
    tensor must have (the module's, up to a 1x1 convolution reshape, for ``layout="same"``).

    ``layout="qkv"``: the tensor is the rows of ``parts`` (q, k, v) stacked; ``module_key`` is q's.
    ``layout="transposed"``: the module tensor is the checkpoint tensor transposed.
    """

    component: Component
    module_key: str
    shape: torch.Size
    layout: Layout = "same"
    parts: tuple[str, ...] = ()


def fit_shape(tensor: torch.Tensor, shape: torch.Size, *, what: str) -> torch.Tensor:
    """The tensor in the target layout: equal shapes pass; a 1x1 conv weight and a linear weight
    (CompVis VAE attention) convert either way; anything else is a mismatch."""
    if tensor.shape == shape:
        return tensor
    if tuple(tensor.shape) == (*shape, 1, 1) or tuple(shape) == (*tensor.shape, 1, 1):
        return tensor.reshape(shape)
    raise ModelLoadError(f"{what}: shape {tuple(tensor.shape)} does not fit the model's {tuple(shape)}.")


def to_module_tensors(
    target: KeyTarget, tensor: torch.Tensor, *, what: str
) -> list[tuple[str, torch.Tensor]]:
    """The module tensors (state-dict key, value) one checkpoint tensor becomes."""
    if target.layout == "same":
        return [(target.module_key, fit_shape(tensor, target.shape, what=what))]
    if tensor.shape != target.shape:
        raise ModelLoadError(
            f"{what}: shape {tuple(tensor.shape)} does not fit the model's {tuple(target.shape)}."
        )
    if target.layout == "transposed":
        return [(target.module_key, tensor.t().contiguous())]
    # Copies: views would keep the fused tensor alive behind three parameters sharing one storage,
    # which safetensors refuses to save and in-place edits (LoRA) would have to know about.
    return [(key, part.clone()) for key, part in zip(target.parts, tensor.chunk(3, dim=0), strict=True)]


def from_module_tensors(target: KeyTarget, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The checkpoint tensor made from a module state dict (the inverse of :func:`to_module_tensors`)."""
    if target.layout == "transposed":
        return state[target.module_key].t().contiguous()
    if target.layout == "qkv":
        return torch.cat([state[key] for key in target.parts], dim=0)
    return state[target.module_key]


def _unet_layout(unet: Any) -> tuple[int, int, tuple[bool, ...]]:
    cfg = unet.config
    attn = tuple(t.startswith("CrossAttn") for t in cfg.down_block_types)
    return len(cfg.block_out_channels), int(cfg.layers_per_block), attn


def _vae_layout(vae: Any) -> tuple[int, int]:
    return len(vae.config.block_out_channels), int(vae.config.layers_per_block)


def _clip_compvis_name(key: str, prefix: str = CLIP_PREFIX) -> str:
    return prefix + (key[len("text_model.") :] if key.startswith("text_model.") else key)


class CheckpointKeyMap:
    """The exact CompVis name of every tensor of the given modules, and its inverse.

    ``vae_prefix`` is ``first_stage_model.`` for full checkpoints and ``""`` for VAE files.
    Any of the modules may be None (VAE files only need the VAE). ``clip_prefix`` is where the CLIP
    ViT-L text encoder lives (SD1's ``cond_stage_model.transformer.text_model.`` unless given);
    ``text_encoder_2`` is SDXL's OpenCLIP ViT-bigG, under ``open_clip_prefix``.
    """

    def __init__(
        self,
        unet: Any = None,
        vae: Any = None,
        text_encoder: Any = None,
        *,
        vae_prefix: str = VAE_PREFIX,
        clip_prefix: str = CLIP_PREFIX,
        text_encoder_2: Any = None,
        open_clip_prefix: str = "",
    ):
        self.forward: dict[str, KeyTarget] = {}
        self.reverse: dict[tuple[Component, str], str] = {}
        self.clip_prefix = clip_prefix
        if unet is not None:
            rules = unet_rules(*_unet_layout(unet))
            self._add("unet", unet, lambda k: _prefixed(UNET_PREFIX, _module_to_compvis_name(k, rules)))
        if vae is not None:
            vrules = vae_rules(*_vae_layout(vae))
            self._add("vae", vae, lambda k: _prefixed(vae_prefix, _module_to_compvis_name(k, vrules)))
        if text_encoder is not None:
            self._add("text_encoder", text_encoder, lambda k: _clip_compvis_name(k, clip_prefix))
        if text_encoder_2 is not None:
            self._add_open_clip(text_encoder_2, open_clip_prefix)

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

    def _add_open_clip(self, module: Any, prefix: str) -> None:
        state = module.state_dict(keep_vars=True)
        for key, tensor in state.items():
            named = open_clip_name(key)
            if named is None:
                raise ModelLoadError(
                    f"no open_clip name for text_encoder_2 key '{key}': the installed transformers renamed "
                    "a module; use the version pinned in pyproject.toml."
                )
            name, layout = prefix + named[0], named[1]
            self.reverse[("text_encoder_2", key)] = name
            if name in self.forward:
                continue  # the k and v rows of an in_proj already entered with q
            if layout == "qkv":
                parts = qkv_parts(key)
                rows = sum(int(state[p].shape[0]) for p in parts)
                shape = torch.Size((rows, *tensor.shape[1:]))
                self.forward[name] = KeyTarget("text_encoder_2", parts[0], shape, "qkv", parts)
            elif layout == "transposed":
                self.forward[name] = KeyTarget("text_encoder_2", key, torch.Size(tensor.shape[::-1]), layout)
            else:
                self.forward[name] = KeyTarget("text_encoder_2", key, tensor.shape)

    def target(self, checkpoint_key: str) -> KeyTarget | None:
        if checkpoint_key in self.forward:
            return self.forward[checkpoint_key]
        # Pre-4.x transformers saves: cond_stage_model.transformer.embeddings... (no text_model.)
        old = self.clip_prefix.removesuffix("text_model.")
        if (
            old != self.clip_prefix
            and checkpoint_key.startswith(old)
            and not checkpoint_key.startswith(self.clip_prefix)
        ):
            return self.forward.get(self.clip_prefix + checkpoint_key[len(old) :])
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
    text_encoder_2: dict[str, torch.Tensor] = field(default_factory=dict)


def convert_state_dict(
    keymap: CheckpointKeyMap, state_dict: Mapping[str, torch.Tensor]
) -> ConvertedStateDicts:
    """Convert an in-memory checkpoint state dict through ``keymap``.

    Keys that name no module tensor (schedule buffers, EMA, position_ids) are listed in ``unused``;
    the loader decides which of those are expected.
    """
    out: dict[str, dict[str, torch.Tensor]] = {
        "unet": {},
        "vae": {},
        "text_encoder": {},
        "text_encoder_2": {},
    }
    unused = []
    for key, tensor in state_dict.items():
        target = keymap.target(key)
        if target is None:
            unused.append(key)
            continue
        out[target.component].update(to_module_tensors(target, tensor, what=key))
    return ConvertedStateDicts(out["unet"], out["vae"], out["text_encoder"], unused, out["text_encoder_2"])


def compvis_to_modules(
    state_dict: Mapping[str, torch.Tensor], unet: Any, vae: Any, text_encoder: Any
) -> ConvertedStateDicts:
    """Convert an in-memory SD1 CompVis state dict for the given (possibly meta) modules."""
    return convert_state_dict(CheckpointKeyMap(unet, vae, text_encoder), state_dict)


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


def modules_to_checkpoint(keymap: CheckpointKeyMap, modules: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Every checkpoint tensor of ``keymap`` made from the modules' state dicts (``modules`` maps a
    component name to its module). Plain tensors are shared with the modules; fused and transposed
    ones are new."""
    states = {name: module.state_dict() for name, module in modules.items() if module is not None}
    return {
        name: _compvis_layout(name, from_module_tensors(target, states[target.component]))
        for name, target in keymap.forward.items()
    }


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
