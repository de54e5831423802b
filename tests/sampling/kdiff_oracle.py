"""Load k-diffusion's ``sampling.py`` and ``external.py`` as a test oracle.

``import k_diffusion`` fails here (its ``__init__`` imports torchvision, which has no CPU wheel), so
the two modules are loaded from their files under a private package name, with a stub ``utils``
providing the one helper they use (``append_dims``). k-diffusion's own random draws go through the
module-level ``torch`` name, which :func:`patched_randn` replaces with a proxy that hands out a given
noise sequence.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import types
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

_PKG = "_voidprompt_kdiff_oracle"


def _kdiff_dir() -> Path:
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("k-diffusion is not installed (make installs it with --no-deps for tests)")
    return Path(next(iter(spec.submodule_search_locations)))


def _append_dims(x: torch.Tensor, target_dims: int) -> torch.Tensor:
    dims_to_append = target_dims - x.ndim
    if dims_to_append < 0:
        raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}, which is less")
    return x[(...,) + (None,) * dims_to_append]


def _load() -> tuple[types.ModuleType, types.ModuleType]:
    if f"{_PKG}.external" in sys.modules:
        return sys.modules[f"{_PKG}.sampling"], sys.modules[f"{_PKG}.external"]
    root = _kdiff_dir()
    pkg = types.ModuleType(_PKG)
    pkg.__path__ = [str(root)]
    utils = types.ModuleType(f"{_PKG}.utils")
    utils.append_dims = _append_dims  # type: ignore[attr-defined]
    pkg.utils = utils  # type: ignore[attr-defined]
    sys.modules[_PKG] = pkg
    sys.modules[f"{_PKG}.utils"] = utils
    mods = []
    for name in ("sampling", "external"):
        spec = importlib.util.spec_from_file_location(f"{_PKG}.{name}", root / f"{name}.py")
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        setattr(pkg, name, mod)
        mods.append(mod)
    return mods[0], mods[1]


def kdiff_sampling() -> types.ModuleType:
    return _load()[0]


def kdiff_external() -> types.ModuleType:
    return _load()[1]


class _TorchProxy:
    def __init__(self, noises: Iterator[torch.Tensor]) -> None:
        self._noises = noises

    def randn_like(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return next(self._noises).to(x)

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


@contextlib.contextmanager
def patched_randn(noises: Sequence[torch.Tensor]) -> Iterator[None]:
    """Within the block, k-diffusion's ``torch.randn_like`` returns ``noises`` in order."""
    mod = kdiff_sampling()
    original = mod.torch
    mod.torch = _TorchProxy(iter(noises))
    try:
        yield
    finally:
        mod.torch = original
