"""Shared pieces for the sampling tests: the SD1 noise table and closed-form Gaussian oracles."""

from __future__ import annotations

import math

import torch


def sd1_alphas_cumprod(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """SD1's "scaled linear" schedule: betas = linspace(sqrt(0.00085), sqrt(0.012), 1000)^2."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0).to(dtype)


class GaussianDenoiser:
    """Exact D(x, sigma) for data N(mu, s^2): mu + s^2 / (s^2 + sigma^2) (x - mu)."""

    def __init__(self, mu: float, s: float) -> None:
        self.mu, self.s = mu, s
        self.calls = 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        sig = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        return self.mu + self.s**2 / (self.s**2 + sig**2) * (x - self.mu)

    def exact(self, x0: torch.Tensor, sigma0: float, sigma1: float) -> torch.Tensor:
        """The probability-flow ODE solution from (x0, sigma0) to sigma1."""
        ratio = math.sqrt(self.s**2 + sigma1**2) / math.sqrt(self.s**2 + sigma0**2)
        return self.mu + ratio * (x0 - self.mu)


class GaussianEpsModel:
    """Exact eps(x_t, t) for VP data x_t = sqrt(abar) x0 + sqrt(1 - abar) eps, x0 ~ N(mu, s^2).

    abar at a fractional timestep follows UniPC's discrete schedule: log sqrt(abar) piecewise linear
    in the index.
    """

    def __init__(self, mu: float, s: float, alphas_cumprod: torch.Tensor) -> None:
        self.mu, self.s = mu, s
        self.log_alpha = 0.5 * torch.log(alphas_cumprod.double())
        self.calls = 0

    def abar(self, t: torch.Tensor) -> torch.Tensor:
        t = t.double().clamp(0, len(self.log_alpha) - 1)
        lo = t.floor().long().clamp(max=len(self.log_alpha) - 2)
        w = t - lo
        return torch.exp(2 * ((1 - w) * self.log_alpha[lo] + w * self.log_alpha[lo + 1]))

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        a = self.abar(t).reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        return (1 - a).sqrt() * (x - a.sqrt() * self.mu) / (a * self.s**2 + 1 - a)

    def exact(self, x_start: torch.Tensor, abar0: float, abar1: float) -> torch.Tensor:
        """PF-ODE solution in VP form: x = sqrt(abar) y with y the VE solution, sigma^2 = (1-abar)/abar."""
        s0, s1 = (1 - abar0) / abar0, (1 - abar1) / abar1
        y0 = x_start / math.sqrt(abar0)
        y1 = self.mu + math.sqrt(self.s**2 + s1) / math.sqrt(self.s**2 + s0) * (y0 - self.mu)
        return math.sqrt(abar1) * y1
