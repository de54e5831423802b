"""Checkpoint loading: safe reading, family detection, key conversion, hashes.

Public entry point: :func:`load_model` (returns :class:`Components`).
"""

from voidprompt.models.components import CheckpointInfo, Components, LoadReport, VaeInfo
from voidprompt.models.detect import ModelFamily, detect_family
from voidprompt.models.load import load_model, open_checkpoint

__all__ = [
    "CheckpointInfo",
    "Components",
    "LoadReport",
    "ModelFamily",
    "VaeInfo",
    "detect_family",
    "load_model",
    "open_checkpoint",
]
