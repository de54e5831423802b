"""Outcome classes, auto-labeler plugins and label CSV import/export.

A study's ``[labels]`` table names its outcome classes and the plugin that pre-labels images::

    [labels]
    classes = ["clean single shape", "several shapes", "pattern / no shape", "defective"]
    labeler = "detector"        # or "none", or "package.module:factory"

Without ``classes`` the seed's four outcomes are used. Without ``labeler`` studies on the
miniature model are pre-labeled by its detector (the world's ground-truth reader) and other
studies are not pre-labeled. A person's labels (source ``human``) always win over a plugin's in
reports; both are kept in the catalog.
"""

from __future__ import annotations

import csv
import importlib
import inspect
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from PIL import Image

from voidprompt.errors import StudyError
from voidprompt.files import atomic_write
from voidprompt.lab.catalog import Catalog
from voidprompt.lab.study import Study

DEFAULT_CLASSES = ("Pattern", "Object or Scenery", "Malformed human", "Legit human")
HUMAN = "human"

# The miniature world's outcome classes (the demo study's), in the order reports show them.
CLEAN_SINGLE = "clean single shape"
SEVERAL = "several shapes"
PATTERN = "pattern / no shape"
DEFECTIVE = "defective"
WORLD_CLASSES = (CLEAN_SINGLE, SEVERAL, PATTERN, DEFECTIVE)


@dataclass(frozen=True)
class Label:
    """An outcome class, free tags, and numbers the plugin read off the image.

    ``measures`` are stored with the image's other measures (so reports can plot them against any
    axis); name them after the plugin, e.g. ``detector_objects``.
    """

    label_class: str | None
    tags: tuple[str, ...] = ()
    measures: Mapping[str, float] = field(default_factory=dict)


@runtime_checkable
class Labeler(Protocol):
    """An auto-labeler plugin: one image in, one outcome class (of ``classes``) and free tags out.

    A labeler whose reading depends on the model's pixel scale may take a keyword ``native_size``
    in ``label`` (the side the model was trained at, from its ``voidprompt.arch`` metadata): the
    study runner then passes it (:func:`label_image`). The detector does: a miniature model paints
    at its own pixel scale whatever size it is asked for."""

    name: str  # stored as the label's source
    classes: Sequence[str]

    def label(self, image: Image.Image) -> Label: ...


class DetectorLabeler:
    """The miniature world's detector as a labeler: what it sees, mapped onto the world classes.

    Any defect flag -> defective (the negative prompt is meant to remove those); otherwise one
    shape -> clean single shape, two or more -> several shapes, none -> pattern / no shape.
    The detector's tags (colours, kinds, background, defects) become the label's tags, and its
    counts become measures: ``detector_objects`` (shapes found, whatever their defects) and
    ``detector_defects`` (defect flags raised).
    """

    name = "detector"
    classes: Sequence[str] = WORLD_CLASSES

    def __init__(self, config: Any = None) -> None:
        # Imported here: the detector pulls scipy's spatial module, not needed by studies without it.
        from voidprompt.demo.detector import detect

        self._detect = detect
        self._config = config

    def classify(self, detection: Any) -> str:
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
            from voidprompt.demo.detector import DetectorConfig

            config = DetectorConfig(native_size=native_size)
        detection = self._detect(image, config)
        measures = {
            "detector_objects": float(detection.count),
            "detector_defects": float(len(detection.defect_flags)),
        }
        return Label(self.classify(detection), tuple(detection.to_tags()), measures)


LABELERS: Mapping[str, Callable[[], Labeler]] = {"detector": DetectorLabeler}


def label_image(labeler: Labeler, image: Image.Image, native_size: int | None) -> Label:
    """``labeler.label(image)``, with ``native_size=`` when it is known and the labeler takes it."""
    if native_size is not None and "native_size" in inspect.signature(labeler.label).parameters:
        return labeler.label(image, native_size=native_size)  # type: ignore[call-arg]
    return labeler.label(image)


@dataclass(frozen=True)
class LabelScheme:
    """A study's outcome classes and its pre-labeler (by name; built on demand)."""

    classes: tuple[str, ...]
    labeler: str | None

    def make_labeler(self) -> Labeler | None:
        if self.labeler is None:
            return None
        factory = LABELERS.get(self.labeler)
        if factory is None:
            module_name, _, attr = self.labeler.partition(":")
            try:
                factory = getattr(importlib.import_module(module_name), attr)
            except (ImportError, AttributeError, ValueError) as error:
                raise StudyError(
                    f"[labels] labeler = {self.labeler!r}: cannot load it ({error}); use "
                    f'{", ".join(repr(n) for n in LABELERS)}, "none", or "package.module:factory"'
                ) from None
        labeler = factory()
        if not isinstance(labeler, Labeler):
            raise StudyError(
                f"[labels] labeler = {self.labeler!r} does not give a Labeler (name, classes, label(image))"
            )
        return labeler


def label_scheme(study: Study) -> LabelScheme:
    """Validate a study's ``[labels]`` table."""
    options = dict(study.label_options)
    where = f"{study.path}: [labels]"
    unknown = set(options) - {"classes", "labeler"}
    if unknown:
        raise StudyError(f"{where} {sorted(unknown)[0]}: unknown key; allowed: classes, labeler")
    classes = options.get("classes")
    if classes is None:
        uses_detector = options.get("labeler", _default_labeler(study)) == "detector"
        classes = list(WORLD_CLASSES if uses_detector else DEFAULT_CLASSES)
    if (
        not isinstance(classes, list)
        or not classes
        or not all(isinstance(c, str) and c.strip() for c in classes)
        or len(set(classes)) != len(classes)
    ):
        raise StudyError(f'{where} classes: write distinct names, e.g. classes = ["Pattern", "Legit human"]')
    labeler = options.get("labeler", _default_labeler(study))
    if labeler is not None and not isinstance(labeler, str):
        raise StudyError(f'{where} labeler: write a name, e.g. labeler = "detector", or "none"')
    if labeler == "none":
        labeler = None
    if labeler == "detector" and options.get("classes") is not None and set(classes) != set(WORLD_CLASSES):
        raise StudyError(
            f"{where} classes: the detector labels with {list(WORLD_CLASSES)}; use those classes "
            'or labeler = "none"'
        )
    return LabelScheme(tuple(classes), labeler)


def _default_labeler(study: Study) -> str | None:
    return "detector" if study.model.is_miniature else None


def effective_label(labels: Mapping[str, tuple[str | None, list[str]]]) -> tuple[str | None, str | None]:
    """(class, source) shown in reports: a person's label if any, else the first plugin's."""
    if HUMAN in labels and labels[HUMAN][0] is not None:
        return labels[HUMAN][0], HUMAN
    for source in sorted(labels):
        if labels[source][0] is not None:
            return labels[source][0], source
    return None, None


# ------------------------------------------------------------------------------------------- CSV

CSV_COLUMNS = ("job_id", "path", "label_class", "tags", "source")


def export_labels(catalog: Catalog, path: str | Path, source: str | None = None) -> int:
    """Write labels as CSV (one row per image and source; tags joined with ``;``). Returns rows."""
    by_id = {image["id"]: image for image in catalog.images()}
    rows = []
    for image_id, sources in sorted(catalog.all_labels().items()):
        for src, (label_class, tags) in sorted(sources.items()):
            if source is None or src == source:
                image = by_id[image_id]
                rows.append((image["job_id"], image["path"], label_class or "", ";".join(tags), src))

    def write(temp: Path) -> None:
        with temp.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(CSV_COLUMNS)
            writer.writerows(rows)

    atomic_write(Path(path), write)
    return len(rows)


def import_labels(
    catalog: Catalog, path: str | Path, classes: Sequence[str], default_source: str = HUMAN
) -> int:
    """Read labels from CSV (``job_id`` or ``path``, ``label_class``, optional ``tags``, ``source``).

    Every row is checked before any is written, so a bad file changes nothing. Returns rows applied.
    """
    file = Path(path)
    try:
        with file.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = reader.fieldnames or []
            records = list(reader)
    except OSError as error:
        raise StudyError(f"{file}: cannot read the labels file: {error.strerror}") from None
    if "label_class" not in header or not ({"job_id", "path"} & set(header)):
        raise StudyError(
            f"{file}: the header must name label_class and job_id (or path); got {header}. "
            "Export one with `voidprompt study labels export` to see the format"
        )
    planned = []
    for line, record in enumerate(records, start=2):
        job = (record.get("job_id") or "").strip()
        image_path = (record.get("path") or "").strip()
        image_id = catalog.image_id_for(job_id=job) if job else catalog.image_id_for(path=image_path or None)
        if image_id is None:
            raise StudyError(
                f"{file}: line {line}: no image for job_id={job!r} path={image_path!r}; "
                "labels can only be given to generated images"
            )
        label_class = (record.get("label_class") or "").strip() or None
        if label_class is not None and label_class not in classes:
            raise StudyError(
                f"{file}: line {line}: label_class {label_class!r} is not one of the study's classes "
                f"{list(classes)}; fix the name or add it to [labels] classes"
            )
        raw_tags = (record.get("tags") or "").strip()
        tags = json.loads(raw_tags) if raw_tags.startswith("[") else [t.strip() for t in raw_tags.split(";")]
        source = (record.get("source") or "").strip() or default_source
        planned.append((image_id, label_class, [t for t in tags if t], source))
    for image_id, label_class, tags, source in planned:
        catalog.set_label(image_id, label_class, tags, source=source)
    return len(planned)
