"""A1111's timestep samplers (``sd_samplers_timesteps_impl``): DDIM, DDIM CFG++, PLMS, UniPC.

``model(x, t_batch, **extra_args)`` returns the predicted noise eps at the (possibly fractional)
training timestep t; ``timesteps`` is A1111's ``clip(range(0, 1000, 1000 // steps) + 1, 0, 999)``
(:func:`timesteps_for`) and ``alphas_cumprod`` the model's 1000-entry abar table. ``noise_sampler``
is called with the current and next timestep. The sigma samplers live in :mod:`.samplers`; the two
families share its small helpers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor

from voidprompt.errors import InvalidRequestError
from voidprompt.sampling.samplers import Callback, Model, NoiseSampler, _report, _setup


def timesteps_for(
    steps: int, *, discard_penultimate: bool = False, device: torch.device | str = "cpu"
) -> Tensor:
    """A1111's ``CompVisSampler.get_timesteps``: clip(range(0, 1000, 1000 // steps) + 1, 0, 999).

    A1111 quirk: when 1000 is not a multiple of ``steps`` this has more than ``steps`` entries.
    """
    if steps < 1:
        raise InvalidRequestError(f"steps={steps}: need at least 1 sampling step")
    steps += 1 if discard_penultimate else 0
    return torch.clip(torch.arange(0, 1000, 1000 // steps, device=device) + 1, 0, 999)


def _ddim_tables(alphas_cumprod: Tensor, timesteps: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    alphas = alphas_cumprod[timesteps]
    # alphas_prev[k] = abar at timesteps[k-1]; abar[0] for k = 0 (never used, see the loops).
    alphas_prev = alphas_cumprod[torch.nn.functional.pad(timesteps[:-1], pad=(1, 0))].to(torch.float64)
    return alphas, alphas_prev, torch.sqrt(1 - alphas)


def _ddim_loop(
    model: Model,
    x: Tensor,
    timesteps: Tensor,
    alphas_cumprod: Tensor,
    extra_args: dict[str, Any] | None,
    callback: Callback | None,
    noise_sampler: NoiseSampler | None,
    eta: float,
    direction: Callable[[Tensor], Tensor] | None,
) -> Tensor:
    args, noise, s_in = _setup(x, extra_args, noise_sampler)
    alphas, alphas_prev, sqrt_one_minus = _ddim_tables(alphas_cumprod, timesteps)
    a64, p64 = alphas.double(), alphas_prev
    sigmas = eta * torch.sqrt((1 - p64) / (1 - a64) * (1 - a64 / p64))
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    # A1111 quirk: the loop runs len(timesteps) - 1 times, so the last update lands on timestep
    # timesteps[0] (= 1), not on a clean image, and `steps` requested gives steps - 1 model calls.
    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        e_t = model(x, timesteps[index].item() * s_in, **args)
        a_t = x.new_full(shape, alphas[index].item())
        a_prev = x.new_full(shape, alphas_prev[index].item())
        sigma_t = x.new_full(shape, sigmas[index].item())
        sqrt_one_minus_at = x.new_full(shape, sqrt_one_minus[index].item())
        pred_x0 = (x - sqrt_one_minus_at * e_t) / a_t.sqrt()
        dir_eps = e_t if direction is None else direction(e_t)
        dir_xt = (1.0 - a_prev - sigma_t**2).sqrt() * dir_eps
        # A1111 quirk: the noise is drawn every step, even with eta = 0.
        t_prev = timesteps[index - 1]
        x = a_prev.sqrt() * pred_x0 + dir_xt + sigma_t * noise(timesteps[index], t_prev)
        _report(callback, x, i, 0, 0, pred_x0)
    return x


@torch.no_grad()
def sample_ddim(
    model: Model,
    x: Tensor,
    timesteps: Tensor,
    *,
    alphas_cumprod: Tensor,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    eta: float = 0.0,
) -> Tensor:
    """DDIM: Song, Meng & Ermon (2021), "Denoising Diffusion Implicit Models", eq. 12 (eta = 0:
    deterministic; eta = 1: DDPM-like variance)."""
    return _ddim_loop(model, x, timesteps, alphas_cumprod, extra_args, callback, noise_sampler, eta, None)


class UncondTrackingModel(Protocol):
    """What DDIM CFG++ needs from its model: a guidance-scale multiplier and the last uncond eps."""

    cond_scale_multiplier: float
    need_last_noise_uncond: bool
    last_noise_uncond: Tensor | None

    def __call__(self, x: Tensor, t: Tensor, **kwargs: Any) -> Tensor: ...


@torch.no_grad()
def sample_ddim_cfgpp(
    model: UncondTrackingModel,
    x: Tensor,
    timesteps: Tensor,
    *,
    alphas_cumprod: Tensor,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    eta: float = 0.0,
) -> Tensor:
    """DDIM with CFG++: Chung et al. (2024), "CFG++: Manifold-constrained Classifier Free Guidance".

    The x0 estimate uses the guided eps, the re-noising direction the unconditional eps; as in
    A1111 the CFG scale is multiplied by 1/12.5 (so 0..12.5 maps to CFG++'s 0..1).
    """
    model.cond_scale_multiplier = 1 / 12.5
    model.need_last_noise_uncond = True

    def uncond_direction(_: Tensor) -> Tensor:
        if model.last_noise_uncond is None:
            raise InvalidRequestError("DDIM CFG++ needs a CFG denoiser that records the uncond prediction")
        return model.last_noise_uncond

    return _ddim_loop(
        model, x, timesteps, alphas_cumprod, extra_args, callback, noise_sampler, eta, uncond_direction
    )


@torch.no_grad()
def sample_plms(
    model: Model,
    x: Tensor,
    timesteps: Tensor,
    *,
    alphas_cumprod: Tensor,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
) -> Tensor:
    """PLMS: Liu et al. (2022), "Pseudo Numerical Methods for Diffusion Models on Manifolds" (PNDM),
    pseudo improved Euler for the first step, then Adams-Bashforth orders 2, 3, 4 on eps."""
    args, _, s_in = _setup(x, extra_args, noise_sampler)
    alphas, alphas_prev, sqrt_one_minus = _ddim_tables(alphas_cumprod, timesteps)
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    old_eps: list[Tensor] = []

    def x_prev_and_x0(x: Tensor, e_t: Tensor, index: int) -> tuple[Tensor, Tensor]:
        a_t = x.new_full(shape, alphas[index].item())
        a_prev = x.new_full(shape, alphas_prev[index].item())
        sqrt_one_minus_at = x.new_full(shape, sqrt_one_minus[index].item())
        pred_x0 = (x - sqrt_one_minus_at * e_t) / a_t.sqrt()
        return a_prev.sqrt() * pred_x0 + (1.0 - a_prev).sqrt() * e_t, pred_x0

    for i in range(len(timesteps) - 1):  # A1111 quirk: len - 1 iterations, as in DDIM
        index = len(timesteps) - 1 - i
        ts = timesteps[index].item() * s_in
        t_next = timesteps[max(index - 1, 0)].item() * s_in
        e_t = model(x, ts, **args)
        if not old_eps:
            x_prev, _ = x_prev_and_x0(x, e_t, index)
            e_t_next = model(x_prev, t_next, **args)
            e_t_prime = (e_t + e_t_next) / 2
        elif len(old_eps) == 1:
            e_t_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_t_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e_t_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x_prev, pred_x0 = x_prev_and_x0(x, e_t_prime, index)
        old_eps.append(e_t)
        if len(old_eps) >= 4:
            old_eps.pop(0)
        x = x_prev
        _report(callback, x, i, 0, 0, pred_x0)
    return x


class _DiscreteVP:
    """The discrete VP noise schedule UniPC works in: t_n = (n + 1) / N, log alpha_t = 0.5 log abar,
    piecewise linear in t (extrapolated linearly outside [1/N, 1])."""

    def __init__(self, alphas_cumprod: Tensor) -> None:
        self.total_n = len(alphas_cumprod)
        self.t_array = torch.linspace(0.0, 1.0, self.total_n + 1)[1:]
        self.log_alpha_array = 0.5 * torch.log(alphas_cumprod.float())

    def log_alpha(self, t: Tensor) -> Tensor:
        return _interp(t, self.t_array.to(t.device), self.log_alpha_array.to(t.device))

    def alpha(self, t: Tensor) -> Tensor:
        return torch.exp(self.log_alpha(t))

    def std(self, t: Tensor) -> Tensor:
        return torch.sqrt(1.0 - torch.exp(2.0 * self.log_alpha(t)))

    def lam(self, t: Tensor) -> Tensor:
        la = self.log_alpha(t)
        return la - 0.5 * torch.log(1.0 - torch.exp(2.0 * la))

    def inverse_lambda(self, lamb: Tensor) -> Tensor:
        log_alpha = -0.5 * torch.logaddexp(torch.zeros_like(lamb), -2.0 * lamb)
        return _interp(
            log_alpha, self.log_alpha_array.flip(0).to(lamb.device), self.t_array.flip(0).to(lamb.device)
        )


def _interp(x: Tensor, xp: Tensor, yp: Tensor) -> Tensor:
    """Piecewise-linear f(x) through (xp, yp), xp increasing, extended linearly beyond both ends."""
    idx = torch.searchsorted(xp, x.reshape(-1).contiguous()).clamp(1, len(xp) - 1)
    x0, x1, y0, y1 = xp[idx - 1], xp[idx], yp[idx - 1], yp[idx]
    return (y0 + (x.reshape(-1) - x0) * (y1 - y0) / (x1 - x0)).reshape(x.shape)


UNIPC_VARIANTS = ("bh1", "bh2")
UNIPC_SKIP_TYPES = ("time_uniform", "time_quadratic", "logSNR")


@torch.no_grad()
def sample_unipc(
    model: Model,
    x: Tensor,
    timesteps: Tensor,
    *,
    alphas_cumprod: Tensor,
    extra_args: dict[str, Any] | None = None,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    is_img2img: bool = False,
    variant: str = "bh1",
    skip_type: str = "time_uniform",
    order: int = 3,
    lower_order_final: bool = True,
) -> Tensor:
    """UniPC multistep predictor-corrector, data prediction: Zhao et al. (2023), "UniPC: A Unified
    Predictor-Corrector Framework for Fast Sampling of Diffusion Models", Algorithms 2-3 (B(h) variants).

    A1111 defaults: variant bh1, skip type time_uniform, order 3, lower order final. A1111 quirk: it
    runs ``len(timesteps)`` UniPC steps (more than requested when 1000 % steps != 0), from t = 1 (or
    ``timesteps[-1] / 1000 + 1/1000`` for img2img) down to t = 1/1000, and calls the model at the
    continuous time (t - 1/1000) * 1000. One model call per step.
    """
    if variant not in UNIPC_VARIANTS:
        raise InvalidRequestError(f"UniPC variant={variant!r}: choose one of {', '.join(UNIPC_VARIANTS)}")
    if skip_type not in UNIPC_SKIP_TYPES:
        raise InvalidRequestError(
            f"UniPC skip_type={skip_type!r}: choose one of {', '.join(UNIPC_SKIP_TYPES)}"
        )
    steps = len(timesteps)
    if not 1 <= order <= steps:
        raise InvalidRequestError(f"UniPC order={order}: must be between 1 and the step count {steps}")
    args, _, _ = _setup(x, extra_args, noise_sampler)
    ns = _DiscreteVP(alphas_cumprod)
    dims = x.ndim
    t_0 = 1.0 / ns.total_n
    t_T = float(timesteps[-1]) / 1000 + 1 / 1000 if is_img2img else 1.0

    def expand(v: Tensor) -> Tensor:
        return v[(...,) + (None,) * (dims - 1)]

    def data_pred(x: Tensor, t: Tensor) -> Tensor:
        eps = model(x, (t - 1.0 / ns.total_n) * 1000.0, **args)
        return (x - expand(ns.std(t)) * eps) / expand(ns.alpha(t))

    if skip_type == "logSNR":
        lam_T, lam_0 = ns.lam(torch.tensor([t_T])), ns.lam(torch.tensor([t_0]))
        ts = ns.inverse_lambda(torch.linspace(float(lam_T), float(lam_0), steps + 1))
    elif skip_type == "time_uniform":
        ts = torch.linspace(t_T, t_0, steps + 1)
    else:
        ts = torch.linspace(t_T**0.5, t_0**0.5, steps + 1).pow(2)
    ts = ts.to(x.device)
    index = 0

    def after_update(x: Tensor, model_x: Tensor | None) -> None:
        nonlocal index
        _report(callback, x, index, 0, 0, model_x if model_x is not None else x)
        index += 1

    def update(
        x: Tensor, model_prev: list[Tensor], t_prev: list[Tensor], t: Tensor, order: int, use_corrector: bool
    ) -> tuple[Tensor, Tensor | None]:
        t_prev_0 = t_prev[-1]
        lambda_prev_0, lambda_t = ns.lam(t_prev_0), ns.lam(t)
        model_prev_0 = model_prev[-1]
        sigma_prev_0, sigma_t = ns.std(t_prev_0), ns.std(t)
        alpha_t = torch.exp(ns.log_alpha(t))
        h = lambda_t - lambda_prev_0
        rks_list: list[Tensor | float] = []
        d1s_list: list[Tensor] = []
        for i in range(1, order):
            rk = ((ns.lam(t_prev[-(i + 1)]) - lambda_prev_0) / h)[0]
            rks_list.append(rk)
            d1s_list.append((model_prev[-(i + 1)] - model_prev_0) / rk)
        rks_list.append(1.0)
        rks = torch.tensor([float(r) for r in rks_list], device=x.device)
        hh = -h[0]
        h_phi_1 = torch.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1
        factorial = 1
        b_h = hh if variant == "bh1" else torch.expm1(hh)
        rows, b = [], []
        for i in range(1, order + 1):
            rows.append(torch.pow(rks, i - 1))
            b.append(float(h_phi_k * factorial / b_h))
            factorial *= i + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        r_mat = torch.stack(rows)
        b_vec = torch.tensor(b, device=x.device)
        d1s = torch.stack(d1s_list, dim=1) if d1s_list else None
        x_t_ = expand(sigma_t / sigma_prev_0) * x - expand(alpha_t * h_phi_1) * model_prev_0
        if d1s is not None:
            rhos_p = (
                torch.tensor([0.5], device=x.device)
                if order == 2
                else torch.linalg.solve(r_mat[:-1, :-1], b_vec[:-1])
            )
            pred_res = torch.einsum("k,bk...->b...", rhos_p.to(x.dtype), d1s)
            x_t = x_t_ - expand(alpha_t * b_h) * pred_res
        else:
            x_t = x_t_
        model_t = None
        if use_corrector:
            rhos_c = torch.tensor([0.5], device=x.device) if order == 1 else torch.linalg.solve(r_mat, b_vec)
            model_t = data_pred(x_t, t)
            corr_res = torch.einsum("k,bk...->b...", rhos_c[:-1].to(x.dtype), d1s) if d1s is not None else 0
            x_t = x_t_ - expand(alpha_t * b_h) * (
                corr_res + rhos_c[-1].to(x.dtype) * (model_t - model_prev_0)
            )
        return x_t, model_t

    vec_t = ts[0].expand(x.shape[0])
    model_prev = [data_pred(x, vec_t)]
    t_prev = [vec_t]
    for init_order in range(1, order):
        vec_t = ts[init_order].expand(x.shape[0])
        x, model_x = update(x, model_prev, t_prev, vec_t, init_order, True)
        if model_x is None:
            model_x = data_pred(x, vec_t)
        after_update(x, model_x)
        model_prev.append(model_x)
        t_prev.append(vec_t)
    for step in range(order, steps + 1):
        vec_t = ts[step].expand(x.shape[0])
        step_order = min(order, steps + 1 - step) if lower_order_final else order
        # No corrector on the last step: its model value would never be used.
        x, model_x = update(x, model_prev, t_prev, vec_t, step_order, step != steps)
        after_update(x, model_x)
        for i in range(order - 1):
            t_prev[i] = t_prev[i + 1]
            model_prev[i] = model_prev[i + 1]
        t_prev[-1] = vec_t
        if step < steps:
            model_prev[-1] = model_x if model_x is not None else data_pred(x, vec_t)
    return x
