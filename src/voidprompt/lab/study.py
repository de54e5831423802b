"""Study files (TOML) -> a grid of generation jobs.

A study names the model, the fixed settings (any ``GenerationRequest`` field), the prompts with
variables such as ``{W}``, and axes. N axes expand to their full grid (the first axis outermost);
``[[points]]`` lists explicit combinations, each crossed with the grid. See ``docs/design.md``
("lab") for the format; every mistake is a :class:`StudyError` naming the file, the field and
the fix.

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
import difflib
import functools
import hashlib
import itertools
import json
import re
import tomllib
import types
import typing
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from voidprompt.errors import InvalidRequestError, StudyError
from voidprompt.lab import axes as ax
from voidprompt.request import GenerationRequest

MINIATURE = "miniature"

_SECTIONS = (
    "study", "model", "settings", "prompt", "variables", "axes", "points", "cfg_by_area", "run", "labels",
    "report",
)  # fmt: skip
_STUDY_KEYS = ("name", "description", "master_seed")
_MODEL_KEYS = ("checkpoint", "vae")
_PROMPT_KEYS = ("positive", "negative", "positive_step", "negative_step")
_STEP_KEYS = ("tags", "weight")
_CFG_KEYS = ("points", "mode", "unit", "base")
# Request fields a study may not set: jobs are one image each (the runner batches them), the
# prompts live in [prompt], and images / masks / free-form extras are not txt2img settings.
_NOT_SETTINGS = {
    "batch_size": "each job is one image; the runner's batch size is set with `study run --batch-size`",
    "n_iter": 'each job is one image; add a seed axis (e.g. seed = "8 random") for more images',
    "prompt": "write the prompt in [prompt] positive",
    "negative_prompt": "write the negative prompt in [prompt] negative",
    "init_images": "studies are txt2img only",
    "mask": "studies are txt2img only",
    "extra_generation_params": "it is filled in by the runner",
}
# Axis names with a meaning of their own, beyond the request fields.
_SIZE_AXES = ("size", "sizes")
_SEED_AXES = {"seed": "seed", "seeds": "seed", "subseed": "subseed", "subseeds": "subseed"}
_MODEL_AXES = {"checkpoint": "checkpoint", "model": "checkpoint", "vae": "vae"}
_PROMPT_AXES = ("prompt", "negative_prompt", "prompt_matrix", "prompts_file")
_SR_AXES = ("prompt_sr", "Prompt S/R")
_ALIASES = {
    "cfg": "cfg_scale",
    "CFG Scale": "cfg_scale",
    "sampler": "sampler_name",
    "Sampler": "sampler_name",
    "Steps": "steps",
    "Clip skip": "clip_skip",
    "Seed": "seed",
    "Size": "size",
}
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class ModelRef:
    """The checkpoint and VAE of a job; ``checkpoint=None`` is the shipped miniature model."""

    checkpoint: str | None = None
    vae: str | None = None

    @property
    def is_miniature(self) -> bool:
        return self.checkpoint is None


@dataclass(frozen=True)
class Job:
    """One image to generate. ``job_id`` is stable: the same study expands to the same ids."""

    job_id: str
    axis_values: dict[str, Any]
    request: GenerationRequest
    model: ModelRef = ModelRef()

    def __hash__(self) -> int:
        # The id already covers every field; hashing the axis-values dict would fail.
        return hash(self.job_id)


@dataclass(frozen=True)
class Axis:
    """One swept quantity: ``kind`` says what its values change, ``target`` which thing."""

    name: str
    kind: str  # field | size | model | prompt | prompt_sr | variable
    target: str
    values: tuple[Any, ...]


@dataclass(frozen=True)
class CfgByArea:
    """A piecewise table area -> cfg_scale (the seed's "stable CFG grows with area")."""

    points: tuple[tuple[float, float], ...]
    mode: str = "linear"  # linear interpolation between points, clamped; or "step"
    unit: str = "base"  # area in multiples of base^2, or "megapixels"
    base: int = 512

    def area_of(self, width: int, height: int) -> float:
        if self.unit == "megapixels":
            return width * height / 1_000_000
        return width * height / (self.base * self.base)

    def cfg(self, width: int, height: int) -> float:
        area = self.area_of(width, height)
        xs = [x for x, _ in self.points]
        if area <= xs[0]:
            return self.points[0][1]
        if area >= xs[-1]:
            return self.points[-1][1]
        upper = next(i for i, x in enumerate(xs) if x > area)
        (x0, y0), (x1, y1) = self.points[upper - 1], self.points[upper]
        if self.mode == "step":
            return y0
        return y0 + (y1 - y0) * (area - x0) / (x1 - x0)


@dataclass(frozen=True)
class Study:
    path: Path
    name: str
    description: str
    toml_text: str
    master_seed: int
    model: ModelRef
    settings: Mapping[str, Any]
    positive: str
    negative: str
    variables: Mapping[str, Any]
    axes: tuple[Axis, ...]
    points: tuple[tuple[Axis, ...], ...]
    cfg_by_area: CfgByArea | None
    run_options: Mapping[str, Any] = field(default_factory=dict)
    # [labels] and [report] are validated by voidprompt.lab.labels / voidprompt.lab.report.
    label_options: Mapping[str, Any] = field(default_factory=dict)
    report_options: Mapping[str, Any] = field(default_factory=dict)

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
                    checkpoint = None if value == MINIATURE else value
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
        except InvalidRequestError as error:
            raise StudyError(f"{self.path}: the job {record} is not a valid request: {error}") from None
        model = ModelRef(checkpoint, vae)
        return Job(job_id=job_id(request, record, model), axis_values=record, request=request, model=model)


def _grid(axes: Sequence[Axis]) -> list[tuple[tuple[Axis, Any], ...]]:
    return list(itertools.product(*[[(axis, value) for value in axis.values] for axis in axes]))


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        # Ranges carry binary noise (0.30000000000000004); A1111 rounds to 8 places for labels too.
        return repr(round(value, 8))
    return str(value)


def _substitute(template: str, variables: Mapping[str, Any]) -> str:
    # Only declared variables are replaced: NovelAI prompts use {tag} for emphasis.
    def replace(match: re.Match[str]) -> str:
        name = match[1]
        return _format_value(variables[name]) if name in variables else match[0]

    return _PLACEHOLDER.sub(replace, template)


def weight_tags(tags: str, weight: str) -> str:
    """The author's ``node step [ratio]``: ``a, b`` -> ``(a:W), (b:W)``; empty tags are dropped."""
    return ", ".join(f"({tag}:{weight})" for tag in (t.strip() for t in tags.split(",")) if tag)


def request_to_dict(request: GenerationRequest) -> dict[str, Any]:
    """Every request field as JSON-ready values (tuples -> lists); images are not recorded."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(request):
        if f.name in ("init_images", "mask"):
            continue
        value = getattr(request, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def job_id(request: GenerationRequest, axis_values: Mapping[str, Any], model: ModelRef) -> str:
    """A hash of everything that determines the image and its place in the study."""
    identity = {
        "model": {"checkpoint": model.checkpoint, "vae": model.vae},
        "request": request_to_dict(request),
        "axes": dict(axis_values),
    }
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


# ----------------------------------------------------------------------------------------- loading


@functools.cache
def _field_kinds() -> dict[str, str]:
    """Request field -> the parser its values need (int, float, str, bool, styles)."""
    kinds = {}
    for name, hint in typing.get_type_hints(GenerationRequest).items():
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
            hint = args[0]
        if hint is bool:
            kinds[name] = "bool"
        elif hint in (int, float, str):
            kinds[name] = hint.__name__
        elif typing.get_origin(hint) is tuple and typing.get_args(hint)[:1] == (str,):
            kinds[name] = "styles"
    return kinds


def _close(name: str, choices: Sequence[str]) -> str:
    matches = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(repr(m) for m in matches)}?" if matches else ""


class _Loader:
    def __init__(self, path: Path) -> None:
        self.path = path

    def error(self, where: str, message: str) -> StudyError:
        return StudyError(f"{self.path}: {where}: {message}")

    def table(self, data: Mapping[str, Any], name: str) -> dict[str, Any]:
        value = data.get(name, {})
        if not isinstance(value, dict):
            raise self.error(f"[{name}]", f"must be a table ([{name}] followed by key = value lines)")
        return value

    def check_keys(self, table: Mapping[str, Any], allowed: Sequence[str], where: str) -> None:
        for key in table:
            if key not in allowed:
                raise self.error(
                    f"{where} {key}", f"unknown key; allowed: {', '.join(allowed)}{_close(key, allowed)}"
                )

    def setting(self, name: str, value: Any, where: str) -> Any:
        if name in _NOT_SETTINGS:
            raise self.error(f"{where} {name}", f"cannot be set here: {_NOT_SETTINGS[name]}")
        kinds = _field_kinds()
        if name not in kinds:
            raise self.error(
                f"{where} {name}",
                f"not a GenerationRequest field{_close(name, list(kinds))} "
                "(field names follow A1111's API, e.g. cfg_scale, sampler_name, clip_skip)",
            )
        kind = kinds[name]
        ok = {
            "bool": isinstance(value, bool),
            "int": isinstance(value, int) and not isinstance(value, bool),
            "float": isinstance(value, int | float) and not isinstance(value, bool),
            "str": isinstance(value, str),
            "styles": isinstance(value, list) and all(isinstance(v, str) for v in value),
        }[kind]
        if not ok:
            raise self.error(
                f"{where} {name}",
                f"{value!r} is not a valid {kind} value; write e.g. "
                + {"bool": "true", "int": "20", "float": "7.5", "str": '"Euler"', "styles": '["style one"]'}[
                    kind
                ],
            )
        if kind == "float":
            return float(value)
        return tuple(value) if kind == "styles" else value

    def axis(
        self,
        raw_name: str,
        spec: Any,
        where: str,
        master_seed: int,
        declared_variables: set[str],
        template_names: set[str],
    ) -> Axis:
        name = _ALIASES.get(raw_name, raw_name)
        label = f"{where} {raw_name}"
        try:
            return self._axis(raw_name, name, spec, label, master_seed, declared_variables, template_names)
        except StudyError as error:
            if str(error).startswith(str(self.path)):
                raise
            raise self.error(label, str(error)) from None

    def _axis(
        self,
        raw_name: str,
        name: str,
        spec: Any,
        label: str,
        master_seed: int,
        declared_variables: set[str],
        template_names: set[str],
    ) -> Axis:
        if not isinstance(spec, str | list | dict | int | float) or isinstance(spec, bool):
            raise StudyError(f'{spec!r}: write a string of values ("1-5, 8"), a list or a table')
        if isinstance(spec, int | float):
            spec = [spec]
        values: list[Any]
        if name in _SIZE_AXES:
            values = self._sizes(spec)
            axis = Axis(raw_name, "size", "size", tuple(values))
        elif name in _SEED_AXES:
            values = ax.parse_seed_values(self._plain(spec), master_seed, purpose=f"axis {raw_name}")
            axis = Axis(raw_name, "field", _SEED_AXES[name], tuple(values))
        elif name in _MODEL_AXES:
            axis = Axis(raw_name, "model", _MODEL_AXES[name], tuple(ax.parse_str_values(self._plain(spec))))
        elif name in _SR_AXES:
            values = ax.parse_str_values(self._plain(spec))
            if len(values) < 1 or not values[0]:
                raise StudyError("Prompt S/R needs the search text first, then its replacements")
            axis = Axis(raw_name, "prompt_sr", "prompt", tuple(values))
        elif name in _PROMPT_AXES:
            axis = self._prompt_axis(raw_name, name, spec)
        elif name in _NOT_SETTINGS:
            raise StudyError(f"cannot be swept: {_NOT_SETTINGS[name]}")
        elif name in _field_kinds():
            parsers: dict[str, Callable[[str | Iterable[object]], Sequence[Any]]] = {
                "int": ax.parse_int_values,
                "float": ax.parse_float_values,
                "str": ax.parse_str_values,
                "bool": ax.parse_bool_values,
            }
            parser = parsers.get(_field_kinds()[name])
            if parser is None:
                raise StudyError("this setting cannot be swept; fix it in [settings] instead")
            axis = Axis(raw_name, "field", name, tuple(parser(self._plain(spec))))
        elif name in declared_variables or name in template_names:
            axis = Axis(raw_name, "variable", name, tuple(ax.parse_auto_values(self._plain(spec))))
        else:
            known = [
                *_field_kinds(),
                *_SIZE_AXES,
                *_SEED_AXES,
                *_MODEL_AXES,
                *_PROMPT_AXES,
                *_SR_AXES,
                *template_names,
            ]
            raise StudyError(
                f"not a request field, a study axis (size, seed, prompt_sr, prompt_matrix, prompts_file, "
                f"checkpoint, vae) or a variable used as {{{raw_name}}} in [prompt]{_close(raw_name, known)}"
            )
        if not axis.values:
            raise StudyError(
                f"{spec!r} gives no values (a descending range needs a negative step, e.g. 10-1 (-3))"
            )
        return axis

    @staticmethod
    def _plain(spec: Any) -> str | list[Any]:
        if isinstance(spec, dict):
            raise StudyError("this axis takes a string or a list of values, not a table")
        return typing.cast(str | list[Any], spec)

    def _sizes(self, spec: Any) -> list[ax.SizeValue]:
        if not isinstance(spec, dict):
            return ax.parse_size_values(spec)
        self.check_keys(spec, ("values", "aspects", "areas", "base", "unit"), "size")
        base, unit = spec.get("base", 512), spec.get("unit", 64)
        if not (isinstance(base, int) and isinstance(unit, int)):
            raise StudyError(f"base={base!r}, unit={unit!r}: write whole numbers of pixels, e.g. base = 64")
        if "values" in spec:
            if "aspects" in spec or "areas" in spec:
                raise StudyError("write either values or aspects and areas, not both")
            return ax.parse_size_values(spec["values"], base=base, unit=unit)
        aspects, areas = spec.get("aspects"), spec.get("areas", [1.0])
        if not aspects:
            raise StudyError('a size table needs values = "..." or aspects = ["1:1", "4:3"] (and areas)')
        area_values = ax.parse_float_values(areas if isinstance(areas, str | list) else [areas])
        specs = [f"{a} @ {_format_value(area)}" for a in ax.parse_str_values(aspects) for area in area_values]
        return ax.parse_size_values(specs, base=base, unit=unit)

    def _prompt_axis(self, raw_name: str, name: str, spec: Any) -> Axis:
        options = spec if isinstance(spec, dict) else {}
        target = "negative_prompt" if name == "negative_prompt" else "prompt"
        if "target" in options:
            if options["target"] not in ("positive", "negative"):
                raise StudyError(f"target={options['target']!r}: choose positive or negative")
            target = "prompt" if options["target"] == "positive" else "negative_prompt"
        values: list[str]
        if name == "prompt_matrix":
            self.check_keys(options, ("text", "target", "put_at_start", "delimiter"), "prompt_matrix")
            text = options.get("text") if options else spec
            if not isinstance(text, str):
                raise StudyError('write the matrix as one string, e.g. "1girl|red hair|smile"')
            delimiter = {"comma": ", ", "space": " "}.get(options.get("delimiter", "comma"))
            if delimiter is None:
                raise StudyError(f"delimiter={options.get('delimiter')!r}: choose comma or space")
            values = ax.prompt_matrix(
                text, put_at_start=bool(options.get("put_at_start", False)), delimiter=delimiter
            )
        elif name == "prompts_file":
            self.check_keys(options, ("path", "target"), "prompts_file")
            file = options.get("path") if options else spec
            if not isinstance(file, str):
                raise StudyError('write the path of a text file, e.g. prompts_file = "prompts.txt"')
            values = ax.read_prompts_file(self.path.parent / file)
        else:
            values = ax.parse_str_values(self._plain(spec))
        return Axis(raw_name, "prompt", target, tuple(values))

    def cfg_table(self, data: Mapping[str, Any]) -> CfgByArea:
        self.check_keys(data, _CFG_KEYS, "[cfg_by_area]")
        mode, unit, base = data.get("mode", "linear"), data.get("unit", "base"), data.get("base", 512)
        if mode not in ("linear", "step"):
            raise self.error("[cfg_by_area] mode", f"{mode!r}: choose linear or step")
        if unit not in ("base", "megapixels"):
            raise self.error(
                "[cfg_by_area] unit", f"{unit!r}: choose base (multiples of base^2) or megapixels"
            )
        if not isinstance(base, int) or base <= 0:
            raise self.error("[cfg_by_area] base", f"{base!r}: a side in pixels, e.g. 512")
        raw = data.get("points")
        fix = "write points = [[area, cfg], ...] with areas increasing, e.g. [[1.0, 12], [2.25, 30]]"
        if not isinstance(raw, list) or not raw:
            raise self.error("[cfg_by_area] points", f"missing or empty; {fix}")
        points = []
        for pair in raw:
            if (
                not isinstance(pair, list)
                or len(pair) != 2
                or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in pair)
            ):
                raise self.error("[cfg_by_area] points", f"{pair!r} is not an [area, cfg] pair; {fix}")
            points.append((float(pair[0]), float(pair[1])))
        if any(b[0] <= a[0] for a, b in itertools.pairwise(points)):
            raise self.error("[cfg_by_area] points", f"areas must increase; {fix}")
        return CfgByArea(tuple(points), mode, unit, base)


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
    path = Path(path)
    loader = _Loader(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise StudyError(f"{path}: not valid TOML: {error}") from None
    for section in data:
        if section not in _SECTIONS:
            raise loader.error(
                f"[{section}]",
                f"unknown section; allowed: {', '.join(_SECTIONS)}" + _close(section, _SECTIONS),
            )

    study = loader.table(data, "study")
    loader.check_keys(study, _STUDY_KEYS, "[study]")
    name = study.get("name", path.stem)
    description = study.get("description", "")
    if not isinstance(name, str) or not name or not isinstance(description, str):
        raise loader.error("[study] name", 'write a non-empty string, e.g. name = "pure-negative"')
    master_seed = study.get("master_seed")
    if master_seed is None:
        # A fixed function of the name, so an unstated master seed still expands the same way twice.
        digest = hashlib.sha256(f"voidprompt study {name}".encode()).digest()
        master_seed = int.from_bytes(digest[:4], "big") % ax.SEED_SPAN
    elif not isinstance(master_seed, int) or isinstance(master_seed, bool) or master_seed < 0:
        raise loader.error("[study] master_seed", f"{master_seed!r}: write a whole number >= 0")

    model_table = loader.table(data, "model")
    loader.check_keys(model_table, _MODEL_KEYS, "[model]")
    checkpoint, vae = model_table.get("checkpoint", MINIATURE), model_table.get("vae")
    if not isinstance(checkpoint, str) or not (vae is None or isinstance(vae, str)):
        raise loader.error(
            "[model]", 'checkpoint and vae are file names, e.g. checkpoint = "model.safetensors"'
        )
    model = ModelRef(None if checkpoint == MINIATURE else checkpoint, vae)

    settings = {k: loader.setting(k, v, "[settings]") for k, v in loader.table(data, "settings").items()}

    prompt_table = loader.table(data, "prompt")
    loader.check_keys(prompt_table, _PROMPT_KEYS, "[prompt]")
    templates = {}
    for side in ("positive", "negative"):
        plain, step = prompt_table.get(side), prompt_table.get(f"{side}_step")
        if plain is not None and step is not None:
            raise loader.error(f"[prompt] {side}_step", f"give either {side} or {side}_step, not both")
        if step is not None:
            if not isinstance(step, dict):
                raise loader.error(f"[prompt] {side}_step", 'write { tags = "a, b", weight = "{W}" }')
            loader.check_keys(step, _STEP_KEYS, f"[prompt] {side}_step")
            tags, weight = step.get("tags"), step.get("weight", "{W}")
            if not isinstance(tags, str) or not isinstance(weight, str | int | float):
                raise loader.error(f"[prompt] {side}_step", 'write { tags = "a, b", weight = "{W}" }')
            templates[side] = weight_tags(tags, _format_value(weight))
        else:
            if plain is not None and not isinstance(plain, str):
                raise loader.error(f"[prompt] {side}", "write the prompt as a string")
            templates[side] = plain or ""

    variables_table = loader.table(data, "variables")
    for var, value in variables_table.items():
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise loader.error(f"[variables] {var}", f"{value!r}: write a number or a string")
    declared = set(variables_table)
    template_names = {m for t in templates.values() for m in _PLACEHOLDER.findall(t)}

    def build_axes(table: Mapping[str, Any], where: str) -> tuple[Axis, ...]:
        built = tuple(
            loader.axis(k, v, where, master_seed, declared, template_names) for k, v in table.items()
        )
        targets = Counter((a.kind, a.target) for a in built if a.kind != "prompt_sr")
        for (_kind, target), count in targets.items():
            if count > 1:
                raise loader.error(where, f"{count} axes set {target}; keep one of them")
        return built

    axes_table = loader.table(data, "axes")
    grid_axes = build_axes(axes_table, "[axes]")
    raw_points = data.get("points", [])
    if not isinstance(raw_points, list) or not all(isinstance(p, dict) for p in raw_points):
        raise loader.error("[[points]]", "write each point as a [[points]] table of axis = value lines")
    points = tuple(build_axes(p, f"[[points]] #{i + 1}") for i, p in enumerate(raw_points))
    grid_targets = {(a.kind, a.target) for a in grid_axes}
    for i, point in enumerate(points):
        for a in point:
            if (a.kind, a.target) in grid_targets and a.kind != "prompt_sr":
                raise loader.error(f"[[points]] #{i + 1} {a.name}", "is also an [axes] axis; keep one")
    for a in (*grid_axes, *(a for p in points for a in p)):
        if a.kind == "field" and a.target in settings:
            raise loader.error(f"[settings] {a.target}", f"is also swept by the axis {a.name}; remove one")
        if a.kind == "size" and ({"width", "height"} & set(settings)):
            raise loader.error("[settings] width", f"the axis {a.name} sets the size; remove width/height")

    # A variable typo like {w} for W would silently stay in the prompt; catch it by case.
    known_vars = declared | {a.target for a in grid_axes if a.kind == "variable"}
    known_vars |= {a.target for p in points for a in p if a.kind == "variable"}
    for placeholder in template_names - known_vars:
        near = [v for v in known_vars if v.lower() == placeholder.lower()]
        if near:
            raise loader.error("[prompt]", f"{{{placeholder}}} has no value; did you mean {{{near[0]}}}?")

    cfg_by_area = None
    if "cfg_by_area" in data:
        cfg_by_area = loader.cfg_table(loader.table(data, "cfg_by_area"))
        if "cfg_scale" in settings:
            raise loader.error("[cfg_by_area]", "[settings] cfg_scale also fixes CFG; remove one of them")

    return Study(
        path=path,
        name=name,
        description=description,
        toml_text=text,
        master_seed=master_seed,
        model=model,
        settings=settings,
        positive=templates["positive"],
        negative=templates["negative"],
        variables=dict(variables_table),
        axes=grid_axes,
        points=points,
        cfg_by_area=cfg_by_area,
        run_options=loader.table(data, "run"),
        label_options=loader.table(data, "labels"),
        report_options=loader.table(data, "report"),
    )


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

    def format(self) -> str:
        lines = [f"study {self.name}: {self.jobs} jobs"]
        if self.axes:
            lines.append("axes: " + ", ".join(f"{name} ({n})" for name, n in self.axes.items()))
        lines.append(f"shapes: {len(self.shapes)}")
        lines += [f"  {w}x{h}: {n} jobs" for (w, h), n in sorted(self.shapes.items())]
        lines.append(f"prompts: {self.prompts} distinct pairs, {self.prompt_texts} distinct texts to encode")
        lines.append(f"pixels: {self.megapixels:.2f} MP in all")
        if self.estimated_seconds is not None:
            minutes, seconds = divmod(round(self.estimated_seconds), 60)
            hours, minutes = divmod(minutes, 60)
            lines.append(f"estimated time: {hours}h {minutes:02d}m {seconds:02d}s")
        return "\n".join(lines)


def summarize(
    study: Study, seconds_per_pixel: float | None = None, reference_steps: int | None = None
) -> StudySummary:
    """Count jobs, shapes and prompts; estimate the run time from seconds per image pixel.

    With ``reference_steps`` the figure is taken as measured at that many steps and scaled
    linearly by each job's steps (sampling time is proportional to steps).
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
        )
    axes = {a.name: len(a.values) for a in study.axes}
    for i, point in enumerate(study.points):
        axes.update({f"point {i + 1} {a.name}": len(a.values) for a in point})
    return StudySummary(
        study.name, len(jobs), dict(shapes), len(pairs), len(texts), pixels / 1e6, estimate, axes
    )
