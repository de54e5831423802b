"""The study file's schema: every section, its keys, their types and their defaults, in one place.

:func:`read_study_file` turns TOML text into a :class:`StudyFile` of typed, frozen options - one
per section - and rejects every mistake with a :class:`StudyError` that names the file, the
section and key, the value and the fix ("did you mean" for a near miss). The runner, the labels
and the report read these options, never the raw tables. ``docs/study-format.md`` is the reference
a user reads; a test checks that it names every section and key declared here.

A new key is one :class:`Key` in its section's table plus, for ``[run]`` and ``[labels]``, a field
of the same name in :class:`RunOptions` / :class:`LabelOptions` (for instance a ``device`` key).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import math
import re
import tomllib
import types
import typing
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from voidprompt.errors import InvalidRequestError, PromptError, StudyError, did_you_mean
from voidprompt.explain.record import WINDOW_ALL, ExplainOptions
from voidprompt.explain.store import DEFAULT_MAP_SIDE
from voidprompt.lab import axes as ax
from voidprompt.lab.sizes import named_base
from voidprompt.models.placement import PRECISIONS
from voidprompt.prompts.styles import StyleDatabase
from voidprompt.request import GenerationRequest

# Images per sampler run. 16 rather than 8: on the miniature model at 64x64 (1 thread) a batch of
# 16 costs about 23% less CPU per image than 8; beyond that the gain is small and a kill loses more.
DEFAULT_BATCH_SIZE = 16
# On a GPU the batch size follows free memory; a planned batch is at most this many images, so a
# kill loses at most this many (diffusers' batched SD1.5 runs reach 64 at 512x512 on an 80 GB card).
GPU_BATCH_CAP = 64
EXECUTORS = ("local", "ray")
WORKERS_AUTO = "auto"  # [run] workers: one worker process per CPU core this process may use
# The outcome classes of a study that names none and has no labeler: the study brief's four.
DEFAULT_CLASSES = ("Pattern", "Object or Scenery", "Malformed human", "Legit human")
NO_LABELER = "none"
PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
# A placeholder where the prompt language reads a number: an emphasis weight "(tag:{W})" or a
# schedule step "[a:b:{W}]". A word there is no error in the prompt language, just a different
# prompt ("(lowres:heavy)" is the text "lowres:heavy"). Network multipliers are the fields after
# the name in "<lora:name:{W}>" (see _number_placeholders).
NUMBER_PLACEHOLDER = re.compile(r":\s*\{([A-Za-z_][A-Za-z0-9_]*)\}\s*[)\]]")

# Request fields a study may not set: jobs are one image each (the runner batches them), the
# prompts live in [prompt], and images / masks / free-form extras are not txt2img settings.
_NOT_SETTINGS = {
    "batch_size": "each job is one image; the runner's batch size is [run] batch_size",
    "n_iter": 'each job is one image; add a seed axis (e.g. seed = "8 random") for more images',
    "prompt": "write the prompt in [prompt] positive",
    "negative_prompt": "write the negative prompt in [prompt] negative",
    "init_images": "studies are txt2img only",
    "mask": "studies are txt2img only",
    "extra_generation_params": "it is filled in by the runner",
}
# Axis names with a meaning of their own, beyond the request fields.
SIZE_AXES = ("size", "sizes")
SEED_AXES = {"seed": "seed", "seeds": "seed", "subseed": "subseed", "subseeds": "subseed"}
MODEL_AXES = {"checkpoint": "checkpoint", "model": "checkpoint", "vae": "vae"}
PROMPT_AXES = ("prompt", "negative_prompt", "prompt_matrix", "prompts_file")
SR_AXES = ("prompt_sr", "Prompt S/R")
# A1111's X/Y/Z plot labels, accepted as axis names.
AXIS_ALIASES = {
    "cfg": "cfg_scale",
    "CFG Scale": "cfg_scale",
    "sampler": "sampler_name",
    "Sampler": "sampler_name",
    "Steps": "steps",
    "Clip skip": "clip_skip",
    "Seed": "seed",
    "Size": "size",
}
SIZE_TABLE_KEYS = ("values", "aspects", "areas", "base", "unit")
PROMPT_MATRIX_KEYS = ("text", "target", "put_at_start", "delimiter")
PROMPTS_FILE_KEYS = ("path", "target")
GRID_KEYS = ("x", "y", "where", "rows", "pages")
PLOT_KEYS = ("x", "split", "where", "measures")
EXPLAIN_VIEW_KEYS = ("x", "where", "tags", "window", "branch")
# Columns a [explain] where may name besides the study's axes (the report's derived ones, area and
# aspect, depend on [report] base and are not known to a job).
JOB_COLUMNS = ("width", "height")
BRANCHES = ("positive", "negative")


# ------------------------------------------------------------------------------------ typed options


@dataclass(frozen=True)
class ModelRef:
    """The checkpoint and VAE of a job.

    ``checkpoint`` is a file (relative to the study file) or the name of a registered model
    (:mod:`voidprompt.lab.plugins`); ``None`` is the installed default model.
    """

    checkpoint: str | None = None
    vae: str | None = None


@dataclass(frozen=True)
class Axis:
    """One swept quantity: ``kind`` says what its values change, ``target`` which thing."""

    name: str
    kind: str  # field | size | model | prompt | prompt_sr | variable
    target: str
    values: tuple[Any, ...]


@dataclass(frozen=True)
class CfgByArea:
    """A piecewise table area -> cfg_scale (the study brief's "stable CFG grows with area")."""

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
class RunOptions:
    """How a study runs: its ``[run]`` table, then the caller's choices over it (:meth:`override`)."""

    # Most same-shape jobs per sampler run; None: DEFAULT_BATCH_SIZE on the CPU, free memory's
    # choice (up to GPU_BATCH_CAP) on a GPU. See :meth:`batch_cap`.
    batch_size: int | None = None
    threads: int | None = None  # torch intra-op threads; None: torch's own choice (worker processes: 1)
    # Worker processes: an int, or WORKERS_AUTO (one per CPU core on the CPU); None: the executor's
    # default (local: this process alone; Ray: as many as the cluster's CPUs or GPUs hold).
    workers: int | str | None = None
    device: str | None = None  # torch device name; None: cpu (a Ray cluster's GPU workers: cuda)
    precision: str = "auto"  # one of placement.PRECISIONS; what each means per device is its rule
    compile: bool = False  # torch.compile the UNet, once per shape
    # UNet and VAE weights stored channels-last: faster convolutions on a CPU (and CUDA's default
    # for the UNet), results that differ from the plain layout in their last bits. None: the
    # device's default (off on the CPU, where plain keeps A1111's numbers exactly).
    channels_last: bool | None = None
    # Fixed batch sizes and deterministic algorithms: the same batch gives the same pixels bit for bit.
    deterministic: bool = False
    # Chosen by the caller (command-line flags), not by the study file:
    disable_nan_check: bool = False  # A1111's --disable-nan-check: keep NaN output (black pictures)
    executor: str = "local"
    address: str | None = None  # Ray cluster address; None: join or start a local one
    gpus_per_worker: float | None = None  # Ray: GPUs per worker; None: 1 if the cluster has GPUs, else 0
    max_jobs: int | None = None  # stop after this many images
    catalog: Path | None = None  # None: runs/<study file stem>/catalog.sqlite beside the study
    progress: bool = True

    def __post_init__(self) -> None:
        if self.executor not in EXECUTORS:
            raise StudyError(f"executor={self.executor!r}: choose one of {', '.join(EXECUTORS)}")
        if self.precision not in PRECISIONS:
            raise StudyError(f"precision={self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        if self.batch_size is not None and self.batch_size < 1:
            raise StudyError(f"batch_size={self.batch_size}: must be at least 1")
        if (
            self.workers is not None
            and self.workers != WORKERS_AUTO
            and (not isinstance(self.workers, int) or self.workers < 1)
        ):
            raise StudyError(
                f"workers={self.workers!r}: write a whole number of at least 1, or {WORKERS_AUTO!r}"
            )
        if self.gpus_per_worker is not None and self.gpus_per_worker < 0:
            raise StudyError(f"gpus_per_worker={self.gpus_per_worker}: must be 0 or more")

    def batch_cap(self, on_gpu: bool) -> int:
        """The most images one planned batch holds: the file's (or flag's) batch_size, else the
        default for the device. Deterministic runs keep it on a GPU too (no sizing from memory)."""
        if self.batch_size is not None:
            return self.batch_size
        return GPU_BATCH_CAP if on_gpu and not self.deterministic else DEFAULT_BATCH_SIZE

    def override(self, **changes: Any) -> RunOptions:
        """These options with every change that is not None: a flag left out keeps the file's value."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


@dataclass(frozen=True)
class TagRule:
    """``[labels.rules]``: a picture is ``label_class`` when it has every tag of any one group."""

    label_class: str
    groups: tuple[tuple[str, ...], ...]

    def matches(self, tags: set[str]) -> bool:
        return any(all(t in tags for t in group) for group in self.groups)


@dataclass(frozen=True)
class LabelOptions:
    """A study's ``[labels]``: its outcome classes and the labeler that pre-labels its images."""

    classes: tuple[str, ...] | None = None  # None: the labeler's classes, else DEFAULT_CLASSES
    labeler: str | None = None  # a registered labeler; None: the model's own; NO_LABELER: none
    # For labelers that read tags (the taggers): the tagger's file or folder (relative paths are
    # relative to the study file), its thresholds, and the rules that turn tags into a class.
    tagger: Path | None = None
    threshold: float | None = None
    character_threshold: float | None = None
    rules: tuple[TagRule, ...] = ()
    fallback: str | None = None  # the class when no rule matches; None: no class

    def tag_options(self) -> dict[str, Any]:
        """The keys that only a labeler reading tags uses, those the study set."""
        values = {
            "tagger": self.tagger,
            "threshold": self.threshold,
            "character_threshold": self.character_threshold,
            "rules": self.rules or None,
            "fallback": self.fallback,
        }
        return {k: v for k, v in values.items() if v is not None}


@dataclass(frozen=True)
class PlotSpec:
    x: str
    split: str | None = None
    where: Mapping[str, Any] = field(default_factory=dict)
    measures: tuple[str, ...] = ()  # empty: every measure


@dataclass(frozen=True)
class GridSpec:
    x: str
    y: str
    where: Mapping[str, Any] = field(default_factory=dict)
    rows: int | None = None  # values of y per page (default: all)
    pages: int | None = None  # pages shown per combination of the other factors (default: all)


@dataclass(frozen=True)
class ExplainView:
    """A report view of the captured explanations against one axis: a grid of tag heatmaps (the
    ``tags`` tags with the largest mean attention share, per value of ``x``) and plots of the tags'
    attention measures and of the guidance difference against ``x``."""

    x: str
    where: Mapping[str, Any] = field(default_factory=dict)
    tags: int = 6
    window: str = WINDOW_ALL
    branch: str | None = None  # positive / negative; None: both


@dataclass(frozen=True)
class ReportOptions:
    """A study's ``[report]``; None for a view means the report's own default choice."""

    base: int = 512
    grids: tuple[GridSpec, ...] | None = None
    outcomes_by: tuple[tuple[str, Mapping[str, Any]], ...] | None = None  # (axis, where)
    plots: tuple[PlotSpec, ...] | None = None
    explain: tuple[ExplainView, ...] | None = None


@dataclass(frozen=True)
class ExplainSpec:
    """A study's ``[explain]``: which jobs capture an explanation when they are generated, and what
    it keeps. A job captures when its axis values (and width / height) match ``where`` and, with
    ``seeds`` set, its seed is among the first ``seeds`` values of its seed axis. Capture leaves the
    pictures and the job ids as they are."""

    where: Mapping[str, Any] = field(default_factory=dict)
    seeds: int | None = None
    per_token: bool = False
    preview_every: int = ExplainOptions.preview_every
    map_side: int = DEFAULT_MAP_SIDE

    def options(self) -> ExplainOptions:
        """What the Engine is asked to capture."""
        return ExplainOptions(per_token=self.per_token, preview_every=self.preview_every)


@dataclass(frozen=True)
class StudyFile:
    """Everything a study file says, validated and typed (``voidprompt.lab.study.Study`` expands it)."""

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
    run: RunOptions = RunOptions()
    labels: LabelOptions = LabelOptions()
    report: ReportOptions = ReportOptions()
    explain: ExplainSpec | None = None  # None: no [explain] section, nothing captures
    # A1111's styles.csv files named by [prompt] styles_file; a job's styles are applied from them.
    style_db: StyleDatabase | None = field(default=None, compare=False)


# ------------------------------------------------------------------------------------- key readers


class _Invalid(Exception):
    """A value is wrong: ``message`` says why and how to write it; ``at`` extends the key's place
    (a list entry, a sub-key). Turned into a StudyError naming the file by :class:`_Reader`."""

    def __init__(self, message: str, at: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.at = at


Read = Callable[[Any], Any]


@dataclass(frozen=True)
class Key:
    """One key of a section: how its value is checked and converted, and its default."""

    name: str
    read: Read
    default: Any = None
    required: str | None = None  # the message when the key is missing; None: optional


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_finite_number(value: Any) -> bool:
    return _is_number(value) and math.isfinite(value)


def _reads_as_number(value: Any) -> bool:
    """A number, or text that is one ("1.1"): what may stand where the prompt language reads one."""
    if isinstance(value, str):
        try:
            return math.isfinite(float(value))
        except ValueError:
            return False
    return _is_finite_number(value)


def _whole(minimum: int, example: str) -> Read:
    def read(value: Any) -> int:
        if not _is_int(value) or value < minimum:
            raise _Invalid(f"{value!r}: write a whole number of at least {minimum}, e.g. {example}")
        return int(value)

    return read


def _base(value: Any) -> int:
    try:
        return named_base(value)
    except StudyError as error:
        raise _Invalid(str(error)) from None


def _text(fix: str) -> Read:
    def read(value: Any) -> str:
        if not isinstance(value, str):
            raise _Invalid(f"{value!r}: {fix}")
        return value

    return read


def _choice(*choices: str, explain: str = "") -> Read:
    def read(value: Any) -> str:
        if value not in choices:
            raise _Invalid(f"{value!r}: choose {' or '.join(choices)}{explain}")
        return str(value)

    return read


def _study_name(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise _Invalid('write a non-empty string, e.g. name = "pure-negative"')
    return value


def format_value(value: Any) -> str:
    """A value as it goes into a prompt or a label."""
    if isinstance(value, float):
        # Ranges carry binary noise (0.30000000000000004); A1111 rounds to 8 places for labels too.
        return repr(round(value, 8))
    return str(value)


def weight_tags(tags: str, weight: str) -> str:
    """The author's ``node step [ratio]``: ``a, b`` -> ``(a:W), (b:W)``; empty tags are dropped."""
    return ", ".join(f"({tag}:{weight})" for tag in (t.strip() for t in tags.split(",")) if tag)


# Pony Diffusion V6 XL's quality prefix, in the order its model card writes it. The variable
# pony_quality (an axis or a [variables] entry) is how many of these tags {pony_quality} stands for.
PONY_QUALITY = "pony_quality"
PONY_QUALITY_TAGS = ("score_9", "score_8_up", "score_7_up", "score_6_up", "score_5_up", "score_4_up")


def pony_quality_prefix(count: object) -> str:
    """The first ``count`` tags of Pony's quality prefix: 2 -> ``"score_9, score_8_up"``."""
    if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= len(PONY_QUALITY_TAGS):
        raise StudyError(
            f"{PONY_QUALITY}={count!r}: write how many of Pony's {len(PONY_QUALITY_TAGS)} quality tags to "
            f'use, a whole number 0..{len(PONY_QUALITY_TAGS)} (e.g. {PONY_QUALITY} = "0-6")'
        )
    return ", ".join(PONY_QUALITY_TAGS[:count])


def expand_pony_quality(template: str, count: int) -> str:
    """``{pony_quality}`` in ``template`` replaced by :func:`pony_quality_prefix`. With no tags the
    placeholder leaves with the comma that joins it to the prompt (the one after it, else the one
    before it), so a count of 0 is exactly the prompt without the prefix: ``"{pony_quality}, 1girl"``
    gives ``"1girl"``, not ``", 1girl"``."""
    prefix = pony_quality_prefix(count)
    name = re.escape("{" + PONY_QUALITY + "}")
    if not prefix:
        template = re.sub(name + r"\s*,\s*", "", template)
        template = re.sub(r"\s*,\s*" + name, "", template)
    return template.replace("{" + PONY_QUALITY + "}", prefix)


def _close(name: str, choices: Sequence[str]) -> str:
    return did_you_mean(name, choices)


def _check_keys(table: Mapping[str, Any], allowed: Sequence[str], at: str = "") -> None:
    for key in table:
        if key not in allowed:
            raise _Invalid(f"unknown key; allowed: {', '.join(allowed)}{_close(key, allowed)}", f"{at} {key}")


def _prompt_step(value: Any) -> str:
    fix = 'write { tags = "a, b", weight = "{W}" }'
    if not isinstance(value, dict):
        raise _Invalid(fix)
    _check_keys(value, ("tags", "weight"))
    tags, weight = value.get("tags"), value.get("weight", "{W}")
    if not isinstance(tags, str) or not isinstance(weight, str | int | float) or isinstance(weight, bool):
        raise _Invalid(fix)
    if not (_reads_as_number(weight) or (isinstance(weight, str) and PLACEHOLDER.fullmatch(weight.strip()))):
        raise _Invalid(f"weight={weight!r} is not a number; write a number or a {{variable}}, e.g. {fix}")
    return weight_tags(tags, format_value(weight))


def _area_points(value: Any) -> tuple[tuple[float, float], ...]:
    fix = "write points = [[area, cfg], ...] with areas increasing, e.g. [[1.0, 12], [2.25, 30]]"
    if not isinstance(value, list) or not value:
        raise _Invalid(f"missing or empty; {fix}")
    points = []
    for pair in value:
        if not isinstance(pair, list) or len(pair) != 2 or not all(_is_finite_number(v) for v in pair):
            raise _Invalid(f"{pair!r} is not an [area, cfg] pair; {fix}")
        points.append((float(pair[0]), float(pair[1])))
    if any(b[0] <= a[0] for a, b in itertools.pairwise(points)):
        raise _Invalid(f"areas must increase; {fix}")
    return tuple(points)


def _classes(value: Any) -> tuple[str, ...]:
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(c, str) and c.strip() for c in value)
        or len(set(value)) != len(value)
    ):
        raise _Invalid('write distinct names, e.g. classes = ["Pattern", "Legit human"]')
    return tuple(value)


def _labeler_name(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise _Invalid(f'write a name, e.g. labeler = "detector", or "{NO_LABELER}"')
    if ":" in value:
        # Names only: a study file is data, and must never choose code to import and run.
        raise _Invalid(
            f"{value!r}: a labeler is named, not imported; write a registered name (e.g. "
            '"detector") - a package adds its labeler under the "voidprompt.labelers" entry point group'
        )
    return value


_RULES_FIX = (
    'write one line per class under [labels.rules], e.g. Pattern = ["no_humans", "pattern"] (every '
    'tag of the list) or "Legit human" = [["1girl"], ["1boy"]] (every tag of any one list); '
    "the first class whose rule matches wins"
)


def _tag_list(value: Any) -> tuple[str, ...] | None:
    if isinstance(value, list) and value and all(isinstance(t, str) and t.strip() for t in value):
        return tuple(t.strip() for t in value)
    return None


def _label_rules(value: Any) -> tuple[TagRule, ...]:
    if not isinstance(value, dict) or not value:
        raise _Invalid(_RULES_FIX)
    rules = []
    for label_class, spec in value.items():
        groups: tuple[tuple[str, ...], ...] | None = None
        single = _tag_list(spec)
        if single is not None:
            groups = (single,)
        elif isinstance(spec, list) and spec:
            several = [_tag_list(g) for g in spec]
            if all(g is not None for g in several):
                groups = tuple(g for g in several if g is not None)
        if groups is None:
            raise _Invalid(f"{spec!r} is not a list of tags; {_RULES_FIX}", f" {label_class!r}")
        rules.append(TagRule(label_class, groups))
    return tuple(rules)


def _unit_interval(example: str) -> Read:
    def read(value: Any) -> float:
        if not _is_finite_number(value) or not 0 <= value <= 1:
            raise _Invalid(f"{value!r}: write a probability from 0 to 1, e.g. {example}")
        return float(value)

    return read


def _optional_name(example: str) -> Read:
    def read(value: Any) -> str:
        if not isinstance(value, str) or not value.strip():
            raise _Invalid(f"write a name, e.g. {example}")
        return value

    return read


def _where(value: Any, fix: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Invalid(fix)
    return dict(value)


def _grids(value: Any) -> tuple[GridSpec, ...]:
    fix = (
        'write grid = { x = "W", y = "size" } or a list of such tables, each optionally with '
        "where = {...}, rows = 8 (per page) and pages = 1"
    )
    specs = []
    for entry in value if isinstance(value, list) and value else [value]:
        if not isinstance(entry, dict) or not {"x", "y"} <= set(entry) or set(entry) - set(GRID_KEYS):
            raise _Invalid(fix)
        counts = [entry.get(k) for k in ("rows", "pages")]
        if any(c is not None and (not _is_int(c) or c < 1) for c in counts):
            raise _Invalid(fix)
        where = _where(entry.get("where", {}), fix)
        specs.append(GridSpec(str(entry["x"]), str(entry["y"]), where, counts[0], counts[1]))
    return tuple(specs)


def _outcomes_by(value: Any) -> tuple[tuple[str, Mapping[str, Any]], ...]:
    fix = 'write axis names or tables, e.g. ["size", { by = "W", where = { size = "64x64" } }]'
    entries: list[tuple[str, Mapping[str, Any]]] = []
    for entry in value if isinstance(value, list) else [None]:
        if isinstance(entry, str):
            entries.append((entry, {}))
        elif isinstance(entry, dict) and "by" in entry and not set(entry) - {"by", "where"}:
            entries.append((str(entry["by"]), _where(entry.get("where", {}), fix)))
        else:
            raise _Invalid(fix)
    return tuple(entries)


def _plots(value: Any) -> tuple[PlotSpec, ...]:
    fix = 'write { x = "W", split = "size", where = {...}, measures = ["luminance"] } (only x is required)'
    specs = []
    for i, plot in enumerate(value if isinstance(value, list) else [None]):
        at = f" #{i + 1}"
        if not isinstance(plot, dict) or "x" not in plot or set(plot) - set(PLOT_KEYS):
            raise _Invalid(fix, at)
        measures = plot.get("measures", [])
        split = plot.get("split")
        if (
            not isinstance(plot["x"], str)
            or not (split is None or isinstance(split, str))
            or not isinstance(measures, list)
            or not all(isinstance(m, str) for m in measures)
        ):
            raise _Invalid(fix, at)
        specs.append(PlotSpec(plot["x"], split, _where(plot.get("where", {}), fix), tuple(measures)))
    return tuple(specs)


def _explain_views(value: Any) -> tuple[ExplainView, ...]:
    fix = (
        'write explain = [{ x = "W", where = {...}, tags = 6, window = "all", branch = "negative" }] '
        "(only x is required)"
    )
    views = []
    for i, view in enumerate(value if isinstance(value, list) else [value]):
        at = f" #{i + 1}"
        if not isinstance(view, dict) or "x" not in view or not isinstance(view["x"], str):
            raise _Invalid(fix, at)
        unknown = set(view) - set(EXPLAIN_VIEW_KEYS)
        if unknown:
            key = sorted(unknown)[0]
            raise _Invalid(
                f"unknown key; allowed: {', '.join(EXPLAIN_VIEW_KEYS)}{_close(key, EXPLAIN_VIEW_KEYS)}",
                f"{at} {key}",
            )
        tags = view.get("tags", 6)
        if not _is_int(tags) or tags < 1:
            raise _Invalid(f"tags={tags!r}: write how many tags to show, a whole number >= 1, e.g. tags = 6",
                           at)  # fmt: skip
        window = view.get("window", WINDOW_ALL)
        if not isinstance(window, str) or not window:
            raise _Invalid(f'window={window!r}: write a step window, e.g. window = "all" (or early, middle, '
                           'late, hires)', at)  # fmt: skip
        branch = view.get("branch")
        if branch is not None and branch not in BRANCHES:
            raise _Invalid(f"branch={branch!r}: choose {' or '.join(BRANCHES)} (or leave it out for both)",
                           at)  # fmt: skip
        views.append(ExplainView(view["x"], _where(view.get("where", {}), fix), tags, window, branch))
    return tuple(views)


def _explain_where(value: Any) -> dict[str, Any]:
    where = _where(value, 'write where = { size = "128x128", cfg_scale = 7.0 } (a list means any of)')
    for key, wanted in where.items():
        for item in wanted if isinstance(wanted, list) else [wanted]:
            if isinstance(item, dict | list):
                raise _Invalid(f"{item!r}: write a value or a list of values", f" {key}")
    return where


def workers_arg(text: str) -> int | str:
    """A command line's ``--workers`` value: a number, or a word that RunOptions checks (auto)."""
    return int(text) if text.strip().isdigit() else text


def _workers(value: Any) -> int | str:
    if value == WORKERS_AUTO or (_is_int(value) and value >= 1):
        return value if isinstance(value, str) else int(value)
    raise _Invalid(
        f'{value!r}: write a whole number of at least 1, e.g. workers = 2, or workers = "{WORKERS_AUTO}"'
    )


def _flag(example: str) -> Read:
    def read(value: Any) -> bool:
        if not isinstance(value, bool):
            raise _Invalid(f"{value!r}: write true or false, e.g. {example}")
        return value

    return read


def _device_name(value: Any) -> str:
    # Only the form here: whether the device exists is known where the model loads.
    if not isinstance(value, str) or not value.strip():
        raise _Invalid('write a torch device name, e.g. device = "cuda" (or "cpu", "cuda:1", "mps")')
    return value.strip()


def _styles_files(value: Any) -> tuple[str, ...]:
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise _Invalid('write a file name or a list of them, e.g. styles_file = "styles.csv"')
    return tuple(names)


def _optional_file(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise _Invalid('write a file name, e.g. checkpoint = "model.safetensors"')
    return value


# The sections with fixed keys. [settings] takes request fields, [variables] names of your own,
# [axes] and each [[points]] table request fields, study axes and variables.
STUDY_KEYS = (
    Key("name", _study_name),  # default: the file's stem
    Key("description", _text('write a string, e.g. description = "what this study asks"'), ""),
    Key("master_seed", _whole(0, "master_seed = 1234")),  # default: derived from the name
)
MODEL_KEYS = (Key("checkpoint", _optional_file), Key("vae", _optional_file))
PROMPT_KEYS = (
    Key("positive", _text("write the prompt as a string")),
    Key("negative", _text("write the prompt as a string")),
    Key("positive_step", _prompt_step),
    Key("negative_step", _prompt_step),
    Key("styles_file", _styles_files, ()),
)
CFG_BY_AREA_KEYS = (
    Key("points", _area_points, required="missing or empty; write points = [[area, cfg], ...]"),
    Key("mode", _choice("linear", "step"), "linear"),
    Key("unit", _choice("base", "megapixels", explain=" (multiples of base^2 or of 10^6 pixels)"), "base"),
    Key("base", _base, 512),
)
RUN_KEYS = (
    Key("batch_size", _whole(1, "batch_size = 16")),
    Key("threads", _whole(1, "threads = 1")),
    Key("workers", _workers),
    Key("device", _device_name),
    Key("precision", _choice(*PRECISIONS), "auto"),
    Key("compile", _flag("compile = true"), False),
    Key("channels_last", _flag("channels_last = true")),
    Key("deterministic", _flag("deterministic = true"), False),
)
LABELS_KEYS = (
    Key("classes", _classes),
    Key("labeler", _labeler_name),
    Key("tagger", _optional_name('tagger = "models/wd14/wd-vit-tagger-v3"')),
    Key("threshold", _unit_interval("threshold = 0.35")),
    Key("character_threshold", _unit_interval("character_threshold = 0.85")),
    Key("rules", _label_rules, ()),
    Key("fallback", _optional_name('fallback = "Object or Scenery"')),
)
EXPLAIN_KEYS = (
    Key("where", _explain_where, {}),
    Key("seeds", _whole(1, "seeds = 32")),
    Key("per_token", _flag("per_token = true"), False),
    Key("preview_every", _whole(0, "preview_every = 5"), ExplainSpec.preview_every),
    Key("map_side", _whole(1, "map_side = 24"), ExplainSpec.map_side),
)
REPORT_KEYS = (
    Key("base", _base, 512),
    Key("grid", _grids),
    Key("outcomes_by", _outcomes_by),
    Key("plots", _plots),
    Key("explain", _explain_views),
)
KEYED_SECTIONS: Mapping[str, tuple[Key, ...]] = {
    "study": STUDY_KEYS,
    "model": MODEL_KEYS,
    "prompt": PROMPT_KEYS,
    "cfg_by_area": CFG_BY_AREA_KEYS,
    "run": RUN_KEYS,
    "labels": LABELS_KEYS,
    "explain": EXPLAIN_KEYS,
    "report": REPORT_KEYS,
}
SECTIONS = (
    "study", "model", "settings", "prompt", "variables", "axes", "points", "cfg_by_area", "run", "labels",
    "explain", "report",
)  # fmt: skip


@functools.cache
def request_field_kinds() -> dict[str, str]:
    """Request field -> the kind its values have (int, float, str, bool, styles)."""
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


# ------------------------------------------------------------------------------------------ reading


class _Reader:
    """Reads one file's tables; every error names the file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, where: str, message: str) -> StudyError:
        return StudyError(f"{self.path}: {where}: {message}")

    def table(self, data: Mapping[str, Any], name: str) -> dict[str, Any]:
        value = data.get(name, {})
        if not isinstance(value, dict):
            raise self.fail(f"[{name}]", f"must be a table ([{name}] followed by key = value lines)")
        return value

    def keyed(self, data: Mapping[str, Any], section: str) -> dict[str, Any]:
        """A fixed-key section's values (defaults filled in), each checked by its :class:`Key`."""
        keys = KEYED_SECTIONS[section]
        table = self.table(data, section)
        try:
            _check_keys(table, [k.name for k in keys])
        except _Invalid as error:
            raise self.fail(f"[{section}]{error.at}", error.message) from None
        values = {}
        for key in keys:
            where = f"[{section}] {key.name}"
            if key.name not in table:
                if key.required is not None:
                    raise self.fail(where, key.required)
                values[key.name] = key.default
                continue
            try:
                values[key.name] = key.read(table[key.name])
            except _Invalid as error:
                raise self.fail(where + error.at, error.message) from None
        return values

    def setting(self, name: str, value: Any, where: str) -> Any:
        if name in _NOT_SETTINGS:
            raise self.fail(f"{where} {name}", f"cannot be set here: {_NOT_SETTINGS[name]}")
        kinds = request_field_kinds()
        if name not in kinds:
            raise self.fail(
                f"{where} {name}",
                f"not a GenerationRequest field{_close(name, list(kinds))} "
                "(field names follow A1111's API, e.g. cfg_scale, sampler_name, clip_skip)",
            )
        kind = kinds[name]
        ok = {
            "bool": isinstance(value, bool),
            "int": _is_int(value),
            "float": _is_finite_number(value),
            "str": isinstance(value, str),
            "styles": isinstance(value, list) and all(isinstance(v, str) for v in value),
        }[kind]
        if kind == "float" and _is_number(value) and not ok:
            raise self.fail(f"{where} {name}", f"{value!r} is not a finite number; write e.g. 7.5")
        if not ok:
            example = {
                "bool": "true",
                "int": "20",
                "float": "7.5",
                "str": '"Euler"',
                "styles": '["style one"]',
            }
            raise self.fail(
                f"{where} {name}", f"{value!r} is not a valid {kind} value; write e.g. {example[kind]}"
            )
        if kind == "float":
            return float(value)
        return tuple(value) if kind == "styles" else value

    def axis(self, raw_name: str, spec: Any, where: str, context: _AxisContext) -> Axis:
        label = f"{where} {raw_name}"
        try:
            return _axis(raw_name, AXIS_ALIASES.get(raw_name, raw_name), spec, context)
        except _Invalid as error:
            raise self.fail(label + error.at, error.message) from None
        except StudyError as error:  # from the value syntax of voidprompt.lab.axes
            raise self.fail(label, str(error)) from None


@dataclass(frozen=True)
class _AxisContext:
    folder: Path  # relative prompt files are read from here
    master_seed: int
    variables: frozenset[str]  # declared in [variables]
    placeholders: frozenset[str]  # {names} used in [prompt]


def _plain(spec: Any) -> str | list[Any]:
    if isinstance(spec, dict):
        raise _Invalid("this axis takes a string or a list of values, not a table")
    return typing.cast(str | list[Any], spec)


def _axis(raw_name: str, name: str, spec: Any, context: _AxisContext) -> Axis:
    if not isinstance(spec, str | list | dict | int | float) or isinstance(spec, bool):
        raise _Invalid(f'{spec!r}: write a string of values ("1-5, 8"), a list or a table')
    if isinstance(spec, int | float):
        spec = [spec]
    kinds = request_field_kinds()
    values: Sequence[Any]
    if name in SIZE_AXES:
        axis = Axis(raw_name, "size", "size", tuple(_sizes(spec)))
    elif name in SEED_AXES:
        values = ax.parse_seed_values(_plain(spec), context.master_seed, purpose=f"axis {raw_name}")
        axis = Axis(raw_name, "field", SEED_AXES[name], tuple(values))
    elif name in MODEL_AXES:
        axis = Axis(raw_name, "model", MODEL_AXES[name], tuple(ax.parse_str_values(_plain(spec))))
    elif name in SR_AXES:
        values = ax.parse_str_values(_plain(spec))
        if len(values) < 1 or not values[0]:
            raise _Invalid("Prompt S/R needs the search text first, then its replacements")
        axis = Axis(raw_name, "prompt_sr", "prompt", tuple(values))
    elif name in PROMPT_AXES:
        axis = _prompt_axis(raw_name, name, spec, context.folder)
    elif name in _NOT_SETTINGS:
        raise _Invalid(f"cannot be swept: {_NOT_SETTINGS[name]}")
    elif name in kinds:
        parsers: dict[str, Callable[[str | Iterable[object]], Sequence[Any]]] = {
            "int": ax.parse_int_values,
            "float": ax.parse_float_values,
            "str": ax.parse_str_values,
            "bool": ax.parse_bool_values,
        }
        parser = parsers.get(kinds[name])
        if parser is None:
            raise _Invalid("this setting cannot be swept; fix it in [settings] instead")
        axis = Axis(raw_name, "field", name, tuple(parser(_plain(spec))))
    elif name == PONY_QUALITY and (name in context.variables or name in context.placeholders):
        counts = ax.parse_int_values(_plain(spec))
        for count in counts:
            pony_quality_prefix(count)
        axis = Axis(raw_name, "variable", name, tuple(counts))
    elif name in context.variables or name in context.placeholders:
        axis = Axis(raw_name, "variable", name, tuple(ax.parse_auto_values(_plain(spec))))
    else:
        known = [*kinds, *SIZE_AXES, *SEED_AXES, *MODEL_AXES, *PROMPT_AXES, *SR_AXES, *context.placeholders]
        raise _Invalid(
            f"not a request field, a study axis (size, seed, prompt_sr, prompt_matrix, prompts_file, "
            f"checkpoint, vae) or a variable used as {{{raw_name}}} in [prompt]{_close(raw_name, known)}"
        )
    if not axis.values:
        raise _Invalid(f"{spec!r} gives no values (a descending range needs a negative step, e.g. 10-1 (-3))")
    return axis


def _sizes(spec: Any) -> list[ax.SizeValue]:
    if not isinstance(spec, dict):
        return ax.parse_size_values(spec)
    _check_keys(spec, SIZE_TABLE_KEYS)
    base, unit = _base(spec.get("base", 512)), spec.get("unit", 64)
    if not _is_int(unit):
        raise _Invalid(f"unit={unit!r}: write a whole number of pixels, e.g. unit = 64")
    if "values" in spec:
        if "aspects" in spec or "areas" in spec:
            raise _Invalid("write either values or aspects and areas, not both")
        return ax.parse_size_values(spec["values"], base=base, unit=unit)
    aspects, areas = spec.get("aspects"), spec.get("areas", [1.0])
    if not aspects:
        raise _Invalid('a size table needs values = "..." or aspects = ["1:1", "4:3"] (and areas)')
    area_values = ax.parse_float_values(areas if isinstance(areas, str | list) else [areas])
    specs = [f"{a} @ {format_value(area)}" for a in ax.parse_str_values(aspects) for area in area_values]
    return ax.parse_size_values(specs, base=base, unit=unit)


def _prompt_axis(raw_name: str, name: str, spec: Any, folder: Path) -> Axis:
    options = spec if isinstance(spec, dict) else {}
    target = "negative_prompt" if name == "negative_prompt" else "prompt"
    if "target" in options:
        if options["target"] not in ("positive", "negative"):
            raise _Invalid(f"target={options['target']!r}: choose positive or negative")
        target = "prompt" if options["target"] == "positive" else "negative_prompt"
    values: list[str]
    if name == "prompt_matrix":
        _check_keys(options, PROMPT_MATRIX_KEYS)
        text = options.get("text") if options else spec
        if not isinstance(text, str):
            raise _Invalid('write the matrix as one string, e.g. "1girl|red hair|smile"')
        delimiter = {"comma": ", ", "space": " "}.get(options.get("delimiter", "comma"))
        if delimiter is None:
            raise _Invalid(f"delimiter={options.get('delimiter')!r}: choose comma or space")
        values = ax.prompt_matrix(
            text, put_at_start=bool(options.get("put_at_start", False)), delimiter=delimiter
        )
    elif name == "prompts_file":
        _check_keys(options, PROMPTS_FILE_KEYS)
        file = options.get("path") if options else spec
        if not isinstance(file, str):
            raise _Invalid('write the path of a text file, e.g. prompts_file = "prompts.txt"')
        values = ax.read_prompts_file(folder / file)
    else:
        values = ax.parse_str_values(_plain(spec))
    return Axis(raw_name, "prompt", target, tuple(values))


def default_master_seed(name: str) -> int:
    """A fixed function of the study's name, so an unstated master seed expands the same way twice."""
    digest = hashlib.sha256(f"voidprompt study {name}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % ax.SEED_SPAN


def job_count(grid_axes: Sequence[Axis], points: Sequence[Sequence[Axis]]) -> int:
    """How many jobs the axes expand to, from their lengths alone: each point crossed with the grid."""
    grid = math.prod(len(a.values) for a in grid_axes)
    return grid * (sum(math.prod(len(a.values) for a in point) for point in points) if points else 1)


def _check_job_count(reader: _Reader, grid_axes: Sequence[Axis], points: Sequence[Sequence[Axis]]) -> None:
    count = job_count(grid_axes, points)
    if count <= ax.MAX_JOBS:
        return
    named = [*grid_axes, *(a for point in points for a in point)]
    largest = max(named, key=lambda a: len(a.values))
    raise reader.fail(
        "[axes]",
        f"the study expands to {count} jobs, over the limit of {ax.MAX_JOBS} per study file; split it "
        f"into several study files, e.g. one per part of its largest axis, {largest.name} "
        f"({len(largest.values)} values)",
    )


def _number_placeholders(text: str) -> list[tuple[str, str]]:
    """(variable, the prompt text around it) for each placeholder that stands for a number."""
    found = []
    for m in PLACEHOLDER.finditer(text):
        weight = NUMBER_PLACEHOLDER.match(text, text.rfind(":", 0, m.start()))
        opening = text.rfind("<", 0, m.start())
        in_network = opening >= 0 and ">" not in text[opening : m.start()]
        # <lora:name:{W}> or <lora:name:{TE}:{UNET}>: every field after the name is a multiplier.
        multiplier = in_network and text.count(":", opening, m.start()) >= 2
        if multiplier or (weight is not None and weight.start(1) == m.start(1)):
            found.append((m[1], text[max(0, m.start() - 20) : m.end() + 1]))
    return found


def _check_number_placeholders(
    reader: _Reader,
    templates: Mapping[str, str],
    variables: Mapping[str, Any],
    grid_axes: Sequence[Axis],
    points: Sequence[Sequence[Axis]],
) -> None:
    """A variable that stands where the prompt language reads a number takes only numbers."""
    texts = [*templates.values()]
    for axis in (*grid_axes, *(a for point in points for a in point)):
        if axis.kind == "prompt":
            texts += [v for v in axis.values if isinstance(v, str)]
    used: dict[str, str] = {}
    for text in texts:
        for name, snippet in _number_placeholders(text):
            used.setdefault(name, snippet)
    if not used:
        return
    sources: list[tuple[str, str, Sequence[Any]]] = [
        (f"[variables] {name}", name, [value]) for name, value in variables.items()
    ]
    sources += [(f"[axes] {a.name}", a.target, a.values) for a in grid_axes if a.kind == "variable"]
    for i, point in enumerate(points):
        sources += [
            (f"[[points]] #{i + 1} {a.name}", a.target, a.values) for a in point if a.kind == "variable"
        ]
    for where, name, values in sources:
        if name not in used:
            continue
        for value in values:
            if not _reads_as_number(value):
                raise reader.fail(
                    where,
                    f"{value!r} is not a number, but {{{name}}} stands where the prompt reads one "
                    f'(in {used[name]!r}); write numbers, e.g. {name} = "0.9, 1.1"',
                )


def read_study_file(text: str, path: Path) -> StudyFile:
    """Validate study TOML ``text``; ``path`` names it in errors and anchors relative file names."""
    reader = _Reader(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise StudyError(f"{path}: not valid TOML: {error}") from None
    if not data:
        raise StudyError(
            f'{path}: the study file is empty; write at least a [prompt] table with positive = "..." '
            "(docs/study-format.md describes every section)"
        )
    for section in data:
        if section not in SECTIONS:
            raise reader.fail(
                f"[{section}]", f"unknown section; allowed: {', '.join(SECTIONS)}" + _close(section, SECTIONS)
            )

    study = reader.keyed(data, "study")
    name = study["name"] if study["name"] is not None else path.stem
    master_seed = study["master_seed"] if study["master_seed"] is not None else default_master_seed(name)
    model = ModelRef(**reader.keyed(data, "model"))
    settings = {k: reader.setting(k, v, "[settings]") for k, v in reader.table(data, "settings").items()}
    try:
        # The request's own limits (steps, sides, finite numbers) for the fixed settings, once.
        GenerationRequest(**settings).validate()
    except InvalidRequestError as error:
        raise reader.fail("[settings]", str(error)) from None

    prompt = reader.keyed(data, "prompt")
    style_db = None
    if prompt["styles_file"]:
        try:
            style_db = StyleDatabase.from_csv_files([path.parent / name for name in prompt["styles_file"]])
        except PromptError as error:
            raise reader.fail("[prompt] styles_file", str(error)) from None
    templates = {}
    for side in ("positive", "negative"):
        plain, step = prompt[side], prompt[f"{side}_step"]
        if plain is not None and step is not None:
            raise reader.fail(f"[prompt] {side}_step", f"give either {side} or {side}_step, not both")
        templates[side] = step if step is not None else plain or ""

    variables = reader.table(data, "variables")
    for var, value in variables.items():
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise reader.fail(f"[variables] {var}", f"{value!r}: write a number or a string")
        if isinstance(value, float) and not math.isfinite(value):
            raise reader.fail(f"[variables] {var}", f"{value!r} is not a finite number; write e.g. 1.1")
        if var == PONY_QUALITY:
            try:
                pony_quality_prefix(value)
            except StudyError as error:
                raise reader.fail(f"[variables] {var}", str(error)) from None
    placeholders = frozenset(m for t in templates.values() for m in PLACEHOLDER.findall(t))
    context = _AxisContext(path.parent, master_seed, frozenset(variables), placeholders)

    def read_axes(table: Mapping[str, Any], where: str) -> tuple[Axis, ...]:
        built = tuple(reader.axis(k, v, where, context) for k, v in table.items())
        targets = Counter((a.kind, a.target) for a in built if a.kind != "prompt_sr")
        for (_kind, target), count in targets.items():
            if count > 1:
                raise reader.fail(where, f"{count} axes set {target}; keep one of them")
        return built

    grid_axes = read_axes(reader.table(data, "axes"), "[axes]")
    raw_points = data.get("points", [])
    if not isinstance(raw_points, list) or not all(isinstance(p, dict) for p in raw_points):
        raise reader.fail("[[points]]", "write each point as a [[points]] table of axis = value lines")
    points = tuple(read_axes(p, f"[[points]] #{i + 1}") for i, p in enumerate(raw_points))
    grid_targets = {(a.kind, a.target) for a in grid_axes}
    for i, point in enumerate(points):
        for a in point:
            if (a.kind, a.target) in grid_targets and a.kind != "prompt_sr":
                raise reader.fail(f"[[points]] #{i + 1} {a.name}", "is also an [axes] axis; keep one")
    for a in (*grid_axes, *(a for p in points for a in p)):
        if a.kind == "field" and a.target in settings:
            raise reader.fail(f"[settings] {a.target}", f"is also swept by the axis {a.name}; remove one")
        if a.kind == "size" and ({"width", "height"} & set(settings)):
            raise reader.fail("[settings] width", f"the axis {a.name} sets the size; remove width/height")

    _check_job_count(reader, grid_axes, points)
    _check_number_placeholders(reader, templates, variables, grid_axes, points)

    # A variable typo like {w} for W would silently stay in the prompt; catch it by case.
    known_vars = set(variables) | {a.target for a in grid_axes if a.kind == "variable"}
    known_vars |= {a.target for p in points for a in p if a.kind == "variable"}
    for placeholder in placeholders - known_vars:
        near = [v for v in known_vars if v.lower() == placeholder.lower()]
        if near:
            raise reader.fail("[prompt]", f"{{{placeholder}}} has no value; did you mean {{{near[0]}}}?")

    cfg_by_area = None
    if "cfg_by_area" in data:
        cfg_by_area = CfgByArea(**reader.keyed(data, "cfg_by_area"))
        if "cfg_scale" in settings:
            raise reader.fail("[cfg_by_area]", "[settings] cfg_scale also fixes CFG; remove one of them")

    explain = None
    if "explain" in data:
        explain = ExplainSpec(**reader.keyed(data, "explain"))
        _check_explain(reader, explain, grid_axes, points)

    report = reader.keyed(data, "report")
    return StudyFile(
        path=path,
        name=name,
        description=study["description"],
        toml_text=text,
        master_seed=master_seed,
        model=model,
        settings=settings,
        positive=templates["positive"],
        negative=templates["negative"],
        variables=dict(variables),
        axes=grid_axes,
        points=points,
        cfg_by_area=cfg_by_area,
        run=RunOptions(**reader.keyed(data, "run")),
        labels=_label_options(reader, reader.keyed(data, "labels")),
        report=ReportOptions(
            report["base"], report["grid"], report["outcomes_by"], report["plots"], report["explain"]
        ),
        explain=explain,
        style_db=style_db,
    )


def _label_options(reader: _Reader, values: dict[str, Any]) -> LabelOptions:
    """``[labels]``: the tagger path made relative to the study file, and rule classes checked."""
    if values["tagger"] is not None:
        tagger = Path(values["tagger"])
        values["tagger"] = tagger if tagger.is_absolute() else reader.path.parent / tagger
    options = LabelOptions(**values)
    tag_keys = options.tag_options()
    if tag_keys and options.labeler in (None, NO_LABELER):
        raise reader.fail(
            f"[labels] {next(iter(tag_keys))}",
            'is read by a tagger labeler; name one, e.g. labeler = "wd14" or labeler = "deepdanbooru"',
        )
    named = [("rules", r.label_class) for r in options.rules]
    named += [("fallback", options.fallback)] if options.fallback is not None else []
    classes = options.classes
    for key, name in named:
        if classes is not None and name not in classes:
            raise reader.fail(
                f"[labels] {key}",
                f"{name!r} is not one of [labels] classes {list(classes)}{_close(name, classes)}",
            )
    return options


def seed_axes(grid_axes: Sequence[Axis], points: Sequence[Sequence[Axis]]) -> list[Axis]:
    """The study's seed axes: the [axes] one and each [[points]] table's own."""
    every = (*grid_axes, *(a for p in points for a in p))
    return [a for a in every if a.kind == "field" and a.target == "seed"]


def _check_explain(
    reader: _Reader, explain: ExplainSpec, grid_axes: Sequence[Axis], points: Sequence[Sequence[Axis]]
) -> None:
    names = [*dict.fromkeys(a.name for a in (*grid_axes, *(a for p in points for a in p))), *JOB_COLUMNS]
    for key in explain.where:
        if key not in names:
            raise reader.fail(
                f"[explain] where {key}",
                f"not an axis of this study; choose one of {', '.join(names)}{_close(key, names)}",
            )
    if explain.seeds is None:
        return
    seeds = seed_axes(grid_axes, points)
    if not seeds:
        raise reader.fail(
            "[explain] seeds",
            'the study has no seed axis to take the first seeds of; add one (e.g. seed = "32 random" in '
            "[axes]) or remove seeds to capture every selected job",
        )
    longest = max(len(a.values) for a in seeds)
    if explain.seeds > longest:
        raise reader.fail(
            "[explain] seeds",
            f"{explain.seeds} is more than the {longest} values of the seed axis; write at most {longest}, "
            "or remove seeds to capture every seed",
        )
