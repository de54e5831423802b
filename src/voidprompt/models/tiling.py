"""Seamless tiles: A1111's "Tiling" switch (circular padding in the UNet's and VAE's convolutions).

A1111 (``sd_hijack.apply_circular``) sets ``padding_mode = "circular"`` on every module whose type
is exactly ``torch.nn.Conv2d`` in the loaded model while a tiling request runs. Circular padding
makes every padded convolution treat the picture as the surface of a torus, so the sampled latent,
and the picture decoded from it, wrap around at the edges.

Two details follow from "exactly Conv2d, and only its own padding":

- The VAE encoder's downsampling convolutions have no padding of their own: they pad the bottom
  and right edges with zeros by an explicit ``F.pad`` before a stride-2 convolution (in A1111's
  ``ldm`` VAE and in diffusers' ``Downsample2D`` alike), and the switch leaves that zero padding
  alone. An img2img or hires-fix VAE encode is therefore not fully circular, as in A1111.
- Subclasses of Conv2d (none in the networks voidprompt builds) and the functional LoRA branches,
  which call ``F.conv2d`` with the layer's padding, keep zero padding, as A1111's functional LoRA
  modules (plain Conv2d modules outside the model) do.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Final, Literal

from torch import nn

__all__ = ["circular_padding", "tiling_convolutions"]

CIRCULAR: Final[Literal["circular"]] = "circular"


def tiling_convolutions(*modules: nn.Module | None) -> list[nn.Conv2d]:
    """The convolutions of ``modules`` the tiling switch changes, each once.

    A convolution without padding is left out: circular padding of width zero gives the same
    result, and A1111's switch of its mode changes nothing in its output.
    """
    found: dict[int, nn.Conv2d] = {}
    for module in modules:
        if module is None:
            continue
        for layer in module.modules():
            # A1111 compares the exact type, so subclasses keep their own padding.
            if type(layer) is nn.Conv2d and _pads(layer):
                found.setdefault(id(layer), layer)
    return list(found.values())


def _pads(conv: nn.Conv2d) -> bool:
    padding = conv.padding
    if isinstance(padding, str):
        return padding != "valid"
    return any(p != 0 for p in padding)


@contextlib.contextmanager
def circular_padding(*modules: nn.Module | None, enabled: bool = True) -> Iterator[None]:
    """Inside the block, the padded Conv2d layers of ``modules`` pad circularly (A1111's
    ``apply_circular(True)``); afterwards each gets back the padding mode it had, even when the
    block raised. With ``enabled=False`` nothing is touched, so a request without tiling runs on
    the modules exactly as they are."""
    if not enabled:
        yield
        return
    convs = tiling_convolutions(*modules)
    saved = [conv.padding_mode for conv in convs]
    try:
        for conv in convs:
            conv.padding_mode = CIRCULAR
        yield
    finally:
        for conv, mode in zip(convs, saved, strict=True):
            conv.padding_mode = mode
