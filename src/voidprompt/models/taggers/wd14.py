"""WD14-style taggers (SmilingWolf's ``wd-*-tagger``): an ONNX model plus its ``selected_tags.csv``.

A tagger is a folder holding ``model.onnx`` and ``selected_tags.csv`` (columns ``tag_id, name,
category, count``; category 9 is a rating, 4 a character, 0 a general tag). The model takes NHWC
float32 pictures, BGR, 0-255, at its own square side (448 for the v2 and v3 taggers) and gives one
probability per row of the csv. Pictures are prepared as those taggers' reference code does:
transparency flattened on white, padded to a square on white (centred), resized with bicubic
filtering to the model's side, channels reversed to BGR.

onnxruntime is the ``taggers`` extra and is imported only when a tagger is opened.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from voidprompt.errors import MissingExtraError, require_extra
from voidprompt.models.taggers.result import TaggerError, TagResult

__all__ = [
    "CHARACTER",
    "DEFAULT_CHARACTER_THRESHOLD",
    "DEFAULT_GENERAL_THRESHOLD",
    "GENERAL",
    "MODEL_FILE",
    "RATING",
    "TAGS_FILE",
    "WD14Tagger",
    "prepare_picture",
    "read_selected_tags",
]

MODEL_FILE = "model.onnx"
TAGS_FILE = "selected_tags.csv"
GENERAL, CHARACTER, RATING = 0, 4, 9
DEFAULT_GENERAL_THRESHOLD = 0.35
DEFAULT_CHARACTER_THRESHOLD = 0.85
WHITE = (255, 255, 255)


@dataclass(frozen=True)
class SelectedTags:
    names: tuple[str, ...]
    categories: tuple[int, ...]


def read_selected_tags(path: Path) -> SelectedTags:
    """The tag list of a WD14 tagger, in the order of the model's outputs."""
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            header = reader.fieldnames or []
            rows = list(reader)
    except FileNotFoundError:
        raise TaggerError(
            f"{path}: missing; a WD14 tagger folder holds {MODEL_FILE} and {TAGS_FILE}"
        ) from None
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise TaggerError(f"{path}: cannot read the tag list ({error})") from None
    if "name" not in header or "category" not in header:
        raise TaggerError(f"{path}: the header must name 'name' and 'category' (got {header})")
    names, categories = [], []
    for line, row in enumerate(rows, start=2):
        try:
            category = int(row["category"])
        except (TypeError, ValueError):
            raise TaggerError(f"{path}: line {line}: category {row['category']!r} is not a number") from None
        names.append(row["name"])
        categories.append(category)
    return SelectedTags(tuple(names), tuple(categories))


def prepare_picture(image: Image.Image, side: int) -> np.ndarray:
    """One picture as the model's input: (1, side, side, 3) float32, BGR, 0-255."""
    if image.mode not in ("RGB", "RGBA"):
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode == "RGBA":
        canvas = Image.new("RGBA", image.size, WHITE)
        canvas.alpha_composite(image)
        image = canvas
    image = image.convert("RGB")
    longest = max(image.size)
    square = Image.new("RGB", (longest, longest), WHITE)
    square.paste(image, ((longest - image.width) // 2, (longest - image.height) // 2))
    if longest != side:
        square = square.resize((side, side), Image.Resampling.BICUBIC)
    pixels = np.asarray(square, dtype=np.float32)[:, :, ::-1]
    return np.ascontiguousarray(pixels)[None]


def _onnxruntime() -> Any:
    try:
        return require_extra("onnxruntime", "taggers", "a WD14 tagger")
    except MissingExtraError as error:
        raise TaggerError(str(error)) from None


class WD14Tagger:
    """An opened WD14 tagger folder.

    ``providers`` are onnxruntime's execution providers, chosen by the caller (the edge decides the
    device); ``threads`` caps onnxruntime's intra-op threads (None: its own choice).
    """

    def __init__(
        self,
        folder: str | Path,
        *,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        threads: int | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.name = self.folder.name
        model = self.folder / MODEL_FILE
        if not model.is_file():
            raise TaggerError(
                f"{model}: missing; a WD14 tagger folder holds {MODEL_FILE} and {TAGS_FILE} "
                "(as SmilingWolf's wd-*-tagger repositories ship them)"
            )
        self.tags = read_selected_tags(self.folder / TAGS_FILE)
        ort = _onnxruntime()
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        try:
            self._session = ort.InferenceSession(str(model), sess_options=options, providers=list(providers))
        except Exception as error:  # onnxruntime raises its own exception types for a bad graph
            raise TaggerError(f"{model}: onnxruntime cannot open it ({error})") from None
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        shape = list(inputs[0].shape)
        if len(inputs) != 1 or len(shape) != 4 or shape[3] != 3 or not isinstance(shape[1], int):
            raise TaggerError(
                f"{model}: input {inputs[0].name} has shape {shape}; a WD14 tagger takes "
                "(batch, side, side, 3) pictures"
            )
        if shape[1] != shape[2]:
            raise TaggerError(f"{model}: input {shape[1]}x{shape[2]} is not square; a WD14 tagger's is")
        self.side = int(shape[1])
        self._input = inputs[0].name
        self._output = outputs[0].name
        width = outputs[0].shape[-1]
        if isinstance(width, int) and width != len(self.tags.names):
            raise TaggerError(
                f"{model}: {width} outputs but {TAGS_FILE} lists {len(self.tags.names)} tags; "
                "the two files are from different taggers"
            )

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        """Probabilities (batch, tags) for pictures already prepared by :func:`prepare_picture`."""
        (probabilities,) = self._session.run([self._output], {self._input: pixels})
        out = np.asarray(probabilities, dtype=np.float32)
        if out.ndim != 2 or out.shape[1] != len(self.tags.names):
            raise TaggerError(
                f"{self.folder / MODEL_FILE}: gave an output of shape {out.shape}, expected "
                f"(batch, {len(self.tags.names)})"
            )
        return out

    def result(
        self,
        probabilities: np.ndarray,
        general_threshold: float = DEFAULT_GENERAL_THRESHOLD,
        character_threshold: float = DEFAULT_CHARACTER_THRESHOLD,
    ) -> TagResult:
        """One picture's tags: general and character tags strictly above their thresholds, as the
        reference taggers keep them; every rating with its probability."""
        general, character, rating = {}, {}, {}
        for name, category, p in zip(self.tags.names, self.tags.categories, probabilities, strict=True):
            value = float(p)
            if category == RATING:
                rating[name] = value
            elif category == CHARACTER:
                if value > character_threshold:
                    character[name] = value
            elif value > general_threshold:
                general[name] = value
        return TagResult(general=general, character=character, rating=rating)

    def tag(
        self,
        image: Image.Image,
        general_threshold: float = DEFAULT_GENERAL_THRESHOLD,
        character_threshold: float = DEFAULT_CHARACTER_THRESHOLD,
    ) -> TagResult:
        probabilities = self.predict(prepare_picture(image, self.side))[0]
        return self.result(probabilities, general_threshold, character_threshold)
