"""One plain function per A1111 sampler, k-diffusion style.

Sigma samplers: ``sample_<name>(model, x, sigmas, *, extra_args=None, callback=None,
noise_sampler=None, **knobs) -> Tensor`` where ``model(x, sigma_batch, **extra_args)`` returns the
denoised x0 (``DiscreteEpsDenoiser`` / ``CFGDenoiser``) and ``noise_sampler(sigma, sigma_next)``
returns a unit normal tensor shaped like ``x``. Every random draw goes through ``noise_sampler``
(A1111 routes them all through its per-image RNG); the default is ``torch.randn_like(x)``. SDE
samplers expect a Brownian-tree noise sampler to match A1111, but accept any.

A1111's timestep samplers (DDIM, DDIM CFG++, PLMS, UniPC) are in :mod:`.timestep_samplers`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from voidprompt.errors import InvalidRequestError
from voidprompt.sampling.schedules import karras

Model = Callable[..., Tensor]
NoiseSampler = Callable[[Tensor, Tensor], Tensor]
Callback = Callable[[dict[str, Any]], None]


def to_d(x: Tensor, sigma: Tensor, denoised: Tensor) -> Tensor:
    """Karras ODE derivative dx/dsigma = (x - D(x, sigma)) / sigma."""
    return (x - denoised) / _bcast(sigma, x)


def _bcast(v: Tensor | float, x: Tensor) -> Tensor | float:
    if isinstance(v, Tensor) and v.ndim:
        return v[(...,) + (None,) * (x.ndim - v.ndim)]
    return v


def get_ancestral_step(sigma_from: Tensor, sigma_to: Tensor, eta: float = 1.0) -> tuple[Tensor, Tensor]:
    """Split a step to sigma_to into a deterministic step to sigma_down plus fresh noise sigma_up.

    sigma_up = min(sigma_to, eta * sqrt(sigma_to^2 (sigma_from^2 - sigma_to^2) / sigma_from^2)),
    sigma_down = sqrt(sigma_to^2 - sigma_up^2); eta = 0 gives (sigma_to, 0).
    """
    if not eta:
        return sigma_to, sigma_to.new_zeros(())
    sigma_up = torch.minimum(
        sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
    )
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def _setup(
    x: Tensor, extra_args: dict[str, Any] | None, noise_sampler: NoiseSampler | None
) -> tuple[dict[str, Any], NoiseSampler, Tensor]:
    args = {} if extra_args is None else extra_args
    noise = noise_sampler if noise_sampler is not None else (lambda s, sn: torch.randn_like(x))
    return args, noise, x.new_ones([x.shape[0]])


def _churn_gamma(sigma: Tensor, n: int, s_churn: float, s_tmin: float, s_tmax: float) -> float:
    return min(s_churn / n, 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0


def _report(
    callback: Callback | None, x: Tensor, i: int, sigma: Any, sigma_hat: Any, denoised: Tensor
) -> None:
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma_hat, "denoised": denoised})


# --------------------------------------------------------------------------------------------------
# Karras-style first and second order samplers
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_euler(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
) -> Tensor:
    """Euler steps with optional churn: Karras et al. (2022), "Elucidating the Design Space of
    Diffusion-Based Generative Models", Algorithm 2 (first-order variant)."""
    args, noise, s_in = _setup(x, extra_args, noise_sampler)
    n = len(sigmas) - 1
    for i in range(n):
        gamma = _churn_gamma(sigmas[i], n, s_churn, s_tmin, s_tmax)
        # A1111 quirk: eps is drawn every step and discarded when gamma == 0, which keeps the
        # per-image noise stream where A1111 has it.
        eps = noise(sigmas[i], sigmas[i + 1]) * s_noise
        sigma_hat = sigmas[i] * (gamma + 1)
        if gamma > 0:
            x = x + eps * (sigma_hat**2 - sigmas[i] ** 2) ** 0.5
        denoised = model(x, sigma_hat * s_in, **args)
        d = to_d(x, sigma_hat, denoised)
        _report(callback, x, i, sigmas[i], sigma_hat, denoised)
        x = x + d * (sigmas[i + 1] - sigma_hat)
    return x


@torch.no_grad()
def sample_euler_ancestral(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """Ancestral Euler: Ho et al. (2020) ancestral sampling on Karras et al. (2022) Euler steps."""
    args, noise, s_in = _setup(x, extra_args, noise_sampler)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **args)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        d = to_d(x, sigmas[i], denoised)
        x = x + d * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_heun(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
) -> Tensor:
    """Heun steps with optional churn: Karras et al. (2022), Algorithm 2. The last step is Euler."""
    args, noise, s_in = _setup(x, extra_args, noise_sampler)
    n = len(sigmas) - 1
    for i in range(n):
        gamma = _churn_gamma(sigmas[i], n, s_churn, s_tmin, s_tmax)
        eps = noise(sigmas[i], sigmas[i + 1]) * s_noise  # A1111 quirk: drawn even when unused
        sigma_hat = sigmas[i] * (gamma + 1)
        if gamma > 0:
            x = x + eps * (sigma_hat**2 - sigmas[i] ** 2) ** 0.5
        denoised = model(x, sigma_hat * s_in, **args)
        d = to_d(x, sigma_hat, denoised)
        _report(callback, x, i, sigmas[i], sigma_hat, denoised)
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            denoised_2 = model(x_2, sigmas[i + 1] * s_in, **args)
            d_2 = to_d(x_2, sigmas[i + 1], denoised_2)
            x = x + (d + d_2) / 2 * dt
    return x


@torch.no_grad()
def sample_dpm_2(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
) -> Tensor:
    """DPM2: a midpoint (in log sigma) step inspired by Lu et al. (2022), "DPM-Solver", with the
    churn of Karras et al. (2022) Algorithm 2. The last step is Euler."""
    args, noise, s_in = _setup(x, extra_args, noise_sampler)
    n = len(sigmas) - 1
    for i in range(n):
        gamma = _churn_gamma(sigmas[i], n, s_churn, s_tmin, s_tmax)
        eps = noise(sigmas[i], sigmas[i + 1]) * s_noise  # A1111 quirk: drawn even when unused
        sigma_hat = sigmas[i] * (gamma + 1)
        if gamma > 0:
            x = x + eps * (sigma_hat**2 - sigmas[i] ** 2) ** 0.5
        denoised = model(x, sigma_hat * s_in, **args)
        d = to_d(x, sigma_hat, denoised)
        _report(callback, x, i, sigmas[i], sigma_hat, denoised)
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigma_hat)
        else:
            sigma_mid = sigma_hat.log().lerp(sigmas[i + 1].log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigma_hat)
            denoised_2 = model(x_2, sigma_mid * s_in, **args)
            d_2 = to_d(x_2, sigma_mid, denoised_2)
            x = x + d_2 * (sigmas[i + 1] - sigma_hat)
    return x


@torch.no_grad()
def sample_dpm_2_ancestral(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """Ancestral DPM2 (Lu et al. 2022 midpoint step towards sigma_down, then sigma_up of noise)."""
    args, noise, s_in = _setup(x, extra_args, noise_sampler)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **args)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        d = to_d(x, sigmas[i], denoised)
        if sigma_down == 0:
            # No noise in this branch (unlike Euler a), as in k-diffusion.
            x = x + d * (sigma_down - sigmas[i])
        else:
            sigma_mid = sigmas[i].log().lerp(sigma_down.log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigmas[i])
            denoised_2 = model(x_2, sigma_mid * s_in, **args)
            d_2 = to_d(x_2, sigma_mid, denoised_2)
            x = x + d_2 * (sigma_down - sigmas[i])
            x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


def lms_coefficient(order: int, t: np.ndarray, i: int, j: int) -> float:
    """Integral over [t_i, t_{i+1}] of the j-th Lagrange basis polynomial over t_i, ..., t_{i-order+1}.

    The integrand is a polynomial, so it is integrated exactly (k-diffusion uses numerical quadrature).
    """
    if order - 1 > i:
        raise InvalidRequestError(f"LMS order {order} is too high for step {i}: at most {i + 1}")
    roots = [t[i - k] for k in range(order) if k != j]
    denom = float(np.prod([t[i - j] - r for r in roots])) if roots else 1.0
    poly = np.polynomial.Polynomial.fromroots(roots) if roots else np.polynomial.Polynomial([1.0])
    antiderivative = poly.integ()
    return float((antiderivative(t[i + 1]) - antiderivative(t[i])) / denom)


@torch.no_grad()
def sample_lms(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    order: int = 4,
) -> Tensor:
    """Linear multistep (Adams-Bashforth over non-uniform sigmas) on the Karras ODE; see Karras et al.
    (2022) for the ODE and Hairer, Norsett & Wanner (1993), III.1, for variable-step Adams methods."""
    args, _, s_in = _setup(x, extra_args, noise_sampler)
    sigmas_np = sigmas.detach().cpu().double().numpy()
    ds: list[Tensor] = []
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **args)
        ds.append(to_d(x, sigmas[i], denoised))
        if len(ds) > order:
            ds.pop(0)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        cur_order = min(i + 1, order)
        coeffs = [lms_coefficient(cur_order, sigmas_np, i, j) for j in range(cur_order)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds), strict=False))
    return x


# --------------------------------------------------------------------------------------------------
# DPM-Solver++ family (log-SNR space, t = -log sigma)
# --------------------------------------------------------------------------------------------------


def _t(sigma: Tensor) -> Tensor:
    return sigma.log().neg()


def _sigma(t: Tensor) -> Tensor:
    return t.neg().exp()


@torch.no_grad()
def sample_dpmpp_2s_ancestral(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """Ancestral DPM-Solver++(2S): Lu et al. (2022), "DPM-Solver++", Algorithm 1 (singlestep, r=1/2)."""
    args, noise, s_in = _setup(x, extra_args, noise_sampler)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **args)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        if sigma_down == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            t, t_next = _t(sigmas[i]), _t(sigma_down)
            h = t_next - t
            s = t + h / 2
            x_2 = (_sigma(s) / _sigma(t)) * x - (-h / 2).expm1() * denoised
            denoised_2 = model(x_2, _sigma(s) * s_in, **args)
            x = (_sigma(t_next) / _sigma(t)) * x - (-h).expm1() * denoised_2
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_dpmpp_sde(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    r: float = 0.5,
) -> Tensor:
    """DPM-Solver++ (stochastic, singlestep 2nd order): Lu et al. (2022), "DPM-Solver++", with the
    SDE noise split as in k-diffusion. Two model calls a step; the last step is Euler."""
    args, noise, s_in = _setup(x, extra_args, noise_sampler)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **args)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
            continue
        t, t_next = _t(sigmas[i]), _t(sigmas[i + 1])
        h = t_next - t
        s = t + h * r
        fac = 1 / (2 * r)
        sd, su = get_ancestral_step(_sigma(t), _sigma(s), eta)
        s_ = _t(sd)
        x_2 = (_sigma(s_) / _sigma(t)) * x - (t - s_).expm1() * denoised
        x_2 = x_2 + noise(_sigma(t), _sigma(s)) * s_noise * su
        denoised_2 = model(x_2, _sigma(s) * s_in, **args)
        sd, su = get_ancestral_step(_sigma(t), _sigma(t_next), eta)
        t_next_ = _t(sd)
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = (_sigma(t_next_) / _sigma(t)) * x - (t - t_next_).expm1() * denoised_d
        x = x + noise(_sigma(t), _sigma(t_next)) * s_noise * su
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """DPM-Solver++(2M): Lu et al. (2022), "DPM-Solver++", Algorithm 2 (multistep, data prediction)."""
    args, _, s_in = _setup(x, extra_args, noise_sampler)
    old_denoised: Tensor | None = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **args)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        t, t_next = _t(sigmas[i]), _t(sigmas[i + 1])
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            x = (_sigma(t_next) / _sigma(t)) * x - (-h).expm1() * denoised
        else:
            r = (t - _t(sigmas[i - 1])) / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (_sigma(t_next) / _sigma(t)) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    solver_type: str = "midpoint",
) -> Tensor:
    """DPM-Solver++(2M) SDE: Lu et al. (2022), "DPM-Solver++", section 5 (SDE variant), with
    k-diffusion's midpoint or Heun correction of the second-order term."""
    if solver_type not in ("midpoint", "heun"):
        raise InvalidRequestError(f"solver_type={solver_type!r}: choose 'midpoint' or 'heun'")
    args, noise, s_in = _setup(x, extra_args, noise_sampler)
    old_denoised: Tensor | None = None
    h_last: Tensor | None = None
    h: Tensor | None = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **args)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            t, s = -sigmas[i].log(), -sigmas[i + 1].log()
            h = s - t
            eta_h = eta * h
            x = sigmas[i + 1] / sigmas[i] * (-eta_h).exp() * x + (-h - eta_h).expm1().neg() * denoised
            if old_denoised is not None and h_last is not None:
                r = h_last / h
                if solver_type == "heun":
                    coef = (-h - eta_h).expm1().neg() / (-h - eta_h) + 1
                    x = x + coef * (1 / r) * (denoised - old_denoised)
                else:
                    x = x + 0.5 * (-h - eta_h).expm1().neg() * (1 / r) * (denoised - old_denoised)
            if eta:
                scale = sigmas[i + 1] * (-2 * eta_h).expm1().neg().sqrt() * s_noise
                x = x + noise(sigmas[i], sigmas[i + 1]) * scale
        old_denoised = denoised
        h_last = h
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """DPM-Solver++(3M) SDE: third-order multistep data-prediction solver, Lu et al. (2022),
    "DPM-Solver++", and Zheng et al. (2023), "DPM-Solver-v3" (k-diffusion's formulation)."""
    args, noise, s_in = _setup(x, extra_args, noise_sampler)
    denoised_1: Tensor | None = None
    denoised_2: Tensor | None = None
    h: Tensor | None = None
    h_1: Tensor | None = None
    h_2: Tensor | None = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **args)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            t, s = -sigmas[i].log(), -sigmas[i + 1].log()
            h = s - t
            h_eta = h * (eta + 1)
            x = torch.exp(-h_eta) * x + (-h_eta).expm1().neg() * denoised
            if h_2 is not None and h_1 is not None and denoised_1 is not None and denoised_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None and denoised_1 is not None:
                r = h_1 / h
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                x = x + phi_2 * ((denoised - denoised_1) / r)
            if eta:
                scale = sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt() * s_noise
                x = x + noise(sigmas[i], sigmas[i + 1]) * scale
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


@torch.no_grad()
def sample_lcm(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """Latent Consistency Model sampling: Luo et al. (2023), "Latent Consistency Models", Algorithm 1
    (multistep consistency sampling: denoise, then re-noise to the next sigma). Use with
    ``denoiser.LCMDenoiser``."""
    args, noise, s_in = _setup(x, extra_args, noise_sampler)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **args)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        x = denoised
        if sigmas[i + 1] > 0:
            x = x + sigmas[i + 1] * noise(sigmas[i], sigmas[i + 1])
    return x


@torch.no_grad()
def sample_restart(
    model: Model,
    x: Tensor,
    sigmas: Tensor,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    s_noise: float = 1.0,
    restart_list: dict[float, tuple[int, int, float]] | None = None,
) -> Tensor:
    """Restart sampling: Xu et al. (2023), "Restart Sampling for Improving Generative Processes".

    Heun steps, with the interval around sigma=0.1 re-noised back to sigma=2 and re-solved. As in
    A1111's ``restart_sampler``: ``restart_list`` is ``{min_sigma: (restart_steps, restart_times,
    max_sigma)}``; by default with >= 20 steps it is ``{0.1: (9 + 1, 1, 2)}`` (>= 36 steps:
    ``{0.1: (steps // 4 + 1, 2, 2)}``) and the main schedule is rebuilt as Karras with the restart
    steps taken out, between sigmas[-2] and sigmas[0] (A1111 quirk: the scheduler the caller chose is
    replaced whenever the default list applies).
    """
    args, noise, s_in = _setup(x, extra_args, noise_sampler)
    step_id = 0

    def heun_step(x: Tensor, old_sigma: Tensor, new_sigma: Tensor) -> Tensor:
        nonlocal step_id
        denoised = model(x, old_sigma * s_in, **args)
        d = to_d(x, old_sigma, denoised)
        _report(callback, x, step_id, new_sigma, old_sigma, denoised)
        dt = new_sigma - old_sigma
        if new_sigma == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            denoised_2 = model(x_2, new_sigma * s_in, **args)
            d_2 = to_d(x_2, new_sigma, denoised_2)
            x = x + (d + d_2) / 2 * dt
        step_id += 1
        return x

    steps = sigmas.shape[0] - 1
    restarts: dict[float, tuple[int, int, float]]
    if restart_list is None:
        if steps >= 20:
            restart_steps, restart_times = 9, 1
            if steps >= 36:
                restart_steps, restart_times = steps // 4, 2
            sigmas = karras(steps - restart_steps * restart_times, sigmas[-2].item(), sigmas[0].item()).to(
                sigmas.device
            )
            restarts = {0.1: (restart_steps + 1, restart_times, 2.0)}
        else:
            restarts = {}
    else:
        restarts = dict(restart_list)

    by_index = {int(torch.argmin(abs(sigmas - key), dim=0)): value for key, value in restarts.items()}
    step_list: list[tuple[Tensor, Tensor]] = []
    for i in range(len(sigmas) - 1):
        step_list.append((sigmas[i], sigmas[i + 1]))
        if i + 1 in by_index:
            r_steps, r_times, r_max = by_index[i + 1]
            min_idx = i + 1
            max_idx = int(torch.argmin(abs(sigmas - r_max), dim=0))
            if max_idx < min_idx:
                sigma_restart = karras(r_steps, sigmas[min_idx].item(), sigmas[max_idx].item()).to(
                    sigmas.device
                )
                sigma_restart = sigma_restart[:-1]
                for _ in range(r_times):
                    step_list.extend(itertools.pairwise(sigma_restart))

    last_sigma: Tensor | None = None
    for old_sigma, new_sigma in step_list:
        if last_sigma is None:
            last_sigma = old_sigma
        elif last_sigma < old_sigma:
            x = x + noise(old_sigma, new_sigma) * s_noise * (old_sigma**2 - last_sigma**2) ** 0.5
        x = heun_step(x, old_sigma, new_sigma)
        last_sigma = new_sigma
    return x


# --------------------------------------------------------------------------------------------------
# DPM-Solver fast / adaptive (Lu et al. 2022), eps-parameterised in t = -log sigma
# --------------------------------------------------------------------------------------------------


class _DPMSolver:
    def __init__(self, model: Model, extra_args: dict[str, Any], s_in: Tensor) -> None:
        self.model, self.extra_args, self.s_in = model, extra_args, s_in
        self.nfe = 0

    def eps(self, cache: dict[str, Tensor], key: str, x: Tensor, t: Tensor) -> Tensor:
        if key not in cache:
            self.nfe += 1
            cache[key] = (x - self.model(x, _sigma(t) * self.s_in, **self.extra_args)) / _sigma(t)
        return cache[key]

    def step1(self, x: Tensor, t: Tensor, t_next: Tensor, cache: dict[str, Tensor]) -> Tensor:
        h = t_next - t
        return x - _sigma(t_next) * h.expm1() * self.eps(cache, "eps", x, t)

    def step2(
        self, x: Tensor, t: Tensor, t_next: Tensor, cache: dict[str, Tensor], r1: float = 0.5
    ) -> Tensor:
        h = t_next - t
        eps = self.eps(cache, "eps", x, t)
        s1 = t + r1 * h
        u1 = x - _sigma(s1) * (r1 * h).expm1() * eps
        eps_r1 = self.eps(cache, "eps_r1", u1, s1)
        return x - _sigma(t_next) * h.expm1() * eps - _sigma(t_next) / (2 * r1) * h.expm1() * (eps_r1 - eps)

    def step3(
        self,
        x: Tensor,
        t: Tensor,
        t_next: Tensor,
        cache: dict[str, Tensor],
        r1: float = 1 / 3,
        r2: float = 2 / 3,
    ) -> Tensor:
        h = t_next - t
        eps = self.eps(cache, "eps", x, t)
        s1, s2 = t + r1 * h, t + r2 * h
        u1 = x - _sigma(s1) * (r1 * h).expm1() * eps
        eps_r1 = self.eps(cache, "eps_r1", u1, s1)
        u2 = (
            x
            - _sigma(s2) * (r2 * h).expm1() * eps
            - _sigma(s2) * (r2 / r1) * ((r2 * h).expm1() / (r2 * h) - 1) * (eps_r1 - eps)
        )
        eps_r2 = self.eps(cache, "eps_r2", u2, s2)
        return (
            x - _sigma(t_next) * h.expm1() * eps - _sigma(t_next) / r2 * (h.expm1() / h - 1) * (eps_r2 - eps)
        )


def _eta_split(s: Tensor, t: Tensor, t_end: Tensor, eta: float) -> tuple[Tensor, Tensor | float]:
    if not eta:
        return t, 0.0
    sd, _ = get_ancestral_step(_sigma(s), _sigma(t), eta)
    t_ = torch.minimum(t_end, _t(sd))
    return t_, (_sigma(t) ** 2 - _sigma(t_) ** 2) ** 0.5


@torch.no_grad()
def sample_dpm_fast(
    model: Model,
    x: Tensor,
    sigma_min: float,
    sigma_max: float,
    n: int,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    eta: float = 0.0,
    s_noise: float = 1.0,
) -> Tensor:
    """DPM-Solver-fast: Lu et al. (2022), "DPM-Solver", section 3.3 (fixed steps uniform in log-SNR,
    orders 3,...,3 then 2,1 or n mod 3, using ``n`` model calls)."""
    if sigma_min <= 0 or sigma_max <= 0:
        raise InvalidRequestError(f"sigma_min={sigma_min}, sigma_max={sigma_max}: both must be positive")
    args, noise, s_in = _setup(x, extra_args, noise_sampler)
    solver = _DPMSolver(model, args, s_in)
    t_start, t_end = _t(torch.tensor(sigma_max)), _t(torch.tensor(sigma_min))
    m = math.floor(n / 3) + 1
    ts = torch.linspace(float(t_start), float(t_end), m + 1, device=x.device)
    orders = [3] * (m - 2) + [2, 1] if n % 3 == 0 else [3] * (m - 1) + [n % 3]
    for i, order in enumerate(orders):
        cache: dict[str, Tensor] = {}
        t, t_next = ts[i], ts[i + 1]
        t_next_, su = _eta_split(t, t_next, t_end, eta)
        eps = solver.eps(cache, "eps", x, t)
        _report(callback, x, i, _sigma(t), _sigma(t), x - _sigma(t) * eps)
        if order == 1:
            x = solver.step1(x, t, t_next_, cache)
        elif order == 2:
            x = solver.step2(x, t, t_next_, cache)
        else:
            x = solver.step3(x, t, t_next_, cache)
        x = x + su * s_noise * noise(_sigma(t), _sigma(t_next))
    return x


@torch.no_grad()
def sample_dpm_adaptive(
    model: Model,
    x: Tensor,
    sigma_min: float,
    sigma_max: float,
    *,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    order: int = 3,
    rtol: float = 0.05,
    atol: float = 0.0078,
    h_init: float = 0.05,
    pcoeff: float = 0.0,
    icoeff: float = 1.0,
    dcoeff: float = 0.0,
    accept_safety: float = 0.81,
    eta: float = 0.0,
    s_noise: float = 1.0,
) -> Tensor:
    """DPM-Solver-12 / 23 with adaptive step size: Lu et al. (2022), "DPM-Solver", Algorithm 4/5,
    with a PID step controller (Söderlind 2003) as in k-diffusion."""
    if sigma_min <= 0 or sigma_max <= 0:
        raise InvalidRequestError(f"sigma_min={sigma_min}, sigma_max={sigma_max}: both must be positive")
    if order not in (2, 3):
        raise InvalidRequestError(f"order={order}: DPM adaptive supports 2 or 3")
    args, noise, s_in = _setup(x, extra_args, noise_sampler)
    solver = _DPMSolver(model, args, s_in)
    t_start, t_end = _t(torch.tensor(sigma_max)), _t(torch.tensor(sigma_min))
    atol_t, rtol_t = torch.tensor(atol), torch.tensor(rtol)
    ctrl_order = 1.5 if eta else order
    b1 = (pcoeff + icoeff + dcoeff) / ctrl_order
    b2 = -(pcoeff + 2 * dcoeff) / ctrl_order
    b3 = dcoeff / ctrl_order
    errs: list[float] = []
    h = abs(h_init)
    s = t_start
    x_prev = x
    step = 0
    while s < t_end - 1e-5:
        cache: dict[str, Tensor] = {}
        t = torch.minimum(t_end, s + h)
        t_, su = _eta_split(s, t, t_end, eta)
        eps = solver.eps(cache, "eps", x, s)
        denoised = x - _sigma(s) * eps
        if order == 2:
            x_low = solver.step1(x, s, t_, cache)
            x_high = solver.step2(x, s, t_, cache)
        else:
            x_low = solver.step2(x, s, t_, cache, r1=1 / 3)
            x_high = solver.step3(x, s, t_, cache)
        delta = torch.maximum(atol_t, rtol_t * torch.maximum(x_low.abs(), x_prev.abs()))
        error = torch.linalg.norm((x_low - x_high) / delta) / x.numel() ** 0.5
        inv_error = 1 / (float(error) + 1e-8)
        if not errs:
            errs = [inv_error] * 3
        errs[0] = inv_error
        factor = errs[0] ** b1 * errs[1] ** b2 * errs[2] ** b3
        factor = 1 + math.atan(factor - 1)
        accept = factor >= accept_safety
        if accept:
            errs[2], errs[1] = errs[1], errs[0]
        h *= factor
        if accept:
            x_prev = x_low
            x = x_high + su * s_noise * noise(_sigma(s), _sigma(t))
            s = t
        _report(callback, x, step, _sigma(s), _sigma(s), denoised)
        step += 1
    return x
