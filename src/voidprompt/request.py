"""The one request type every front end translates into.

Field names follow A1111's HTTP API (``StableDiffusionProcessingTxt2Img`` / ``Img2Img``) and the
settings A1111 writes into infotexts, so the API layer is thin and an infotext maps onto a request
one to one. A request is frozen: derive variants with :func:`dataclasses.replace`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from voidprompt.errors import InvalidRequestError

# A1111's emphasis modes (modules/sd_emphasis.py).
EMPHASIS_MODES = ("Original", "No norm", "Ignore", "None")
# A1111's RNG sources (setting randn_source, infotext "RNG").
RNG_SOURCES = ("GPU", "CPU", "NV")
# A1111's "Noise schedule for sampling" (setting sd_noise_schedule, infotext "Noise Schedule").
NOISE_SCHEDULES = ("Default", "Zero Terminal SNR")
# A1111's "Hires fix: which pass to enable refiner for" (setting hires_fix_refiner_pass).
HIRES_REFINER_PASSES = ("first pass", "second pass", "both passes")
# img2img resize modes (A1111 API resize_mode 0..3).
RESIZE_MODES = ("Just resize", "Crop and resize", "Resize and fill", "Just resize (latent upscale)")
# Inpainting masked content (A1111 API inpainting_fill 0..3).
INPAINTING_FILLS = ("fill", "original", "latent noise", "latent nothing")

# Hard limits on any request, whichever front end it comes from (a server may set lower ones).
# A1111's UI sliders stop at 2048 pixels and 150 steps and its API has no limits; these leave room
# for studies beyond the sliders while keeping one request's memory and time finite.

# Characters in the prompt and the negative prompt together (and in the hires pair together).
MAX_PROMPT_CHARS = 20_000
# Pixels per side: an 8192x8192 picture has a 1024x1024 latent, far beyond what SD1 or SDXL can
# draw.
MAX_SIDE = 8192
# Sampling steps, first and hires pass each: the model has 1000 training timesteps, so more steps
# than that only repeat them.
MAX_STEPS = 1000


@dataclass(frozen=True)
class GenerationRequest:
    """Everything that determines an image. Defaults are A1111's, except where noted."""

    prompt: str = ""
    negative_prompt: str = ""
    styles: tuple[str, ...] = ()

    # Seeds (A1111 modules/processing.py, modules/rng.py).
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1

    # Sampling.
    sampler_name: str = "Euler"
    scheduler: str = "Automatic"
    steps: int = 20  # A1111's API default is 50; its UI (and ours) uses 20.
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    batch_size: int = 1
    n_iter: int = 1
    # Seamless tiles: circular padding in the UNet's and VAE's convolutions (A1111's "Tiling").
    tiling: bool = False

    # Sampler parameters (A1111 "sampler-params" settings; None = the sampler's own default).
    eta: float | None = None
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float | None = None  # None = infinity
    s_noise: float = 1.0
    s_min_uncond: float = 0.0  # NGMS
    sigma_min: float | None = None  # schedule overrides; None = the model's own
    sigma_max: float | None = None
    rho: float | None = None
    always_discard_next_to_last_sigma: bool = False
    sgm_noise_multiplier: bool = False
    beta_dist_alpha: float = 0.6  # the Beta schedule's shape ("Beta schedule alpha" / "beta")
    beta_dist_beta: float = 0.6

    # Settings A1111 keeps globally but writes into infotexts; per request here.
    clip_skip: int = 1  # CLIP_stop_at_last_layers
    eta_noise_seed_delta: int = 0  # ENSD
    randn_source: str = "CPU"  # A1111 defaults to GPU; we write "RNG: CPU" so A1111 reproduces us
    emphasis: str = "Original"
    comma_padding_backtrack: int = 20
    pad_cond_uncond: bool = False
    pad_cond_uncond_v0: bool = False
    use_old_scheduling: bool = False  # "Old prompt editing timelines"
    use_downcasted_alpha_bar: bool = False  # "Downcast alphas_cumprod"
    sd_noise_schedule: str = "Default"  # "Noise Schedule"; a model marked ztsnr always runs ZTSNR
    use_old_karras_scheduler_sigmas: bool = False
    batch_cond_uncond: bool = True
    # SDXL settings (A1111 options; no infotext keys of their own).
    sdxl_crop_top: int = 0
    sdxl_crop_left: int = 0
    sdxl_clip_l_skip: bool = False  # "Clip skip SDXL": Clip skip applies to CLIP-L
    sdxl_refiner_low_aesthetic_score: float = 2.5  # the refiner's negative prompt
    sdxl_refiner_high_aesthetic_score: float = 6.0  # the refiner's positive prompt

    # img2img / inpainting (A1111 Img2Img API fields). Images are PIL images or None.
    init_images: tuple[Any, ...] = ()
    mask: Any = None
    resize_mode: int = 0
    denoising_strength: float | None = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_round: bool = True
    inpainting_fill: int = 1
    inpaint_full_res: bool = False
    inpaint_full_res_padding: int = 32
    inpainting_mask_invert: bool = False
    initial_noise_multiplier: float = 1.0
    inpainting_mask_weight: float = 1.0
    # A1111's img2img_fix_steps: run exactly `steps` steps (the schedule stretched to
    # steps / denoising_strength) instead of denoising_strength * steps of a `steps`-long schedule.
    img2img_fix_steps: bool = False

    # Hires fix (txt2img second pass).
    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_upscaler: str = "Latent"
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""

    # SDXL refiner switch (A1111's refiner_checkpoint / refiner_switch_at, and two settings).
    refiner_checkpoint: str | None = None  # a checkpoint name the front end's loader resolves
    refiner_switch_at: float | None = None  # the completed fraction at which the refiner takes over
    hires_fix_refiner_pass: str = "second pass"
    refiner_switch_by_sample_steps: bool = False

    # Free-form extras a front end wants recorded (kept in insertion order).
    extra_generation_params: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def is_img2img(self) -> bool:
        return bool(self.init_images)

    @property
    def total_images(self) -> int:
        return self.batch_size * self.n_iter

    def replace(self, **changes: Any) -> GenerationRequest:
        return dataclasses.replace(self, **changes)

    def validate(self) -> None:
        """Raise InvalidRequestError naming the bad field, its value and the fix."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            # NaN slips through every range check below (each comparison is False).
            if isinstance(value, float) and not math.isfinite(value):
                raise InvalidRequestError(f"{f.name}={value}: must be a finite number")
        for pair in (("prompt", "negative_prompt"), ("hr_prompt", "hr_negative_prompt")):
            check_prompt_chars(*(getattr(self, name) for name in pair), names=pair)
        for name in ("width", "height"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise InvalidRequestError(f"{name}={value!r}: must be a positive whole number of pixels")
            if value > MAX_SIDE:
                raise InvalidRequestError(
                    f"{name}={value} is over the limit of {MAX_SIDE} pixels per side; use {MAX_SIDE} or less"
                )
            if value % 8:
                lower, upper = value - value % 8, value - value % 8 + 8
                raise InvalidRequestError(
                    f"{name}={value} is not a multiple of 8 (the VAE downsamples by 8); "
                    f"use {lower or 8} or {upper}"
                )
        if self.steps < 1:
            raise InvalidRequestError(f"steps={self.steps}: need at least 1 sampling step")
        for name in ("steps", "hr_second_pass_steps"):
            if getattr(self, name) > MAX_STEPS:
                raise InvalidRequestError(
                    f"{name}={getattr(self, name)} is over the limit of {MAX_STEPS} sampling steps; "
                    f"use {MAX_STEPS} or fewer"
                )
        if self.batch_size < 1 or self.n_iter < 1:
            raise InvalidRequestError(
                f"batch_size={self.batch_size}, n_iter={self.n_iter}: both must be at least 1"
            )
        if not 1 <= self.clip_skip <= 12:
            raise InvalidRequestError(f"clip_skip={self.clip_skip}: must be between 1 and 12")
        if self.emphasis not in EMPHASIS_MODES:
            raise InvalidRequestError(
                f"emphasis={self.emphasis!r}: choose one of {', '.join(EMPHASIS_MODES)}"
            )
        if self.refiner_switch_at is not None and not 0.0 <= self.refiner_switch_at <= 1.0:
            raise InvalidRequestError(f"refiner_switch_at={self.refiner_switch_at}: must be within 0..1")
        if self.hires_fix_refiner_pass not in HIRES_REFINER_PASSES:
            raise InvalidRequestError(
                f"hires_fix_refiner_pass={self.hires_fix_refiner_pass!r}: choose one of "
                f"{', '.join(HIRES_REFINER_PASSES)}"
            )
        if self.sd_noise_schedule not in NOISE_SCHEDULES:
            raise InvalidRequestError(
                f"sd_noise_schedule={self.sd_noise_schedule!r}: choose one of {', '.join(NOISE_SCHEDULES)}"
            )
        if self.randn_source not in RNG_SOURCES:
            raise InvalidRequestError(
                f"randn_source={self.randn_source!r}: choose one of {', '.join(RNG_SOURCES)}"
            )
        if not 0.0 <= self.subseed_strength <= 1.0:
            raise InvalidRequestError(f"subseed_strength={self.subseed_strength}: must be within 0..1")
        if self.denoising_strength is not None and not 0.0 <= self.denoising_strength <= 1.0:
            raise InvalidRequestError(f"denoising_strength={self.denoising_strength}: must be within 0..1")
        if self.resize_mode not in range(len(RESIZE_MODES)):
            raise InvalidRequestError(f"resize_mode={self.resize_mode}: must be 0..{len(RESIZE_MODES) - 1}")
        if self.inpainting_fill not in range(len(INPAINTING_FILLS)):
            raise InvalidRequestError(
                f"inpainting_fill={self.inpainting_fill}: must be 0..{len(INPAINTING_FILLS) - 1}"
            )
        if not 0 <= self.comma_padding_backtrack <= 74:
            raise InvalidRequestError(
                f"comma_padding_backtrack={self.comma_padding_backtrack}: must be within 0..74"
            )
        for name in ("sdxl_crop_top", "sdxl_crop_left"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value <= MAX_SIDE:
                raise InvalidRequestError(
                    f"{name}={value!r}: must be a whole number of pixels, 0..{MAX_SIDE}"
                )
        for name in ("beta_dist_alpha", "beta_dist_beta"):
            if getattr(self, name) <= 0.0:
                raise InvalidRequestError(
                    f"{name}={getattr(self, name)}: the Beta schedule needs a shape above 0 "
                    "(A1111's default is 0.6)"
                )
        for name in ("sdxl_refiner_low_aesthetic_score", "sdxl_refiner_high_aesthetic_score"):
            if not 0.0 <= getattr(self, name) <= 10.0:
                raise InvalidRequestError(f"{name}={getattr(self, name)}: must be within 0..10")


def check_prompt_chars(
    prompt: str,
    negative_prompt: str,
    *,
    limit: int = MAX_PROMPT_CHARS,
    names: tuple[str, str] = ("prompt", "negative_prompt"),
) -> None:
    """Refuse a prompt pair over ``limit`` characters together: every way a prompt arrives (a
    request, an infotext, a study) is held to the same count, and a server may pass a lower limit."""
    total = len(prompt) + len(negative_prompt)
    if total > limit:
        raise InvalidRequestError(
            f"{names[0]} and {names[1]} are {total} characters together, over the limit of {limit}; "
            "shorten them"
        )
