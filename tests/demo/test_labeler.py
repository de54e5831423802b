"""The detector labeler: the miniature world's reader as a study pre-labeler, registered by name."""

from PIL import ImageDraw

from voidprompt.demo.labeler import WORLD_CLASSES, DetectorLabeler
from voidprompt.demo.miniature import MINIATURE_MODEL, miniature_model_path
from voidprompt.demo.world import Background, Scene, ShapeObject, render
from voidprompt.lab.plugins import installed_plugins
from voidprompt.lab.schema import ModelRef


def test_detector_labeler_reads_a_picture_at_the_models_native_size() -> None:
    scene = Scene((ShapeObject("circle", "red", (0.3, 0.4), 0.15),), Background("solid", ("white",)))
    picture = render(scene, 128).convert("RGB")
    # A 9x9 px blob: a shape for a 64 px model (the detector's smallest shape is 35 native px^2), a
    # speck for a 128 px model that paints every shape at twice that side (140 px^2 at least).
    ImageDraw.Draw(picture).rectangle((96, 96, 104, 104), fill=(0, 0, 255))
    labeler = DetectorLabeler()
    assert labeler.label(picture).measures["detector_objects"] == 2.0  # 64 px unless told
    assert labeler.label(picture, native_size=64).measures["detector_objects"] == 2.0
    at_128 = labeler.label(picture, native_size=128)
    assert at_128.measures["detector_objects"] == 1.0 and "red circle" in at_128.tags


def test_the_demo_registers_its_labeler_and_model_with_the_lab() -> None:
    # What pyproject.toml's entry points give an installed voidprompt; the lab imports neither module.
    plugins = installed_plugins()
    labeler = plugins.labeler("detector")
    assert isinstance(labeler, DetectorLabeler) and tuple(labeler.classes) == WORLD_CLASSES
    assert plugins.models["miniature"] is MINIATURE_MODEL
    # The default model of a study without [model], and the miniature by name, are the shipped file,
    # read by the detector.
    for ref in (ModelRef(), ModelRef("miniature")):
        assert plugins.resolve_model(ref, miniature_model_path().parent).checkpoint == miniature_model_path()
        assert plugins.model_labeler(ref) == "detector"
