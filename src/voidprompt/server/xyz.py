"""A1111's "X/Y/Z plot" script over the API: its 18 ``script_args``, its cells, its grid and its answer.

Behaviour re-derived from A1111 1.10's ``scripts/xyz_grid.py`` and ``modules/images.py`` (read for
behaviour only). The flow of one plot:

1. :func:`plan_plot` (in the request's thread) reads the 18 positional arguments, turns each axis's
   values into a list with the lab's A1111 range parser (:mod:`voidprompt.lab.axes`), and builds
   every cell as an API body through :func:`~voidprompt.server.generation.build_request`, so a cell
   meets exactly the rules, limits and precedence of a plain txt2img / img2img call. Anything wrong
   is answered before the queue: an axis voidprompt cannot run, a wrong argument count or layout
   (422, :class:`ScriptArgsError`), a bad value (the cell's own 400 / 404).
2. :func:`run_plot` (on the queue's worker) runs the cells as one job through
   :meth:`~voidprompt.server.generation.ModelHost.generate`, in A1111's order (the costliest axis
   outermost, so a checkpoint axis loads each model once), then draws the grids.
3. :func:`plot_answer` lays out images, infotexts and the ``info`` lists as A1111's API returns them.
"""

from __future__ import annotations

import csv
import io
import itertools
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from voidprompt.errors import StudyError, VoidpromptError
from voidprompt.infotext import create_infotext
from voidprompt.lab import axes as lab_axes
from voidprompt.models.upscalers.registry import Upscalers
from voidprompt.sampling.rng import fixed_seed
from voidprompt.server.checkpoints import ModelRegistry
from voidprompt.server.generation import (
    BuiltRequest,
    Generated,
    ModelHost,
    Options,
    build_request,
    processed_info,
)
from voidprompt.server.limits import LimitError, Limits
from voidprompt.server.models import Txt2ImgRequest

__all__ = [
    "ARG_DEFAULTS",
    "ARG_NAMES",
    "AXIS_OPTIONS",
    "SCRIPT_NAME",
    "AxisOption",
    "PlotPlan",
    "PlotResult",
    "ScriptArgsError",
    "axis_options",
    "draw_grid_annotations",
    "image_grid",
    "is_xyz_plot",
    "plan_plot",
    "plot_answer",
    "run_plot",
    "script_args",
    "script_info",
]

log = logging.getLogger(__name__)

SCRIPT_NAME = "x/y/z plot"  # A1111's script name: its title, lower case
SCRIPT_TITLE = "X/Y/Z plot"  # what the grid's infotext says under "Script"

# run()'s positional arguments in A1111 1.10, the order the API's script_args follow.
ARG_NAMES = (
    "x_type", "x_values", "x_values_dropdown",
    "y_type", "y_values", "y_values_dropdown",
    "z_type", "z_values", "z_values_dropdown",
    "draw_legend", "include_lone_images", "include_sub_grids", "no_fixed_seeds",
    "vary_seeds_x", "vary_seeds_y", "vary_seeds_z", "margin_size", "csv_mode",
)  # fmt: skip
# A plot with no axes: "Nothing" on each, empty values, the legend drawn, no extra images.
ARG_DEFAULTS: dict[str, Any] = dict(
    x_type=0, x_values="", x_values_dropdown=[], y_type=0, y_values="", y_values_dropdown=[],
    z_type=0, z_values="", z_values_dropdown=[], draw_legend=True, include_lone_images=False,
    include_sub_grids=False, no_fixed_seeds=False, vary_seeds_x=False, vary_seeds_y=False,
    vary_seeds_z=False, margin_size=0, csv_mode=False,
)  # fmt: skip


def script_args(**values: Any) -> list[Any]:
    """The 18 positional ``script_args`` in A1111 1.10's order, each from ``values`` by its name in
    :data:`ARG_NAMES` or else from :data:`ARG_DEFAULTS` - what a client sends for the plot."""
    unknown = set(values) - set(ARG_NAMES)
    if unknown:
        raise TypeError(f"not an X/Y/Z plot argument: {', '.join(sorted(unknown))}")
    return [values.get(name, ARG_DEFAULTS[name]) for name in ARG_NAMES]


_FLAG_ARGS = (
    "draw_legend", "include_lone_images", "include_sub_grids", "no_fixed_seeds",
    "vary_seeds_x", "vary_seeds_y", "vary_seeds_z", "csv_mode",
)  # fmt: skip
# The first X/Y/Z plot took 11 (no dropdowns, no vary_seeds, no csv_mode) and a later one 15 (no
# vary_seeds): read with 1.10's positions, their values would land on other arguments.
_OLD_LAYOUTS = {
    11: "x_type, x_values, y_type, y_values, z_type, z_values, draw_legend, include_lone_images, "
    "include_sub_grids, no_fixed_seeds, margin_size",
    15: "x_type, x_values, x_values_dropdown, y_type, y_values, y_values_dropdown, z_type, z_values, "
    "z_values_dropdown, draw_legend, include_lone_images, include_sub_grids, no_fixed_seeds, "
    "margin_size, csv_mode",
}
# A1111's UI slider for the grid margins stops at 500 px.
MAX_MARGIN = 500
# A1111's img_max_size_mp default: a plot whose grid would reach it is refused.
MAX_GRID_MEGAPIXELS = 200


class ScriptArgsError(VoidpromptError):
    """The X/Y/Z plot's script_args cannot be run as sent (422): the layout, an axis, a value."""


def is_xyz_plot(script_name: str | None) -> bool:
    """True when a request names A1111's X/Y/Z plot (names compare case-insensitively, as A1111's)."""
    return script_name is not None and script_name.lower() == SCRIPT_NAME


# ----------------------------------------------------------------------------------------- axes


@dataclass
class _Cell:
    """What the axes change in one cell's API body, applied in X, Y, Z order as A1111 applies them."""

    fields: dict[str, Any]
    overrides: dict[str, Any]
    prompt: str
    negative_prompt: str
    styles: list[str]


Apply = Callable[[_Cell, Any, Sequence[Any]], None]


def _field(name: str) -> Apply:
    def apply(cell: _Cell, value: Any, _values: Sequence[Any]) -> None:
        cell.fields[name] = value

    return apply


def _override(key: str, *, boolean: bool = False) -> Apply:
    def apply(cell: _Cell, value: Any, _values: Sequence[Any]) -> None:
        # A1111's boolean overrides: exactly "true" (any case) is True, anything else False.
        cell.overrides[key] = value.lower() == "true" if boolean else value

    return apply


def _nothing(_cell: _Cell, _value: Any, _values: Sequence[Any]) -> None:
    return None


def _prompt_sr(cell: _Cell, value: Any, values: Sequence[Any]) -> None:
    try:
        cell.prompt, cell.negative_prompt = lab_axes.apply_prompt_sr(
            cell.prompt, cell.negative_prompt, values[0], value
        )
    except StudyError as error:
        raise ScriptArgsError(f"X/Y/Z plot: {error}") from None


def _prompt_order(cell: _Cell, value: Any, _values: Sequence[Any]) -> None:
    try:
        cell.prompt = lab_axes.apply_prompt_order(cell.prompt, value)
    except StudyError as error:
        raise ScriptArgsError(f"X/Y/Z plot: {error}") from None


def _styles(cell: _Cell, value: Any, _values: Sequence[Any]) -> None:
    # A1111 splits on "," without stripping: " b" names no style, and unknown names are ignored.
    cell.styles.extend(value.split(","))


def _size(cell: _Cell, value: Any, _values: Sequence[Any]) -> None:
    width, _, height = value.partition("x")
    try:
        cell.fields["width"], cell.fields["height"] = int(width.strip()), int(height.strip())
    except ValueError:
        # A1111 prints "Invalid size" and keeps the request's size; a grid whose column silently
        # repeats the base size would mislabel its pictures, so it is refused here.
        raise ScriptArgsError(
            f"X/Y/Z plot: Size value {value!r} is not WIDTHxHEIGHT; write e.g. 512x768"
        ) from None


def _checkpoint(cell: _Cell, value: Any, _values: Sequence[Any]) -> None:
    cell.overrides["sd_model_checkpoint"] = value


def _vae(cell: _Cell, value: Any, _values: Sequence[Any]) -> None:
    name = value.strip()
    # A1111 1.10's find_vae: "auto"/"automatic" and "none" in any case, else the name.
    if name.lower() in ("auto", "automatic"):
        name = "Automatic"
    elif name.lower() == "none":
        name = "None"
    cell.overrides["sd_vae"] = name


def _refiner(cell: _Cell, value: Any, _values: Sequence[Any]) -> None:
    cell.fields["refiner_checkpoint"] = None if value in ("", "None", "none") else value


@dataclass(frozen=True)
class AxisOption:
    """One entry of A1111 1.10's ``axis_options``.

    ``kind`` is the value type (int, float, str or permutations); ``tab`` is None for both tabs, else
    the one tab that lists it; ``label_style`` how a value is written on the grid (A1111's
    format_value functions); ``choices`` whether its values come from the dropdown argument; ``cost``
    orders the loops. ``apply`` is None for an axis voidprompt cannot run, ``missing`` says why.
    """

    label: str
    kind: str
    apply: Apply | None
    tab: str | None = None
    label_style: str = "label"
    choices: bool = False
    cost: float = 0.0
    missing: str = ""

    def format(self, value: Any) -> str:
        if self.label_style == "nothing":
            return ""
        if self.label_style == "join":
            return ", ".join(value)
        if isinstance(value, float):
            value = round(value, 8)
        if self.label_style == "basename":
            return str(value).replace("\\", "/").rsplit("/", 1)[-1]
        return str(value) if self.label_style == "value" else f"{self.label}: {value}"


def _missing(label: str, kind: str, why: str, **kwargs: Any) -> AxisOption:
    return AxisOption(label, kind, None, missing=why, **kwargs)


T2I, I2I = "txt2img", "img2img"
AXIS_OPTIONS: tuple[AxisOption, ...] = (
    AxisOption("Nothing", "str", _nothing, label_style="nothing"),
    AxisOption("Seed", "int", _field("seed")),
    AxisOption("Var. seed", "int", _field("subseed")),
    AxisOption("Var. strength", "float", _field("subseed_strength")),
    AxisOption("Steps", "int", _field("steps")),
    AxisOption("Hires steps", "int", _field("hr_second_pass_steps"), tab=T2I),
    AxisOption("CFG Scale", "float", _field("cfg_scale")),
    _missing("Image CFG Scale", "float", "voidprompt runs no instruct-pix2pix models", tab=I2I),
    AxisOption("Prompt S/R", "str", _prompt_sr, label_style="value"),
    AxisOption("Prompt order", "permutations", _prompt_order, label_style="join"),
    AxisOption("Sampler", "str", _field("sampler_name"), tab=T2I, label_style="value", choices=True),
    AxisOption("Hires sampler", "str", _field("hr_sampler_name"), tab=T2I, choices=True),
    AxisOption("Sampler", "str", _field("sampler_name"), tab=I2I, label_style="value", choices=True),
    AxisOption("Checkpoint name", "str", _checkpoint, label_style="basename", choices=True, cost=1.0),
    AxisOption("Negative Guidance minimum sigma", "float", _field("s_min_uncond")),
    AxisOption("Sigma Churn", "float", _field("s_churn")),
    AxisOption("Sigma min", "float", _field("s_tmin")),
    AxisOption("Sigma max", "float", _field("s_tmax")),
    AxisOption("Sigma noise", "float", _field("s_noise")),
    AxisOption("Schedule type", "str", _field("scheduler"), choices=True),
    AxisOption("Schedule min sigma", "float", _override("sigma_min")),
    AxisOption("Schedule max sigma", "float", _override("sigma_max")),
    AxisOption("Schedule rho", "float", _override("rho")),
    AxisOption("Beta schedule alpha", "float", _override("beta_dist_alpha")),
    AxisOption("Beta schedule beta", "float", _override("beta_dist_beta")),
    AxisOption("Eta", "float", _field("eta")),
    AxisOption("Clip skip", "int", _override("CLIP_stop_at_last_layers")),
    AxisOption("Denoising", "float", _field("denoising_strength")),
    AxisOption("Initial noise multiplier", "float", _override("initial_noise_multiplier")),
    _missing("Extra noise", "float", "img2img extra noise is not a setting voidprompt has"),
    AxisOption("Hires upscaler", "str", _field("hr_upscaler"), tab=T2I, choices=True),
    AxisOption("Cond. Image Mask Weight", "float", _override("inpainting_mask_weight"), tab=I2I),
    AxisOption("VAE", "str", _vae, choices=True, cost=0.7),
    AxisOption("Styles", "str", _styles, choices=True),
    _missing("UniPC Order", "int", "UniPC's order is not a setting voidprompt has", cost=0.5),
    _missing("Face restore", "str", "voidprompt has no face restoration", label_style="value"),
    _missing("Token merging ratio", "float", "voidprompt has no token merging"),
    _missing("Token merging ratio high-res", "float", "voidprompt has no token merging"),
    AxisOption(
        "Always discard next-to-last sigma",
        "str",
        _override("always_discard_next_to_last_sigma", boolean=True),
        choices=True,
    ),
    AxisOption("SGM noise multiplier", "str", _override("sgm_noise_multiplier", boolean=True), choices=True),
    AxisOption("Refiner checkpoint", "str", _refiner, label_style="basename", choices=True, cost=1.0),
    AxisOption("Refiner switch at", "float", _field("refiner_switch_at")),
    AxisOption("RNG source", "str", _override("randn_source"), choices=True),
    _missing("FP8 mode", "str", "voidprompt has no FP8 weight storage", choices=True, cost=0.9),
    AxisOption("Size", "str", _size),
)


def axis_options(img2img: bool) -> list[AxisOption]:
    """The axis list of one tab, in A1111's order: its types are indices into this list."""
    tab = I2I if img2img else T2I
    return [option for option in AXIS_OPTIONS if option.tab in (None, tab)]


def script_info(img2img: bool) -> dict[str, Any]:
    """The plot's entry in A1111's ``/sdapi/v1/script-info``: its name, tab and the 18 arguments as its
    UI declares them (label, default, range, choices), in script_args order."""
    labels = [o.label for o in axis_options(img2img)]

    def arg(label: str, value: Any, **more: Any) -> dict[str, Any]:
        return {"label": label, "value": value, "minimum": None, "maximum": None, "step": None,
                "choices": None, **more}  # fmt: skip

    args = []
    for axis, default in (("X", labels[1]), ("Y", labels[0]), ("Z", labels[0])):
        args += [arg(f"{axis} type", default, choices=labels), arg(f"{axis} values", ""),
                 arg(f"{axis} values", None, choices=[])]  # fmt: skip
    args += [
        arg("Draw legend", True),
        arg("Include Sub Images", False),
        arg("Include Sub Grids", False),
        arg("Keep -1 for seeds", False),
        *(arg(f"Vary seeds for {axis}", False) for axis in "XYZ"),
        arg("Grid margins (px)", 0, minimum=0, maximum=MAX_MARGIN, step=2),
        arg("Use text inputs instead of dropdowns", False),
    ]
    return {"name": SCRIPT_NAME, "is_alwayson": False, "is_img2img": img2img, "args": args}


# ------------------------------------------------------------------------------------ arguments


@dataclass(frozen=True)
class PlotArgs:
    """The 18 script_args, checked."""

    types: tuple[AxisOption, AxisOption, AxisOption]
    values: tuple[str, str, str]
    dropdowns: tuple[list[str] | None, list[str] | None, list[str] | None]
    draw_legend: bool
    include_lone_images: bool
    include_sub_grids: bool
    no_fixed_seeds: bool
    vary_seeds: tuple[bool, bool, bool]
    margin_size: int
    csv_mode: bool


def _layout_message(count: int) -> str:
    expected = ", ".join(ARG_NAMES)
    old = _OLD_LAYOUTS.get(count)
    if old:
        return (
            f"X/Y/Z plot: {count} script_args is an older A1111 layout ({old}); voidprompt takes A1111 "
            f"1.10's 18, in this order: {expected}"
        )
    return f"X/Y/Z plot: got {count} script_args; it takes A1111 1.10's 18, in this order: {expected}"


def _flag(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ScriptArgsError(f"X/Y/Z plot: {name}={value!r} must be true or false")


def _axis_type(name: str, value: Any, options: Sequence[AxisOption], tab: str) -> AxisOption:
    # A1111: "x_type or 0", so None (and 0) mean Nothing.
    if value is None:
        return options[0]
    if isinstance(value, str) and not value.strip().lstrip("-").isdigit():
        # An axis label instead of its index: unambiguous within a tab, so accepted.
        for option in options:
            if option.label.lower() == value.strip().lower():
                return option
        raise ScriptArgsError(
            f"X/Y/Z plot: {name}={value!r} names no {tab} axis; use an index 0-{len(options) - 1} or "
            "one of: " + ", ".join(o.label for o in options)
        )
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ScriptArgsError(f"X/Y/Z plot: {name}={value!r} must be an axis index (an integer)")
    index = int(value)
    if not 0 <= index < len(options):
        raise ScriptArgsError(
            f"X/Y/Z plot: {name}={index} is not an axis index of {tab}, whose {len(options)} axes are "
            "numbered 0-"
            + str(len(options) - 1)
            + ": "
            + ", ".join(f"{i} {o.label}" for i, o in enumerate(options))
        )
    return options[index]


def _text(name: str, value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ScriptArgsError(f"X/Y/Z plot: {name}={value!r} must be a string of comma-separated values")
    return value


def _dropdown(name: str, value: Any) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ScriptArgsError(f"X/Y/Z plot: {name}={value!r} must be a list of strings (or null)")
    return list(value)


def parse_script_args(args: Sequence[Any], img2img: bool) -> PlotArgs:
    """The 18 positional script_args of A1111 1.10's run(); any other count is refused, naming the
    layout, so no value is read from another argument's position."""
    if len(args) != len(ARG_NAMES):
        raise ScriptArgsError(_layout_message(len(args)))
    named = dict(zip(ARG_NAMES, args, strict=True))
    options = axis_options(img2img)
    tab = I2I if img2img else T2I
    types = tuple(_axis_type(f"{a}_type", named[f"{a}_type"], options, tab) for a in "xyz")
    for axis, option in zip("XYZ", types, strict=True):
        if option.apply is None:
            raise ScriptArgsError(
                f"X/Y/Z plot: {axis} type {option.label!r} cannot run here: {option.missing}; "
                "choose another axis"
            )
    margin = named["margin_size"]
    if isinstance(margin, float) and margin.is_integer():
        margin = int(margin)
    if isinstance(margin, bool) or not isinstance(margin, int) or not 0 <= margin <= MAX_MARGIN:
        raise ScriptArgsError(
            f"X/Y/Z plot: margin_size={margin!r} must be a whole number of pixels, 0-{MAX_MARGIN}"
        )
    flags = {name: _flag(name, named[name]) for name in _FLAG_ARGS}
    return PlotArgs(
        types=(types[0], types[1], types[2]),
        values=(_text("x_values", named["x_values"]), _text("y_values", named["y_values"]),
                _text("z_values", named["z_values"])),
        dropdowns=(_dropdown("x_values_dropdown", named["x_values_dropdown"]),
                   _dropdown("y_values_dropdown", named["y_values_dropdown"]),
                   _dropdown("z_values_dropdown", named["z_values_dropdown"])),
        draw_legend=flags["draw_legend"],
        include_lone_images=flags["include_lone_images"],
        include_sub_grids=flags["include_sub_grids"],
        no_fixed_seeds=flags["no_fixed_seeds"],
        vary_seeds=(flags["vary_seeds_x"], flags["vary_seeds_y"], flags["vary_seeds_z"]),
        margin_size=margin,
        csv_mode=flags["csv_mode"],
    )  # fmt: skip


@dataclass(frozen=True)
class Axis:
    """One axis of a plot: its option, its values, what the infotext records and the grid labels."""

    option: AxisOption
    values: list[Any]
    text: str  # "X Values" in the grid's infotext
    labels: list[str]


def _csv_row(items: Sequence[str]) -> str:
    # A1111's list_to_csv_string: what the dropdown's choices look like as "X Values".
    with io.StringIO() as out:
        csv.writer(out).writerow(items)
        return out.getvalue().strip()


def axis_values(
    name: str, option: AxisOption, text: str, dropdown: list[str] | None, csv_mode: bool, no_fixed_seeds: bool
) -> Axis:
    """An axis's values as A1111's process_axis reads them (the lab's parser for the range syntax)."""
    if option.label == "Nothing":
        return Axis(option, [0], text, [""])
    if option.choices and not csv_mode:
        items = list(dropdown or [])
        text = _csv_row(items)
        if not items:
            raise ScriptArgsError(
                f"X/Y/Z plot: {name} type {option.label!r} takes its values from "
                f"{name.lower()}_values_dropdown (A1111 1.10), which is empty; list them there, or set "
                f"csv_mode true to read {name.lower()}_values"
            )
    else:
        # A1111 1.10 reads the values with csv's skipinitialspace, so a quoted value may follow ", ".
        items = lab_axes.split_csv(text, skip_initial_space=True)
    values: list[Any]
    try:
        if option.kind == "int":
            values = lab_axes.parse_int_values([item for item in items if item.strip()])
        elif option.kind == "float":
            values = lab_axes.parse_float_values([item for item in items if item.strip()])
        elif option.kind == "permutations":
            values = list(itertools.permutations(items))
        else:
            values = list(items)
    except StudyError as error:
        raise ScriptArgsError(f"X/Y/Z plot: {name} values of {option.label!r}: {error}") from None
    if not values:
        raise ScriptArgsError(f"X/Y/Z plot: {name} values {text!r} give no value for {option.label!r}")
    if option.label in ("Seed", "Var. seed") and not no_fixed_seeds:
        # A1111's fix_axis_seeds: -1 becomes one random seed, fixed for the whole plot.
        values = [fixed_seed(v) if v == -1 else v for v in values]
    return Axis(option, values, text, [option.format(v) for v in values])


# --------------------------------------------------------------------------------------- planning


@dataclass
class PlotCell:
    index: int  # ix + iy * nx + iz * nx * ny, A1111's position in the image list
    ix: int
    iy: int
    iz: int
    built: BuiltRequest


@dataclass
class PlotPlan:
    args: PlotArgs
    x: Axis
    y: Axis
    z: Axis
    cells: list[PlotCell]  # in index order
    order: list[int]  # cell indices in the order they run

    @property
    def shape(self) -> tuple[int, int, int]:
        return len(self.x.values), len(self.y.values), len(self.z.values)

    def grid_extra(self, with_z: bool) -> dict[str, Any]:
        """The keys A1111 adds to a grid's infotext: the script, then each axis's type and values."""
        extra: dict[str, Any] = {"Script": SCRIPT_TITLE}
        for name, axis in (
            (("X", self.x), ("Y", self.y), ("Z", self.z)) if with_z else (("X", self.x), ("Y", self.y))
        ):
            if axis.option.label == "Nothing":
                continue
            extra[f"{name} Type"] = axis.option.label
            extra[f"{name} Values"] = axis.text
            if axis.option.label in ("Seed", "Var. seed") and not self.args.no_fixed_seeds:
                extra[f"Fixed {name} Values"] = ", ".join(str(v) for v in axis.values)
        return extra


def _loop_order(costs: tuple[float, float, float]) -> tuple[int, int]:
    """A1111's choice of the outer and middle loop (0 = x, 1 = y, 2 = z): the costliest axis outermost;
    with no strict maximum, z then y."""
    x, y, z = costs
    if x > y and x > z:
        return 0, (1 if y > z else 2)
    if y > x and y > z:
        return 1, (0 if x > z else 2)
    if z > x and z > y:
        return 2, (0 if x > y else 1)
    return 2, 1


def processing_order(shape: tuple[int, int, int], costs: tuple[float, float, float]) -> list[int]:
    """Cell indices in the order A1111's draw_xyz_grid runs them."""
    nx, ny, nz = shape
    first, second = _loop_order(costs)
    third = 3 - first - second
    sizes = (nx, ny, nz)
    order = []
    for a in range(sizes[first]):
        for b in range(sizes[second]):
            for c in range(sizes[third]):
                pos = [0, 0, 0]
                pos[first], pos[second], pos[third] = a, b, c
                order.append(pos[0] + pos[1] * nx + pos[2] * nx * ny)
    return order


def plan_plot(
    body: Txt2ImgRequest,
    options: Options,
    limits: Limits,
    registry: ModelRegistry,
    *,
    img2img: bool = False,
    upscalers: Upscalers | None = None,
) -> PlotPlan:
    """Every cell of the plot ``body`` asks for, each built and checked as a plain request would be."""
    args = parse_script_args(body.script_args, img2img)
    x, y, z = (
        axis_values(name, option, text, dropdown, args.csv_mode, args.no_fixed_seeds)
        for name, option, text, dropdown in zip("XYZ", args.types, args.values, args.dropdowns, strict=True)
    )
    nx, ny, nz = len(x.values), len(y.values), len(z.values)
    plain = body.model_copy(update={"script_name": None, "script_args": []})
    base = build_request(plain, options, limits, img2img=img2img, upscalers=upscalers)
    per_cell = base.request.batch_size * base.request.n_iter
    if nx * ny * nz * per_cell > limits.max_images:
        raise LimitError(
            f"X/Y/Z plot: {nx}x{ny}x{nz} cells of {per_cell} images each is over this server's limit of "
            f"{limits.max_images} images per request; use fewer values"
        )
    seed, subseed = base.request.seed, base.request.subseed
    if not args.no_fixed_seeds:
        # A1111's fix_seed(p): one random seed (and subseed) for every cell of the plot.
        seed, subseed = fixed_seed(seed), fixed_seed(subseed)
    cells: list[PlotCell] = []
    for iz, zv in enumerate(z.values):
        for iy, yv in enumerate(y.values):
            for ix, xv in enumerate(x.values):
                request = base.request
                cell = _Cell({}, {}, request.prompt, request.negative_prompt, list(request.styles))
                for axis, value in ((x, xv), (y, yv), (z, zv)):
                    assert axis.option.apply is not None
                    axis.option.apply(cell, value, axis.values)
                cell_seed = cell.fields.get("seed", seed)
                # A1111's vary_seeds: the seed moves by the cell's position along the chosen axes.
                xdim = nx if args.vary_seeds[0] else 1
                ydim = ny if args.vary_seeds[1] else 1
                if args.vary_seeds[0]:
                    cell_seed += ix
                if args.vary_seeds[1]:
                    cell_seed += iy * xdim
                if args.vary_seeds[2]:
                    cell_seed += iz * xdim * ydim
                built = _build_cell(
                    plain, cell, cell_seed, subseed, base, options, limits, registry, img2img, upscalers
                )
                cells.append(PlotCell(len(cells), ix, iy, iz, built))
    _check_grid_size(cells)
    costs = (x.option.cost, y.option.cost, z.option.cost)
    return PlotPlan(args, x, y, z, cells, processing_order((nx, ny, nz), costs))


def _build_cell(
    plain: Txt2ImgRequest,
    cell: _Cell,
    seed: int,
    subseed: int,
    base: BuiltRequest,
    options: Options,
    limits: Limits,
    registry: ModelRegistry,
    img2img: bool,
    upscalers: Upscalers | None,
) -> BuiltRequest:
    update: dict[str, Any] = {"subseed": subseed, **cell.fields, "seed": seed}
    if cell.prompt != base.request.prompt or cell.negative_prompt != base.request.negative_prompt:
        update["prompt"], update["negative_prompt"] = cell.prompt, cell.negative_prompt
    if cell.styles != list(base.request.styles):
        update["styles"] = cell.styles
    if cell.overrides:
        update["override_settings"] = {**(plain.override_settings or {}), **cell.overrides}
    built = build_request(
        plain.model_copy(update=update), options, limits, img2img=img2img, upscalers=upscalers
    )
    for key in cell.overrides:
        # An axis's setting is the cell's alone, even when the client keeps its own overrides.
        built.persist.pop(key, None)
    if built.model is not None and "sd_model_checkpoint" in cell.overrides:
        registry.find(built.model)
    if built.vae is not None and "sd_vae" in cell.overrides:
        registry.find_vae(built.vae)
    if built.request.refiner_checkpoint and "refiner_checkpoint" in cell.fields:
        registry.find(built.request.refiner_checkpoint)
    return built


def _check_grid_size(cells: Sequence[PlotCell]) -> None:
    pixels = sum(c.built.request.width * c.built.request.height for c in cells)
    if round(pixels / 1_000_000) >= MAX_GRID_MEGAPIXELS:
        raise LimitError(
            f"X/Y/Z plot: the grid would hold {pixels / 1e6:.0f} megapixels, over A1111's limit of "
            f"{MAX_GRID_MEGAPIXELS}; use fewer or smaller cells"
        )


# ------------------------------------------------------------------------------------------ running


@dataclass
class PlotResult:
    """What a plot produced: each cell's generation (None when it made no picture) and the grids."""

    plan: PlotPlan
    generated: list[Generated | None]
    cell_images: list[Image.Image]
    sub_grids: list[Image.Image]
    grid: Image.Image
    grid_infotexts: list[str | None]  # the main grid's, then one per sub-grid
    first: Generated  # the first cell that ran: the template of the answer's info, as A1111's
    interrupted: bool = False


def run_plot(host: ModelHost, job: str, plan: PlotPlan) -> PlotResult:
    """Run the cells as one job on the queue's worker and draw the grids (A1111's draw_xyz_grid)."""
    state = host.state
    n_iter = plan.cells[0].built.request.n_iter
    generated: list[Generated | None] = [None] * len(plan.cells)
    errors: list[VoidpromptError] = []
    stopped = False
    state.begin(job, len(plan.cells) * n_iter)
    try:
        for count, index in enumerate(plan.order):
            with state.lock:
                interrupted = state.interrupted
                state.job = f"{index + 1} out of {len(plan.cells)}"
            if interrupted and count > 0:
                stopped = True  # A1111: the cells after an interrupt are left blank
                continue
            try:
                generated[index] = host.generate(job, plan.cells[index].built, first_iteration=count * n_iter)
            except VoidpromptError as error:
                # A1111 reports a failed cell and leaves it blank; the plot goes on.
                log.warning("X/Y/Z plot cell %d failed: %s", index + 1, error)
                errors.append(error)
    finally:
        state.end()
    done = [g for g in (generated[i] for i in plan.order) if g is not None and g.result.images]
    if not done:
        if errors:
            raise errors[0]
        done = [g for g in (generated[i] for i in plan.order) if g is not None]
    first = done[0]
    cell_images = _cell_images(plan, generated, first)
    sub_grids, grid = draw_xyz_grid(plan, cell_images)
    grid_infotexts = [_grid_infotext(plan, generated, 0, with_z=True)]
    grid_infotexts += [_grid_infotext(plan, generated, iz, with_z=False) for iz in range(plan.shape[2])]
    interrupted = stopped or any(g is not None and g.interrupted for g in generated)
    return PlotResult(plan, generated, cell_images, sub_grids, grid, grid_infotexts, first, interrupted)


def _cell_images(
    plan: PlotPlan, generated: Sequence[Generated | None], first: Generated
) -> list[Image.Image]:
    images: list[Image.Image] = []
    for cell, g in zip(plan.cells, generated, strict=True):
        if g is not None and g.result.images:
            images.append(g.result.images[0])
        else:
            # A1111 fills a cell without a picture with a black one the size of the first picture.
            request = cell.built.request
            size = first.result.images[0].size if first.result.images else (request.width, request.height)
            images.append(Image.new("RGB", size))
    return images


def _grid_infotext(
    plan: PlotPlan, generated: Sequence[Generated | None], iz: int, *, with_z: bool
) -> str | None:
    # A1111 writes a grid's infotext from the first cell of its slice (x = y = 0), with its own keys.
    nx, ny, _ = plan.shape
    g = generated[iz * nx * ny]
    if g is None or not g.result.params:
        return None
    result = g.result
    return create_infotext(
        result.prompts[0], result.negative_prompts[0], {**result.params[0], **plan.grid_extra(with_z)}
    )


# ----------------------------------------------------------------------------------------- drawing


@dataclass
class _Line:
    text: str
    size: tuple[int, int] = (0, 0)


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    # A1111 draws its labels with a TrueType font at (width + height) // 25 points; Pillow's own
    # scalable default stands in for its Roboto / DejaVu.
    try:
        return ImageFont.load_default(size=max(1, size))
    except ImportError:
        # A Pillow built without FreeType has only its fixed-size bitmap font.
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: Any, width: float) -> list[str]:
    # A1111's wrap: words are added to a line while it fits, a word that does not starts a new one.
    lines = [""]
    for word in text.split():
        line = f"{lines[-1]} {word}".strip()
        if draw.textlength(line, font=font) <= width:
            lines[-1] = line
        else:
            lines.append(word)
    return lines


def image_grid(images: Sequence[Image.Image], rows: int) -> Image.Image:
    """A1111's image_grid: ``rows`` rows of cells the size of the largest picture, each picture
    centred in its cell, on white."""
    rows = min(rows, len(images))
    cols = math.ceil(len(images) / rows)
    w = max(image.width for image in images)
    h = max(image.height for image in images)
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, image in enumerate(images):
        dx = 0 if image.width == w else (w - image.width) // 2
        dy = 0 if image.height == h else (h - image.height) // 2
        grid.paste(image, (i % cols * w + dx, i // cols * h + dy))
    return grid


def draw_grid_annotations(
    grid: Image.Image,
    width: int,
    height: int,
    hor_texts: Sequence[str],
    ver_texts: Sequence[str],
    margin: int = 0,
) -> Image.Image:
    """A1111's draw_grid_annotations: column labels above, row labels at the left (a margin of 3/4 of
    a cell's width when any row has a label), ``margin`` pixels between cells."""
    fontsize = (width + height) // 25
    spacing = fontsize // 2
    font = _font(fontsize)
    pad_left = 0 if not any(ver_texts) else width * 3 // 4
    cols, rows = grid.width // width, grid.height // height
    if cols != len(hor_texts) or rows != len(ver_texts):
        raise ValueError(f"{len(hor_texts)}x{len(ver_texts)} labels for a grid of {cols}x{rows} cells")
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1), "white"))

    def lines_of(text: str, allowed: float) -> list[_Line]:
        lines = [_Line(t) for t in _wrap(measure, text, font, allowed)]
        for line in lines:
            box = measure.multiline_textbbox((0, 0), line.text, font=font)
            line.size = (int(box[2] - box[0]), int(box[3] - box[1]))
        return lines

    hor = [lines_of(t, width) for t in hor_texts]
    ver = [lines_of(t, pad_left) for t in ver_texts]
    hor_heights = [sum(line.size[1] + spacing for line in lines) - spacing for lines in hor]
    # A1111 quirk: a row label's height leaves the spacing out after every line, the last included.
    ver_heights = [sum(line.size[1] + spacing for line in lines) - spacing * len(lines) for lines in ver]
    pad_top = 0 if sum(hor_heights) == 0 else max(hor_heights) + spacing * 2
    result = Image.new(
        "RGB",
        (grid.width + pad_left + margin * (cols - 1), grid.height + pad_top + margin * (rows - 1)),
        "white",
    )
    for row in range(rows):
        for col in range(cols):
            cell = grid.crop((width * col, height * row, width * (col + 1), height * (row + 1)))
            result.paste(cell, (pad_left + (width + margin) * col, pad_top + (height + margin) * row))
    draw = ImageDraw.Draw(result)

    def draw_lines(x: float, y: float, lines: Sequence[_Line]) -> None:
        for line in lines:
            draw.multiline_text((x, y + line.size[1] / 2), line.text, font=font, fill=(0, 0, 0), anchor="mm",
                                align="center")  # fmt: skip
            y += line.size[1] + spacing

    for col in range(cols):
        draw_lines(
            pad_left + (width + margin) * col + width / 2, pad_top / 2 - hor_heights[col] / 2, hor[col]
        )
    for row in range(rows):
        draw_lines(
            pad_left / 2, pad_top + (height + margin) * row + height / 2 - ver_heights[row] / 2, ver[row]
        )
    return result


def draw_xyz_grid(
    plan: PlotPlan, cell_images: Sequence[Image.Image]
) -> tuple[list[Image.Image], Image.Image]:
    """One X/Y grid per Z value, and the grid of those side by side (A1111's draw_xyz_grid)."""
    nx, ny, nz = plan.shape
    sub_grids = []
    for iz in range(nz):
        cells = cell_images[iz * nx * ny : (iz + 1) * nx * ny]
        sub = image_grid(cells, rows=ny)
        if plan.args.draw_legend:
            w, h = max(c.width for c in cells), max(c.height for c in cells)
            sub = draw_grid_annotations(sub, w, h, plan.x.labels, plan.y.labels, plan.args.margin_size)
        sub_grids.append(sub)
    grid = image_grid(sub_grids, rows=1)
    if plan.args.draw_legend:
        w, h = max(s.width for s in sub_grids), max(s.height for s in sub_grids)
        grid = draw_grid_annotations(grid, w, h, plan.z.labels, [""])
    return sub_grids, grid


# ----------------------------------------------------------------------------------------- answer


@dataclass(frozen=True)
class PlotAnswer:
    images: list[Image.Image]
    infotexts: list[str | None]  # one per image, in image order
    info: dict[str, Any]


def _drop_sub_grid_entries(items: list[Any], count: int) -> None:
    # A1111 deletes index 1 once per Z value; in the prompt and seed lists (which never held the main
    # grid) that removes the other slices' entries and the first cell's, an A1111 misalignment kept.
    for _ in range(count):
        del items[1]


def plot_answer(result: PlotResult) -> PlotAnswer:
    """Images, their infotexts and ``info`` as A1111's API answers an X/Y/Z plot: the grid alone by
    default; the grid of each Z value with ``include_sub_grids``; each cell's picture with
    ``include_lone_images``."""
    plan = result.plan
    nx, ny, nz = plan.shape
    args = plan.args
    cell_prompts: list[str | None] = []
    cell_seeds: list[int | None] = []
    cell_infotexts: list[str | None] = []
    for g in result.generated:
        has = g is not None and bool(g.result.images)
        cell_prompts.append(g.result.prompts[0] if has and g is not None else None)
        cell_seeds.append(g.result.seeds[0] if has and g is not None else None)
        cell_infotexts.append(g.result.infotexts[0] if has and g is not None else None)
    prompts = [cell_prompts[iz * nx * ny] for iz in range(nz)] + cell_prompts
    seeds = [cell_seeds[iz * nx * ny] for iz in range(nz)] + cell_seeds
    infotexts = list(result.grid_infotexts) + cell_infotexts
    images = [result.grid, *result.sub_grids, *result.cell_images]
    if not args.include_lone_images:
        images = images[: nz + 1]
    if not args.include_sub_grids:
        for items in (images, prompts, seeds, infotexts):
            _drop_sub_grid_entries(items, nz)
    info = processed_info(result.first)
    info.update(
        all_prompts=prompts,
        all_seeds=seeds,
        infotexts=infotexts,
        index_of_first_image=1,
        interrupted=result.interrupted,
    )
    return PlotAnswer(images, infotexts[: len(images)], info)


def cells_generated(result: PlotResult) -> Iterator[Generated]:
    """The cells that made pictures, in image order (what save_images writes)."""
    for g in result.generated:
        if g is not None and g.result.images:
            yield g
