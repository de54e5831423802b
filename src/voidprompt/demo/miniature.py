"""Where the shipped miniature model lives (package data, ``voidprompt/demo/weights/``).

:data:`MINIATURE_MODEL` registers it with the lab (the ``voidprompt.models`` entry point in
pyproject.toml) as ``miniature``: the default model of a study that names none, pre-labelled by the
world's detector.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from voidprompt.errors import ModelLoadError
from voidprompt.lab.plugins import NamedModel

__all__ = ["MINIATURE_FILENAME", "MINIATURE_MODEL", "miniature_model_path"]

MINIATURE_FILENAME = "voidprompt-miniature-sd1.safetensors"


def miniature_model_path() -> Path:
    """Path of the committed miniature model (an SD1-layout .safetensors; see MODEL_CARD.md beside it)."""
    path = Path(str(resources.files("voidprompt.demo") / "weights" / MINIATURE_FILENAME))
    if not path.is_file():
        raise ModelLoadError(
            f"the miniature model is missing ({path}); reinstall voidprompt, or rebuild it with "
            f"`voidprompt demo train` and copy the run's model.safetensors there"
        )
    return path


MINIATURE_MODEL = NamedModel(path=miniature_model_path, labeler="detector", default=True)
