"""The miniature model's architecture and what the phases do to its modules: fresh weights, the
optimiser, the EMA, the reconstruction losses.

The final LayerNorm's bias is frozen at a vector with mean 0.5. A1111's emphasis ("Original") scales
the conditioning back to its old mean (``z * mean_before / mean_after``); an output whose mean is near
zero turns that into a division by ~0 (NaN or huge values). A fixed offset is harmless to the UNet (its
key/value projections absorb it) and keeps the mean well away from zero whatever the encoder learns.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from voidprompt.models.arch import ArchConstants, ClipArch, SD1Arch, UNetArch, VaeArch, build_modules

__all__ = [
    "FINAL_LN_BIAS_MEAN",
    "MINIATURE_ARCH",
    "MINIATURE_CONSTANTS",
    "adamw",
    "ema_update",
    "fresh_modules",
    "reconstruction_losses",
    "swapped",
    "text_model",
]

# Constants shapes cannot tell, written to the file's ``voidprompt.arch`` metadata. Frozen with the
# weights: UNet widths 32/64/128 need fewer than SD1's 32 GroupNorm groups to keep 4 channels a group,
# the CLIP width 64 needs head width 16 for 4 heads. ``scaling_factor`` is filled in after the VAE.
MINIATURE_CONSTANTS = ArchConstants(
    unet_heads=4,
    unet_norm_groups=8,
    unet_sample_size=8,
    vae_norm_groups=8,
    vae_sample_size=64,
    clip_head_dim=16,
)

MINIATURE_ARCH = SD1Arch(
    # SD1 puts attention at every level but the last; here 8x8 and 4x4 have it, 2x2 does not.
    unet=UNetArch(
        in_channels=4,
        out_channels=4,
        model_channels=32,
        channel_mult=(1, 2, 4),
        num_res_blocks=1,
        attention_levels=(True, True, False),
        transformer_depth=(1, 1, 1),
        context_dim=64,
        linear_projection=False,
    ),
    # Four levels: downscale 8, as every SD1 VAE.
    vae=VaeArch(in_channels=3, out_channels=3, channels=32, channel_mult=(1, 2, 4, 4), num_res_blocks=1,
                latent_channels=4),
    clip=ClipArch(hidden_size=64, intermediate_size=256, num_layers=4, vocab_size=49408, max_positions=77),
    constants=MINIATURE_CONSTANTS,
)

FINAL_LN_BIAS_MEAN = 0.5


def text_model(text_encoder: nn.Module) -> nn.Module:
    """The module holding the text encoder's layers and final LayerNorm."""
    # transformers 5.x flattened CLIPTextModel; older versions keep the parts under ``.text_model``.
    inner = getattr(text_encoder, "text_model", None)
    return inner if isinstance(inner, nn.Module) else text_encoder


def fresh_modules(seed: int) -> tuple[Any, Any, Any]:
    """(unet, vae, text_encoder) with the initial weights of a run with this seed, on the CPU; torch's
    global generator is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet, vae, text_encoder = build_modules(MINIATURE_ARCH, device="cpu")
        bias: torch.Tensor = getattr(text_model(text_encoder), "final_layer_norm").bias  # noqa: B009
        with torch.no_grad():
            bias.copy_(FINAL_LN_BIAS_MEAN + 0.1 * torch.randn_like(bias))
        bias.requires_grad_(False)
    return unet, vae, text_encoder


def adamw(params: Iterable[torch.Tensor], lr: float) -> torch.optim.AdamW:
    """AdamW without weight decay, on torch's fused CPU kernel: one pass over the text encoder + UNet's
    6.5 M parameters takes 10 ms instead of the default per-tensor loop's 43 ms (measured on one
    core), which was a quarter of a batch-16 diffusion step."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True)


def reconstruction_losses(
    rec: torch.Tensor, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """L1, L2 and the L1 of image gradients (keeps edges sharp) between a decoded and a true picture.

    Built in this order on purpose: the graph's order sets the order in which backward sums
    gradients, and the shipped VAE phase was trained with this one. (The shipped decoder phase built
    L2 after the edge term, so a rerun of that phase differs from the shipped decoder by float
    rounding only; see docs/miniature-history.md, "Reproducibility".)"""
    l1 = (rec - x).abs().mean()
    l2 = (rec - x).square().mean()
    edge = (rec.diff(dim=-1) - x.diff(dim=-1)).abs().mean() + (rec.diff(dim=-2) - x.diff(dim=-2)).abs().mean()
    return l1, l2, edge


def ema_update(ema: dict[str, torch.Tensor], module: nn.Module, decay: float) -> None:
    """``ema = decay * ema + (1 - decay) * weights`` for every float tensor of ``module``'s state."""
    # Two multi-tensor kernels instead of two per tensor (hundreds of launches a step on a GPU); the
    # same arithmetic, so the same bits, as a per-tensor mul_ and add_.
    with torch.no_grad():
        state = module.state_dict()
        floats = [name for name, p in state.items() if p.is_floating_point()]
        averages, current = [ema[name] for name in floats], [state[name] for name in floats]
        torch._foreach_mul_(averages, decay)
        torch._foreach_add_(averages, current, alpha=1.0 - decay)
        for name, p in state.items():
            if not p.is_floating_point():  # integer buffers (position ids) are copied, not averaged
                ema[name].copy_(p)


@contextmanager
def swapped(module: nn.Module, weights: dict[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily load ``weights`` (the EMA) into ``module``."""
    saved = {k: v.clone() for k, v in module.state_dict().items()}
    module.load_state_dict(weights)
    try:
        yield
    finally:
        module.load_state_dict(saved)
