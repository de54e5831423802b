"""A command that needs an optional package ends in one line naming the extra that installs it."""

import sys
from pathlib import Path

import pytest

from voidprompt import cli
from voidprompt.errors import MissingExtraError, require_extra


def _without(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    # A None entry makes `import name` fail as if the package were not installed.
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)


def test_require_extra_returns_the_module_when_it_is_installed() -> None:
    import json

    assert require_extra("json", "server", "a test") is json


def test_require_extra_names_the_extra_and_stays_an_import_error(monkeypatch: pytest.MonkeyPatch) -> None:
    _without(monkeypatch, "uvicorn")
    with pytest.raises(MissingExtraError) as caught:
        require_extra("uvicorn", "server", "voidprompt serve", instead="or use the CLI")
    assert str(caught.value) == (
        "voidprompt serve needs uvicorn, which is not installed: pip install 'voidprompt[server]'; "
        "or use the CLI"
    )
    # Code that falls back on a missing import keeps catching it.
    assert isinstance(caught.value, ModuleNotFoundError) and caught.value.name == "uvicorn"


@pytest.mark.parametrize("missing", ["fastapi", "uvicorn"])
def test_serve_without_the_server_extra_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], missing: str
) -> None:
    _without(monkeypatch, missing)
    assert cli.main(["serve", "--port", "0"]) == 1
    err = capsys.readouterr().err
    assert err == (
        f"voidprompt: error: voidprompt serve needs {missing}, which is not installed: "
        "pip install 'voidprompt[server]'\n"
    )


def test_study_report_without_the_lab_extra_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from voidprompt.lab.cli import main

    study = tmp_path / "s.toml"
    study.write_text((Path(__file__).parents[1] / "studies" / "smoke.toml").read_text())
    _without(monkeypatch, "matplotlib")
    assert main(["report", str(study), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'voidprompt[lab]'" in err and "matplotlib" in err
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_report_figures_name_the_lab_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from voidprompt.lab.report import figures

    _without(monkeypatch, "matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg")
    with pytest.raises(MissingExtraError, match=r"pip install 'voidprompt\[lab\]'"):
        figures._new_figure(2, 2)


def test_ray_executor_without_ray_names_the_extra_and_the_local_executor(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from voidprompt.lab.ray_executor import RayExecutor

    _without(monkeypatch, "ray")
    with pytest.raises(MissingExtraError) as caught:
        RayExecutor({})
    assert str(caught.value) == (
        "--executor ray needs ray, which is not installed: pip install 'voidprompt[ray]'; "
        "or use --executor local"
    )


def test_wd14_tagger_without_onnxruntime_names_the_taggers_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from voidprompt.models.taggers import wd14
    from voidprompt.models.taggers.result import TaggerError

    _without(monkeypatch, "onnxruntime")
    with pytest.raises(TaggerError) as caught:
        wd14._onnxruntime()
    assert str(caught.value) == (
        "a WD14 tagger needs onnxruntime, which is not installed: pip install 'voidprompt[taggers]'"
    )


def test_demo_without_the_lab_extra_stops_before_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from voidprompt.demo.cli import main

    _without(monkeypatch, "matplotlib")
    assert main(["--out", str(tmp_path / "o")]) != 0
    err = capsys.readouterr().err
    assert "voidprompt demo's report needs matplotlib" in err and "pip install 'voidprompt[lab]'" in err
    assert not (tmp_path / "o").exists()


def test_the_demo_study_ships_inside_the_package() -> None:
    import tomllib

    import voidprompt
    from voidprompt.demo.study import default_demo_study

    study = default_demo_study()
    assert study.parent == Path(voidprompt.__file__).resolve().parent / "demo"
    assert tomllib.loads(study.read_text())["study"]["name"] == "pure-negative"
    # The wheel carries it: package data names the file's pattern.
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert "demo/*.toml" in pyproject["tool"]["setuptools"]["package-data"]["voidprompt"]
