"""Labelers and models reach the lab by registered name only; a study file never names code."""

from pathlib import Path

import pytest
from PIL import Image

from voidprompt.errors import StudyError
from voidprompt.lab.labels import DEFAULT_CLASSES, Label, label_scheme
from voidprompt.lab.plugins import NamedModel, Plugins
from voidprompt.lab.schema import ModelRef
from voidprompt.lab.study import parse_study


class Shapes:
    name, classes = "shapes", ("one", "many")

    def label(self, image: Image.Image) -> Label:
        return Label("one")


def _plugins(model_file: Path, **models: NamedModel) -> Plugins:
    return Plugins(
        labelers={"shapes": Shapes, "broken": lambda: object()},
        models={"mine": NamedModel(lambda: model_file, labeler="shapes", default=True), **models},
    )


def test_an_unknown_labeler_is_an_error_that_lists_the_registered_ones(tmp_path: Path) -> None:
    plugins = _plugins(tmp_path / "m.safetensors")
    with pytest.raises(StudyError, match=r"'nope' is not registered; registered: 'broken', 'shapes'"):
        plugins.labeler("nope")
    study = parse_study('[labels]\nlabeler = "nope"', tmp_path / "s.toml")
    with pytest.raises(StudyError, match=r"s\.toml: \[labels\] labeler = 'nope' is not registered"):
        label_scheme(study, plugins)
    with pytest.raises(StudyError, match=r"registered: \(none\)"):
        Plugins().labeler("detector")
    with pytest.raises(StudyError, match="'broken' does not give a Labeler"):
        plugins.labeler("broken")


@pytest.mark.parametrize("name", ["os:system", "voidprompt.demo.labeler:DetectorLabeler"])
def test_a_study_cannot_name_code_to_import(name: str) -> None:
    with pytest.raises(StudyError, match=r"\[labels\] labeler: .*a labeler is named, not imported"):
        parse_study(f'[labels]\nlabeler = "{name}"', "s.toml")


def test_a_named_models_labeler_and_classes_are_the_studys_defaults(tmp_path: Path) -> None:
    plugins = _plugins(tmp_path / "m.safetensors")
    # No [model]: the registered default model, pre-labelled by its labeler with its classes.
    assert label_scheme(parse_study("[study]", tmp_path / "s.toml"), plugins) == label_scheme(
        parse_study('[model]\ncheckpoint = "mine"', tmp_path / "s.toml"), plugins
    )
    scheme = label_scheme(parse_study("[study]", tmp_path / "s.toml"), plugins)
    assert (scheme.classes, scheme.labeler) == (("one", "many"), "shapes")
    # A model given as a file has no labeler of its own: the study brief's classes, no pre-labels.
    on_file = parse_study('[model]\ncheckpoint = "other.safetensors"', tmp_path / "s.toml")
    assert label_scheme(on_file, plugins) == type(scheme)(DEFAULT_CLASSES, None)
    # "none" turns the model's labeler off; classes given with a labeler must be the labeler's.
    off = parse_study('[labels]\nlabeler = "none"\nclasses = ["x", "y"]', tmp_path / "s.toml")
    assert label_scheme(off, plugins) == type(scheme)(("x", "y"), None)
    with pytest.raises(StudyError, match=r"the labeler 'shapes' labels with \['one', 'many'\]"):
        label_scheme(parse_study('[labels]\nclasses = ["x", "y"]', tmp_path / "s.toml"), plugins)


def test_models_resolve_by_name_or_file(tmp_path: Path) -> None:
    named_file = tmp_path / "registered.safetensors"
    plugins = _plugins(named_file)
    assert plugins.resolve_model(ModelRef(), tmp_path).checkpoint == named_file
    assert plugins.resolve_model(ModelRef("mine", "v.pt"), tmp_path).vae == tmp_path / "v.pt"
    (tmp_path / "local.safetensors").touch()
    assert (
        plugins.resolve_model(ModelRef("local.safetensors"), tmp_path).checkpoint
        == tmp_path / "local.safetensors"
    )
    with pytest.raises(StudyError, match=r"no file at .*gone\.safetensors.*registered model name \('mine'\)"):
        plugins.resolve_model(ModelRef("gone.safetensors"), tmp_path)
    two_defaults = _plugins(named_file, also=NamedModel(lambda: named_file, default=True))
    with pytest.raises(StudyError, match=r"several installed models claim to be the default \(mine, also\)"):
        two_defaults.resolve_model(ModelRef(), tmp_path)
    # A checkpoint axis may mix registered names and files; each job keeps the name it was given.
    study = parse_study('[axes]\ncheckpoint = "mine, local.safetensors"', tmp_path / "s.toml")
    assert [j.model for j in study.expand()] == [ModelRef("mine"), ModelRef("local.safetensors")]
