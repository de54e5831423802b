"""Outcome classes, the study's pre-labeler, and label CSV import/export.

A study's ``[labels]`` table names its outcome classes and the labeler that pre-labels images::

    [labels]
    classes = ["clean single shape", "several shapes", "pattern / no shape", "defective"]
    labeler = "detector"        # a registered labeler (voidprompt.lab.plugins), or "none"

Without ``labeler`` a study on a registered model is pre-labeled by that model's labeler (the
shipped miniature model's is its world's detector) and a study on a model file is not pre-labeled.
Without ``classes`` the labeler's classes are used, else the study brief's four outcomes. A
person's labels (source ``human``) always win over a plugin's in reports; both are kept in the
catalog.
"""

from __future__ import annotations

import csv
import inspect
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from voidprompt.errors import StudyError
from voidprompt.files import atomic_write
from voidprompt.lab.catalog import Catalog
from voidprompt.lab.plugins import Label, Labeler, Plugins, installed_plugins
from voidprompt.lab.schema import DEFAULT_CLASSES, NO_LABELER, StudyFile

__all__ = [
    "DEFAULT_CLASSES",
    "HUMAN",
    "Label",
    "LabelScheme",
    "Labeler",
    "effective_label",
    "export_labels",
    "import_labels",
    "label_image",
    "label_scheme",
]

HUMAN = "human"


def label_image(labeler: Labeler, image: Image.Image, native_size: int | None) -> Label:
    """``labeler.label(image)``, with ``native_size=`` when it is known and the labeler takes it."""
    if native_size is not None and "native_size" in inspect.signature(labeler.label).parameters:
        return labeler.label(image, native_size=native_size)  # type: ignore[call-arg]
    return labeler.label(image)


@dataclass(frozen=True)
class LabelScheme:
    """A study's outcome classes and the name of its pre-labeler (None: no pre-labels)."""

    classes: tuple[str, ...]
    labeler: str | None


def label_scheme(study: StudyFile, plugins: Plugins | None = None) -> LabelScheme:
    """A study's classes and pre-labeler, with the defaults of its model (see the module docstring).

    ``plugins`` defaults to the installed ones; an unknown labeler name is an error listing them.
    """
    plugins = installed_plugins() if plugins is None else plugins
    options = study.labels
    name = options.labeler if options.labeler is not None else plugins.model_labeler(study.model)
    if name is None or name == NO_LABELER:
        return LabelScheme(options.classes or DEFAULT_CLASSES, None)
    try:
        labeler_classes = tuple(plugins.labeler(name, options).classes)
    except StudyError as error:
        raise StudyError(f"{study.path}: {error}") from None
    classes = options.classes or labeler_classes
    if set(classes) != set(labeler_classes):
        raise StudyError(
            f"{study.path}: [labels] classes: the labeler {name!r} labels with {list(labeler_classes)}; "
            f'use those classes or labeler = "{NO_LABELER}"'
        )
    return LabelScheme(classes, name)


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
