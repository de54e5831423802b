"""Study TOML -> jobs: expansion, prompts with W, cfg by area, points, validation errors."""

from pathlib import Path

import pytest

from voidprompt.errors import StudyError
from voidprompt.lab.schema import weight_tags
from voidprompt.lab.study import load_study, parse_study, summarize

BASE = """
[study]
name = "pure-negative"
master_seed = 1234

[settings]
steps = 28
clip_skip = 2

[prompt]
positive = ""
negative_step = { tags = "lowres, bad anatomy", weight = "{W}" }

[axes]
seed = "1, 2"
size = "1:1 @ 1, 4:3 @ 1.5, 512x768"
W = "0.9, 1.0, 1.1"

[cfg_by_area]
points = [[1.0, 12], [2.25, 30]]
"""


def test_expand_grid() -> None:
    jobs = parse_study(BASE, "s.toml").expand()
    assert len(jobs) == 2 * 3 * 3
    first = jobs[0]
    assert first.axis_values == {"seed": 1, "size": "512x512", "size_spec": "1:1 @ 1", "W": 0.9}
    assert first.request.negative_prompt == "(lowres:0.9), (bad anatomy:0.9)"
    assert first.request.prompt == ""
    assert (first.request.steps, first.request.clip_skip, first.request.seed) == (28, 2, 1)
    assert first.model.checkpoint is None  # no [model]: the installed default model
    # the first axis is the outermost loop, the last the innermost
    assert [j.axis_values["W"] for j in jobs[:3]] == [0.9, 1.0, 1.1]
    assert jobs[9].axis_values["seed"] == 2
    assert len({j.job_id for j in jobs}) == 18


def test_job_ids_are_stable_and_sensitive() -> None:
    ids = [j.job_id for j in parse_study(BASE, "s.toml").expand()]
    assert ids == [j.job_id for j in parse_study(BASE, "other-name.toml").expand()]
    changed = parse_study(BASE.replace("steps = 28", "steps = 29"), "s.toml").expand()
    assert not set(ids) & {j.job_id for j in changed}


def test_cfg_by_area_linear_and_step() -> None:
    jobs = parse_study(BASE, "s.toml").expand()
    cfg = {j.axis_values["size"]: j.request.cfg_scale for j in jobs}
    # areas in 512^2: 1.0 -> 12; 704x512 = 1.375 -> 12 + 18 * 0.375 / 1.25 = 17.4; 512x768 = 1.5 -> 19.2
    assert cfg["512x512"] == 12.0
    assert cfg["704x512"] == pytest.approx(17.4)
    assert cfg["512x768"] == pytest.approx(19.2)
    stepped = parse_study(BASE.replace("[cfg_by_area]", '[cfg_by_area]\nmode = "step"'), "s.toml").expand()
    assert {j.request.cfg_scale for j in stepped} == {12.0}


def test_cfg_axis_wins_over_table() -> None:
    text = BASE.replace('W = "0.9, 1.0, 1.1"', 'W = "1.0"\ncfg_scale = "7, 30"')
    assert {j.request.cfg_scale for j in parse_study(text, "s.toml").expand()} == {7.0, 30.0}


def test_points_cross_the_grid() -> None:
    text = """
[prompt]
negative = "(lowres:{W})"
[variables]
W = 1.05
[axes]
seed = "5, 6"
[[points]]
size = "512x512"
cfg_scale = 12
[[points]]
size = "768x768"
cfg_scale = 30
"""
    jobs = parse_study(text, "p.toml").expand()
    got = [(j.request.width, j.request.cfg_scale, j.request.seed) for j in jobs]
    assert got == [(512, 12.0, 5), (512, 12.0, 6), (768, 30.0, 5), (768, 30.0, 6)]
    assert jobs[0].request.negative_prompt == "(lowres:1.05)"


def test_prompt_axes(tmp_path: Path) -> None:
    (tmp_path / "prompts.txt").write_text("car\nhouse\n", encoding="utf-8")
    study_file = tmp_path / "s.toml"
    study_file.write_text(
        """
[prompt]
negative = "lowres, text"
[axes]
prompts_file = "prompts.txt"
prompt_sr = "text, watermark"
""",
        encoding="utf-8",
    )
    jobs = load_study(study_file).expand()
    got = [(j.request.prompt, j.request.negative_prompt) for j in jobs]
    assert got == [
        ("car", "lowres, text"),
        ("car", "lowres, watermark"),
        ("house", "lowres, text"),
        ("house", "lowres, watermark"),
    ]
    matrix = parse_study('[axes]\nprompt_matrix = "1girl|car|park"', "m.toml").expand()
    assert [j.request.prompt for j in matrix] == ["1girl", "1girl, car", "1girl, park", "1girl, car, park"]


def test_prompt_sr_must_find_its_text() -> None:
    with pytest.raises(StudyError, match=r"s\.toml: \[axes\] prompt_sr: Prompt S/R did not find 'cat'"):
        parse_study('[prompt]\nnegative = "dog"\n[axes]\nprompt_sr = "cat, bird"', "s.toml").expand()


def test_random_seeds_follow_master_seed() -> None:
    a = parse_study('[study]\nmaster_seed = 7\n[axes]\nseed = "4 random"', "s.toml").expand()
    b = parse_study('[study]\nmaster_seed = 7\n[axes]\nseed = "4 random"', "s.toml").expand()
    c = parse_study('[study]\nmaster_seed = 8\n[axes]\nseed = "4 random"', "s.toml").expand()
    assert [j.request.seed for j in a] == [j.request.seed for j in b] != [j.request.seed for j in c]
    # no seed anywhere: A1111's fix_seed - one seed for the whole grid
    fixed = parse_study("[axes]\nsteps = '10, 20'", "s.toml").expand()
    assert fixed[0].request.seed == fixed[1].request.seed != -1


def test_size_table_for_the_miniature_world() -> None:
    text = '[axes]\nsize = { aspects = ["1:1", "4:3"], areas = [1, 4], base = 64, unit = 8 }'
    jobs = parse_study(text, "s.toml").expand()
    # 4:3 @ 4: sqrt(64^2*4*4/3) = 147.8 -> 144, sqrt(64^2*4*3/4) = 110.9 -> 104
    assert [(j.request.width, j.request.height) for j in jobs] == [(64, 64), (128, 128), (72, 48), (144, 104)]


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("[settings]\ncfg_scal = 7", r"s\.toml: \[settings\] cfg_scal: .*did you mean 'cfg_scale'"),
        ("[settings]\nsteps = 'many'", r"\[settings\] steps: 'many' is not a valid int"),
        ("[settings]\nbatch_size = 4", r"\[settings\] batch_size: cannot be set here"),
        ("[setings]\n", r"\[setings\]: unknown section.*did you mean 'settings'"),
        ("[axes]\nWW = '1, 2'", r"\[axes\] WW: not a request field"),
        ("[axes]\nsampler = []", r"\[axes\] sampler: \[\] gives no values"),
        ("[axes]\nsteps = '10-1'", r"gives no values .*negative step"),
        ("[axes]\nsize = '4:3 @ big'", r"\[axes\] size: '4:3 @ big' is not a size"),
        ("[prompt]\nnegative = '(a:{w})'\n[variables]\nW = 1", r"\{w\} has no value; did you mean \{W\}"),
        ("[settings]\nwidth = 500", r"s\.toml: \[settings\]: width=500 is not a multiple of 8"),
        ("[axes]\nsize = '512x500'", r"not a valid request: height=500 is not a multiple of 8"),
        ("[axes]\nsampler = 'Euler, Euler b'", r"not a valid request: .*Euler b.*Euler a"),
        ("[settings]\nscheduler = 'Cosine'", r"not a valid request: .*Cosine.*Karras"),
        (
            "[settings]\nenable_hr = true\ndenoising_strength = 0.5\nhr_sampler_name = 'DDIM z'",
            r"not a valid request: .*DDIM z",
        ),
        ("[settings]\ncfg_scale = 7\n[cfg_by_area]\npoints = [[1, 7]]", r"\[cfg_by_area\]: .*remove one"),
        ("[cfg_by_area]\npoints = [[2, 7], [1, 9]]", r"areas must increase"),
        ("[settings]\nsteps = 20\n[axes]\nsteps = '1, 2'", r"\[settings\] steps: is also swept"),
        ("not toml =", r"not valid TOML"),
    ],
)
def test_errors_name_file_and_field(text: str, pattern: str) -> None:
    with pytest.raises(StudyError, match=pattern):
        parse_study(text, "s.toml").expand()


def test_weight_tags() -> None:
    assert weight_tags("lowres, bad hands,, text ", "0.9") == "(lowres:0.9), (bad hands:0.9), (text:0.9)"


def test_summary() -> None:
    summary = summarize(parse_study(BASE, "s.toml"), seconds_per_pixel=1e-5)
    assert summary.jobs == 18
    assert summary.shapes == {(512, 512): 6, (704, 512): 6, (512, 768): 6}
    assert summary.prompts == 3 and summary.prompt_texts == 4  # 3 negatives + the empty positive
    pixels = 6 * (512 * 512 + 704 * 512 + 512 * 768)
    assert summary.estimated_seconds == pytest.approx(pixels * 1e-5)
    text = summary.format()
    assert "18 jobs" in text and "704x512: 6 jobs" in text and "estimated time: 0h 01m 01s" in text


def test_jobs_are_hashable_by_id() -> None:
    jobs = parse_study(BASE, "s.toml").expand()
    assert len(set(jobs)) == 18
