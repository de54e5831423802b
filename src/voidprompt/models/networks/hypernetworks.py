"""A1111 / NovelAI hypernetworks (``.pt``, read through the restricted unpickler only).

File: a dict keyed by **int context width** (320, 640, 768, 1280 for SD1) -> a pair of state dicts
(the k-MLP and the v-MLP), plus ``layer_structure`` (default [1, 2, 1]), ``activation_func``
(default None = none), ``is_layer_norm``, ``use_dropout`` / ``dropout_structure`` /
``last_layer_dropout`` (dropout is the identity at inference but occupies indices in the saved
``linear.N`` keys), ``activate_output`` (default True), ``name``, ``step``, ``sd_checkpoint``...
NovelAI's original files use ``linear1`` / ``linear2`` key names: mapped to ``linear.0`` / ``linear.1``.

Each MLP is A1111's ``HypernetworkModule``: for every step of ``layer_structure`` a Linear
``dim*ls[i] -> dim*ls[i+1]``, then the activation (not after the last Linear unless
``activate_output``), then LayerNorm if ``is_layer_norm``, then Dropout where the dropout structure is
non-zero; ``forward(x) = x + mlp(x) * multiplier``.

Application (A1111 ``apply_hypernetworks`` in the attention forward): the context goes through the
k-MLP before ``to_k`` and through the v-MLP before ``to_v``, the pair chosen by the context's width -
so self-attention layers whose width has an entry (320/640/1280) are changed too. Several hypernets
apply in sequence. Here this is done by forward pre-hooks on each UNet attention's ``to_k`` and
``to_v`` (the input of ``to_k`` *is* the context), which composes with whatever attention processor
the engine uses and leaves module names and state dicts untouched.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from voidprompt.errors import ModelLoadError
from voidprompt.models.hashes import sha256_file
from voidprompt.models.safe_pickle import LazyTensor, load_pickle_checkpoint

__all__ = [
    "Hypernetwork",
    "HypernetworkMLP",
    "apply_hypernetworks",
    "install_hypernetworks",
    "load_hypernetwork",
    "parse_dropout_structure",
]

_OLD_KEYS = {
    "linear1.weight": "linear.0.weight",
    "linear1.bias": "linear.0.bias",
    "linear2.weight": "linear.1.weight",
    "linear2.bias": "linear.1.bias",
}


def _activations() -> dict[str, type[nn.Module]]:
    acts: dict[str, type[nn.Module]] = {
        "linear": nn.Identity,
        "relu": nn.ReLU,
        "leakyrelu": nn.LeakyReLU,
        "elu": nn.ELU,
        "swish": nn.Hardswish,  # A1111 quirk: "swish" means Hardswish, not SiLU
        "tanh": nn.Tanh,
        "sigmoid": nn.Sigmoid,
    }
    # A1111 also accepts every class of torch.nn.modules.activation by its lower-cased name.
    for cls_name, cls in inspect.getmembers(torch.nn.modules.activation, inspect.isclass):
        if cls.__module__ == "torch.nn.modules.activation" and issubclass(cls, nn.Module):
            acts[cls_name.lower()] = cls
    return acts


def parse_dropout_structure(
    layer_structure: Sequence[float], use_dropout: bool, last_layer_dropout: bool
) -> list[float]:
    """A1111's reconstruction of the dropout positions of files that do not store them."""
    if not use_dropout:
        return [0.0] * len(layer_structure)
    values = [0.0] + [0.3] * (len(layer_structure) - 3)
    values.append(0.3 if last_layer_dropout else 0.0)
    values.append(0.0)
    return values


class HypernetworkMLP(nn.Module):
    """One k or v MLP; ``forward`` returns ``x + mlp(x) * multiplier``."""

    def __init__(
        self,
        dim: int,
        layer_structure: Sequence[float],
        activation_func: str | None,
        add_layer_norm: bool,
        activate_output: bool,
        dropout_structure: Sequence[float] | None,
    ) -> None:
        super().__init__()
        if layer_structure[0] != 1 or layer_structure[-1] != 1:
            raise ModelLoadError(
                f"hypernetwork layer_structure {list(layer_structure)} must start and end with 1."
            )
        acts = _activations()
        layers: list[nn.Module] = []
        n = len(layer_structure)
        for i in range(n - 1):
            width = int(dim * layer_structure[i + 1])
            layers.append(nn.Linear(int(dim * layer_structure[i]), width))
            if activation_func in (None, "linear") or (i >= n - 2 and not activate_output):
                pass
            elif activation_func in acts:
                try:
                    layers.append(acts[activation_func]())
                except TypeError as exc:
                    raise ModelLoadError(
                        f"hypernetwork activation '{activation_func}' cannot be used ({exc})."
                    ) from exc
            else:
                raise ModelLoadError(
                    f"hypernetwork uses an unknown activation function '{activation_func}'; known: "
                    f"{', '.join(sorted(acts))}."
                )
            if add_layer_norm:
                layers.append(nn.LayerNorm(width))
            if dropout_structure is not None and dropout_structure[i + 1] > 0:
                layers.append(nn.Dropout(p=float(dropout_structure[i + 1])))
        self.linear = nn.Sequential(*layers)
        self.multiplier = 1.0

    def forward(self, x: Tensor) -> Tensor:
        return x + self.linear(x) * self.multiplier


@dataclass
class Hypernetwork:
    name: str
    path: Path
    layers: dict[int, tuple[HypernetworkMLP, HypernetworkMLP]]
    info: dict[str, Any] = field(default_factory=dict)
    sha256: str = ""

    @property
    def shorthash(self) -> str:
        """A1111's "Hypernet hashes" entry: the first 10 hex of the file's sha256."""
        return self.sha256[:10]


def _layer_structure(value: Any, path: Path) -> list[float]:
    """A1111's layer_structure: width multipliers that start and end with 1 (default [1, 2, 1])."""
    if value is None:
        return [1.0, 2.0, 1.0]
    ok = isinstance(value, list | tuple) and len(value) >= 2
    if ok:
        ok = all(
            isinstance(v, int | float) and not isinstance(v, bool) and 0 < v < float("inf") for v in value
        )
    if not ok or value[0] != 1 or value[-1] != 1:
        raise ModelLoadError(
            f"{path}: hypernetwork layer_structure {value!r:.200} must be a list of positive numbers that "
            "starts and ends with 1 (A1111's default is [1, 2, 1]); the file is damaged."
        )
    return [float(v) for v in value]


def _check_options(path: Path, layer_structure: Sequence[float], activation: Any, dropout: Any) -> None:
    if activation is not None and not isinstance(activation, str):
        raise ModelLoadError(
            f"{path}: hypernetwork activation_func {activation!r:.100} is not a name; the file is damaged."
        )
    numbers = isinstance(dropout, list | tuple) and all(
        isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v < 1 for v in dropout
    )
    if not numbers or len(dropout) != len(layer_structure):
        raise ModelLoadError(
            f"{path}: hypernetwork dropout_structure {dropout!r:.200} must hold one probability in [0, 1) "
            f"per layer_structure entry ({len(layer_structure)}); the file is damaged."
        )


def _linear_index(key: str) -> int | None:
    """N of ``linear.N.weight``, or None for any other key."""
    parts = key.split(".")
    if len(parts) == 3 and parts[0] == "linear" and parts[1].isdigit() and parts[2] == "weight":
        return int(parts[1])
    return None


def _check_saved_shapes(
    path: Path, width: int, which: str, state: dict[str, Any], layer_structure: Sequence[float]
) -> None:
    """The Linear weights saved for one MLP must have exactly the shapes layer_structure gives them,
    checked on the file's declared shapes before any module exists: a layer_structure of
    [1, 1000000, 1] over a small file would otherwise allocate gigabytes for modules that can
    never be filled."""
    bad = [k for k, v in state.items() if not isinstance(v, LazyTensor)]
    if bad:
        raise ModelLoadError(
            f"{path}: the {which}-MLP for width {width} has entries that are not tensors ({bad[:3]}); "
            "the file is damaged or from an unknown trainer."
        )
    linears = sorted(
        (index, tuple(v.shape))
        for k, v in state.items()
        if (index := _linear_index(k)) is not None and len(v.shape) == 2
    )
    saved = [shape for _, shape in linears]
    expected = [
        (int(width * layer_structure[i + 1]), int(width * layer_structure[i]))
        for i in range(len(layer_structure) - 1)
    ]
    if saved != expected:
        raise ModelLoadError(
            f"{path}: the {which}-MLP for width {width} does not fit layer_structure "
            f"{list(layer_structure)}: it needs Linear weights of shapes {expected[:8]} but the file "
            f"holds {saved[:8]}; the file is damaged or from an unknown trainer."
        )


def load_hypernetwork(path: str | Path, *, device: torch.device | str = "cpu") -> Hypernetwork:
    """Read a hypernetwork ``.pt`` through :mod:`voidprompt.models.safe_pickle`; MLPs in float32."""
    p = Path(path)
    with load_pickle_checkpoint(p) as ck:
        sd = ck.obj
        if not isinstance(sd, dict):
            raise ModelLoadError(f"{p}: not a hypernetwork (the pickle holds a {type(sd).__name__}).")
        layer_structure = _layer_structure(sd.get("layer_structure") or None, p)
        activation = sd.get("activation_func")
        add_ln = bool(sd.get("is_layer_norm", False))
        dropout = sd.get("dropout_structure")
        use_dropout = True if dropout is not None and any(dropout) else bool(sd.get("use_dropout", False))
        activate_output = bool(sd.get("activate_output", True))
        last_layer_dropout = bool(sd.get("last_layer_dropout", False))
        if dropout is None:
            dropout = parse_dropout_structure(layer_structure, use_dropout, last_layer_dropout)
        _check_options(p, layer_structure, activation, dropout)
        states: dict[int, list[dict[str, Any]]] = {}
        for size, pair in sd.items():
            if not isinstance(size, int) or isinstance(size, bool):
                continue
            if (
                not isinstance(pair, (list, tuple))
                or len(pair) != 2
                or not all(isinstance(x, dict) for x in pair)
            ):
                raise ModelLoadError(f"{p}: entry {size} is not a (k, v) pair of state dicts.")
            if size <= 0:
                raise ModelLoadError(f"{p}: entry {size} is not a context width; the file is damaged.")
            states[size] = [{_OLD_KEYS.get(str(k), str(k)): v for k, v in state.items()} for state in pair]
            for which, state in zip("kv", states[size], strict=True):
                _check_saved_shapes(p, size, which, state, layer_structure)
        layers: dict[int, tuple[HypernetworkMLP, HypernetworkMLP]] = {}
        for size, pair_states in states.items():
            mlps = []
            for which, lazy in zip("kv", pair_states, strict=True):
                mlp = HypernetworkMLP(size, layer_structure, activation, add_ln, activate_output, dropout)
                try:
                    mlp.load_state_dict({k: ck.materialize(v) for k, v in lazy.items()}, strict=True)
                except RuntimeError as exc:
                    raise ModelLoadError(
                        f"{p}: the {which}-MLP for width {size} does not fit layer_structure "
                        f"{layer_structure}, activation {activation!r}, layer norm {add_ln}, "
                        f"dropout {list(dropout)} ({exc}); the file is damaged or from an unknown trainer."
                    ) from exc
                mlps.append(mlp.to(device=device, dtype=torch.float32).eval().requires_grad_(False))
            layers[size] = (mlps[0], mlps[1])
        if not layers:
            raise ModelLoadError(f"{p}: no int-keyed (context width) entries; it is not a hypernetwork file.")
        info = {k: v for k, v in sd.items() if isinstance(k, str) and not isinstance(v, LazyTensor)}
    return Hypernetwork(str(sd.get("name") or p.stem), p, layers, info, sha256_file(p))


def apply_hypernetworks(
    hypernets: Sequence[tuple[Hypernetwork, float]], context: Tensor, which: int
) -> Tensor:
    """The context as ``to_k`` (which=0) or ``to_v`` (which=1) sees it: each hypernet in turn,
    picked by the context's last dimension, applied in float32 and cast back."""
    out = context
    for net, mult in hypernets:
        pair = net.layers.get(int(out.shape[-1]))
        if pair is None:
            continue
        mlp = pair[which]
        mlp.multiplier = mult
        out = mlp(out.to(torch.float32)).to(context.dtype)
    return out


def install_hypernetworks(
    unet: nn.Module, hypernets: Sequence[tuple[Hypernetwork, float]]
) -> list[RemovableHandle]:
    """Pre-hooks on every UNet attention's ``to_k`` / ``to_v`` whose input width a hypernet covers."""
    handles: list[RemovableHandle] = []
    if not hypernets:
        return handles
    widths = {w for net, _ in hypernets for w in net.layers}
    for _, mod in unet.named_modules():
        to_k, to_v = getattr(mod, "to_k", None), getattr(mod, "to_v", None)
        if not isinstance(to_k, nn.Linear) or not isinstance(to_v, nn.Linear):
            continue
        if to_k.in_features not in widths:
            continue
        for which, lin in ((0, to_k), (1, to_v)):

            def hook(_m: nn.Module, args: tuple[Any, ...], which: int = which) -> tuple[Any, ...]:
                return (apply_hypernetworks(hypernets, args[0], which), *args[1:])

            handles.append(lin.register_forward_pre_hook(hook))
    return handles
