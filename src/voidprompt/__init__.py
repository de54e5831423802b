"""voidprompt: an A1111-faithful Stable Diffusion 1.x workbench for measured research."""

import os as _os

# Never touch a model hub: everything voidprompt needs ships with it or is given by the user.
_os.environ.setdefault("HF_HUB_OFFLINE", "1")
_os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

__version__ = "0.1.0"

__all__ = ["__version__"]
