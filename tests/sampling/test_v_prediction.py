"""v-prediction and the Zero Terminal SNR schedule, against independent implementations.

* ``DiscreteVDenoiser`` against k-diffusion's own ``CompVisVDenoiser`` (what A1111 wraps a
  v-prediction model in), same sigma table, same fake v-model.
* ``VTimestepModel``'s eps against diffusers' DDIM scheduler, which turns v into eps for its
  ``prediction_type="v_prediction"`` by the same identity.
* ``zero_terminal_snr_alphas_cumprod`` against diffusers' ``rescale_zero_terminal_snr`` (on betas), except
  the last entry, which A1111 sets to a small stand-in instead of diffusers' exact zero.
"""

from __future__ import annotations

import pytest
import torch
from kdiff_oracle import kdiff_external

from voidprompt.models.load import sd1_alphas_cumprod
from voidprompt.sampling.denoiser import (
    ZERO_TERMINAL_SNR_LAST_ABAR,
    DiscreteVDenoiser,
    VTimestepModel,
    zero_terminal_snr_alphas_cumprod,
)


def _fake_v(x_in: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in for a v-predicting UNet that depends on all three inputs."""
    return torch.tanh(x_in * 0.7 + t[:, None, None, None] / 500.0 + context.mean())


def test_v_denoiser_matches_k_diffusion() -> None:
    abar = sd1_alphas_cumprod()
    ours = DiscreteVDenoiser(_fake_v, abar)

    class CompVisModel:
        alphas_cumprod = abar

        def apply_model(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
            return _fake_v(x, t, cond)

    theirs = kdiff_external().CompVisVDenoiser(CompVisModel(), quantize=False)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 8, generator=gen) * 5
    context = torch.randn(2, 77, 16, generator=gen)
    for sigma in (0.03, 0.9, 4.0, 14.6):
        s = torch.full((2,), sigma)
        assert torch.allclose(ours(x, s, context=context), theirs(x, s, cond=context), atol=1e-6, rtol=1e-5)


def test_v_timestep_model_gives_diffusers_eps() -> None:
    from diffusers import DDIMScheduler

    abar = sd1_alphas_cumprod()
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    assert torch.allclose(scheduler.alphas_cumprod.float(), abar, atol=1e-7)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    context = torch.randn(2, 77, 16, generator=gen)
    t = torch.tensor([999, 261])
    eps = VTimestepModel(_fake_v, abar)(x, t, context=context)
    v = _fake_v(x, t, context)
    for row, step in enumerate(t.tolist()):
        a = scheduler.alphas_cumprod[step].float()
        # diffusers' DDIMScheduler.step, prediction_type "v_prediction": its pred_epsilon.
        expected = a**0.5 * v[row] + (1 - a) ** 0.5 * x[row]
        assert torch.allclose(eps[row], expected, atol=1e-6)


def test_zero_terminal_snr_matches_diffusers_rescale() -> None:
    from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr

    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    abar = sd1_alphas_cumprod()
    rescaled = zero_terminal_snr_alphas_cumprod(abar)
    theirs = torch.cumprod(1 - rescale_zero_terminal_snr(betas), dim=0)
    assert float(theirs[-1]) == pytest.approx(0.0, abs=1e-12)
    assert torch.allclose(rescaled[:-1].double(), theirs[:-1], rtol=2e-5, atol=1e-9)
    assert float(rescaled[0]) == pytest.approx(float(abar[0]), rel=1e-6)
    assert float(rescaled[-1]) == pytest.approx(ZERO_TERMINAL_SNR_LAST_ABAR)
    # The stand-in's sigma: about 4519 where SD1's schedule tops out near 14.6.
    sigma_max = ((1 - rescaled[-1]) / rescaled[-1]) ** 0.5
    assert 4500 < float(sigma_max) < 4530
