"""`voidprompt txt2img/img2img/info`: the model's native size as the default size, the checks made
before a model loads (the output folder, sampler and schedule names with suggestions, hires flags),
the hires fix from the command line, progress on a pipe, and help text for every option."""

from __future__ import annotations

import argparse
import io
import json
import os
import stat
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from voidprompt import cli
from voidprompt.demo.miniature import miniature_model_path
from voidprompt.imagemeta import read_infotext
from voidprompt.infotext import parse_generation_parameters
from voidprompt.models.info import checkpoint_native_size
from voidprompt.testing.fake_checkpoints import write_tiny_sdxl_checkpoint

FAST = ["--steps", "1", "--seed", "5", "--sampler", "Euler"]


@pytest.fixture(scope="module")
def native_32(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint, its voidprompt.arch metadata recording a native size of 32."""
    with safe_open(str(tiny_checkpoint), "pt") as handle:
        metadata = dict(handle.metadata())
    arch = json.loads(metadata["voidprompt.arch"])
    arch["vae_sample_size"] = 32
    metadata["voidprompt.arch"] = json.dumps(arch)
    path = tmp_path_factory.mktemp("native") / "native32.safetensors"
    save_file(load_file(str(tiny_checkpoint)), str(path), metadata=metadata)
    return path


def _no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """A check that must fail before any weights load: loading them fails the test."""

    def refuse(*_args: object) -> None:
        raise AssertionError("the model was loaded before the check")

    monkeypatch.setattr(cli, "_engine", refuse)


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("voidprompt: error: "), err
    return err.strip()


# Native size.


def test_native_sizes_come_from_the_file(tiny_checkpoint: Path, tmp_path: Path) -> None:
    assert checkpoint_native_size(miniature_model_path()) == 128  # recorded in its voidprompt.arch
    assert checkpoint_native_size(tiny_checkpoint) == 512  # SD1's default: nothing recorded
    assert checkpoint_native_size(write_tiny_sdxl_checkpoint(tmp_path / "xl.safetensors")) == 1024


def _preflight(argv: list[str]) -> object:
    args = cli.build_parser().parse_args(argv)
    return cli._preflight(args, {**cli._request_fields(args, torch.device("cpu")), **cli._hires_fields(args)})


def test_without_a_size_txt2img_asks_for_the_models_native_size(tmp_path: Path) -> None:
    out = ["--out", str(tmp_path / "o")]
    request = _preflight(["txt2img", *out])  # the miniature model
    assert (request.width, request.height) == (128, 128)  # type: ignore[attr-defined]
    request = _preflight(["txt2img", "--width", "64", *out])
    assert (request.width, request.height) == (64, 128)  # type: ignore[attr-defined]
    xl = write_tiny_sdxl_checkpoint(tmp_path / "xl.safetensors")
    request = _preflight(["txt2img", "--model", str(xl), "--height", "96", *out])
    assert (request.width, request.height) == (1024, 96)  # type: ignore[attr-defined]


def test_txt2img_makes_the_native_size_picture(
    native_32: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "o"
    assert cli.main(["txt2img", "--model", str(native_32), *FAST, "--out", str(out)]) == 0
    (path,) = [Path(line) for line in capsys.readouterr().out.split()]
    with Image.open(path) as picture:
        assert picture.size == (32, 32)
    init = tmp_path / "init.png"
    Image.new("RGB", (48, 40), "red").save(init)
    argv = ["img2img", "--model", str(native_32), "--init-image", str(init), *FAST, "--out", str(out)]
    assert cli.main(argv) == 0
    (path,) = [Path(line) for line in capsys.readouterr().out.split()]
    with Image.open(path) as picture:
        assert picture.size == (32, 32)


def test_info_shows_the_native_size_and_describes_the_default_model(
    native_32: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["info", str(native_32)]) == 0
    assert "native size:   32x32 (txt2img's default size)" in capsys.readouterr().out
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"file:          {miniature_model_path()}" in out
    assert "native size:   128x128" in out


# Checks before the model loads.


def test_an_out_path_that_is_a_file_fails_before_loading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _no_model(monkeypatch)
    existing = tmp_path / "taken.png"
    existing.write_bytes(b"x")
    assert cli.main(["txt2img", *FAST, "--out", str(existing)]) == 1
    assert _one_error_line(capsys) == (
        f"voidprompt: error: --out {existing}: is a file; give a folder (the pictures are saved into it)"
    )
    below = existing / "sub"
    assert cli.main(["txt2img", *FAST, "--out", str(below)]) == 1
    assert f"--out {below}: cannot be made: {existing} is a file" in _one_error_line(capsys)
    assert existing.read_bytes() == b"x"


@pytest.mark.parametrize(
    ("flag", "what"),
    [("--vae", "no such file"), ("--lora-dir", "no such folder"), ("--embeddings-dir", "no such folder")],
)
def test_a_missing_vae_or_network_folder_fails_before_loading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], flag: str, what: str
) -> None:
    _no_model(monkeypatch)
    gone = tmp_path / "gone"
    assert cli.main(["txt2img", flag, str(gone), "--out", str(tmp_path / "o")]) == 1
    assert _one_error_line(capsys).startswith(f"voidprompt: error: {flag} {gone}: {what}")


def test_sampler_and_schedule_typos_are_refused_with_a_suggestion(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _no_model(monkeypatch)
    out = ["--out", str(tmp_path / "o")]
    assert cli.main(["txt2img", "--sampler", "euler_a", *out]) == 1
    line = _one_error_line(capsys)
    assert "sampler_name='euler_a' is not known" in line and line.endswith(
        "did you mean 'Euler a' or 'Euler'?"
    )
    assert cli.main(["txt2img", "--scheduler", "karas", *out]) == 1
    assert _one_error_line(capsys).endswith("; did you mean 'Karras'?")
    assert cli.main(["txt2img", "--scheduler", "zzz", *out]) == 1
    assert "did you mean" not in _one_error_line(capsys)


def test_hires_flags_without_enable_hr_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _no_model(monkeypatch)
    assert cli.main(["txt2img", "--hr-scale", "1.5", "--out", str(tmp_path / "o")]) == 1
    assert _one_error_line(capsys) == (
        "voidprompt: error: --hr-scale sets the hires fix, which is off; add --enable-hr"
    )


# The hires fix.


def test_an_unknown_hires_upscaler_fails_before_loading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _no_model(monkeypatch)
    argv = ["txt2img", "--enable-hr", "--hr-upscaler", "Lanczoss", "--upscaler-dir", str(tmp_path)]
    assert cli.main([*argv, "--out", str(tmp_path / "o")]) == 1
    line = _one_error_line(capsys)
    assert line.startswith("voidprompt: error: hr_upscaler='Lanczoss' is not available; choose one of Latent")
    assert "Lanczos" in line


def test_hires_flags_fill_the_request_fields(tmp_path: Path) -> None:
    argv = ["txt2img", "--enable-hr", "--hr-upscaler", "Lanczos", "--hr-second-pass-steps", "3",
            "--denoising-strength", "0.4", "--hr-resize-x", "160", "--hr-resize-y", "192",
            "--out", str(tmp_path)]  # fmt: skip
    request = _preflight(argv)
    assert request.enable_hr and request.hr_upscaler == "Lanczos"  # type: ignore[attr-defined]
    assert request.hr_second_pass_steps == 3 and request.denoising_strength == 0.4  # type: ignore[attr-defined]
    assert (request.hr_resize_x, request.hr_resize_y) == (160, 192)  # type: ignore[attr-defined]
    assert request.hr_scale == 2.0  # type: ignore[attr-defined]  # the request's default when not given


def test_hires_fix_from_the_command_line(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["txt2img", "--model", str(tiny_checkpoint), *FAST, "--width", "32", "--height", "32",
            "--enable-hr", "--hr-scale", "1.5", "--hr-second-pass-steps", "1", "--hr-upscaler", "Nearest",
            "--denoising-strength", "0.5", "--out", str(tmp_path)]  # fmt: skip
    assert cli.main(argv) == 0
    (path,) = [Path(line) for line in capsys.readouterr().out.split()]
    with Image.open(path) as picture:
        assert picture.size == (48, 48)
        infotext, _ = read_infotext(picture)
    params = parse_generation_parameters(infotext or "")
    assert params["Hires upscale"] == 1.5 or params["Hires upscale"] == "1.5"
    assert str(params["Hires upscaler"]) == "Nearest" and str(params["Hires steps"]) == "1"
    assert float(params["Denoising strength"]) == 0.5


# Progress.


def test_progress_on_a_pipe_is_a_plain_line_each_tenth() -> None:
    stream = io.StringIO()  # not a terminal
    progress = cli.StepProgress(20, stream)
    assert progress.bar is None
    for _ in range(13):  # img2img at strength 0.6 runs 13 of 20: the total says 13, see below
        progress.step()
    progress.finish()
    lines = stream.getvalue().splitlines()
    assert lines[0] == "voidprompt: step 2/20 (10%)" and lines[-1] == "voidprompt: step 20/20 (100%)"
    assert len(lines) == 10


def test_img2img_progress_counts_the_steps_it_runs(tmp_path: Path) -> None:
    from voidprompt.request import GenerationRequest

    init = (Image.new("RGB", (8, 8)),)
    assert cli._sampler_steps(GenerationRequest(steps=20, init_images=init, denoising_strength=0.6)) == 13
    fixed = GenerationRequest(steps=20, init_images=init, denoising_strength=0.6, img2img_fix_steps=True)
    assert cli._sampler_steps(fixed) == 20
    assert cli._sampler_steps(GenerationRequest(steps=8, enable_hr=True)) == 16
    assert cli._sampler_steps(GenerationRequest(steps=8, enable_hr=True, hr_second_pass_steps=3)) == 11


def test_generation_says_when_the_model_loads_and_reaches_100_percent(
    tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    init = tmp_path / "init.png"
    Image.new("RGB", (32, 32), "blue").save(init)
    argv = ["img2img", "--model", str(tiny_checkpoint), "--init-image", str(init), "--steps", "10",
            "--denoising-strength", "0.6", "--width", "32", "--height", "32",
            "--out", str(tmp_path / "o")]  # fmt: skip
    assert cli.main(argv) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"voidprompt: loading {tiny_checkpoint} on cpu ..."
    assert err[1].startswith("voidprompt: model loaded in ")
    # int(0.6 * 10) + 1 = 7 steps run: the last line says 7 of 7.
    assert err[-1] == "voidprompt: step 7/7 (100%)"


# Help.


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {name: p for name, p in sub.choices.items() if name not in cli.DELEGATED}


def _check_help(name: str, command: argparse.ArgumentParser) -> None:
    text = " ".join(command.format_help().split())
    for action in command._actions:
        if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
            continue
        assert action.help, f"{name} {action.dest}: no help"
        default = action.default
        if action.option_strings and default not in (None, False, "", []):
            said = "default" in (action.help or "") or f"(default: {default})" in text
            assert said, f"{name} {action.option_strings[0]}: its default {default!r} is not in the help"


def test_every_option_has_help_and_says_its_default() -> None:
    from voidprompt.lab.cli import _parser as study_parser
    from voidprompt.models.networks_cli import _merge_parser

    parser = cli.build_parser()
    assert parser.description and "AUTOMATIC1111" in parser.description
    for name, command in _commands().items():
        _check_help(name, command)
    (study_sub,) = [a for a in study_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    for name, command in study_sub.choices.items():
        _check_help(f"study {name}", command)
    _check_help("merge", _merge_parser())
    txt2img = " ".join(_commands()["txt2img"].format_help().split())
    assert "--steps STEPS sampling steps (default: 20)" in txt2img
    assert "--width WIDTH picture width (default: the model's native size)" in txt2img


# Permissions.


def test_files_the_cli_writes_get_the_mode_the_umask_gives(
    tiny_checkpoint: Path, native_32: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = os.umask(0o027)
    try:
        assert cli.main(["txt2img", "--model", str(native_32), *FAST, "--out", str(tmp_path / "o")]) == 0
        (picture,) = [Path(line) for line in capsys.readouterr().out.split()]
        merged = tmp_path / "merged.safetensors"
        argv = ["merge", "--a", str(tiny_checkpoint), "--b", str(native_32), "--out", str(merged)]
        assert cli.main(argv) == 0
    finally:
        os.umask(old)
    # 0o666 less the umask, as any file the user makes; not the 0600 of a temporary file.
    assert stat.S_IMODE(picture.stat().st_mode) == 0o640
    assert stat.S_IMODE(merged.stat().st_mode) == 0o640
