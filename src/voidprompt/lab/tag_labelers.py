"""Taggers as study labelers, registered as ``deepdanbooru`` and ``wd14``: they pre-label pictures
of a real (anime) model with Danbooru tags and turn the tags into the study's outcome classes by the
rules in its ``[labels]`` table::

    [labels]
    labeler = "wd14"
    tagger = "models/wd14/wd-vit-tagger-v3"    # a WD14 folder; for deepdanbooru, A1111's .pt file
    classes = ["Pattern", "Object or Scenery", "Malformed human", "Legit human"]
    fallback = "Object or Scenery"              # no rule matched (leave out: no class)
    threshold = 0.35                            # general tags (WD14's default; DeepDanbooru's 0.5)
    character_threshold = 0.85                  # WD14 character tags

    [labels.rules]                              # the first class whose rule matches wins
    Pattern = ["no_humans", "pattern"]          # every tag of the list
    "Malformed human" = [["bad_anatomy"], ["extra_arms"], ["bad_hands"]]   # any one list
    "Legit human" = [["1girl"], ["1boy"], ["solo"]]

Rules see the character and general tags above their thresholds and the most probable rating
(``rating:general``, DeepDanbooru's ``rating:safe``), in the taggers' own spelling (underscores).
The label keeps those tags; its measures are each rating's probability (``wd14_rating_general``,
``deepdanbooru_rating_safe``, ...) and the number of tags found (``wd14_tags``).

The tagger runs on the CPU in the process that stores the pictures, opened on the first picture.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from voidprompt.errors import StudyError
from voidprompt.lab.plugins import Label
from voidprompt.lab.schema import DEFAULT_CLASSES, LabelOptions
from voidprompt.models.taggers.deepdanbooru import DEFAULT_FILE
from voidprompt.models.taggers.result import TagResult
from voidprompt.models.taggers.wd14 import MODEL_FILE, TAGS_FILE
from voidprompt.pipeline.interrogate import DEEPDANBOORU, WD14, Tagger, open_tagger

__all__ = ["DeepDanbooruLabeler", "TaggerLabeler", "WD14Labeler", "label_from_tags"]

RATING = "rating:"


def _classes(options: LabelOptions) -> tuple[str, ...]:
    if options.classes is not None:
        return options.classes
    if not options.rules:
        return DEFAULT_CLASSES
    named = [r.label_class for r in options.rules] + ([options.fallback] if options.fallback else [])
    return tuple(dict.fromkeys(named))


def _measure_name(prefix: str, tag: str) -> str:
    return f"{prefix}_" + re.sub(r"[^a-z0-9]+", "_", tag.lower()).strip("_")


def label_from_tags(result: TagResult, options: LabelOptions, prefix: str) -> Label:
    """The label a tagger's result gives under the study's rules (first match wins, else the
    fallback); see the module docstring for its tags and measures."""
    tags = list(result.tags())
    top = result.rating_tag()
    if top is not None:
        tags.append(top if top.startswith(RATING) else RATING + top)
    present = set(tags)
    label_class = next((r.label_class for r in options.rules if r.matches(present)), options.fallback)
    measures = {
        _measure_name(f"{prefix}_rating", t.removeprefix(RATING)): p for t, p in result.rating.items()
    }
    measures[f"{prefix}_tags"] = float(len(result.general) + len(result.character))
    return Label(label_class, tuple(tags), measures)


class TaggerLabeler:
    """A tagger with the study's rules; :class:`WD14Labeler` and :class:`DeepDanbooruLabeler` say
    which kind of tagger the ``tagger`` path must be."""

    name: str = ""
    classes: Sequence[str] = ()

    def __init__(self, options: LabelOptions | None = None) -> None:
        self.options = options or LabelOptions()
        self.classes = _classes(self.options)
        self.path = self._path()
        self._tagger: Tagger | None = None

    def _path(self) -> Path:
        raise NotImplementedError

    def _files(self) -> list[Path]:
        raise NotImplementedError

    def check(self) -> None:
        """Refuse missing tagger files without opening them (they are big): ``study check`` calls it,
        so a run does not stop at its first picture."""
        missing = next((f for f in self._files() if not f.is_file()), None)
        if missing is not None:
            raise StudyError(
                f"[labels] tagger = {str(self.path)!r}: {missing} is missing; place the {self.name} tagger "
                "there or correct the path (relative to the study file)"
            )

    def tagger(self) -> Tagger:
        if self._tagger is None:
            self._tagger = open_tagger(
                self.path,
                threshold=self.options.threshold,
                character_threshold=self.options.character_threshold,
            )
        return self._tagger

    def label(self, image: Image.Image) -> Label:
        return label_from_tags(self.tagger().tag(image), self.options, self.name)


class WD14Labeler(TaggerLabeler):
    """A WD14 ONNX tagger folder (``model.onnx`` + ``selected_tags.csv``)."""

    name = WD14

    def _path(self) -> Path:
        path = self.options.tagger
        if path is None:
            raise StudyError(
                '[labels] labeler = "wd14" needs its tagger: add tagger = "path/to/wd14-folder" (the '
                "folder holding model.onnx and selected_tags.csv, relative to the study file)"
            )
        if path.exists() and not path.is_dir():
            raise StudyError(f"[labels] tagger = {str(path)!r}: a WD14 tagger is a folder, not a file")
        return path

    def _files(self) -> list[Path]:
        return [self.path / MODEL_FILE, self.path / TAGS_FILE]


class DeepDanbooruLabeler(TaggerLabeler):
    """A1111's DeepDanbooru file (default: where A1111 keeps it, ``models/torch_deepdanbooru``)."""

    name = DEEPDANBOORU

    def _path(self) -> Path:
        if self.options.character_threshold is not None:
            raise StudyError(
                '[labels] character_threshold: DeepDanbooru has no character tags; it is for labeler = "wd14"'
            )
        path = self.options.tagger or DEFAULT_FILE
        if path.is_dir():
            raise StudyError(
                f"[labels] tagger = {str(path)!r}: DeepDanbooru is one file (model-resnet_custom_v3.pt), "
                'not a folder; for a WD14 tagger folder write labeler = "wd14"'
            )
        return path

    def _files(self) -> list[Path]:
        return [self.path]
