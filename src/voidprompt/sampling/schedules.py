"""Noise schedules: one function per A1111 scheduler, each returning ``n`` sigmas plus a final 0.

Closed-form schedules (Karras, exponential, polyexponential, KL optimal, Beta, Align Your Steps)
take ``sigma_min``/``sigma_max``; the ones A1111 derives from the model's 1000 discrete sigmas
(Uniform, Normal, SGM Uniform, Simple, DDIM) take a :class:`DiscreteSigmas` (implemented by
``voidprompt.sampling.denoiser.DiscreteEpsDenoiser``). Everything is computed on the CPU in the
model's sigma dtype (float32 for SD1), as A1111 does, and moved by the caller.
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

# Align Your Steps, SD1.5 table (NVIDIA's "howto" page, as A1111's sd_schedulers.py uses it).
AYS_SD15_SIGMAS = (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029)
# A1111's `use_old_karras_scheduler_sigmas` range (before 1.x the Karras range was hard-coded).
OLD_KARRAS_SIGMA_RANGE = (0.1, 10.0)


class DiscreteSigmas(Protocol):
    """The discrete-schedule view a model gives the schedules (k-diffusion's DiscreteSchedule)."""

    sigmas: Tensor

    def sigma_to_t(self, sigma: Tensor, quantize: bool | None = None) -> Tensor: ...

    def t_to_sigma(self, t: Tensor) -> Tensor: ...

    def get_sigmas(self, n: int) -> Tensor: ...


def append_zero(x: Tensor) -> Tensor:
    return torch.cat([x, x.new_zeros([1])])


def karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Karras et al. (2022), eq. 5: uniform in sigma^(1/rho)."""
    ramp = torch.linspace(0, 1, n)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def exponential(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """Uniform in log sigma from sigma_max down to sigma_min."""
    return append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n).exp())


def polyexponential(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0) -> Tensor:
    """log sigma = log sigma_min + ramp^rho (log sigma_max - log sigma_min), ramp from 1 to 0."""
    ramp = torch.linspace(1, 0, n) ** rho
    log_min, log_max = math.log(sigma_min), math.log(sigma_max)
    return append_zero(torch.exp(ramp * (log_max - log_min) + log_min))


def uniform(n: int, model: DiscreteSigmas) -> Tensor:
    """A1111 "Uniform": the model's own ``get_sigmas(n)`` (t = linspace(999, 0, n))."""
    return model.get_sigmas(n)


def normal(n: int, sigma_min: float, sigma_max: float, model: DiscreteSigmas, *, sgm: bool = False) -> Tensor:
    """A1111 "Normal": t uniform between t(sigma_max) and t(sigma_min); ``sgm`` drops the endpoint."""
    start = model.sigma_to_t(torch.tensor(sigma_max))
    end = model.sigma_to_t(torch.tensor(sigma_min))
    ts = (
        torch.linspace(float(start), float(end), n + 1)[:-1]
        if sgm
        else torch.linspace(float(start), float(end), n)
    )
    sigs = [float(model.t_to_sigma(t)) for t in ts]
    # A1111 builds a FloatTensor from Python floats: float32 whatever the model dtype.
    return torch.tensor([*sigs, 0.0], dtype=torch.float32)


def sgm_uniform(n: int, sigma_min: float, sigma_max: float, model: DiscreteSigmas) -> Tensor:
    """A1111 "SGM Uniform": Normal with n+1 points and the last dropped (SDXL/Turbo style)."""
    return normal(n, sigma_min, sigma_max, model, sgm=True)


def simple(n: int, model: DiscreteSigmas) -> Tensor:
    """A1111 "Simple": every (1000/n)-th discrete sigma from the top, by truncated float stride."""
    stride = len(model.sigmas) / n
    sigs = [float(model.sigmas[-(1 + int(i * stride))]) for i in range(n)]
    return torch.tensor([*sigs, 0.0], dtype=torch.float32)


def ddim(n: int, model: DiscreteSigmas) -> Tensor:
    """A1111 "DDIM" scheduler: discrete sigmas at indices 1, 1+s, 1+2s, ... (s = 1000//n), reversed.

    A1111 quirk: when 1000 is not a multiple of n this yields more than n sigmas (e.g. n=30 gives 31),
    so the sampler runs more steps than requested.
    """
    count = len(model.sigmas)
    stride = max(count // n, 1)
    sigs = [float(model.sigmas[i]) for i in range(1, count, stride)][::-1]
    return torch.tensor([*sigs, 0.0], dtype=torch.float32)


def align_your_steps(n: int, table: tuple[float, ...] = AYS_SD15_SIGMAS) -> Tensor:
    """Sabour et al. (2024), Align Your Steps: a fixed 11-sigma table, log-linearly resampled to n."""
    if n == len(table):
        return torch.tensor([*table, 0.0], dtype=torch.float32)
    xs = np.linspace(0, 1, len(table))
    ys = np.log(np.asarray(table)[::-1])
    resampled = np.exp(np.interp(np.linspace(0, 1, n), xs, ys))[::-1]
    return torch.tensor([*resampled.tolist(), 0.0], dtype=torch.float32)


def kl_optimal(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """KL-optimal schedule (Sabour et al. 2024, appendix): uniform in arctan(sigma).

    A1111 quirk: n+1 values with the last equal to sigma_min, not 0, so sampling stops at sigma_min.
    """
    alpha_min = torch.arctan(torch.tensor(sigma_min))
    alpha_max = torch.arctan(torch.tensor(sigma_max))
    idx = torch.arange(n + 1)
    return torch.tan(idx / n * alpha_min + (1.0 - idx / n) * alpha_max)


def beta(n: int, sigma_min: float, sigma_max: float, alpha: float = 0.6, beta_: float = 0.6) -> Tensor:
    """Lee et al. (2024), "Beta Sampling is All You Need": sigmas at Beta(alpha, beta) quantiles.

    Linear in sigma between sigma_min and sigma_max (A1111's formula), quantiles of 1 - linspace(0, 1, n).
    """
    qs = 1 - np.linspace(0, 1, n)
    sigs = [sigma_min + beta_ppf(float(q), alpha, beta_) * (sigma_max - sigma_min) for q in qs]
    return torch.tensor([*sigs, 0.0], dtype=torch.float32)


def _betacf(x: float, a: float, b: float) -> float:
    """Continued fraction for the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-16:
            break
    return h


def beta_cdf(x: float, a: float, b: float) -> float:
    """Regularised incomplete beta I_x(a, b); scipy is only a test dependency, so it is written here."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(x, a, b) / a
    return 1.0 - math.exp(log_front) * _betacf(1.0 - x, b, a) / b


def beta_ppf(q: float, a: float, b: float) -> float:
    """Inverse of :func:`beta_cdf` by bisection to double precision (the cdf is monotone)."""
    if q <= 0.0:
        return 0.0
    if q >= 1.0:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if beta_cdf(mid, a, b) < q:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def discard_penultimate(sigmas: Tensor) -> Tensor:
    """Drop the second-to-last sigma (schedules built with steps+1 for DPM2 / DPM2 a / 3M SDE)."""
    return torch.cat([sigmas[:-2], sigmas[-1:]])
