"""Pydantic schemas of the HTTP API: A1111's field names, defaults and response shapes.

The request models follow A1111's ``StableDiffusionTxt2ImgProcessingAPI`` /
``StableDiffusionImg2ImgProcessingAPI`` (fields of the processing classes plus the API extras:
sampler_index, script_name, script_args, send_images, save_images, alwayson_scripts, infotext).
Unknown fields are ignored, as A1111's generated pydantic models do, so clients written for newer
or extended A1111 versions keep working. Defaults are A1111's API defaults (steps 50, sampler_index
"Euler"), not voidprompt's UI defaults.
"""

from __future__ import annotations

import functools
import math
import types
import typing
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator


class _Lenient(BaseModel):
    # extra="ignore": A1111's models drop unknown fields; clients send extension fields freely.
    model_config = ConfigDict(extra="ignore")


class Txt2ImgRequest(_Lenient):
    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    denoising_strength: float | None = None
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = False
    firstpass_image: str | None = None
    comments: dict[str, Any] | None = None
    enable_hr: bool = False
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    force_task_id: str | None = None
    # API extras.
    sampler_index: str = Field("Euler", description="used only when sampler_name is absent")
    script_name: str | None = None
    script_args: list[Any] = Field(default_factory=list)
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    infotext: str | None = Field(None, description="an infotext whose parameters pre-fill unset fields")

    @field_validator("*", mode="before")
    @classmethod
    def _truncate_fractions(cls, value: Any, info: ValidationInfo) -> Any:
        # A1111's pydantic v1 models turn a number into a whole-number field with int(), which
        # truncates (aiyabot sends hr_second_pass_steps 12.5); pydantic v2 would refuse it.
        if isinstance(value, float) and math.isfinite(value) and info.field_name in _int_fields(cls):
            return int(value)
        return value


@functools.cache
def _int_fields(model: type[BaseModel]) -> frozenset[str]:
    """The fields of ``model`` whose type is ``int`` or ``int | None``."""

    def whole(hint: Any) -> bool:
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            return {a for a in typing.get_args(hint) if a is not type(None)} == {int}
        return hint is int

    return frozenset(name for name, f in model.model_fields.items() if whole(f.annotation))


class Img2ImgRequest(Txt2ImgRequest):
    init_images: list[str] | None = Field(None, description="base64 images (data: URLs accepted)")
    resize_mode: int = 0
    image_cfg_scale: float | None = None
    mask: str | None = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: int | None = None
    mask_round: bool = True
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool = False
    denoising_strength: float | None = 0.75


class GenerationResponse(BaseModel):
    images: list[str] | None = Field(None, description="base64 PNGs carrying the infotext")
    parameters: dict[str, Any]
    info: str = Field(description="a JSON string with A1111's Processed.js() keys")


# voidprompt's own generation routes: A1111's bodies plus what A1111 has no field for.

MAX_VAE_CALLS = 8  # each is a full VAE decode per image


class ExplainRequest(_Lenient):
    per_token: bool = Field(False, description="keep a map per prompt token too, not only per tag")
    preview_every: int = Field(
        4, ge=0, le=1000, description="a trajectory preview every k-th denoiser call and the last (0: none)"
    )
    vae_calls: list[Annotated[int, Field(ge=0, le=100_000)]] = Field(
        default_factory=list,
        max_length=MAX_VAE_CALLS,
        description="denoiser calls (0-based) whose guided prediction the full VAE decodes too",
    )


class _Explained(BaseModel):
    explain: ExplainRequest | None = Field(
        None, description="capture attention maps, the guidance decomposition and the trajectory"
    )


class VoidpromptTxt2ImgRequest(Txt2ImgRequest, _Explained):
    pass


class VoidpromptImg2ImgRequest(Img2ImgRequest, _Explained):
    pass


class ExplanationRef(BaseModel):
    id: str
    url: str = Field(description="the explanation's description; its pictures are under it")
    image: int = Field(description="the image's index in images")
    seed: int


class VoidpromptGenerationResponse(GenerationResponse):
    explanations: list[ExplanationRef] = Field(
        default_factory=list, description="one per image when explain was set, in image order"
    )


class PngInfoRequest(_Lenient):
    image: str = Field(description="base64 image (PNG, JPEG, WebP; data: URLs accepted)")


class PngInfoResponse(BaseModel):
    info: str
    items: dict[str, Any] = Field(default_factory=dict)
    parameters: dict[str, Any] = Field(default_factory=dict)


class ProgressState(BaseModel):
    skipped: bool = False
    interrupted: bool = False
    stopping_generation: bool = False
    job: str = ""
    job_count: int = 0
    job_timestamp: str = "0"
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0
    queued: int = Field(0, description="voidprompt: jobs waiting behind the current one")


class ProgressResponse(BaseModel):
    progress: float
    eta_relative: float
    state: ProgressState
    current_image: str | None = None
    textinfo: str | None = None


class SamplerItem(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, Any]


class SchedulerItem(BaseModel):
    name: str
    label: str
    aliases: list[str] | None
    default_rho: float
    need_inner_model: bool


class SDModelItem(BaseModel):
    title: str
    model_name: str
    hash: str | None
    sha256: str | None
    filename: str
    config: str | None = None
    family: str | None = Field(
        None,
        description="voidprompt: the model family read from the file's tensor shapes (sd1, sd1-inpaint, "
        "sdxl, sdxl-refiner, sdxl-inpaint, sd2, sd2-v); null when the file cannot be read",
    )
    native_size: int | None = Field(
        None,
        description="voidprompt: the picture side the model was trained at (SD1 512, SDXL 1024, or the "
        "file's voidprompt.arch metadata); null when the file cannot be read",
    )


class SDVaeItem(BaseModel):
    model_name: str
    filename: str


class UpscalerItem(BaseModel):
    name: str
    model_name: str | None = None
    model_path: str | None = None
    model_url: str | None = None
    scale: float | None = None


class LatentUpscalerModeItem(BaseModel):
    name: str


class PromptStyleItem(BaseModel):
    name: str
    prompt: str | None
    negative_prompt: str | None


class EmbeddingItem(BaseModel):
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None
    shape: int
    vectors: int


class EmbeddingsResponse(BaseModel):
    loaded: dict[str, EmbeddingItem]
    skipped: dict[str, EmbeddingItem]


class LoraItem(BaseModel):
    name: str
    alias: str = Field(description="the metadata's ss_output_name, else the name")
    path: str
    metadata: dict[str, Any] = Field(
        description="the safetensors header's __metadata__ (JSON values decoded)"
    )


class HypernetworkItem(BaseModel):
    name: str
    path: str


class ScriptsList(BaseModel):
    txt2img: list[str] = Field(default_factory=list)
    img2img: list[str] = Field(default_factory=list)


class MemoryResponse(BaseModel):
    ram: dict[str, Any]
    cuda: dict[str, Any]


class ErrorResponse(BaseModel):
    error: str
    detail: str
    body: str = ""
    errors: str = ""


# ------------------------------------------------------------------------------ voidprompt routes


class TokensRequest(_Lenient):
    text: str = ""
    emphasis: str = "Original"
    comma_padding_backtrack: int = 20


class TokenChunk(BaseModel):
    tokens: int
    padding: int


class TokensResponse(BaseModel):
    token_count: int
    target: int = Field(description="75, 150, ...: the counter A1111 shows as token_count/target")
    chunks: list[TokenChunk]
    report: str


class StudyItem(BaseModel):
    id: str
    name: str
    study_file: str | None
    catalog: str | None
    images: int
    jobs: int
    labeled: int
    classes: list[str]
    axes: list[str]
    running: bool


class LabelValue(BaseModel):
    label_class: str | None
    tags: list[str] = Field(default_factory=list)


class LabelPut(_Lenient):
    label_class: str | None = Field(description="one of the study's classes; null clears it")
    tags: list[str] = Field(default_factory=list)
    source: str = "human"


class StudyImage(BaseModel):
    id: int
    job_id: str
    url: str
    seed: int
    width: int
    height: int
    axis_values: dict[str, Any]
    labels: dict[str, LabelValue]
    label: str | None = Field(description="the effective label: a person's, else a labeler's")
    label_source: str | None


class StudyImagesResponse(BaseModel):
    study: str
    total: int = Field(description="images matching the filters, before offset/limit")
    labeled: int = Field(description="images with a human label, of all the study's images")
    all_images: int
    classes: list[str]
    axes: dict[str, list[Any]] = Field(description="every axis and its values, in study order")
    images: list[StudyImage]


class StudyImageDetail(StudyImage):
    infotext: str
    settings: dict[str, Any]
    measures: Mapping[str, float | None]
    explanation_url: str | None = Field(
        None, description="the image's explanation (NAME.explain.npz beside it), when it has one"
    )


class ReportFigure(BaseModel):
    name: str
    kind: str = Field(description="grid (image grid page), plot (measures by axis), outcomes, or figure")
    url: str
    svg_url: str | None = None


class ReportFile(BaseModel):
    name: str
    url: str


class ReportResponse(BaseModel):
    study: str
    generated: str = Field(description="when the report was built (UTC, ISO 8601)")
    built: bool = Field(description="true when this request built it (it was missing or out of date)")
    html_url: str | None = Field(description="the lab's self-contained report.html")
    figures: list[ReportFigure] = Field(description="PNG figures in report order; SVG beside each plot")
    files: list[ReportFile] = Field(description="report.html and the CSV / Parquet exports")


class RunStatus(BaseModel):
    study: str
    running: bool
    returncode: int | None = None
    log_tail: str = ""
