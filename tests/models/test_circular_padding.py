"""The tiling switch (circular padding) on the tiny model's networks."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from diffusers.models import downsampling
from torch import nn

from voidprompt.models.tiling import circular_padding, tiling_convolutions


def _modes(module: nn.Module) -> dict[str, str]:
    return {name: m.padding_mode for name, m in module.named_modules() if isinstance(m, nn.Conv2d)}


def test_switch_turns_padded_convolutions_circular_and_restores_them(tiny_modules: Any) -> None:
    unet, vae, _ = tiny_modules
    before = {**_modes(unet), **{f"vae.{k}": v for k, v in _modes(vae).items()}}
    assert set(before.values()) == {"zeros"}
    with circular_padding(unet, vae):
        inside = {**_modes(unet), **{f"vae.{k}": v for k, v in _modes(vae).items()}}
        padded = {
            name
            for name, m in [*unet.named_modules(), *(("vae." + n, m) for n, m in vae.named_modules())]
            if isinstance(m, nn.Conv2d) and m.padding != (0, 0)
        }
        assert padded and {k for k, v in inside.items() if v == "circular"} == padded
        # 1x1 projections and the VAE encoder's downsamplers (padding 0, zeros by their own F.pad).
        assert inside["vae.encoder.down_blocks.0.downsamplers.0.conv"] == "zeros"
        assert inside["down_blocks.0.downsamplers.0.conv"] == "circular"
    assert {**_modes(unet), **{f"vae.{k}": v for k, v in _modes(vae).items()}} == before


def test_switch_restores_each_layers_own_mode_after_an_error() -> None:
    net = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect"), nn.Conv2d(1, 1, 3, padding=1))
    with pytest.raises(RuntimeError, match="boom"), circular_padding(net):
        assert [m.padding_mode for m in net] == ["circular", "circular"]
        raise RuntimeError("boom")
    assert [m.padding_mode for m in net] == ["reflect", "zeros"]


def test_disabled_switch_and_subclasses_are_left_alone() -> None:
    class Custom(nn.Conv2d):
        pass

    net = nn.Sequential(Custom(1, 1, 3, padding=1), nn.Conv2d(1, 1, 3, padding=1), nn.Conv2d(1, 1, 1))
    # A1111 compares the exact type; a layer shared twice is switched once.
    assert tiling_convolutions(net, net, None) == [net[1]]
    with circular_padding(net, enabled=False):
        assert [m.padding_mode for m in net] == ["zeros"] * 3
    with circular_padding(net):
        assert [m.padding_mode for m in net] == ["zeros", "circular", "zeros"]


def _unet_eps(unet: Any, x: torch.Tensor) -> torch.Tensor:
    context = torch.linspace(-1, 1, 77 * 32).reshape(1, 77, 32).expand(x.shape[0], -1, -1)
    return unet(x, torch.tensor([500]), encoder_hidden_states=context).sample


@torch.no_grad()
def test_unet_and_decoder_commute_with_a_roll_only_when_tiling(tiny_modules: Any) -> None:
    unet, vae, _ = tiny_modules
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=generator)
    # The tiny UNet downsamples once: shifts by multiples of 2 latent cells commute with it.
    shift = (2, 4)

    def roll(t: torch.Tensor, scale: int = 1) -> torch.Tensor:
        return torch.roll(t, shifts=(shift[0] * scale, shift[1] * scale), dims=(2, 3))

    with circular_padding(unet, vae):
        eps, eps_rolled = _unet_eps(unet, x), _unet_eps(unet, roll(x))
        pixels, pixels_rolled = vae.decode(x).sample, vae.decode(roll(x)).sample
    torch.testing.assert_close(eps_rolled, roll(eps), rtol=0, atol=1e-5)
    # The tiny VAE upsamples by 2: one latent cell is two pixels.
    assert pixels.shape[-1] == 2 * x.shape[-1]
    torch.testing.assert_close(pixels_rolled, roll(pixels, 2), rtol=0, atol=1e-5)
    # Zero padding breaks it at the edges: the control that the check above can fail.
    assert (_unet_eps(unet, roll(x)) - roll(_unet_eps(unet, x))).abs().max() > 1e-3
    assert (vae.decode(roll(x)).sample - roll(vae.decode(x).sample, 2)).abs().max() > 1e-3


@torch.no_grad()
def test_encoder_keeps_its_zero_padded_downsampling(
    tiny_modules: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A1111's VAE encoder pads its stride-2 convolutions with zeros itself, so tiling leaves an
    img2img encode not quite circular; only that padding stands between it and a circular one."""
    _, vae, _ = tiny_modules
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1

    def roll(t: torch.Tensor, cells: int) -> torch.Tensor:
        return torch.roll(t, shifts=(cells, cells), dims=(2, 3))

    def moments(t: torch.Tensor) -> torch.Tensor:
        return vae.encode(t).latent_dist.mean

    with circular_padding(vae):
        plain, rolled = moments(image), moments(roll(image, 4))
        assert (rolled - roll(plain, 2)).abs().max() > 1e-3
        # With the downsampler's own pad made circular as well, the encoder commutes with the roll.
        circular_f = SimpleNamespace(
            pad=lambda x, pad, mode="constant", value=0: F.pad(x, pad, mode="circular")
        )
        monkeypatch.setattr(downsampling, "F", circular_f)
        plain, rolled = moments(image), moments(roll(image, 4))
    torch.testing.assert_close(rolled, roll(plain, 2), rtol=0, atol=1e-5)
