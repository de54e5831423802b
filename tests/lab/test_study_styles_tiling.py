"""Study keys for two request features: ``tiling`` (a plain request field) and prompt styles
(``[settings] styles`` with ``[prompt] styles_file``, applied by the prompts package's owner)."""

from __future__ import annotations

from pathlib import Path

import pytest

from voidprompt.errors import StudyError
from voidprompt.lab.run import batch_key
from voidprompt.lab.study import load_study, parse_study

STYLES = "name,prompt,negative_prompt\nframed,framed {prompt} art,lowres\nwarm,golden hour,\n"


def _study(tmp_path: Path, body: str) -> Path:
    (tmp_path / "styles.csv").write_text(STYLES, encoding="utf-8")
    path = tmp_path / "study.toml"
    path.write_text(body, encoding="utf-8")
    return path


def test_tiling_is_a_setting_and_an_axis() -> None:
    base = '[settings]\nsteps = 2\n[prompt]\npositive = "x"\n[axes]\nseed = "1, 2"\n'
    plain = parse_study(base).expand()
    tiled = parse_study(base.replace("steps = 2", "steps = 2\ntiling = true")).expand()
    assert [j.request.tiling for j in plain] == [False, False]
    assert [j.request.tiling for j in tiled] == [True, True]
    # Off is the default: a study without the key keeps its job ids; on is another job.
    off = parse_study(base.replace("steps = 2", "steps = 2\ntiling = false")).expand()
    assert [j.job_id for j in off] == [j.job_id for j in plain]
    assert not {j.job_id for j in tiled} & {j.job_id for j in plain}
    swept = parse_study(base.replace('seed = "1, 2"', 'seed = "1"\ntiling = "false, true"')).expand()
    assert [(j.axis_values["tiling"], j.request.tiling) for j in swept] == [(False, False), (True, True)]
    # The runner never batches a tiled job with a plain one.
    assert batch_key(swept[0]) != batch_key(swept[1])


def test_styles_are_applied_from_the_study_styles_file(tmp_path: Path) -> None:
    path = _study(
        tmp_path,
        '[settings]\nsteps = 2\nstyles = ["framed", "warm"]\n'
        '[prompt]\npositive = "a {colour} ball"\nnegative = "text"\nstyles_file = "styles.csv"\n'
        '[axes]\ncolour = "red, blue"\n',
    )
    jobs = load_study(path).expand()
    # A1111's order: {prompt} placement, then the next style appended; the negative side likewise.
    assert [j.request.prompt for j in jobs] == [
        "framed a red ball art, golden hour",
        "framed a blue ball art, golden hour",
    ]
    assert {j.request.negative_prompt for j in jobs} == {"text, lowres"}
    # The job carries the styled text only: the runner needs no styles file, and the job is the one
    # the styled prompt typed out gives.
    assert {j.request.styles for j in jobs} == {()}
    (tmp_path / "typed").mkdir()
    typed = _study(
        tmp_path / "typed",
        '[settings]\nsteps = 2\n[prompt]\npositive = "framed a {colour} ball art, golden hour"\n'
        'negative = "text, lowres"\n[axes]\ncolour = "red, blue"\n',
    )
    assert [j.request for j in load_study(typed).expand()] == [j.request for j in jobs]


@pytest.mark.parametrize(
    ("settings", "prompt", "message"),
    [
        (
            'styles = ["framed"]',
            "",
            "names the styles ['framed'] but the study has no styles file; "
            'add styles_file = "styles.csv" to [prompt]',
        ),
        (
            'styles = ["framd"]',
            'styles_file = "styles.csv"',
            "[prompt] styles_file: unknown style 'framd'; known styles: 'framed', 'warm'",
        ),
        ("", 'styles_file = "missing.csv"', "[prompt] styles_file: cannot read the styles file"),
        ("", "styles_file = []", "[prompt] styles_file: write a file name or a list of them"),
    ],
)
def test_style_mistakes_name_the_key(tmp_path: Path, settings: str, prompt: str, message: str) -> None:
    path = _study(tmp_path, f'[settings]\nsteps = 2\n{settings}\n[prompt]\npositive = "x"\n{prompt}\n')
    with pytest.raises(StudyError) as caught:
        load_study(path).expand()
    assert message in str(caught.value)
