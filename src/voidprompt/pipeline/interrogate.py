"""Tagging a picture: A1111's DeepDanbooru interrogation and WD14 ONNX taggers, behind one
:class:`Tagger` shape that the server's ``/sdapi/v1/interrogate``, ``voidprompt tag`` and the lab's
tagger labelers all call.

DeepDanbooru sees what A1111 hands it: the picture as RGB, resized to 512x512 with A1111's "resize
and fill" (:func:`voidprompt.pipeline.images.resize_image` mode 2), scaled to [0, 1]. A WD14 tagger
prepares its own input (:func:`voidprompt.models.taggers.wd14.prepare_picture`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from voidprompt.models.taggers import deepdanbooru as ddb
from voidprompt.models.taggers.result import TaggerError, TagResult
from voidprompt.models.taggers.wd14 import (
    DEFAULT_CHARACTER_THRESHOLD,
    DEFAULT_GENERAL_THRESHOLD,
    MODEL_FILE,
    WD14Tagger,
)
from voidprompt.pipeline.images import resize_image

__all__ = [
    "DEEPDANBOORU",
    "WD14",
    "DeepDanbooruTagger",
    "Tagger",
    "WD14Captioner",
    "deepdanbooru_pixels",
    "open_tagger",
    "scan_wd14_folder",
]

DEEPDANBOORU = "deepdanbooru"
WD14 = "wd14"
RESIZE_AND_FILL = 2
DEEPDANBOORU_SUFFIXES = (".pt", ".pth", ".ckpt")


class Tagger(Protocol):
    """A loaded tagger: one picture in, its tags out, and the caption A1111's API answers with."""

    @property
    def name(self) -> str: ...

    def tag(self, image: Image.Image) -> TagResult: ...

    def caption(self, result: TagResult) -> str: ...


def deepdanbooru_pixels(image: Image.Image) -> np.ndarray:
    """The (1, 512, 512, 3) float32 array A1111 feeds DeepDanbooru."""
    picture = resize_image(RESIZE_AND_FILL, image.convert("RGB"), ddb.INPUT_SIZE, ddb.INPUT_SIZE)
    return np.expand_dims(np.asarray(picture, dtype=np.float32), 0) / 255


class DeepDanbooruTagger:
    """A1111's DeepDanbooru with its interrogation options (1.10's defaults unless given)."""

    name = DEEPDANBOORU

    def __init__(
        self,
        net: ddb.DeepDanbooruNet,
        options: ddb.DeepDanbooruOptions | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.net = net.to(device)
        self.options = options or ddb.DeepDanbooruOptions()
        self.device = torch.device(device)

    def probabilities(self, image: Image.Image) -> np.ndarray:
        pixels = torch.from_numpy(deepdanbooru_pixels(image)).to(self.device)
        with torch.inference_mode():
            return self.net(pixels)[0].float().cpu().numpy()

    def tag(self, image: Image.Image) -> TagResult:
        return ddb.result_from_probabilities(self.net.tags, self.probabilities(image), self.options.threshold)

    def caption(self, result: TagResult) -> str:
        return ddb.caption(result, self.options)


@dataclass
class WD14Captioner:
    """A WD14 tagger with its thresholds; its caption is the character then the general tags, each
    by falling probability, written as prompts take them (spaces, escaped brackets)."""

    tagger: WD14Tagger
    general_threshold: float = DEFAULT_GENERAL_THRESHOLD
    character_threshold: float = DEFAULT_CHARACTER_THRESHOLD

    @property
    def name(self) -> str:
        return self.tagger.name

    def tag(self, image: Image.Image) -> TagResult:
        return self.tagger.tag(image, self.general_threshold, self.character_threshold)

    def caption(self, result: TagResult) -> str:
        return result.caption()


def open_tagger(
    path: str | Path,
    *,
    device: torch.device | str = "cpu",
    threshold: float | None = None,
    character_threshold: float | None = None,
) -> Tagger:
    """The tagger at ``path``: a folder holding ``model.onnx`` (or that file) is a WD14 tagger, a
    ``.pt`` file A1111's DeepDanbooru. ``threshold`` replaces the general threshold (DeepDanbooru's
    0.5, WD14's 0.35)."""
    for what, value in (("threshold", threshold), ("character threshold", character_threshold)):
        if value is not None and not 0.0 <= value <= 1.0:
            raise TaggerError(f"{what} {value}: give a probability from 0 to 1")
    p = Path(path)
    if p.is_file() and p.name == MODEL_FILE:
        p = p.parent  # the model file of a WD14 folder stands for its folder
    if not p.exists() and p.suffix.lower() not in DEEPDANBOORU_SUFFIXES:
        raise TaggerError(
            f"{p}: no tagger there; give A1111's DeepDanbooru file (model-resnet_custom_v3.pt) or a "
            f"WD14 tagger folder holding {MODEL_FILE} and selected_tags.csv"
        )
    if p.is_dir():
        providers = ["CUDAExecutionProvider"] if torch.device(device).type == "cuda" else []
        tagger = WD14Tagger(p, providers=[*providers, "CPUExecutionProvider"])
        return WD14Captioner(
            tagger,
            DEFAULT_GENERAL_THRESHOLD if threshold is None else threshold,
            DEFAULT_CHARACTER_THRESHOLD if character_threshold is None else character_threshold,
        )
    if character_threshold is not None:
        raise TaggerError(
            f"{p}: a character threshold applies to WD14 taggers only; DeepDanbooru has no character tags"
        )
    options = ddb.DeepDanbooruOptions()
    if threshold is not None:
        options = ddb.DeepDanbooruOptions(threshold=threshold)
    return DeepDanbooruTagger(ddb.load_deepdanbooru(p), options, device)


def scan_wd14_folder(folder: Path | None) -> Mapping[str, Path]:
    """WD14 taggers in ``folder``: each subfolder holding a ``model.onnx``, by its name."""
    if folder is None or not folder.is_dir():
        return {}
    return {
        child.name: child
        for child in sorted(folder.iterdir())
        if child.is_dir() and (child / MODEL_FILE).is_file()
    }
