"""Study files (TOML) -> a grid of generation jobs.

A study names the model, the fixed settings (any ``GenerationRequest`` field), the prompts with
variables such as ``{W}``, and axes. N axes expand to their full grid (the first axis outermost);
``[[points]]`` lists explicit combinations, each crossed with the grid. ``docs/study-format.md``
is the reference for every section and key; :mod:`voidprompt.lab.schema` reads and checks them
(every mistake is a :class:`StudyError` naming the file, the field and the fix), and this module
expands the result into jobs.

Example::

    [study]
    name = "pure-negative"
    master_seed = 1234            # random seeds are drawn from it, so a rerun expands identically

    [settings]
    steps = 28
    clip_skip = 2

    [prompt]
    positive = ""
    negative_step = { tags = "lowres, bad anatomy, text", weight = "{W}" }

    [axes]
    seed = "8 random"
    size = "1:1 @ 1, 4:3 @ 1.5, 512x768"
    W = "0.9, 1.0, 1.1"

    [cfg_by_area]                 # used because no axis or setting gives cfg_scale
    points = [[1.0, 12], [2.25, 30]]
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import re
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from voidprompt.errors import InvalidRequestError, PromptError, StudyError
from voidprompt.lab import axes as ax
from voidprompt.lab.schema import (
    PLACEHOLDER,
    PONY_QUALITY,
    Axis,
    ModelRef,
    StudyFile,
    expand_pony_quality,
    format_value,
    read_study_file,
    seed_axes,
)
from voidprompt.lab.selection import matches
from voidprompt.pipeline.hires import hires_target
from voidprompt.request import MAX_SIDE, GenerationRequest
from voidprompt.sampling.registry import resolve


@dataclass(frozen=True)
class Job:
    """One image to generate. ``job_id`` is stable: the same study expands to the same ids."""

    job_id: str
    axis_values: dict[str, Any]
    request: GenerationRequest
    model: ModelRef = field(default_factory=ModelRef)

    def __hash__(self) -> int:
        # The id already covers every field; hashing the axis-values dict would fail.
        return hash(self.job_id)


@dataclass(frozen=True)
class Study(StudyFile):
    """A validated study file (see :class:`voidprompt.lab.schema.StudyFile`) and its jobs."""

    def expand(self) -> list[Job]:
        """Every job of the study: each [[point]] (or none) crossed with the full grid of [axes]."""
        point_grids = [_grid(point) for point in self.points] or [[()]]
        grid = _grid(self.axes)
        jobs = []
        seen: set[str] = set()
        for point_grid in point_grids:
            for point_part in point_grid:
                for grid_part in grid:
                    job = self._resolve(point_part + grid_part)
                    if job.job_id in seen:
                        raise StudyError(
                            f"{self.path}: two combinations give the same job ({job.axis_values}); "
                            "remove the repeated value from [axes] or [[points]]"
                        )
                    seen.add(job.job_id)
                    jobs.append(job)
        return jobs

    def captures(self, jobs: Sequence[Job]) -> frozenset[str]:
        """The ids of ``jobs`` that capture an explanation when generated (see
        :class:`voidprompt.lab.schema.ExplainSpec`); none without an ``[explain]`` section."""
        spec = self.explain
        if spec is None:
            return frozenset()
        seeds: set[Any] | None = None
        if spec.seeds is not None:
            axes = seed_axes(self.axes, self.points)
            seeds = {value for axis in axes for value in axis.values[: spec.seeds]}
        chosen = set()
        for job in jobs:
            row = {**job.axis_values, "width": job.request.width, "height": job.request.height}
            if matches(row, spec.where) and (seeds is None or job.request.seed in seeds):
                chosen.add(job.job_id)
        return frozenset(chosen)

    def _resolve(self, choice: Sequence[tuple[Axis, Any]]) -> Job:
        fields: dict[str, Any] = dict(self.settings)
        variables: dict[str, Any] = dict(self.variables)
        templates = {"prompt": self.positive, "negative_prompt": self.negative}
        checkpoint, vae = self.model.checkpoint, self.model.vae
        replacements: list[tuple[Axis, str]] = []
        record: dict[str, Any] = {}
        for axis, value in choice:
            if axis.kind == "field":
                fields[axis.target] = value
                record[axis.name] = value
            elif axis.kind == "size":
                fields["width"], fields["height"] = value.width, value.height
                record[axis.name] = value.label
                if value.spec != value.label:
                    record[f"{axis.name}_spec"] = value.spec
            elif axis.kind == "model":
                if axis.target == "checkpoint":
                    checkpoint = value
                else:
                    vae = value
                record[axis.name] = value
            elif axis.kind == "prompt":
                templates[axis.target] = value
                record[axis.name] = value
            elif axis.kind == "prompt_sr":
                replacements.append((axis, value))
                record[axis.name] = value
            else:
                variables[axis.target] = value
                record[axis.name] = value
        prompt = _substitute(templates["prompt"], variables)
        negative = _substitute(templates["negative_prompt"], variables)
        for axis, value in replacements:
            try:
                prompt, negative = ax.apply_prompt_sr(prompt, negative, axis.values[0], value)
            except StudyError as error:
                raise StudyError(f"{self.path}: [axes] {axis.name}: {error}") from None
        styles = fields.pop("styles", ())
        if styles:
            prompt, negative = self._styled(prompt, negative, styles, record)
        if self.cfg_by_area is not None and "cfg_scale" not in fields:
            fields["cfg_scale"] = self.cfg_by_area.cfg(fields.get("width", 512), fields.get("height", 512))
        for seed_field in ("seed", "subseed"):
            # A1111's fix_seed: one random seed for the whole grid, here drawn from the master seed.
            if fields.get(seed_field, -1) == -1:
                fields[seed_field] = ax.derived_rng(self.master_seed, f"fixed {seed_field}").randrange(
                    ax.SEED_SPAN
                )
        request = GenerationRequest(prompt=prompt, negative_prompt=negative, **fields)
        try:
            request.validate()
            # Unknown sampler or schedule names fail here, before any weights load (as A1111's X/Y/Z
            # plot confirms its samplers before the first image).
            resolve(request.sampler_name, request.scheduler)
            if request.enable_hr:
                hr_sampler = request.hr_sampler_name or request.sampler_name
                resolve(hr_sampler, request.hr_scheduler or request.scheduler)
                target = hires_target(request)
                if max(target.upscale_width, target.upscale_height) > MAX_SIDE:
                    raise InvalidRequestError(
                        f"the hires fix goes to {target.upscale_width}x{target.upscale_height}: a side "
                        f"is over the limit of {MAX_SIDE} pixels; lower hr_scale or hr_resize_x/y"
                    )
        except InvalidRequestError as error:
            raise StudyError(f"{self.path}: the job {record} is not a valid request: {error}") from None
        model = ModelRef(checkpoint, vae)
        return Job(job_id=job_id(request, record, model), axis_values=record, request=request, model=model)

    def _styled(
        self, prompt: str, negative: str, styles: Sequence[str], record: Mapping[str, Any]
    ) -> tuple[str, str]:
        """The prompts with ``styles`` applied by A1111's rules, after prompt S/R as in its X/Y/Z
        plot. The job then carries the styled text and no style names: its picture and infotext are
        those of the styled prompt sent with ``styles``, and the runner needs no styles file."""
        if self.style_db is None:
            raise StudyError(
                f"{self.path}: the job {dict(record)} names the styles {list(styles)} but the study has "
                'no styles file; add styles_file = "styles.csv" to [prompt]'
            )
        try:
            return (
                self.style_db.apply_styles_to_prompt(prompt, styles),
                self.style_db.apply_negative_styles_to_prompt(negative, styles),
            )
        except PromptError as error:
            raise StudyError(f"{self.path}: [prompt] styles_file: {error}") from None


def load_study(path: str | Path) -> Study:
    """Read and validate a study file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise StudyError(f"{path}: cannot read the study file: {error.strerror}") from None
    return parse_study(text, path)


def parse_study(text: str, path: str | Path = "<study>") -> Study:
    """Validate study TOML ``text``; ``path`` names it in errors and anchors relative file names."""
    file = read_study_file(text, Path(path))
    return Study(**{f.name: getattr(file, f.name) for f in dataclasses.fields(file)})


def _grid(axes: Sequence[Axis]) -> list[tuple[tuple[Axis, Any], ...]]:
    return list(itertools.product(*[[(axis, value) for value in axis.values] for axis in axes]))


def _substitute(template: str, variables: Mapping[str, Any]) -> str:
    if PONY_QUALITY in variables:
        template = expand_pony_quality(template, variables[PONY_QUALITY])

    # Only declared variables are replaced: NovelAI prompts use {tag} for emphasis.
    def replace(match: re.Match[str]) -> str:
        name = match[1]
        return format_value(variables[name]) if name in variables else match[0]

    return PLACEHOLDER.sub(replace, template)


def request_to_dict(request: GenerationRequest) -> dict[str, Any]:
    """Every request field as JSON-ready values (tuples -> lists); images are not recorded."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(request):
        if f.name in ("init_images", "mask"):
            continue
        value = getattr(request, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


# The request fields every job id has hashed from the first catalog on. A field added to the request
# later joins a job's identity only when it differs from its default, so adding one (with a default
# that keeps today's pictures) leaves every existing catalog's job ids - and its resume - intact.
JOB_ID_FIELDS_V1 = frozenset(
    {
        "prompt", "negative_prompt", "styles", "seed", "subseed", "subseed_strength", "seed_resize_from_h",
        "seed_resize_from_w", "sampler_name", "scheduler", "steps", "cfg_scale", "width", "height",
        "batch_size", "n_iter", "eta", "s_churn", "s_tmin", "s_tmax", "s_noise", "s_min_uncond",
        "sigma_min", "sigma_max", "rho", "always_discard_next_to_last_sigma", "sgm_noise_multiplier",
        "clip_skip", "eta_noise_seed_delta", "randn_source", "emphasis", "comma_padding_backtrack",
        "pad_cond_uncond", "pad_cond_uncond_v0", "use_old_scheduling", "use_downcasted_alpha_bar",
        "use_old_karras_scheduler_sigmas", "batch_cond_uncond", "resize_mode", "denoising_strength",
        "mask_blur_x", "mask_blur_y", "mask_round", "inpainting_fill", "inpaint_full_res",
        "inpaint_full_res_padding", "inpainting_mask_invert", "initial_noise_multiplier",
        "inpainting_mask_weight", "enable_hr", "hr_scale", "hr_upscaler", "hr_second_pass_steps",
        "hr_resize_x", "hr_resize_y", "hr_sampler_name", "hr_scheduler", "hr_prompt", "hr_negative_prompt",
        "extra_generation_params"
    }
)


_REQUEST_DEFAULTS = request_to_dict(GenerationRequest())


def _identity_fields(request: GenerationRequest) -> dict[str, Any]:
    fields = request_to_dict(request)
    defaults = _REQUEST_DEFAULTS
    return {
        name: value
        for name, value in fields.items()
        if name in JOB_ID_FIELDS_V1 or value != defaults.get(name)
    }


def job_id(request: GenerationRequest, axis_values: Mapping[str, Any], model: ModelRef) -> str:
    """A hash of everything that determines the image and its place in the study."""
    identity = {
        "model": {"checkpoint": model.checkpoint, "vae": model.vae},
        "request": _identity_fields(request),
        "axes": dict(axis_values),
    }
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


# ---------------------------------------------------------------------------------------- summary


@dataclass(frozen=True)
class StudySummary:
    """What ``voidprompt study check`` prints."""

    name: str
    jobs: int
    shapes: dict[tuple[int, int], int]
    prompts: int  # distinct (prompt, negative prompt) pairs
    prompt_texts: int  # distinct texts to encode
    megapixels: float
    estimated_seconds: float | None
    axes: dict[str, int]
    axis_values: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    done: int = 0  # jobs the catalog already has a picture of; the estimate is for the others

    def format(self) -> str:
        lines = [f"study {self.name}: {self.jobs} jobs"]
        if self.axes:
            lines.append("axes: " + ", ".join(f"{name} ({n})" for name, n in self.axes.items()))
            lines += [f"  {name}: {_listed(values)}" for name, values in self.axis_values.items()]
        lines.append(f"shapes: {len(self.shapes)}")
        lines += [f"  {w}x{h}: {n} jobs" for (w, h), n in sorted(self.shapes.items())]
        lines.append(f"prompts: {self.prompts} distinct pairs, {self.prompt_texts} distinct texts to encode")
        lines.append(f"pixels: {self.megapixels:.2f} MP in all")
        if self.estimated_seconds is not None:
            minutes, seconds = divmod(round(self.estimated_seconds), 60)
            hours, minutes = divmod(minutes, 60)
            left = self.jobs - self.done
            jobs = f"{left} pending job{'s' * (left != 1)}"
            pending = f" for the {jobs} ({self.done} done)" if self.done else ""
            lines.append(f"estimated time: {hours}h {minutes:02d}m {seconds:02d}s{pending}")
        return "\n".join(lines)


def _listed(values: Sequence[Any], most: int = 12) -> str:
    """An axis's values as check prints them: the first ``most`` and how many there are in all."""
    shown = ", ".join(_shown(v) for v in values[:most])
    return shown if len(values) <= most else f"{shown}, ... ({len(values)} in all)"


def _shown(value: Any) -> str:
    """A size as the pixels it expands to (with the spec it came from when that differs)."""
    if isinstance(value, ax.SizeValue):
        size = f"{value.width}x{value.height}"
        return size if value.spec == size else f"{size} ({value.spec})"
    return format_value(value)


def summarize(
    study: Study,
    seconds_per_pixel: float | None = None,
    reference_steps: int | None = None,
    done: Collection[str] = (),
) -> StudySummary:
    """Count jobs, shapes and prompts; estimate the run time from seconds per image pixel.

    With ``reference_steps`` the figure is taken as measured at that many steps and scaled
    linearly by each job's steps (sampling time is proportional to steps). Jobs whose id is in
    ``done`` (already in the catalog) count everywhere but in the estimate.
    """
    jobs = study.expand()
    shapes = Counter((j.request.width, j.request.height) for j in jobs)
    pairs = {(j.request.prompt, j.request.negative_prompt) for j in jobs}
    texts = {t for pair in pairs for t in pair}
    pixels = sum(j.request.width * j.request.height * j.request.total_images for j in jobs)
    estimate = None
    if seconds_per_pixel is not None:
        estimate = sum(
            j.request.width
            * j.request.height
            * j.request.total_images
            * seconds_per_pixel
            * (j.request.steps / reference_steps if reference_steps else 1.0)
            for j in jobs
            if j.job_id not in done
        )
    axes = {a.name: len(a.values) for a in study.axes}
    values = {a.name: tuple(a.values) for a in study.axes}
    for i, point in enumerate(study.points):
        axes.update({f"point {i + 1} {a.name}": len(a.values) for a in point})
        values.update({f"point {i + 1} {a.name}": tuple(a.values) for a in point})
    finished = sum(1 for j in jobs if j.job_id in done)
    return StudySummary(
        study.name, len(jobs), dict(shapes), len(pairs), len(texts), pixels / 1e6, estimate, axes,
        values, finished,
    )  # fmt: skip
