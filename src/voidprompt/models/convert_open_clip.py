"""OpenCLIP text tower names (SDXL's ViT-bigG as sgm saves it) <-> ``CLIPTextModelWithProjection``.

open_clip's text tower is the same network as CLIP's, stored differently:

* ``token_embedding.weight`` and ``positional_embedding`` (a bare parameter, no ``.weight``);
* ``transformer.resblocks.N.`` blocks whose attention is a ``torch.nn.MultiheadAttention``: one fused
  ``attn.in_proj_weight`` / ``in_proj_bias`` holding the q, k and v projections stacked by rows in
  that order, and ``attn.out_proj``; ``ln_1``, ``ln_2``, ``mlp.c_fc``, ``mlp.c_proj``;
* ``ln_final``, and ``text_projection``, a bare (width, projection) matrix applied as
  ``x @ text_projection`` - so transformers' ``text_projection`` Linear weight is its transpose;
* ``logit_scale`` belongs to the contrastive loss and has no place in a text encoder.

:func:`open_clip_name` names the open_clip tensor that holds one transformers tensor, and how it is
held (:data:`Layout`); the key map in :mod:`voidprompt.models.convert` turns that into both directions.
"""

from __future__ import annotations

import re
from typing import Literal

__all__ = ["IGNORED_OPEN_CLIP_KEYS", "Layout", "open_clip_name", "qkv_parts"]

# How a checkpoint tensor holds module tensors: as is ("same"), transposed ("transposed"), or as the
# rows of three module tensors q, k, v stacked in that order ("qkv").
Layout = Literal["same", "transposed", "qkv"]

# Keys of an open_clip text tower that no text encoder uses (relative to its prefix).
IGNORED_OPEN_CLIP_KEYS = frozenset({"logit_scale", "attn_mask"})

_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)")
_IN_LAYER = {
    "self_attn.out_proj.": "attn.out_proj.",
    "layer_norm1.": "ln_1.",
    "layer_norm2.": "ln_2.",
    "mlp.fc1.": "mlp.c_fc.",
    "mlp.fc2.": "mlp.c_proj.",
}
_QKV = re.compile(r"self_attn\.([qkv])_proj\.(weight|bias)")


def open_clip_name(module_key: str) -> tuple[str, Layout] | None:
    """The open_clip name (without the checkpoint prefix) of a ``CLIPTextModelWithProjection`` state
    dict key and its layout there; None for a key open_clip has no tensor for."""
    if module_key == "text_projection.weight":
        return "text_projection", "transposed"
    key = module_key.removeprefix("text_model.")
    if key in _TOP:
        return _TOP[key], "same"
    m = _LAYER.fullmatch(key)
    if m is None:
        return None
    index, rest = m.groups()
    block = f"transformer.resblocks.{index}."
    if qkv := _QKV.fullmatch(rest):
        return f"{block}attn.in_proj_{qkv.group(2)}", "qkv"
    for hf, oc in _IN_LAYER.items():
        if rest.startswith(hf):
            return block + oc + rest[len(hf) :], "same"
    return None


def qkv_parts(module_key: str) -> tuple[str, str, str]:
    """The q, k and v module keys that share one fused ``in_proj`` tensor with ``module_key``."""
    m = re.search(r"\.([qkv])_proj\.(weight|bias)$", module_key)
    if m is None:
        raise ValueError(f"not a q/k/v projection key: {module_key}")
    head = module_key[: m.start()]
    return tuple(f"{head}.{p}_proj.{m.group(2)}" for p in "qkv")  # type: ignore[return-value]
