"""The miniature world's detector as a study labeler, registered as ``detector``.

The lab knows it only by that name (the ``voidprompt.labelers`` entry point in pyproject.toml):
a study's ``[labels] labeler = "detector"``, or any study on the miniature model, which names it as
its labeler.
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image

from voidprompt.demo.detector import Detection, DetectorConfig, detect
from voidprompt.lab.plugins import Label

# The miniature world's outcome classes (the demo study's), in the order reports show them.
CLEAN_SINGLE = "clean single shape"
SEVERAL = "several shapes"
PATTERN = "pattern / no shape"
DEFECTIVE = "defective"
WORLD_CLASSES = (CLEAN_SINGLE, SEVERAL, PATTERN, DEFECTIVE)


class DetectorLabeler:
    """What the detector sees, mapped onto the world classes.

    Any defect flag -> defective (the negative prompt is meant to remove those); otherwise one
    shape -> clean single shape, two or more -> several shapes, none -> pattern / no shape.
    The detector's tags (colours, kinds, background, defects) become the label's tags, and its
    counts become measures: ``detector_objects`` (shapes found, whatever their defects) and
    ``detector_defects`` (defect flags raised).
    """

    name = "detector"
    classes: Sequence[str] = WORLD_CLASSES

    def __init__(self, config: DetectorConfig | None = None) -> None:
        self._config = config

    def classify(self, detection: Detection) -> str:
        if detection.defect_flags:
            return DEFECTIVE
        if detection.count == 0:
            return PATTERN
        return CLEAN_SINGLE if detection.count == 1 else SEVERAL

    def label(self, image: Image.Image, native_size: int | None = None) -> Label:
        """Read ``image`` with the detector's thresholds at ``native_size`` (the detector's default 64
        px world when not given; a config passed to the constructor wins over both)."""
        config = self._config
        if config is None and native_size is not None:
            config = DetectorConfig(native_size=native_size)
        detection = detect(image, config)
        measures = {
            "detector_objects": float(detection.count),
            "detector_defects": float(len(detection.defect_flags)),
        }
        return Label(self.classify(detection), tuple(detection.to_tags()), measures)
