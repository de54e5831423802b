"""Sampler and scheduler names as A1111 writes them, mapped to our functions.

Names follow A1111 1.9+ (``sd_samplers_kdiffusion.samplers_k_diffusion``, ``sd_samplers_timesteps``,
``sd_samplers_lcm``, ``sd_schedulers.schedulers``). Legacy names that carried the schedule in the
sampler name ("DPM++ 2M Karras", "k_dpmpp_2m_ka") resolve to a (sampler, scheduler) pair the way
A1111's ``get_sampler_and_scheduler`` does, except that an unknown name is an error here instead of a
silent fall-back to the first sampler.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from voidprompt.errors import InvalidRequestError, did_you_mean
from voidprompt.sampling import samplers as S
from voidprompt.sampling import schedules
from voidprompt.sampling import timestep_samplers as T
from voidprompt.sampling.schedules import DiscreteSigmas


@dataclass(frozen=True)
class SamplerSpec:
    label: str
    function: Callable[..., Tensor]
    aliases: tuple[str, ...] = ()
    default_scheduler: str | None = None  # scheduler *name*; None = the model's discrete sigmas
    second_order: bool = False
    uses_ensd: bool = False
    discard_next_to_last_sigma: bool = False
    brownian_noise: bool = False
    is_timestep_sampler: bool = False
    uses_sigma_range: bool = False  # DPM fast / adaptive take sigma_min, sigma_max (and n), not sigmas
    eta_kind: str | None = None  # "ancestral" (default eta 1.0), "ddim" (default 0.0) or None
    options: Mapping[str, Any] = field(default_factory=dict)
    # A1111's ``sampler_extra_params`` entry for the sampler's function: the churn settings
    # (s_churn, s_tmin, s_tmax, s_noise) it hands on. A1111 quirk: Euler a, DPM adaptive and Restart
    # take s_noise in k-diffusion's signature but A1111 never passes it, so they run with 1.0.
    extra_params: tuple[str, ...] = ()

    def takes(self, param: str) -> bool:
        """Whether A1111's ``initialize`` passes the churn setting ``param`` to this sampler (listed
        for its function and present in the function's signature)."""
        return param in self.extra_params and param in inspect.signature(self.function).parameters

    def total_steps(self, steps: int) -> int:
        """A1111's SamplerData.total_steps: the expected denoiser calls used for prompt schedules."""
        return steps * 2 if self.second_order else steps

    @property
    def default_eta(self) -> float | None:
        return {"ancestral": 1.0, "ddim": 0.0}.get(self.eta_kind or "")


@dataclass(frozen=True)
class SchedulerSpec:
    name: str
    label: str
    aliases: tuple[str, ...] = ()
    default_rho: float | None = None
    needs_model: bool = False


_CHURN = ("s_churn", "s_tmin", "s_tmax", "s_noise")
_NOISE = ("s_noise",)


def _spec(label: str, fn: Callable[..., Tensor], aliases: tuple[str, ...], **kw: Any) -> SamplerSpec:
    return SamplerSpec(label, fn, aliases, **kw)


SAMPLERS: tuple[SamplerSpec, ...] = (
    _spec("DPM++ 2M", S.sample_dpmpp_2m, ("k_dpmpp_2m",), default_scheduler="karras"),
    _spec(
        "DPM++ SDE",
        S.sample_dpmpp_sde,
        ("k_dpmpp_sde",),
        default_scheduler="karras",
        second_order=True,
        brownian_noise=True,
        eta_kind="ancestral",
        extra_params=_NOISE,
    ),
    _spec(
        "DPM++ 2M SDE",
        S.sample_dpmpp_2m_sde,
        ("k_dpmpp_2m_sde",),
        default_scheduler="exponential",
        brownian_noise=True,
        eta_kind="ancestral",
        extra_params=_NOISE,
    ),
    _spec(
        "DPM++ 2M SDE Heun",
        functools.partial(S.sample_dpmpp_2m_sde, solver_type="heun"),
        ("k_dpmpp_2m_sde_heun",),
        default_scheduler="exponential",
        brownian_noise=True,
        eta_kind="ancestral",
        options={"solver_type": "heun"},
        extra_params=_NOISE,
    ),
    _spec(
        "DPM++ 2S a",
        S.sample_dpmpp_2s_ancestral,
        ("k_dpmpp_2s_a",),
        default_scheduler="karras",
        uses_ensd=True,
        second_order=True,
        eta_kind="ancestral",
        extra_params=_NOISE,
    ),
    _spec(
        "DPM++ 3M SDE",
        S.sample_dpmpp_3m_sde,
        ("k_dpmpp_3m_sde",),
        default_scheduler="exponential",
        discard_next_to_last_sigma=True,
        brownian_noise=True,
        eta_kind="ancestral",
        extra_params=_NOISE,
    ),
    _spec(
        "Euler a",
        S.sample_euler_ancestral,
        ("k_euler_a", "k_euler_ancestral"),
        uses_ensd=True,
        eta_kind="ancestral",
    ),
    _spec("Euler", S.sample_euler, ("k_euler",), extra_params=_CHURN),
    _spec("LMS", S.sample_lms, ("k_lms",)),
    _spec("Heun", S.sample_heun, ("k_heun",), second_order=True, extra_params=_CHURN),
    _spec(
        "DPM2",
        S.sample_dpm_2,
        ("k_dpm_2",),
        default_scheduler="karras",
        discard_next_to_last_sigma=True,
        second_order=True,
        extra_params=_CHURN,
    ),
    _spec(
        "DPM2 a",
        S.sample_dpm_2_ancestral,
        ("k_dpm_2_a",),
        default_scheduler="karras",
        discard_next_to_last_sigma=True,
        uses_ensd=True,
        second_order=True,
        eta_kind="ancestral",
        extra_params=_NOISE,
    ),
    _spec(
        "DPM fast",
        S.sample_dpm_fast,
        ("k_dpm_fast",),
        uses_ensd=True,
        uses_sigma_range=True,
        eta_kind="ancestral",
        extra_params=_NOISE,
    ),
    _spec(
        "DPM adaptive",
        S.sample_dpm_adaptive,
        ("k_dpm_ad",),
        uses_ensd=True,
        uses_sigma_range=True,
        eta_kind="ancestral",
    ),
    _spec("Restart", S.sample_restart, ("restart",), default_scheduler="karras", second_order=True),
    _spec("DDIM", T.sample_ddim, ("ddim",), is_timestep_sampler=True, uses_ensd=True, eta_kind="ddim"),
    _spec(
        "DDIM CFG++",
        T.sample_ddim_cfgpp,
        ("ddim_cfgpp",),
        is_timestep_sampler=True,
        uses_ensd=True,
        eta_kind="ddim",
    ),
    _spec("PLMS", T.sample_plms, ("plms",), is_timestep_sampler=True),
    _spec("UniPC", T.sample_unipc, ("unipc",), is_timestep_sampler=True),
    _spec("LCM", S.sample_lcm, ("k_lcm", "lcm")),
)

SCHEDULERS: tuple[SchedulerSpec, ...] = (
    SchedulerSpec("automatic", "Automatic"),
    SchedulerSpec("uniform", "Uniform", needs_model=True),
    SchedulerSpec("karras", "Karras", default_rho=7.0),
    SchedulerSpec("exponential", "Exponential"),
    SchedulerSpec("polyexponential", "Polyexponential", default_rho=1.0),
    SchedulerSpec("sgm_uniform", "SGM Uniform", aliases=("SGMUniform",), needs_model=True),
    SchedulerSpec("kl_optimal", "KL Optimal"),
    SchedulerSpec("align_your_steps", "Align Your Steps"),
    SchedulerSpec("simple", "Simple", needs_model=True),
    SchedulerSpec("normal", "Normal", needs_model=True),
    SchedulerSpec("ddim", "DDIM", needs_model=True),
    SchedulerSpec("beta", "Beta", needs_model=True),
)

# Pre-1.9 aliases that named a scheduler too (A1111 1.8's samplers_k_diffusion table).
LEGACY_ALIASES: Mapping[str, tuple[str, str]] = {
    "k_dpmpp_2m_ka": ("DPM++ 2M", "karras"),
    "k_dpmpp_sde_ka": ("DPM++ SDE", "karras"),
    "k_dpmpp_2m_sde_ka": ("DPM++ 2M SDE", "karras"),
    "k_dpmpp_2m_sde_exp": ("DPM++ 2M SDE", "exponential"),
    "k_dpmpp_2m_sde_heun_ka": ("DPM++ 2M SDE Heun", "karras"),
    "k_dpmpp_2m_sde_heun_exp": ("DPM++ 2M SDE Heun", "exponential"),
    "k_dpmpp_3m_sde_ka": ("DPM++ 3M SDE", "karras"),
    "k_dpmpp_3m_sde_exp": ("DPM++ 3M SDE", "exponential"),
    "k_lms_ka": ("LMS", "karras"),
    "k_dpm_2_ka": ("DPM2", "karras"),
    "k_dpm_2_a_ka": ("DPM2 a", "karras"),
    "k_dpmpp_2s_a_ka": ("DPM++ 2S a", "karras"),
}

_SAMPLERS_BY_KEY: Mapping[str, SamplerSpec] = {
    key.lower(): s for s in SAMPLERS for key in (s.label, *s.aliases)
}
_SCHEDULERS_BY_KEY: Mapping[str, SchedulerSpec] = {
    key.lower(): s for s in SCHEDULERS for key in (s.name, s.label, *s.aliases)
}


def sampler_labels() -> list[str]:
    return [s.label for s in SAMPLERS]


def scheduler_labels() -> list[str]:
    return [s.label for s in SCHEDULERS]


def get_sampler(name: str) -> SamplerSpec:
    """A sampler by label or alias (case-insensitive); legacy scheduler-carrying names are not here."""
    spec = _SAMPLERS_BY_KEY.get(name.strip().lower())
    if spec is None:
        raise InvalidRequestError(
            f"sampler_name={name!r} is not known; choose one of {', '.join(sampler_labels())}"
            + did_you_mean(name, sampler_labels(), ignore_case=True)
        )
    return spec


def get_scheduler(name: str | None) -> SchedulerSpec:
    """A scheduler by name, label or alias (case-insensitive); None or "" is Automatic."""
    if not name:
        return SCHEDULERS[0]
    spec = _SCHEDULERS_BY_KEY.get(name.strip().lower())
    if spec is None:
        raise InvalidRequestError(
            f"scheduler={name!r} is not known; choose one of {', '.join(scheduler_labels())}"
            + did_you_mean(name, scheduler_labels(), ignore_case=True)
        )
    return spec


def split_sampler_name(name: str) -> tuple[str, str | None]:
    """A pre-1.9 sampler name that carried its schedule, as A1111's ``get_sampler_and_scheduler``
    reads it: ("DPM++ 2M Karras" -> "DPM++ 2M", "Karras"; "k_lms_ka" -> "LMS", "Karras").

    Returns the sampler part and the schedule's label, or ``(name, None)`` when the name carries no
    schedule. Nothing is validated here: an unknown sampler part is the caller's to refuse.
    """
    legacy = LEGACY_ALIASES.get(name.strip().lower())
    if legacy is not None:
        return legacy[0], get_scheduler(legacy[1]).label
    if name.strip().lower() in _SAMPLERS_BY_KEY:
        return name, None
    found: SchedulerSpec | None = None
    # A1111 quirk: each scheduler is tried in order against the name as shortened so far.
    for sched in SCHEDULERS:
        for option in (sched.label, sched.name, *sched.aliases):
            if name.endswith(" " + option):
                found = sched
                name = name[: -(len(option) + 1)]
                break
    return name, found.label if found is not None else None


def resolve(
    sampler_name: str | None, scheduler_name: str | None = None, *, convert_automatic: bool = True
) -> tuple[SamplerSpec, SchedulerSpec]:
    """A1111's ``get_sampler_and_scheduler``: split a legacy suffix ("DPM++ 2M Karras") off the
    sampler name (it wins over ``scheduler_name``), and report Automatic when the scheduler is the
    sampler's default. Empty sampler name means A1111's first sampler, DPM++ 2M."""
    scheduler = get_scheduler(scheduler_name)
    name, suffix = split_sampler_name((sampler_name or SAMPLERS[0].label).strip())
    if suffix is not None:
        scheduler = get_scheduler(suffix)
    sampler = get_sampler(name)
    if convert_automatic and sampler.default_scheduler == scheduler.name:
        scheduler = SCHEDULERS[0]
    return sampler, scheduler


def effective_scheduler(sampler: SamplerSpec, scheduler: SchedulerSpec) -> SchedulerSpec | None:
    """The schedule actually run: Automatic becomes the sampler's default; None = model sigmas."""
    if scheduler.name != "automatic":
        return scheduler
    return get_scheduler(sampler.default_scheduler) if sampler.default_scheduler else None


def infotext_names(sampler_name: str, scheduler_name: str | None = None) -> dict[str, str]:
    """ "Sampler" and "Schedule type" as A1111 1.9+ writes them: the request's scheduler label,
    replaced by the resolved one when a k-diffusion schedule function ran (so "DPM++ 2M" with
    Automatic writes "Karras", while "Euler" with Automatic writes "Automatic")."""
    sampler, scheduler = resolve(sampler_name, scheduler_name)
    label = scheduler.label
    if not sampler.is_timestep_sampler:
        eff = effective_scheduler(sampler, scheduler)
        if eff is not None:
            label = eff.label
    return {"Sampler": sampler.label, "Schedule type": label}


def schedule_overrides(
    sampler: SamplerSpec,
    scheduler: SchedulerSpec,
    model_range: tuple[float, float] | None,
    sigma_min: float | None,
    sigma_max: float | None,
    rho: float | None,
) -> dict[str, float]:
    """The schedule overrides that take effect in A1111's ``get_sigmas``, by argument name: sigma_min
    / sigma_max when set (not 0 or None) and not the model's own (``model_range``; None = unknown,
    so any set value counts), rho only for a schedule with a default rho (Karras, Polyexponential)
    when set and not that default. Empty when no schedule function runs (the model's own sigmas)."""
    eff = effective_scheduler(sampler, scheduler)
    if eff is None:
        return {}
    found: dict[str, float] = {}
    m_min, m_max = model_range if model_range is not None else (None, None)
    if sigma_min and sigma_min != m_min:
        found["sigma_min"] = sigma_min
    if sigma_max and sigma_max != m_max:
        found["sigma_max"] = sigma_max
    if rho and eff.default_rho is not None and rho != eff.default_rho:
        found["rho"] = rho
    return found


def schedule_infotext(
    sampler: SamplerSpec,
    scheduler: SchedulerSpec,
    model_range: tuple[float, float] | None,
    *,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    rho: float | None = None,
    beta_alpha: float = 0.6,
    beta_beta: float = 0.6,
) -> dict[str, Any]:
    """The keys A1111 1.10's ``get_sigmas`` records for one pass, in its order: "Schedule type"
    (the schedule that ran), the overrides that took effect (:func:`schedule_overrides`), and the
    Beta schedule's alpha and beta whenever Beta runs, default or not. Empty when no schedule
    function runs: the model's own sigmas (Automatic for a sampler without a default schedule) and
    the timestep samplers, which never call it."""
    eff = effective_scheduler(sampler, scheduler)
    if eff is None or sampler.is_timestep_sampler:
        return {}
    keys: dict[str, Any] = {"Schedule type": eff.label}
    names = {"sigma_min": "Schedule min sigma", "sigma_max": "Schedule max sigma", "rho": "Schedule rho"}
    for name, value in schedule_overrides(sampler, scheduler, model_range, sigma_min, sigma_max, rho).items():
        keys[names[name]] = value
    if eff.name == "beta":
        keys["Beta schedule alpha"] = beta_alpha
        keys["Beta schedule beta"] = beta_beta
    return keys


def compute_sigmas(
    sampler: SamplerSpec,
    scheduler: SchedulerSpec,
    steps: int,
    model: DiscreteSigmas,
    *,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    rho: float | None = None,
    use_old_karras_scheduler_sigmas: bool = False,
    always_discard_next_to_last_sigma: bool = False,
    beta_alpha: float = 0.6,
    beta_beta: float = 0.6,
) -> Tensor:
    """A1111's ``KDiffusionSampler.get_sigmas``: steps (+1 when discarding the penultimate sigma),
    the scheduler's sigmas over the model's range (or the old 0.1..10 Karras range), overrides of
    sigma_min / sigma_max / rho (0 or None = not set), then the penultimate sigma dropped."""
    if steps < 1:
        raise InvalidRequestError(f"steps={steps}: need at least 1 sampling step")
    discard = sampler.discard_next_to_last_sigma or always_discard_next_to_last_sigma
    n = steps + 1 if discard else steps
    m_min, m_max = float(model.sigmas[0]), float(model.sigmas[-1])
    s_min, s_max = schedules.OLD_KARRAS_SIGMA_RANGE if use_old_karras_scheduler_sigmas else (m_min, m_max)
    overrides = schedule_overrides(sampler, scheduler, (m_min, m_max), sigma_min, sigma_max, rho)
    s_min = overrides.get("sigma_min", s_min)
    s_max = overrides.get("sigma_max", s_max)
    r = overrides.get("rho")
    eff = effective_scheduler(sampler, scheduler)
    name = eff.name if eff is not None else "uniform"
    if name == "uniform":
        sigmas = schedules.uniform(n, model)
    elif name == "karras":
        sigmas = schedules.karras(n, s_min, s_max, r if r is not None else 7.0)
    elif name == "exponential":
        sigmas = schedules.exponential(n, s_min, s_max)
    elif name == "polyexponential":
        sigmas = schedules.polyexponential(n, s_min, s_max, r if r is not None else 1.0)
    elif name == "sgm_uniform":
        sigmas = schedules.sgm_uniform(n, s_min, s_max, model)
    elif name == "kl_optimal":
        sigmas = schedules.kl_optimal(n, s_min, s_max)
    elif name == "align_your_steps":
        sigmas = schedules.align_your_steps(n)
    elif name == "simple":
        sigmas = schedules.simple(n, model)
    elif name == "normal":
        sigmas = schedules.normal(n, s_min, s_max, model)
    elif name == "ddim":
        sigmas = schedules.ddim(n, model)
    elif name == "beta":
        sigmas = schedules.beta(n, s_min, s_max, beta_alpha, beta_beta)
    else:  # pragma: no cover - SCHEDULERS and this chain are kept in step by the tests
        raise InvalidRequestError(f"scheduler={name!r} has no sigma function")
    return schedules.discard_penultimate(sigmas) if discard else sigmas
