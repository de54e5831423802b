"""kohya-format LoRA / LyCORIS files for SD1 and SDXL: reading, layer names, weight deltas.

Names (:func:`build_layer_map`), as A1111 1.10's ``extensions-builtin/Lora/networks.py`` resolves
them; the table is made by walking the *actual* modules, so it fits any width or depth:

- UNet, two spellings of one layer. The diffusers module path underscored (``lora_unet_down_blocks_
  1_attentions_0_proj_in``; kohya's SD1 LoRAs) and the original CompVis / sgm path underscored
  (``lora_unet_input_blocks_4_1_proj_in``; kohya's SDXL LoRAs and old LyCORIS files), the latter
  through the loader's CompVis <-> diffusers key map. A1111 turns a diffusers name into a CompVis one
  with SD1's fixed formulas, so two diffusers names reach nothing on SDXL, and here neither:
  ``add_embedding`` (no formula) and the first up block's upsampler (A1111 puts it at index 1 of its
  output block, where SDXL's has an attention in between). Their sgm names (``label_emb_0_0``,
  ``output_blocks_2_2_conv``) work.
- SD1's text encoder: ``lora_te_`` + the transformers path (``lora_te_text_model_encoder_layers_0_
  self_attn_q_proj``); A1111 also accepts ``lora_te1_`` there.
- SDXL: ``lora_te1_`` names CLIP ViT-L and ``lora_te2_`` names OpenCLIP bigG, both with transformers'
  CLIP paths, which are those of our converted ``text_encoder_2``. ``lora_te_`` keys reach nothing on
  SDXL (A1111 looks them up under SD1's names). Of bigG, A1111 reaches the encoder layers' MLP and
  attention projections only, and open_clip fuses q/k/v into one ``in_proj``: it changes a layer's
  q, k, v and out projections only when a LoRA has all four, merged into the weights even in
  functional mode (:attr:`LayerTarget.fused`). The refiner keeps bigG as its first embedder, where
  A1111's ``lora_te2_`` lookup (second embedder) misses: no text-encoder key reaches the refiner.

A LoRA's text-encoder modules take the ``te`` multiplier (both encoders on SDXL), the rest ``unet``.

Tensors per module (suffix after the first ``.``): ``lora_up.weight`` / ``lora_down.weight`` /
optional ``lora_mid.weight``; LoHa ``hada_w1_a`` ... ``hada_t2``; LoKr ``lokr_w1`` ... ``lokr_t2``;
full ``diff``; all with optional ``alpha`` and ``scale``.

Scale (A1111 ``NetworkModule.calc_scale``): the ``scale`` tensor if present, else ``alpha / dim`` where
dim is the module's rank (``lora_down.shape[0]``, ``hada_w1_b.shape[0]``, ``lokr_w2_b`` or
``lokr_w1_b``'s ``shape[0]``), else 1.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from voidprompt.errors import ModelLoadError
from voidprompt.models.convert import CheckpointKeyMap
from voidprompt.models.hashes import addnet_hash_safetensors, sha256_file
from voidprompt.models.load import open_checkpoint
from voidprompt.models.networks import lycoris

__all__ = [
    "LayerTarget",
    "LoraModule",
    "LoraNetwork",
    "build_layer_map",
    "fit_delta",
    "load_lora",
    "lora_family",
    "lora_hash",
    "unet_compvis_names",
]

log = logging.getLogger(__name__)

Component = Literal["unet", "text_encoder", "text_encoder_2"]
LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")


@dataclass(frozen=True)
class LayerTarget:
    """A model layer a network module can change."""

    component: Component
    name: str  # module path inside its component (diffusers / transformers)
    module: nn.Module
    # bigG attention: the attention module whose q/k/v/out projections a LoRA changes only together
    fused: str | None = None


# The bigG layers A1111 reaches (open_clip's resblocks' attention and MLP); group 2 marks attention.
_TE2_LAYER = re.compile(
    r"(text_model\.encoder\.layers\.\d+\.self_attn)\.(?:q|k|v|out)_proj$|text_model\.encoder\.layers\.\d+\.mlp\.fc[12]$"
)


def _te_name(name: str) -> str:
    # transformers >= 5 flattened CLIPTextModel; kohya names always carry the text_model level.
    return name if name.startswith("text_model.") else "text_model." + name


def _a1111_reads_diffusers_name(name: str, compvis: str | None) -> bool:
    """Whether A1111's diffusers -> CompVis formulas (written for SD1's layout) reach this UNet layer:
    they have none for ``add_embedding``, and put the first up block's upsampler at index 1 of its
    output block, which is right only where the deepest level has no attention."""
    if name.startswith("add_embedding."):
        return False
    if name == "up_blocks.0.upsamplers.0.conv" and compvis is not None:
        return compvis.endswith(".1.conv")
    return True


def unet_compvis_names(unet: nn.Module) -> dict[str, str]:
    """diffusers module path -> CompVis module path (without ``model.diffusion_model.``)."""
    try:
        keymap = CheckpointKeyMap(unet=unet)
    except Exception:  # a UNet the CompVis rules cannot name: diffusers names still work
        return {}
    prefix = "model.diffusion_model."
    return {
        key[: -len(".weight")]: cv[len(prefix) : -len(".weight")]
        for (_, key), cv in keymap.reverse.items()
        if key.endswith(".weight") and cv.startswith(prefix)
    }


def build_layer_map(
    unet: nn.Module | None, text_encoder: nn.Module | None, text_encoder_2: nn.Module | None = None
) -> dict[str, LayerTarget]:
    """kohya name -> layer, for every Linear / Conv2d a LoRA can reach (see the module docstring).
    ``text_encoder_2`` is SDXL's bigG; given, the model is SDXL (``text_encoder`` None: the refiner)."""
    out: dict[str, LayerTarget] = {}
    sdxl = text_encoder_2 is not None
    if text_encoder is not None:
        prefixes = ("lora_te1_",) if sdxl else ("lora_te_", "lora_te1_")
        for name, mod in text_encoder.named_modules():
            if isinstance(mod, (nn.Linear, nn.Conv2d)):
                for prefix in prefixes:
                    out.setdefault(
                        prefix + _te_name(name).replace(".", "_"), LayerTarget("text_encoder", name, mod)
                    )
    if text_encoder_2 is not None and text_encoder is not None:
        for name, mod in text_encoder_2.named_modules():
            match = _TE2_LAYER.match(_te_name(name))
            if isinstance(mod, nn.Linear) and match:
                out["lora_te2_" + _te_name(name).replace(".", "_")] = LayerTarget(
                    "text_encoder_2", name, mod, match.group(1)
                )
    if unet is not None:
        compvis = unet_compvis_names(unet)
        for name, mod in unet.named_modules():
            if isinstance(mod, (nn.Linear, nn.Conv2d)):
                target = LayerTarget("unet", name, mod)
                if _a1111_reads_diffusers_name(name, compvis.get(name)):
                    out["lora_unet_" + name.replace(".", "_")] = target
                if name in compvis:
                    out.setdefault("lora_unet_" + compvis[name].replace(".", "_"), target)
    return out


@dataclass
class LoraModule:
    """The tensors of one network module (one layer)."""

    network: str
    name: str
    tensors: dict[str, Tensor]

    @property
    def kind(self) -> str:
        t = self.tensors
        if "lora_up.weight" in t and "lora_down.weight" in t:
            return "lora"
        if "hada_w1_a" in t and "hada_w1_b" in t and "hada_w2_a" in t and "hada_w2_b" in t:
            return "loha"
        if ("lokr_w1" in t or "lokr_w1_a" in t) and ("lokr_w2" in t or "lokr_w2_a" in t):
            return "lokr"
        if "diff" in t:
            return "full"
        return "unknown"

    @property
    def dim(self) -> int | None:
        t = self.tensors
        kind = self.kind
        if kind == "lora":
            return int(t["lora_down.weight"].shape[0])
        if kind == "loha":
            return int(t["hada_w1_b"].shape[0])
        if kind == "lokr":
            if "lokr_w2_b" in t:
                return int(t["lokr_w2_b"].shape[0])
            if "lokr_w1_b" in t:
                return int(t["lokr_w1_b"].shape[0])
        return None

    @property
    def scale(self) -> float:
        t = self.tensors
        if "scale" in t:
            return float(t["scale"].item())
        dim = self.dim
        if dim is not None and "alpha" in t:
            return float(t["alpha"].item()) / dim
        return 1.0

    def _raw_delta(self, tensors: dict[str, Tensor], target_shape: torch.Size, dyn_dim: int | None) -> Tensor:
        kind = self.kind
        if kind == "lora":
            return lycoris.delta_lora(tensors, dyn_dim)
        if kind == "loha":
            return lycoris.delta_loha(tensors)
        if kind == "lokr":
            return lycoris.delta_lokr(tensors, target_shape)
        if kind == "full":
            return lycoris.delta_full(tensors)
        raise ModelLoadError(
            f"LoRA '{self.network}': layer {self.name} has tensors {sorted(self.tensors)}, a module type "
            "voidprompt does not support (LoRA, LoCon, LoHa, LoKr and full diff are); "
            "remove it from the prompt."
        )

    def check(self, target_shape: torch.Size, *, dyn_dim: int | None = None, model: str = "") -> None:
        """Raise :class:`ModelLoadError` unless the delta fits a weight of ``target_shape``.

        The arithmetic runs on the meta device, which gives the delta's shape without computing or
        allocating it: factors of a few KB can describe a product (``up @ down``, a Kronecker
        product) of gigabytes, and a misfit must be refused before that is built."""
        try:
            planned = self._raw_delta(
                {k: v.to("meta") for k, v in self.tensors.items()}, target_shape, dyn_dim
            )
        except RuntimeError as exc:
            raise ModelLoadError(
                f"LoRA '{self.network}': layer {self.name} has factors whose shapes do not combine "
                f"({', '.join(f'{k} {tuple(v.shape)}' for k, v in sorted(self.tensors.items()))}): {exc}; "
                "the file is damaged."
            ) from exc
        fit_delta(planned, target_shape, network=self.network, layer=self.name, model=model)

    def delta(self, target_shape: torch.Size, *, dyn_dim: int | None = None, model: str = "") -> Tensor:
        """ΔW * scale (float32, no multiplier) in the target's shape; raises on a misfit
        (:meth:`check`, before anything is computed). ``model`` names the model in that message."""
        self.check(target_shape, dyn_dim=dyn_dim, model=model)
        raw = self._raw_delta(self.tensors, target_shape, dyn_dim)
        return fit_delta(raw, target_shape, network=self.network, layer=self.name, model=model) * self.scale

    def input_width(self) -> int | None:
        """The layer input width the factors imply (a linear layer's ``in_features``), when the
        module type states it directly."""
        t = self.tensors
        kind = self.kind
        factor = {"lora": "lora_down.weight", "loha": "hada_w1_b", "full": "diff"}.get(kind)
        if factor is None or t[factor].ndim != 2:
            return None
        return int(t[factor].shape[1])


def fit_delta(delta: Tensor, shape: torch.Size, *, network: str, layer: str, model: str = "") -> Tensor:
    """ΔW in the weight's shape: equal shapes pass, equal sizes reshape (1x1 conv vs linear), a
    4-channel conv delta on a 9-channel inpainting weight is zero-padded (A1111 does the same).
    ``model`` (a family label such as "SDXL") names the model in the error."""
    if delta.shape == shape:
        return delta
    if delta.numel() == shape.numel():
        return delta.reshape(shape)
    if (
        len(shape) == 4
        and delta.ndim == 4
        and shape[1] == 9
        and delta.shape[1] == 4
        and delta.shape[0] == shape[0]
        and delta.shape[2:] == shape[2:]
    ):
        return torch.nn.functional.pad(delta, (0, 0, 0, 0, 0, 5))
    this = f"this {model} model" if model else "this model"
    raise ModelLoadError(
        f"LoRA '{network}': layer {layer} gives a weight change of shape {tuple(delta.shape)} "
        "but the model's "
        f"weight is {tuple(shape)}. The LoRA was trained for a different model (another family, or "
        f"another width); use a LoRA made for {this}."
    )


# Cross-attention context width -> the family whose text encoder gives it.
_CONTEXT_FAMILIES = {768: "SD1", 1024: "SD2", 1280: "SDXL", 2048: "SDXL"}
_CROSS_ATTENTION_KV = re.compile(r"lora_unet_.*attn2_to_[kv]$")


def lora_family(modules: Mapping[str, LoraModule]) -> tuple[str, str] | None:
    """(family, evidence) of a LoRA when its modules tell it: the context width its cross-attention
    keys/values take (768 SD1, 1024 SD2, 2048 SDXL, 1280 SDXL refiner), else its text-encoder key
    names (``lora_te2_``: SDXL; ``lora_te_``: SD1 or SD2). None when neither does."""
    for name, mod in modules.items():
        if _CROSS_ATTENTION_KV.match(name):
            width = mod.input_width()
            if width in _CONTEXT_FAMILIES:
                return _CONTEXT_FAMILIES[width], f"its cross-attention takes a {width}-wide context"
    if any(name.startswith("lora_te2_") for name in modules):
        return "SDXL", "lora_te2_ keys"
    if any(name.startswith("lora_te_") for name in modules):
        return "SD1/SD2", "lora_te_ keys"
    return None


@dataclass
class LoraNetwork:
    """A loaded LoRA file."""

    name: str
    path: Path
    modules: dict[str, LoraModule]
    metadata: dict[str, str] = field(default_factory=dict)
    hash: str = ""  # 64-hex addnet hash (or file sha256 for pickles); A1111 shows [:12]
    bundled_embeddings: list[str] = field(default_factory=list)

    @property
    def shorthash(self) -> str:
        return self.hash[:12]

    @property
    def alias(self) -> str:
        """Name for infotexts; A1111 strips ':' and ',' which would break the "Lora hashes" list."""
        return self.name.replace(":", "").replace(",", "")


def lora_hash(path: Path, metadata: Mapping[str, str]) -> str:
    """A1111's LoRA hash: the ``sshs_model_hash`` kohya's scripts store in the metadata if present,
    else the addnet hash (sha256 of the tensor data) for safetensors, else the file's sha256."""
    stored = metadata.get("sshs_model_hash")
    if isinstance(stored, str) and stored:
        return stored
    if path.suffix.lower() == ".safetensors":
        return addnet_hash_safetensors(path)
    return sha256_file(path)


def _read_tensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    with open_checkpoint(path) as reader:
        return {k: reader.get(k).clone() for k in reader.shapes}, dict(reader.metadata)


def load_lora(path: str | Path, name: str | None = None) -> LoraNetwork:
    """Read a LoRA/LyCORIS file (safetensors, or .pt/.ckpt through the restricted unpickler)."""
    p = Path(path)
    tensors, metadata = _read_tensors(p)
    net_name = name or p.stem
    modules: dict[str, LoraModule] = {}
    bundled: list[str] = []
    for key, value in tensors.items():
        if key.startswith("bundle_emb."):
            bundled.append(key)  # textual-inversion embeddings shipped inside the LoRA
            continue
        layer, _, suffix = key.partition(".")
        if not suffix:
            continue
        modules.setdefault(layer, LoraModule(net_name, layer, {})).tensors[suffix] = value
    if not modules:
        raise ModelLoadError(
            f"{p}: no LoRA modules in the file (keys e.g. {list(tensors)[:3]}); is it a LoRA?"
        )
    for mod in modules.values():
        empty = [suffix for suffix, t in mod.tensors.items() if t.numel() == 0]
        if empty:
            # A rank-0 factor has no elements: its scale alpha / rank divides by zero and it changes
            # nothing, so the file is broken rather than merely unusual.
            tensor = f"{mod.name}.{empty[0]}"
            raise ModelLoadError(
                f"{p}: tensor '{tensor}' has shape {tuple(mod.tensors[empty[0]].shape)} - rank 0, no "
                "elements; the LoRA is damaged. Extract or train it again with a rank of at least 1."
            )
        if "dora_scale" in mod.tensors:
            raise ModelLoadError(
                f"LoRA '{net_name}': layer {mod.name} is a DoRA module (dora_scale), "
                "which voidprompt does not "
                "support yet; remove the tag or convert the LoRA."
            )
    # Metadata values are strings already for safetensors; keep them as they are.
    meta = {str(k): (v if isinstance(v, str) else json.dumps(v)) for k, v in metadata.items()}
    return LoraNetwork(net_name, p, modules, meta, lora_hash(p, meta), bundled)


def lora_call_params(call: Any) -> tuple[str, float, float, int | None]:
    """(name, te multiplier, unet multiplier, dyn_dim) of a ``<lora:...>`` call, A1111's rules:
    te = 2nd positional or ``te=`` (default 1.0); unet = 3rd positional or ``unet=`` (default te);
    dyn = 4th positional or ``dyn=``."""
    pos = call.positional
    named = call.named
    te = float(pos[1]) if len(pos) > 1 else 1.0
    te = float(named.get("te", te))
    unet = float(pos[2]) if len(pos) > 2 else te
    unet = float(named.get("unet", unet))
    dyn = int(pos[3]) if len(pos) > 3 else None
    dyn = int(named["dyn"]) if "dyn" in named else dyn
    return call.name, te, unet, dyn
