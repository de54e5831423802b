"""Between the API and the Engine: settings, request translation, the model in memory, and info.

Everything here is plain Python (no FastAPI), so the translation rules can be tested directly.
The flow of one txt2img/img2img call:

1. :func:`build_request` turns the API body into a :class:`GenerationRequest` in the request's own
   thread, so bad values are answered at once (400) without waiting in the queue. Precedence, as
   in A1111: server settings < API defaults < ``infotext`` < fields the client set < ``override_settings``.
2. :meth:`ModelHost.generate` runs on the queue's worker: it loads the model if needed, applies the
   one-request model override, and runs the request through the Engine, whose iteration hooks let
   "skip" drop the current iteration and "interrupt" return what is done, like A1111.
3. :func:`processed_info` builds the ``info`` JSON with A1111's ``Processed.js()`` keys.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image, PngImagePlugin

from voidprompt import __version__
from voidprompt.errors import InvalidRequestError, VoidpromptError
from voidprompt.explain.record import ExplainOptions
from voidprompt.imagemeta import open_image_safely
from voidprompt.infotext import KEY_ORDER, TRAILING_KEYS, request_fields_from_infotext
from voidprompt.models.load import load_model
from voidprompt.models.placement import PrecisionPolicy, resolve_device, resolve_precision
from voidprompt.models.upscalers.registry import Upscalers
from voidprompt.models.upscalers.tiled import DEFAULT_TILE, DEFAULT_TILE_OVERLAP
from voidprompt.pipeline.engine import Engine, GenerationHooks, Progress
from voidprompt.pipeline.hires import check_hr_upscaler, hires_target
from voidprompt.pipeline.result import Result
from voidprompt.prompts.styles import StyleDatabase
from voidprompt.request import EMPHASIS_MODES, HIRES_REFINER_PASSES, RNG_SOURCES, GenerationRequest
from voidprompt.sampling.registry import resolve, sampler_labels
from voidprompt.server.checkpoints import CheckpointEntry, ModelRegistry, NotFoundError, VaeEntry
from voidprompt.server.limits import LimitError, Limits
from voidprompt.server.models import Img2ImgRequest, Txt2ImgRequest
from voidprompt.server.networks import NetworkFolders
from voidprompt.server.queue import State

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------- options


class ScriptNotFoundError(VoidpromptError):
    """A request names a script (or an extension's always-on script) voidprompt does not have, or names
    one where A1111 does not take it (a selectable script among the always-on ones): A1111's 422."""


# The scripts voidprompt runs, by A1111's title in lower case (A1111 looks a script up by
# ``title().lower() == name.lower()``): selectable ones (``script_name``) and always-on ones
# (``alwayson_scripts`` keys). Every other name is answered as A1111 without that script answers.
SELECTABLE_SCRIPTS: frozenset[str] = frozenset()
# The always-on scripts every A1111 1.10 install has, by lower-case title, found by name over the API
# and run there without effect. A1111 quirk: their args are ignored - Seed, Sampler and Refiner are
# "built-in UI" scripts whose setup runs for the web UI only; Comments and Hypertile have no args and
# read settings; Extra options maps its args onto the settings named in ``extra_options_txt2img`` /
# ``extra_options_img2img``, which list none by default.
ALWAYSON_SCRIPTS: frozenset[str] = frozenset(
    {"seed", "sampler", "refiner", "comments", "hypertile", "extra options"}
)
# img2img's tab also has the built-in Soft Inpainting extension, which does act on its args.
SOFT_INPAINTING = "soft inpainting"
# Selectable scripts voidprompt runs (through its own route), refused as always-on ones.
_SELECTABLE_ELSEWHERE = frozenset({"x/y/z plot"})


def known_script(name: str, *, alwayson: bool = False, img2img: bool = False) -> bool:
    """Whether ``name`` (any case) is a script voidprompt knows on the tab, as A1111's lookup
    compares it (its title in lower case)."""
    key = name.lower()
    if not alwayson:
        return key in SELECTABLE_SCRIPTS
    return key in ALWAYSON_SCRIPTS or (img2img and key == SOFT_INPAINTING)


def check_scripts(body: Txt2ImgRequest, *, img2img: bool = False) -> None:
    """A1111's answers about named scripts.

    A script it does not have (ControlNet, ControlNet-LLLite, ADetailer without their extensions):
    422 ``Script '<name>' not found``, selectable or always-on alike (its always-on lookup goes
    through the same ``script_name_to_index``), the name as the client wrote it. A selectable script
    among the always-on ones: A1111's 422 for that. Soft Inpainting switched on: voidprompt does not
    have it, so the request is refused rather than run without it. An empty ``script_name`` is no
    script."""
    if body.script_name and not known_script(body.script_name):
        raise ScriptNotFoundError(f"Script '{body.script_name}' not found")
    for name, entry in body.alwayson_scripts.items():
        if name.lower() in _SELECTABLE_ELSEWHERE:
            raise ScriptNotFoundError("Cannot have a selectable script in the always on scripts params")
        if not known_script(name, alwayson=True, img2img=img2img):
            raise ScriptNotFoundError(f"Script '{name}' not found")
        args = entry.get("args") if isinstance(entry, dict) else None
        if name.lower() == SOFT_INPAINTING and args and bool(args[0]):
            raise InvalidRequestError(
                f"alwayson_scripts '{name}': voidprompt has no soft inpainting; "
                "send its first argument (enabled) false or leave the script out"
            )


@dataclass(frozen=True)
class OptionSpec:
    default: Any
    kind: type  # int, float, bool or str
    field: str | None = None  # the GenerationRequest field it sets, if any
    choices: tuple[str, ...] = ()
    zero_is_none: bool = False  # A1111 stores "use the model's own" as 0 for these


# The A1111 settings voidprompt honours. Each maps onto a request field (A1111 keeps them global).
OPTION_SPECS: dict[str, OptionSpec] = {
    "CLIP_stop_at_last_layers": OptionSpec(1, int, "clip_skip"),
    "eta_noise_seed_delta": OptionSpec(0, int, "eta_noise_seed_delta"),
    # The server sets the device's default (models.placement.default_randn_source): GPU on CUDA, as
    # A1111; CPU elsewhere, where the two are the same numbers and "RNG: CPU" regenerates anywhere.
    "randn_source": OptionSpec("CPU", str, "randn_source", RNG_SOURCES),
    # A1111's "Tiling" setting: what a request's tiling of None means.
    "tiling": OptionSpec(False, bool, "tiling"),
    "emphasis": OptionSpec("Original", str, "emphasis", EMPHASIS_MODES),
    "comma_padding_backtrack": OptionSpec(20, int, "comma_padding_backtrack"),
    "eta_ancestral": OptionSpec(1.0, float),
    "eta_ddim": OptionSpec(0.0, float),
    "s_churn": OptionSpec(0.0, float, "s_churn"),
    "s_tmin": OptionSpec(0.0, float, "s_tmin"),
    "s_tmax": OptionSpec(0.0, float, "s_tmax", zero_is_none=True),
    "s_noise": OptionSpec(1.0, float, "s_noise"),
    "s_min_uncond": OptionSpec(0.0, float, "s_min_uncond"),
    "sigma_min": OptionSpec(0.0, float, "sigma_min", zero_is_none=True),
    "sigma_max": OptionSpec(0.0, float, "sigma_max", zero_is_none=True),
    "rho": OptionSpec(0.0, float, "rho", zero_is_none=True),
    "always_discard_next_to_last_sigma": OptionSpec(False, bool, "always_discard_next_to_last_sigma"),
    "sgm_noise_multiplier": OptionSpec(False, bool, "sgm_noise_multiplier"),
    "beta_dist_alpha": OptionSpec(0.6, float, "beta_dist_alpha"),
    "beta_dist_beta": OptionSpec(0.6, float, "beta_dist_beta"),
    "pad_cond_uncond": OptionSpec(False, bool, "pad_cond_uncond"),
    "pad_cond_uncond_v0": OptionSpec(False, bool, "pad_cond_uncond_v0"),
    "use_old_scheduling": OptionSpec(False, bool, "use_old_scheduling"),
    "use_downcasted_alpha_bar": OptionSpec(False, bool, "use_downcasted_alpha_bar"),
    "use_old_karras_scheduler_sigmas": OptionSpec(False, bool, "use_old_karras_scheduler_sigmas"),
    "batch_cond_uncond": OptionSpec(True, bool, "batch_cond_uncond"),
    "initial_noise_multiplier": OptionSpec(1.0, float, "initial_noise_multiplier"),
    "inpainting_mask_weight": OptionSpec(1.0, float, "inpainting_mask_weight"),
    "img2img_fix_steps": OptionSpec(False, bool, "img2img_fix_steps"),
    # SDXL's settings, A1111's names and defaults; SD1 models ignore them.
    "sdxl_crop_top": OptionSpec(0, int, "sdxl_crop_top"),
    "sdxl_crop_left": OptionSpec(0, int, "sdxl_crop_left"),
    "sdxl_clip_l_skip": OptionSpec(False, bool, "sdxl_clip_l_skip"),
    "sdxl_refiner_low_aesthetic_score": OptionSpec(2.5, float, "sdxl_refiner_low_aesthetic_score"),
    "sdxl_refiner_high_aesthetic_score": OptionSpec(6.0, float, "sdxl_refiner_high_aesthetic_score"),
    # The refiner switch's two settings (the checkpoint and the switch point are request fields).
    "hires_fix_refiner_pass": OptionSpec("second pass", str, "hires_fix_refiner_pass", HIRES_REFINER_PASSES),
    "refiner_switch_by_sample_steps": OptionSpec(False, bool, "refiner_switch_by_sample_steps"),
    # Model upscalers' tiles (the server's upscalers follow them; see the options route).
    "ESRGAN_tile": OptionSpec(DEFAULT_TILE, int),
    "ESRGAN_tile_overlap": OptionSpec(DEFAULT_TILE_OVERLAP, int),
    # Accepted and reported so clients that set them keep working; they change nothing here.
    "samples_format": OptionSpec("png", str, None, ("png",)),
    "return_grid": OptionSpec(False, bool),
    "live_previews_enable": OptionSpec(True, bool),
    "show_progress_every_n_steps": OptionSpec(1, int),
    "enable_pnginfo": OptionSpec(True, bool),
    "sd_checkpoints_limit": OptionSpec(1, int),
}
MODEL_OPTIONS = ("sd_model_checkpoint", "sd_vae", "sd_checkpoint_hash")


class Options:
    """The server's current settings (A1111's ``shared.opts`` for the keys above)."""

    def __init__(self, defaults: Mapping[str, Any] | None = None) -> None:
        """``defaults`` replaces some keys' defaults (checked like a client's change)."""
        self.values: dict[str, Any] = {key: spec.default for key, spec in OPTION_SPECS.items()}
        self.values.update(self.normalise(defaults or {}))
        self.lock = threading.Lock()

    @staticmethod
    def normalise(changes: Mapping[str, Any]) -> dict[str, Any]:
        """Check keys and types; returns coerced values. Model keys pass through unchanged."""
        out: dict[str, Any] = {}
        for key, value in changes.items():
            if key in MODEL_OPTIONS:
                if key != "sd_checkpoint_hash" and not isinstance(value, str):
                    raise InvalidRequestError(f"{key}={value!r}: must be a string (a model title or name)")
                out[key] = value
                continue
            spec = OPTION_SPECS.get(key)
            if spec is None:
                raise InvalidRequestError(
                    f"option {key!r} is not supported by voidprompt; supported: "
                    f"{', '.join([*MODEL_OPTIONS[:2], *OPTION_SPECS])}"
                )
            out[key] = _coerce(key, value, spec)
        # The request owns the ranges (crop within the picture limits, scores 0..10, ...): a value
        # it would refuse is refused here, not in every later generation.
        GenerationRequest(**request_fields_from_options(out)).validate()
        return out

    def update(self, normalised: Mapping[str, Any]) -> None:
        with self.lock:
            for key, value in normalised.items():
                if key in OPTION_SPECS:
                    self.values[key] = value

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return dict(self.values)


def _coerce(key: str, value: Any, spec: OptionSpec) -> Any:
    bad = InvalidRequestError(f"{key}={value!r}: must be {spec.kind.__name__}")
    if spec.kind is bool:
        if not isinstance(value, bool):
            raise bad
    elif spec.kind is int:
        if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
            raise bad
        value = int(value)
    elif spec.kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
            raise bad
        value = float(value)
    elif not isinstance(value, str):
        raise bad
    if spec.choices and value not in spec.choices:
        raise InvalidRequestError(f"{key}={value!r}: choose one of {', '.join(spec.choices)}")
    return value


def request_fields_from_options(values: Mapping[str, Any]) -> dict[str, Any]:
    """Request fields set by settings (``values`` is a subset of OPTION_SPECS keys)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        spec = OPTION_SPECS.get(key)
        if spec is None or spec.field is None:
            continue
        out[spec.field] = None if spec.zero_is_none and value == 0 else value
    return out


# ------------------------------------------------------------------------------------ request build


def decode_image(data: str, what: str, max_pixels: int) -> Image.Image:
    """A base64 image (a ``data:image/...;base64,`` prefix is allowed), decoded within the pixel
    budget by :func:`open_image_safely`, which checks the declared size before decompressing."""
    if not isinstance(data, str) or not data.strip():
        raise InvalidRequestError(f"{what}: empty; send a base64-encoded PNG, JPEG or WebP")
    text = data.strip()
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError(f"{what}: not valid base64") from None
    return open_image_safely(raw, max_pixels)


def encode_png(image: Image.Image, infotext: str | None) -> str:
    """A base64 PNG with the infotext in its ``parameters`` chunk, as A1111's API returns."""
    info = PngImagePlugin.PngInfo()
    if infotext:
        info.add_text("parameters", infotext)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


@dataclass
class BuiltRequest:
    request: GenerationRequest
    model: str | None = None  # a one-request sd_model_checkpoint override
    vae: str | None = None
    persist: dict[str, Any] = field(default_factory=dict)  # override settings kept afterwards
    explain: ExplainOptions | None = None  # the capture, asked for on voidprompt's own routes only


_SAME_SAMPLER = ("", "Use same sampler")
_SAME_SCHEDULER = ("", "Use same scheduler")


def build_request(
    body: Txt2ImgRequest,
    options: Options,
    limits: Limits,
    *,
    img2img: bool = False,
    upscalers: Upscalers | None = None,
) -> BuiltRequest:
    """The GenerationRequest for an API body; raises InvalidRequestError / LimitError (400).
    ``upscalers``: where ``hr_upscaler`` may name a model upscaler (else only built-in names)."""
    explicit = set(body.model_fields_set)
    if body.restore_faces:
        raise InvalidRequestError(
            "restore_faces=true: no face restorer is installed (A1111's are GFPGAN and CodeFormer; "
            "voidprompt has neither); send restore_faces=false"
        )
    check_scripts(body, img2img=img2img)
    if body.hr_checkpoint_name not in (None, "", "Use same checkpoint"):
        raise InvalidRequestError(
            "hr_checkpoint_name: the hires pass uses the same checkpoint; leave it empty"
        )
    if body.firstpass_image:
        raise InvalidRequestError("firstpass_image: not supported; send a plain txt2img request")

    api = _api_fields(body, img2img)
    merged = request_fields_from_options(options.snapshot())
    merged.update({k: v for k, v in api.items() if k not in explicit})
    if body.infotext:
        # The infotext parser refuses an over-long text before reading it.
        merged.update(request_fields_from_infotext(body.infotext))
    merged.update({k: v for k, v in api.items() if k in explicit or _always_from_api(k, explicit)})
    # After the merge: the prompts may come from the fields or from the infotext.
    if len(merged.get("prompt", "")) + len(merged.get("negative_prompt", "")) > limits.max_prompt_chars:
        raise LimitError(
            f"prompt and negative prompt are over this server's limit of {limits.max_prompt_chars} characters"
        )
    if not img2img and not merged.get("enable_hr"):
        # txt2img without hires: clients (webuiapi) send denoising_strength anyway; A1111 ignores it.
        merged["denoising_strength"] = None

    built = BuiltRequest(GenerationRequest())
    if body.override_settings:
        overrides = Options.normalise(body.override_settings)
        built.model = overrides.pop("sd_model_checkpoint", None)
        built.vae = overrides.pop("sd_vae", None)
        overrides.pop("sd_checkpoint_hash", None)
        merged.update(request_fields_from_options(overrides))
        if not body.override_settings_restore_afterwards:
            built.persist = dict(overrides)
            if built.model is not None:
                built.persist["sd_model_checkpoint"] = built.model
            if built.vae is not None:
                built.persist["sd_vae"] = built.vae

    # Unknown sampler / scheduler: refused (400, the message lists the names). A1111 1.10 instead
    # falls back to its default sampler and schedule (get_sampler_and_scheduler) and generates; a
    # research tool must not silently change the sampler (docs/server.md).
    spec, _scheduler = resolve(merged.get("sampler_name"), merged.get("scheduler"))
    if merged.get("eta") is None and spec.eta_kind is not None:
        eta_key = "eta_ancestral" if spec.eta_kind == "ancestral" else "eta_ddim"
        value = options.snapshot()[eta_key]
        if value != spec.default_eta:
            merged["eta"] = value
    for key in ("hr_sampler_name", "hr_scheduler"):
        if merged.get(key) is not None:
            resolve(
                merged[key] if key == "hr_sampler_name" else None,
                merged[key] if key == "hr_scheduler" else None,
            )
    if merged.get("enable_hr"):
        check_hr_upscaler(merged.get("hr_upscaler", "Latent"), upscalers)

    for key, value in merged.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidRequestError(f"{key}={value}: must be a finite number")
    if abs(float(merged.get("cfg_scale", 7.0))) > limits.max_cfg_scale:
        raise LimitError(
            f"cfg_scale={merged['cfg_scale']} is outside this server's limit of +-{limits.max_cfg_scale}"
        )
    request = GenerationRequest(**merged)
    hr_pixels = 0
    if request.enable_hr and not img2img:
        target = hires_target(request)
        hr_pixels = target.upscale_width * target.upscale_height
    limits.check_generation(
        width=request.width,
        height=request.height,
        steps=request.steps + (request.hr_second_pass_steps if request.enable_hr else 0),
        batch_size=request.batch_size,
        n_iter=request.n_iter,
        hr_pixels=hr_pixels,
    )
    request.validate()
    if img2img:
        assert isinstance(body, Img2ImgRequest)
        if not body.init_images:
            raise InvalidRequestError("init_images: give at least one base64 image for img2img")
        if len(body.init_images) > limits.max_batch_size:
            raise LimitError(
                f"init_images: {len(body.init_images)} images is over the limit of {limits.max_batch_size}"
            )
        images = tuple(
            decode_image(data, f"init_images[{i}]", limits.max_input_pixels)
            for i, data in enumerate(body.init_images)
        )
        mask = decode_image(body.mask, "mask", limits.max_input_pixels) if body.mask else None
        if body.latent_mask:
            log.info("latent_mask ignored: voidprompt derives the latent mask from mask")
        request = request.replace(init_images=images, mask=mask)
    built.request = request
    return built


def _always_from_api(key: str, explicit: set[str]) -> bool:
    # The sampler comes from sampler_index when sampler_name is absent: treat it as explicit then.
    return key == "sampler_name" and "sampler_index" in explicit and "sampler_name" not in explicit


def _api_fields(body: Txt2ImgRequest, img2img: bool) -> dict[str, Any]:
    """API field values translated to request field names and conventions (not yet merged)."""
    out: dict[str, Any] = {
        "prompt": body.prompt,
        "negative_prompt": body.negative_prompt,
        "styles": tuple(body.styles or ()),
        "seed": body.seed,
        "subseed": body.subseed,
        "subseed_strength": body.subseed_strength,
        # A1111 turns seed resize on only when both are positive; clients send 0 for "off".
        "seed_resize_from_h": body.seed_resize_from_h if body.seed_resize_from_h > 0 else -1,
        "seed_resize_from_w": body.seed_resize_from_w if body.seed_resize_from_w > 0 else -1,
        "sampler_name": body.sampler_name or body.sampler_index,
        "scheduler": body.scheduler or "Automatic",
        "batch_size": body.batch_size,
        "n_iter": body.n_iter,
        "steps": body.steps,
        "cfg_scale": body.cfg_scale,
        "width": body.width,
        "height": body.height,
        "eta": body.eta,
        "denoising_strength": body.denoising_strength,
        "enable_hr": body.enable_hr,
        "hr_scale": body.hr_scale,
        "hr_upscaler": body.hr_upscaler or "Latent",
        "hr_second_pass_steps": body.hr_second_pass_steps,
        "hr_resize_x": body.hr_resize_x,
        "hr_resize_y": body.hr_resize_y,
        "hr_sampler_name": None if body.hr_sampler_name in (None, *_SAME_SAMPLER) else body.hr_sampler_name,
        "hr_scheduler": None if body.hr_scheduler in (None, *_SAME_SCHEDULER) else body.hr_scheduler,
        "hr_prompt": body.hr_prompt,
        "hr_negative_prompt": body.hr_negative_prompt,
        # The Engine switches to the refiner; the server's loader resolves the name (ModelHost).
        "refiner_checkpoint": body.refiner_checkpoint,
        "refiner_switch_at": body.refiner_switch_at,
    }
    # A1111's None / 0 mean "the setting's value": only values the client gave override settings.
    for name in ("s_churn", "s_tmin", "s_noise", "s_min_uncond"):
        value = getattr(body, name)
        if value is not None:
            out[name] = value
    if body.tiling is not None:
        out["tiling"] = body.tiling  # None: the server's tiling setting
    if body.s_tmax is not None:
        out["s_tmax"] = body.s_tmax or None  # 0 = infinity, as A1111's setting
    if img2img:
        assert isinstance(body, Img2ImgRequest)
        blur_x = body.mask_blur if body.mask_blur is not None else body.mask_blur_x
        blur_y = body.mask_blur if body.mask_blur is not None else body.mask_blur_y
        out.update(
            resize_mode=body.resize_mode,
            mask_blur_x=blur_x,
            mask_blur_y=blur_y,
            mask_round=body.mask_round,
            inpainting_fill=body.inpainting_fill,
            inpaint_full_res=body.inpaint_full_res,
            inpaint_full_res_padding=body.inpaint_full_res_padding,
            inpainting_mask_invert=bool(body.inpainting_mask_invert),
        )
        if body.initial_noise_multiplier is not None:
            out["initial_noise_multiplier"] = body.initial_noise_multiplier
    return out


# ------------------------------------------------------------------------------------ model host


@dataclass
class Generated:
    result: Result
    request: GenerationRequest
    checkpoint: CheckpointEntry
    vae: VaeEntry | None
    job_timestamp: str
    is_inpainting: bool
    interrupted: bool = False


class ModelHost:
    """The one model in memory and the Engine over it. Only the queue's worker calls into it."""

    def __init__(
        self,
        registry: ModelRegistry,
        options: Options,
        state: State,
        *,
        device: str | torch.device = "cpu",
        precision: PrecisionPolicy | None = None,
        engine_factory: Callable[[Any], Engine] | None = None,
        networks: NetworkFolders | None = None,
        disable_nan_check: bool = False,
        style_db: StyleDatabase | None = None,
        upscalers: Upscalers | None = None,
    ) -> None:
        """``device`` is resolved here (:class:`~voidprompt.errors.DeviceError` when it does not
        exist); ``precision`` defaults to ``auto`` on it."""
        self.registry = registry
        self.options = options
        self.state = state
        self.device = resolve_device(device)
        self.precision = precision or resolve_precision("auto", self.device)
        self.networks = networks or NetworkFolders()
        self.disable_nan_check = disable_nan_check
        self.style_db = style_db
        self.upscalers = upscalers
        self.engine_factory = engine_factory or self.make_engine
        self.selected: CheckpointEntry | None = registry.checkpoints[0] if registry.checkpoints else None
        self.selected_vae: str = "Automatic"
        self.loaded: tuple[CheckpointEntry, VaeEntry | None] | None = None
        self.engine: Engine | None = None

    def make_engine(self, components: Any) -> Engine:
        """An Engine over ``components`` with the server's embeddings, LoRA and hypernetwork folders."""
        engine = Engine(
            components,
            lora_dir=self.networks.lora_dir,
            hypernet_dir=self.networks.hypernetwork_dir,
            disable_nan_check=self.disable_nan_check,
            style_db=self.style_db,
            refiner_loader=self.load_refiner,
            upscalers=self.upscalers,
        )
        self._give_embeddings(engine)
        return engine

    def load_refiner(self, name: str) -> Any:
        """The components of the checkpoint a request names as ``refiner_checkpoint`` (any of A1111's
        aliases; NotFoundError lists the titles), on the server's device and precision, with its own
        VAE. The Engine keeps it beside the main model until the main model is replaced."""
        entry = self.registry.find(name)
        return load_model(entry.path, device=self.device, precision=self.precision)

    def _give_embeddings(self, engine: Engine) -> None:
        tokenizer = engine.components.tokenizer
        engine.give_embeddings(
            lambda width, part: self.networks.embedding_database(tokenizer, width, sdxl_part=part)
        )

    def reload_embeddings(self) -> None:
        """Give the model in memory the embeddings now on disk (run on the queue's worker)."""
        if self.engine is not None:
            self._give_embeddings(self.engine)

    def select(self, name: str) -> CheckpointEntry:
        """Pick the checkpoint by an A1111 alias (raises NotFoundError listing the titles)."""
        self.selected = self.registry.find(name)
        return self.selected

    def require_selected(self) -> CheckpointEntry:
        if self.selected is None:
            raise NotFoundError(
                "no checkpoint is available; put a .safetensors or .ckpt file in --ckpt-dir and POST "
                "/sdapi/v1/refresh-checkpoints"
            )
        return self.selected

    def ensure_loaded(self, entry: CheckpointEntry, vae: VaeEntry | None) -> Engine:
        """Load ``entry`` (with ``vae``) unless it is already the model in memory."""
        if self.engine is not None and self.loaded == (entry, vae):
            return self.engine
        if self.engine is not None:
            # A1111's auto_vae_precision: once a half decode overflowed, VAEs stay float32 for the
            # rest of the process, the next model's included.
            self.precision = self.precision.with_vae(self.engine.components.precision.vae)
        # Drop the old model first: one model in memory at a time, never two.
        self.engine = None
        self.loaded = None
        components = load_model(
            entry.path,
            vae_path=vae.path if vae is not None else None,
            device=self.device,
            precision=self.precision,
        )
        self.engine = self.engine_factory(components)
        self.loaded = (entry, vae)
        log.info("loaded %s", entry.title)
        return self.engine

    def generate(self, job: str, built: BuiltRequest, *, first_iteration: int | None = None) -> Generated:
        """Run ``built`` (on the worker thread); A1111's skip and interrupt act per iteration.

        With ``first_iteration`` the run is one part of a job its caller has begun and will end (the
        X/Y/Z plot's cells share one job, so the progress counts all of them and an interrupt also
        stops the cells after it): its iterations are numbered from there.
        """
        entry = self.registry.find(built.model) if built.model else self.require_selected()
        vae_name = built.vae if built.vae is not None else self.selected_vae
        vae = self.registry.find_vae(vae_name)
        engine = self.ensure_loaded(entry, vae)
        if built.persist:
            if "sd_model_checkpoint" in built.persist:
                self.selected = entry
            if "sd_vae" in built.persist:
                self.selected_vae = built.persist["sd_vae"]
            self.options.update(built.persist)

        request = built.request
        state = self.state
        own_job = first_iteration is None
        if own_job:
            state.begin(job, request.n_iter)
        try:

            def on_progress(event: Progress) -> None:
                with state.lock:
                    state.sampling_step = event.step
                    state.sampling_steps = event.steps
                    state.textinfo = f"Sampling step {event.step}/{event.steps}"
                    # The first image of the batch, on the CPU, for the live preview.
                    state.latent = event.latent[:1].detach().to("cpu", copy=True)

            def before_iteration(n: int) -> bool:
                with state.lock:
                    state.job_no = n + (first_iteration or 0)
                    state.sampling_step = 0
                    state.skipped = False  # skip drops one iteration only, as A1111's
                    return not state.interrupted

            def should_stop() -> bool:
                return state.interrupted or state.skipped

            hooks = GenerationHooks(on_progress, should_stop, before_iteration)
            result = engine.generate(request, hooks, explain=built.explain)
            assert result.request is not None
            return Generated(
                result=result,
                request=result.request,
                checkpoint=entry,
                vae=vae,
                job_timestamp=state.job_timestamp,
                is_inpainting=engine.components.is_inpainting,
                interrupted=result.interrupted,
            )
        finally:
            if own_job:
                state.end()


# Keys A1111 writes from fixed attributes; the rest of an image's params are extra_generation_params.
_BASE_INFOTEXT_KEYS = frozenset(KEY_ORDER) | frozenset(TRAILING_KEYS)


def processed_info(generated: Generated) -> dict[str, Any]:
    """A1111's ``Processed.js()`` for a finished request."""
    r = generated.request
    result = generated.result
    first_params = result.params[0] if result.params else {}
    vae = generated.vae
    return {
        # A1111 reports the first image's prompts: with styles applied, not the request's text.
        "prompt": result.prompts[0] if result.prompts else r.prompt,
        "all_prompts": result.prompts,
        "negative_prompt": result.negative_prompts[0] if result.negative_prompts else r.negative_prompt,
        "all_negative_prompts": result.negative_prompts,
        "seed": result.seeds[0] if result.seeds else r.seed,
        "all_seeds": result.seeds,
        "subseed": result.subseeds[0] if result.subseeds else r.subseed,
        "all_subseeds": result.subseeds,
        "subseed_strength": r.subseed_strength,
        "width": r.width,
        "height": r.height,
        "sampler_name": r.sampler_name,
        "cfg_scale": r.cfg_scale,
        "steps": r.steps,
        "batch_size": r.batch_size,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": generated.checkpoint.stem,
        "sd_model_hash": generated.checkpoint.shorthash,
        "sd_vae_name": _vae_display_name(vae),
        "sd_vae_hash": vae.sha256[:10] if vae is not None else None,
        "seed_resize_from_w": r.seed_resize_from_w,
        "seed_resize_from_h": r.seed_resize_from_h,
        "denoising_strength": r.denoising_strength,
        "extra_generation_params": {k: v for k, v in first_params.items() if k not in _BASE_INFOTEXT_KEYS},
        "index_of_first_image": 0,
        "infotexts": result.infotexts,
        "styles": list(r.styles),
        "job_timestamp": generated.job_timestamp,
        "clip_skip": r.clip_skip,
        "is_using_inpainting_conditioning": generated.is_inpainting,
        "version": f"voidprompt-{__version__}",
        "interrupted": generated.interrupted,
    }


def _vae_display_name(vae: VaeEntry | None) -> str | None:
    if vae is None:
        return None
    return vae.name.rsplit("/", 1)[-1]


def known_samplers() -> str:
    return ", ".join(sampler_labels())
