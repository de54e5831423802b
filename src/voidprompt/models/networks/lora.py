"""kohya-format LoRA / LyCORIS files for SD1: reading, layer names, weight deltas.

Names: a kohya module name is the diffusers (UNet) or transformers (text encoder) module path with
``.`` replaced by ``_``, prefixed ``lora_unet_`` / ``lora_te_`` (``lora_te_text_model_encoder_layers_0_
self_attn_q_proj``). :func:`build_layer_map` makes the table by walking the *actual* modules and
underscoring their names, so it fits any width or depth. It also accepts the older LyCORIS names built
from CompVis paths (``lora_unet_input_blocks_1_1_proj_in``), which A1111 matches as well, using the
loader's CompVis <-> diffusers key map.

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
    "lora_hash",
]

log = logging.getLogger(__name__)

Component = Literal["unet", "text_encoder"]
LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")


@dataclass(frozen=True)
class LayerTarget:
    """A model layer a network module can change."""

    component: Component
    name: str  # module path inside its component (diffusers / transformers)
    module: nn.Module


def _te_name(name: str) -> str:
    # transformers >= 5 flattened CLIPTextModel; kohya names always carry the text_model level.
    return name if name.startswith("text_model.") else "text_model." + name


def build_layer_map(unet: nn.Module | None, text_encoder: nn.Module | None) -> dict[str, LayerTarget]:
    """kohya name -> layer, for every Linear / Conv2d of the UNet and the text encoder."""
    out: dict[str, LayerTarget] = {}
    if text_encoder is not None:
        for name, mod in text_encoder.named_modules():
            if isinstance(mod, (nn.Linear, nn.Conv2d)):
                out["lora_te_" + _te_name(name).replace(".", "_")] = LayerTarget("text_encoder", name, mod)
    if unet is not None:
        compvis: dict[str, str] = {}
        try:
            keymap = CheckpointKeyMap(unet=unet)
            prefix = "model.diffusion_model."
            for (_, key), cv in keymap.reverse.items():
                if key.endswith(".weight") and cv.startswith(prefix):
                    compvis[key[: -len(".weight")]] = cv[len(prefix) : -len(".weight")]
        except Exception:  # a UNet the CompVis rules cannot name: diffusers names still work
            compvis = {}
        for name, mod in unet.named_modules():
            if isinstance(mod, (nn.Linear, nn.Conv2d)):
                target = LayerTarget("unet", name, mod)
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

    def delta(self, target_shape: torch.Size, *, dyn_dim: int | None = None) -> Tensor:
        """ΔW * scale (float32, no multiplier) in the target's shape; raises on a misfit.

        The same arithmetic runs first on the meta device, which gives the delta's shape without
        computing or allocating it: factors of a few KB can describe a product (``up @ down``, a
        Kronecker product) of gigabytes, and a misfit must be refused before that is built."""
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
        fit_delta(planned, target_shape, network=self.network, layer=self.name)
        raw = self._raw_delta(self.tensors, target_shape, dyn_dim)
        return fit_delta(raw, target_shape, network=self.network, layer=self.name) * self.scale


def fit_delta(delta: Tensor, shape: torch.Size, *, network: str, layer: str) -> Tensor:
    """ΔW in the weight's shape: equal shapes pass, equal sizes reshape (1x1 conv vs linear), a
    4-channel conv delta on a 9-channel inpainting weight is zero-padded (A1111 does the same)."""
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
    raise ModelLoadError(
        f"LoRA '{network}': layer {layer} gives a weight change of shape {tuple(delta.shape)} "
        "but the model's "
        f"weight is {tuple(shape)}. The LoRA was trained for a different model (SD2/SDXL, or another width); "
        "use a LoRA made for this SD1 model."
    )


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
