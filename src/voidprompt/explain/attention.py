"""Cross-attention probabilities read beside the UNet's own attention, DAAM-style.

A forward pre-hook on every cross-attention module sees the module's inputs, recomputes the query
and key projections and the softmax of their scaled products, averages it over heads and hands it on.
The module itself runs untouched (its own processor, its own SDPA call), so the pictures are the
same bit for bit with the probe on or off; the probe costs the second query/key projection and the
explicit softmax of cross-attention only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

ProbsSink = Callable[[Tensor], None]
"""Receives one cross-attention layer's probabilities, (rows, query positions, context rows), float32."""


def cross_attention_modules(unet: nn.Module) -> list[nn.Module]:
    """The UNet's cross-attention modules (diffusers ``Attention`` with ``is_cross_attention``)."""
    return [m for m in unet.modules() if getattr(m, "is_cross_attention", False) and hasattr(m, "to_k")]


def head_mean_probabilities(attn: Any, hidden_states: Tensor, context: Tensor) -> Tensor:
    """softmax(q k^T * scale) averaged over heads, (rows, queries, keys), float32 - what the module's
    attention weighs its values by."""
    if hidden_states.ndim == 4:
        b, c, h, w = hidden_states.shape
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
    if getattr(attn, "group_norm", None) is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    if getattr(attn, "norm_cross", None):
        context = attn.norm_encoder_hidden_states(context)
    query = attn.to_q(hidden_states)
    key = attn.to_k(context)
    rows, heads = query.shape[0], attn.heads
    head_dim = key.shape[-1] // heads
    query = query.view(rows, -1, heads, head_dim).transpose(1, 2)
    key = key.view(rows, -1, heads, head_dim).transpose(1, 2)
    if getattr(attn, "norm_q", None) is not None:
        query = attn.norm_q(query)
    if getattr(attn, "norm_k", None) is not None:
        key = attn.norm_k(key)
    # The scale goes on the query (queries x head_dim), not on the scores (queries x keys): one pass
    # over the smaller tensor, for about a fifth of the probe's time.
    scores = torch.matmul(query.float() * float(attn.scale), key.float().transpose(-1, -2))
    return scores.softmax(dim=-1).mean(dim=1)


class AttentionProbe:
    """Hooks the cross-attention of one or more UNets; every layer's head-averaged probabilities go
    to ``sink``. Use as a context manager: leaving it removes every hook."""

    def __init__(self, sink: ProbsSink) -> None:
        self.sink = sink
        self._handles: list[Any] = []

    def attach(self, unet: nn.Module) -> None:
        modules = cross_attention_modules(unet)
        if not modules:
            raise ValueError("this UNet has no cross-attention modules to read attention maps from")
        for module in modules:
            self._handles.append(module.register_forward_pre_hook(self._hook, with_kwargs=True))

    def _hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden_states = args[0] if args else kwargs["hidden_states"]
        context = kwargs.get("encoder_hidden_states")
        if context is None and len(args) > 1:
            context = args[1]
        if context is None:
            return
        with torch.no_grad():
            self.sink(head_mean_probabilities(module, hidden_states, context))

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> AttentionProbe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
