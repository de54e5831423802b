"""Reading an upscaler file into an RRDBNet: ``.safetensors`` through the checkpoint reader, ``.pth``
/ ``.pt`` through the restricted unpickler (never ``torch.load``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from voidprompt.errors import ModelLoadError, UnsupportedModelError
from voidprompt.models.load import open_checkpoint
from voidprompt.models.safe_pickle import LazyTensor, load_pickle_checkpoint
from voidprompt.models.upscalers.rrdb import RRDBNet, rrdb_from_state_dict

__all__ = ["load_rrdbnet", "read_upscaler_state"]

# Where trainers nest the weights, tried in this order (BasicSR saves ``params_ema`` beside ``params``;
# the EMA weights are the released ones). The same list as spandrel's, so a file A1111 loads loads here.
_WRAPPERS = ("model_state_dict", "state_dict", "params_ema", "params-ema", "params", "model", "net")
_PREFIXES = ("module.", "netG.")


def _unwrap(obj: Any, path: Path) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ModelLoadError(f"{path}: the pickle holds a {type(obj).__name__}, not a state dict.")
    for key in _WRAPPERS:
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if len(obj) == 1:
        only = next(iter(obj.values()))
        if isinstance(only, dict):
            obj = only
    for prefix in _PREFIXES:
        if obj and all(str(k).startswith(prefix) for k in obj):
            obj = {str(k)[len(prefix) :]: v for k, v in obj.items()}
    return obj


def read_upscaler_state(path: str | Path) -> dict[str, Tensor]:
    """Every tensor of an upscaler file, unwrapped from its trainer's nesting, as CPU tensors."""
    p = Path(path)
    if p.suffix.lower() == ".safetensors":
        with open_checkpoint(p) as reader:
            return {key: reader.get(key) for key in reader.tensor_names()}
    with load_pickle_checkpoint(p) as ck:
        state = _unwrap(ck.obj, p)
        tensors = {str(k): v for k, v in state.items() if isinstance(v, LazyTensor)}
        if not tensors:
            raise UnsupportedModelError(
                f"{p}: holds no tensors at its top level; not an upscaler model file."
            )
        return {key: ck.materialize(lazy) for key, lazy in tensors.items()}


def load_rrdbnet(
    path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> RRDBNet:
    """An ESRGAN / Real-ESRGAN file as an :class:`RRDBNet` in eval mode on ``device``."""
    p = Path(path)
    try:
        net = rrdb_from_state_dict(read_upscaler_state(p))
    except UnsupportedModelError as exc:
        raise UnsupportedModelError(f"{p}: {exc}") from None
    return net.to(device=device, dtype=dtype)
