"""`voidprompt txt2img/img2img --style NAME --styles-file FILE --tiling`: A1111's prompt styles (the
owner in voidprompt.prompts.styles) and tiling from the command line, written into the infotext as
the server writes them."""

from __future__ import annotations

from pathlib import Path

import pytest

from voidprompt.cli import main
from voidprompt.imagemeta import read_infotext
from voidprompt.infotext import parse_generation_parameters, request_fields_from_params
from voidprompt.prompts.styles import StyleDatabase

ARGV = ["--steps", "1", "--width", "64", "--height", "64", "--seed", "3", "--sampler", "Euler"]


def _styles(tmp_path: Path) -> tuple[Path, Path]:
    first, second = tmp_path / "a.csv", tmp_path / "b.csv"
    first.write_text(
        "name,prompt,negative_prompt\n"
        "framed,framed {prompt} art,lowres\n"
        "tail,should be replaced,\n"
        "# note,ignored,\n",
        encoding="utf-8",
    )
    # A later file's style replaces an earlier one of the same name, as A1111's repeated flag.
    second.write_text("name,prompt,negative_prompt\ntail,golden hour,text\n", encoding="utf-8")
    return first, second


def _written(capsys: pytest.CaptureFixture[str]) -> list[Path]:
    return [Path(line) for line in capsys.readouterr().out.split()]


def test_styles_and_tiling_reach_the_picture_and_read_back(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first, second = _styles(tmp_path)
    styled = [
        "--style",
        "framed",
        "--style",
        "tail",
        "--styles-file",
        str(first),
        "--styles-file",
        str(second),
    ]
    argv = ["txt2img", "--model", str(tiny_checkpoint), "--prompt", "a red square", *ARGV]
    out = tmp_path / "out"
    assert main([*argv, *styled, "--tiling", "--out", str(out)]) == 0
    (picture,) = _written(capsys)
    infotext, _ = read_infotext(picture)
    assert infotext is not None
    # A1111's placement: {prompt} replaced, then the next style appended after ", ".
    assert infotext.startswith("framed a red square art, golden hour\nNegative prompt: lowres, text\n")
    assert ", Tiling: True" in infotext
    # Read with the same files, the styles come back out of the prompts ("Styles array").
    params = parse_generation_parameters(infotext, style_db=StyleDatabase.from_csv_files([first, second]))
    assert params["Styles array"] == ["framed", "tail"]
    fields = request_fields_from_params(params)
    assert (fields["prompt"], fields["negative_prompt"], fields["tiling"]) == ("a red square", "", True)

    # The same prompt written out by hand is the same picture: styles are text, nothing more.
    by_hand = ["--prompt", "framed a red square art, golden hour", "--negative-prompt", "lowres, text"]
    plain = ["txt2img", "--model", str(tiny_checkpoint), *by_hand, *ARGV, "--tiling", "--out", str(out)]
    assert main(plain) == 0
    (again,) = _written(capsys)
    assert again.read_bytes() == picture.read_bytes()


def test_style_mistakes_are_one_line_before_loading(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first, _ = _styles(tmp_path)
    out = tmp_path / "out"
    base = ["txt2img", "--model", str(tiny_checkpoint), *ARGV, "--out", str(out)]
    assert main([*base, "--style", "framed"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (
        "voidprompt: error: --style 'framed': no styles file; add --styles-file FILE (an A1111 styles.csv)"
    )
    # Unlike A1111's silent skip, a name the files lack is a typo worth stopping for.
    assert main([*base, "--style", "framd", "--styles-file", str(first)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("voidprompt: error: unknown style 'framd'; known styles: 'framed', 'tail'")
    assert not out.exists()
