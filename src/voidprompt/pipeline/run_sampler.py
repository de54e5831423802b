"""Run one A1111 sampler over a CFG denoiser: the glue A1111 keeps in KDiffusionSampler / CompVisSampler.

Two families:
- sigma samplers (k-diffusion style) start from ``noise * sigmas[0]`` and call ``D(x, sigma)``;
- timestep samplers (DDIM, PLMS, UniPC, DDIM CFG++) start from the noise itself and call
  ``eps(x, t)``.

Both support img2img (a start part-way down the schedule) with A1111's step arithmetic.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from voidprompt.errors import InvalidRequestError
from voidprompt.request import GenerationRequest
from voidprompt.sampling.brownian import brownian_noise_sampler_for_sigmas
from voidprompt.sampling.registry import SamplerSpec, SchedulerSpec, compute_sigmas
from voidprompt.sampling.rng import ImageRNG, check_randn_source
from voidprompt.sampling.schedules import DiscreteSigmas
from voidprompt.sampling.timestep_samplers import timesteps_for

Callback = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class Img2ImgStart:
    """Where an img2img pass starts: A1111's ``setup_img2img_steps``.

    ``fixed_steps`` (A1111's ``img2img_fix_steps``, and always for the hires pass, which passes its
    steps explicitly): run exactly ``steps`` steps by stretching the schedule to
    ``int(steps / min(strength, 0.999))``. Otherwise the schedule has ``steps`` entries and
    ``t_enc = int(min(strength, 0.999) * steps)`` of them are run.
    """

    schedule_steps: int
    t_enc: int

    @classmethod
    def for_strength(cls, steps: int, strength: float, *, fixed_steps: bool) -> Img2ImgStart:
        if fixed_steps:
            schedule = int(steps / min(strength, 0.999)) if strength > 0 else 0
            return cls(schedule, steps - 1)
        return cls(steps, int(min(strength, 0.999) * steps))


def sampler_knobs(spec: SamplerSpec, request: GenerationRequest) -> dict[str, Any]:
    """The keyword arguments A1111's ``Sampler.initialize`` passes: eta when the sampler function
    takes it, and the churn settings A1111 lists for the function (:meth:`SamplerSpec.takes`)."""
    params = inspect.signature(spec.function).parameters
    knobs: dict[str, Any] = {}
    if "eta" in params:
        eta = request.eta if request.eta is not None else spec.default_eta
        if eta is not None:
            knobs["eta"] = eta
    churn = {
        "s_churn": request.s_churn,
        "s_tmin": request.s_tmin,
        "s_tmax": math.inf if request.s_tmax is None else request.s_tmax,
        "s_noise": request.s_noise,
    }
    knobs.update({name: value for name, value in churn.items() if spec.takes(name)})
    return knobs


def effective_eta(spec: SamplerSpec, request: GenerationRequest) -> float:
    """The eta the sampler runs with (0 for samplers without eta)."""
    if "eta" not in inspect.signature(spec.function).parameters:
        return 0.0
    eta = request.eta if request.eta is not None else spec.default_eta
    return float(eta or 0.0)


def uses_ensd(spec: SamplerSpec, request: GenerationRequest) -> bool:
    """A1111's ``is_sampler_using_eta_noise_seed_delta``: ENSD is written to the infotext only then."""
    return spec.uses_ensd and effective_eta(spec, request) != 0


@dataclass(frozen=True)
class SamplerPass:
    """One sampler run's choice: the sampler, its schedule type and its step count."""

    spec: SamplerSpec
    scheduler: SchedulerSpec
    steps: int


@dataclass(frozen=True)
class SamplingModel:
    """The model as a sampler sees it: ``denoiser`` is a CFGDenoiser over the right inner model
    (``DiscreteEpsDenoiser`` for sigma samplers, ``EpsTimestepModel`` for timestep samplers);
    ``schedule_model`` gives the sigma table; ``alphas_cumprod`` the timestep samplers' table."""

    denoiser: Any
    schedule_model: DiscreteSigmas
    alphas_cumprod: Tensor


@dataclass(frozen=True)
class SamplerStart:
    """Where a run starts: ``noise`` is the batch's first draw from ``rng`` (already multiplied by
    the initial noise multiplier for img2img); ``seeds`` seed the SDE samplers' Brownian trees;
    ``init_latent`` with ``img2img`` starts part-way down the schedule."""

    noise: Tensor
    rng: ImageRNG
    seeds: Sequence[int]
    init_latent: Tensor | None = None
    img2img: Img2ImgStart | None = None


def run_sampler(
    run: SamplerPass,
    model: SamplingModel,
    start: SamplerStart,
    request: GenerationRequest,
    callback: Callback | None = None,
) -> Tensor:
    """Sample one batch; ``request`` gives the sampler settings (eta, churn, schedule overrides)."""
    spec, noise, init_latent, img2img = run.spec, start.noise, start.init_latent, start.img2img
    # Variant options (e.g. DPM++ 2M SDE Heun's solver_type) are bound into spec.function already.
    knobs = sampler_knobs(spec, request)
    if spec.is_timestep_sampler:
        return _run_timestep_sampler(run, model, start, request, knobs, callback)

    schedule_steps = img2img.schedule_steps if img2img is not None else run.steps
    sigmas = compute_sigmas(
        spec,
        run.scheduler,
        schedule_steps,
        model.schedule_model,
        sigma_min=request.sigma_min,
        sigma_max=request.sigma_max,
        rho=request.rho,
        use_old_karras_scheduler_sigmas=request.use_old_karras_scheduler_sigmas,
        always_discard_next_to_last_sigma=request.always_discard_next_to_last_sigma,
        beta_alpha=request.beta_dist_alpha,
        beta_beta=request.beta_dist_beta,
    ).to(noise.device)

    if img2img is not None and init_latent is not None:
        sigmas = sigmas[schedule_steps - img2img.t_enc - 1 :]
        x = init_latent + noise * sigmas[0]
    elif request.sgm_noise_multiplier:
        x = noise * torch.sqrt(1.0 + sigmas[0] ** 2)
    else:
        x = noise * sigmas[0]

    noise_sampler: Callable[..., Tensor]
    if spec.brownian_noise:
        # A1111: the SDE samplers draw from per-image Brownian trees seeded by the image seeds.
        noise_sampler = brownian_noise_sampler_for_sigmas(
            x, sigmas, start.seeds, check_randn_source(request.randn_source)
        )
    else:
        noise_sampler = start.rng.noise_sampler()

    common: dict[str, Any] = {"callback": callback, "noise_sampler": noise_sampler}
    if spec.uses_sigma_range:
        from_image = img2img if init_latent is not None else None
        range_args = _sigma_range_args(run, model, sigmas, from_image)
        return spec.function(model.denoiser, x, **range_args, **common, **knobs)
    return spec.function(model.denoiser, x, sigmas, **common, **knobs)


def _sigma_range_args(
    run: SamplerPass, model: SamplingModel, sigmas: Tensor, img2img: Img2ImgStart | None
) -> dict[str, Any]:
    """DPM fast / adaptive's range, as A1111 1.10 passes it. txt2img: the model's whole sigma range
    and the requested step count, whatever the schedule (A1111 computes the schedule and then uses
    only its length). From an image: the truncated schedule's first sigma and its last before the
    final 0, over its length."""
    params = inspect.signature(run.spec.function).parameters
    if img2img is None:
        table = model.schedule_model.sigmas
        args: dict[str, Any] = {"sigma_min": float(table[0]), "sigma_max": float(table[-1])}
        n = run.steps
    else:
        args = {"sigma_min": float(sigmas[-2]), "sigma_max": float(sigmas[0])}
        n = len(sigmas) - 1
    if "n" in params:
        args["n"] = n
    return args


def _run_timestep_sampler(
    run: SamplerPass,
    model: SamplingModel,
    start: SamplerStart,
    request: GenerationRequest,
    knobs: dict[str, Any],
    callback: Callback | None,
) -> Tensor:
    spec, noise, init_latent, img2img = run.spec, start.noise, start.init_latent, start.img2img
    discard = spec.discard_next_to_last_sigma or request.always_discard_next_to_last_sigma
    params = inspect.signature(spec.function).parameters
    abar = model.alphas_cumprod.to(noise.device)
    if img2img is not None and init_latent is not None:
        timesteps = timesteps_for(img2img.schedule_steps, discard_penultimate=discard, device=noise.device)
        if img2img.t_enc >= len(timesteps):
            raise InvalidRequestError(
                f"denoising strength gives {img2img.t_enc} encode steps for a {len(timesteps)}-step schedule"
            )
        t = timesteps[img2img.t_enc]
        x = init_latent * abar[t].sqrt() + noise * (1 - abar[t]).sqrt()
        timesteps = timesteps[: img2img.t_enc]
        if "is_img2img" in params:
            knobs["is_img2img"] = True
    else:
        timesteps = timesteps_for(run.steps, discard_penultimate=discard, device=noise.device)
        x = noise
    return spec.function(
        model.denoiser,
        x,
        timesteps,
        alphas_cumprod=abar,
        callback=callback,
        noise_sampler=start.rng.noise_sampler(),
        **knobs,
    )
