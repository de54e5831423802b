"""The X/Y/Z plot's script_args, axis values, loop order and grid drawing, without a server.

Expected values are written out by hand from A1111 1.10's ``scripts/xyz_grid.py`` and
``modules/images.py`` (its axis list, its value syntax, its draw_xyz_grid and image_grid).
"""

from __future__ import annotations

from typing import Any

import pytest
from PIL import Image

from voidprompt.errors import StudyError
from voidprompt.lab.axes import apply_prompt_order, split_csv
from voidprompt.sampling.rng import RANDOM_SEED_RANGE
from voidprompt.server.xyz import (
    ARG_NAMES,
    ScriptArgsError,
    axis_options,
    axis_values,
    draw_grid_annotations,
    image_grid,
    is_xyz_plot,
    parse_script_args,
    processing_order,
    script_args,
)

# A1111 1.10's axis_options as each tab lists them (AxisOptionTxt2Img / AxisOptionImg2Img filtered).
TXT2IMG = [
    "Nothing", "Seed", "Var. seed", "Var. strength", "Steps", "Hires steps", "CFG Scale", "Prompt S/R",
    "Prompt order", "Sampler", "Hires sampler", "Checkpoint name", "Negative Guidance minimum sigma",
    "Sigma Churn", "Sigma min", "Sigma max", "Sigma noise", "Schedule type", "Schedule min sigma",
    "Schedule max sigma", "Schedule rho", "Beta schedule alpha", "Beta schedule beta", "Eta", "Clip skip",
    "Denoising", "Initial noise multiplier", "Extra noise", "Hires upscaler", "VAE", "Styles", "UniPC Order",
    "Face restore", "Token merging ratio", "Token merging ratio high-res",
    "Always discard next-to-last sigma", "SGM noise multiplier", "Refiner checkpoint", "Refiner switch at",
    "RNG source", "FP8 mode", "Size",
]  # fmt: skip
IMG2IMG = [
    "Nothing", "Seed", "Var. seed", "Var. strength", "Steps", "CFG Scale", "Image CFG Scale", "Prompt S/R",
    "Prompt order", "Sampler", "Checkpoint name", "Negative Guidance minimum sigma", "Sigma Churn",
    "Sigma min", "Sigma max", "Sigma noise", "Schedule type", "Schedule min sigma", "Schedule max sigma",
    "Schedule rho", "Beta schedule alpha", "Beta schedule beta", "Eta", "Clip skip", "Denoising",
    "Initial noise multiplier", "Extra noise", "Cond. Image Mask Weight", "VAE", "Styles", "UniPC Order",
    "Face restore", "Token merging ratio", "Token merging ratio high-res",
    "Always discard next-to-last sigma", "SGM noise multiplier", "Refiner checkpoint", "Refiner switch at",
    "RNG source", "FP8 mode", "Size",
]  # fmt: skip


def args(**changes: Any) -> list[Any]:
    """The 18 script_args with A1111's UI defaults (X: Seed, empty values, legend on)."""
    return script_args(**{"x_type": 1, **changes})


def test_each_tab_lists_a1111_axes_in_its_order() -> None:
    assert [o.label for o in axis_options(img2img=False)] == TXT2IMG
    assert [o.label for o in axis_options(img2img=True)] == IMG2IMG
    # The same index names different axes on the two tabs: 24 is Clip skip in txt2img, Denoising in img2img.
    assert parse_script_args(args(x_type=24), img2img=False).types[0].label == "Clip skip"
    assert parse_script_args(args(x_type=24), img2img=True).types[0].label == "Denoising"


def test_script_name_compares_case_insensitively() -> None:
    assert is_xyz_plot("X/Y/Z plot") and is_xyz_plot("x/y/z PLOT")
    assert not is_xyz_plot(" x/y/z plot")  # A1111 compares the whole name
    assert not is_xyz_plot("x/y plot") and not is_xyz_plot(None) and not is_xyz_plot("")


@pytest.mark.parametrize(
    ("count", "expected"),
    [(11, "older A1111 layout (x_type, x_values, y_type"), (15, "older A1111 layout"), (17, "got 17")],
)
def test_other_argument_counts_are_refused_naming_the_layout(count: int, expected: str) -> None:
    with pytest.raises(ScriptArgsError) as error:
        parse_script_args(args()[:count], img2img=False)
    message = str(error.value)
    assert expected in message
    assert ", ".join(ARG_NAMES) in message


@pytest.mark.parametrize(
    ("img2img", "index", "label"),
    [(False, 32, "Face restore"), (True, 6, "Image CFG Scale"), (False, 33, "Token merging ratio"),
     (False, 40, "FP8 mode"), (True, 30, "UniPC Order")],
)  # fmt: skip
def test_an_axis_voidprompt_cannot_run_is_refused_by_name(img2img: bool, index: int, label: str) -> None:
    with pytest.raises(ScriptArgsError, match=f"Y type '{label}' cannot run here"):
        parse_script_args(args(y_type=index), img2img=img2img)


def test_axis_types_out_of_range_or_by_label() -> None:
    with pytest.raises(ScriptArgsError, match="x_type=42 is not an axis index of txt2img, whose 42 axes"):
        parse_script_args(args(x_type=42), img2img=False)
    parsed = parse_script_args(args(x_type="steps", y_type=None, z_type="CFG Scale"), img2img=False)
    assert [t.label for t in parsed.types] == ["Steps", "Nothing", "CFG Scale"]
    with pytest.raises(ScriptArgsError, match="names no img2img axis"):
        parse_script_args(args(x_type="Hires steps"), img2img=True)
    with pytest.raises(ScriptArgsError, match="draw_legend='yes' must be true or false"):
        parse_script_args(args(draw_legend="yes"), img2img=False)
    with pytest.raises(ScriptArgsError, match="margin_size=501"):
        parse_script_args(args(margin_size=501), img2img=False)


def option(label: str, img2img: bool = False):  # type: ignore[no-untyped-def]
    return next(o for o in axis_options(img2img) if o.label == label)


def test_number_axes_read_a1111_ranges_and_skip_empty_items() -> None:
    steps = axis_values("X", option("Steps"), "1-5 (+2), ,8, 1-10 [4]", None, False, False)
    assert steps.values == [1, 3, 5, 8, 1, 4, 7, 10]
    assert steps.labels[:2] == ["Steps: 1", "Steps: 3"]
    cfg = axis_values("Y", option("CFG Scale"), "1-2 (+0.5), 7", None, False, False)
    assert cfg.values == [1.0, 1.5, 2.0, 7.0]
    assert cfg.labels == ["CFG Scale: 1.0", "CFG Scale: 1.5", "CFG Scale: 2.0", "CFG Scale: 7.0"]
    # Binary noise of float ranges is rounded to 8 places on the labels only, as A1111's format_value.
    noisy = axis_values("X", option("Eta"), "0.1-0.3 (+0.1)", None, False, False)
    assert noisy.values[2] == pytest.approx(0.3) and noisy.labels[2] == "Eta: 0.3"
    with pytest.raises(ScriptArgsError, match="X values of 'Steps'"):
        axis_values("X", option("Steps"), "1.5", None, False, False)
    with pytest.raises(ScriptArgsError, match="give no value"):
        axis_values("X", option("Steps"), " , ", None, False, False)


def test_choice_axes_read_the_dropdown_unless_csv_mode() -> None:
    sampler = option("Sampler")
    picked = axis_values("X", sampler, "Heun", ["Euler", "DPM++ 2M"], False, False)
    assert picked.values == ["Euler", "DPM++ 2M"]
    assert picked.text == "Euler,DPM++ 2M"  # A1111 records the dropdown as one csv row
    assert picked.labels == ["Euler", "DPM++ 2M"]  # the sampler's label is the bare name
    typed = axis_values("X", sampler, "Euler a, Heun", ["Euler"], True, False)
    assert typed.values == ["Euler a", "Heun"] and typed.text == "Euler a, Heun"
    with pytest.raises(ScriptArgsError, match="x_values_dropdown"):
        axis_values("X", sampler, "Euler", [], False, False)
    # A non-choice axis never reads the dropdown.
    assert axis_values("X", option("Steps"), "3", ["9"], False, False).values == [3]


def test_quoted_values_may_follow_a_space_as_in_a1111_1_10() -> None:
    sr = axis_values("X", option("Prompt S/R"), 'cat, "big dog, small", bird', None, False, False)
    assert sr.values == ["cat", "big dog, small", "bird"]
    assert sr.labels == sr.values
    # The lab's study files keep csv's default reading, where the quote after a space is text.
    assert split_csv('cat, "big dog, small"') == ["cat", '"big dog', 'small"']


def test_seed_axes_fix_minus_one_unless_kept() -> None:
    seeds = axis_values("X", option("Seed"), "-1, 5", None, False, False)
    assert 0 <= seeds.values[0] < RANDOM_SEED_RANGE and seeds.values[1] == 5
    assert seeds.labels[1] == "Seed: 5"
    kept = axis_values("X", option("Seed"), "-1, 5", None, False, True)
    assert kept.values == [-1, 5]


def test_other_labels_follow_a1111_format_functions() -> None:
    assert axis_values("X", option("Nothing"), "ignored", None, False, False).labels == [""]
    order = axis_values("X", option("Prompt order"), "a, b", None, False, False)
    assert order.values == [("a", "b"), ("b", "a")] and order.labels == ["a, b", "b, a"]
    ckpt = axis_values("X", option("Checkpoint name"), "", ["sub/model.safetensors [abc]"], False, False)
    assert ckpt.labels == ["model.safetensors [abc]"]
    hires = axis_values("X", option("Hires sampler"), "", ["Euler"], False, False)
    assert hires.labels == ["Hires sampler: Euler"]


def test_prompt_order_permutes_tokens_in_place() -> None:
    prompt = "a cat, on a mat, at night"
    assert apply_prompt_order(prompt, ("night", "cat")) == "a night, on a mat, at cat"
    assert apply_prompt_order(prompt, ("cat", "night")) == prompt
    with pytest.raises(StudyError, match="did not find 'dog'"):
        apply_prompt_order(prompt, ("dog", "cat"))


def test_loops_run_the_costliest_axis_outermost() -> None:
    # Equal costs: z, then y, then x - index order.
    assert processing_order((2, 3, 1), (0.0, 0.0, 0.0)) == [0, 1, 2, 3, 4, 5]
    # X costliest (a checkpoint axis): x outermost, then z (y is not costlier than z), then y.
    assert processing_order((2, 3, 1), (1.0, 0.0, 0.0)) == [0, 2, 4, 1, 3, 5]
    # Y costliest (a VAE axis): y outermost, then z (x is not costlier than z), then x innermost.
    assert processing_order((2, 2, 2), (0.0, 0.7, 0.0)) == [0, 1, 4, 5, 2, 3, 6, 7]


def solid(color: tuple[int, int, int], size: tuple[int, int]) -> Image.Image:
    return Image.new("RGB", size, color)


def test_image_grid_centres_smaller_pictures_on_white() -> None:
    grid = image_grid([solid((255, 0, 0), (4, 4)), solid((0, 0, 255), (2, 2))], rows=1)
    assert grid.size == (8, 4)
    assert grid.getpixel((5, 1)) == (0, 0, 255) and grid.getpixel((6, 2)) == (0, 0, 255)
    assert grid.getpixel((4, 0)) == (255, 255, 255) and grid.getpixel((7, 3)) == (255, 255, 255)
    # More rows than pictures: one row per picture.
    assert image_grid([solid((1, 2, 3), (3, 5))], rows=4).size == (3, 5)


def test_annotations_pad_the_grid_and_keep_every_cell_at_its_place() -> None:
    colors = [(200, 0, 0), (0, 200, 0), (0, 0, 200), (200, 200, 0)]
    cells = [solid(c, (40, 30)) for c in colors]
    grid = image_grid(cells, rows=2)
    out = draw_grid_annotations(grid, 40, 30, ["Steps: 1", "Steps: 2"], ["CFG: 3", "CFG: 7"], margin=2)
    pad_left = 40 * 3 // 4
    assert out.width == pad_left + 2 * 40 + 2
    pad_top = out.height - (2 * 30 + 2)
    assert pad_top > 0
    for i, color in enumerate(colors):
        col, row = i % 2, i // 2
        left, top = pad_left + (40 + 2) * col, pad_top + (30 + 2) * row
        assert out.crop((left, top, left + 40, top + 30)).getcolors() == [(40 * 30, color)]
    # The margin between cells is white.
    assert out.getpixel((pad_left + 40, pad_top + 5)) == (255, 255, 255)
    # Labels are drawn (in black, antialiased) above the columns and left of the rows.
    top_band = out.crop((pad_left, 0, out.width, pad_top))
    left_band = out.crop((0, pad_top, pad_left, out.height))
    assert top_band.getextrema()[0][0] < 200 and left_band.getextrema()[0][0] < 200
    # Empty labels add nothing: the Z grid of a plot without a Z axis is its one sub-grid.
    bare = draw_grid_annotations(grid, 80, 60, [""], [""])
    assert bare.size == grid.size and bare.tobytes() == grid.tobytes()
