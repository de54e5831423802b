"""Apply the extra networks of a prompt to a loaded model, and take them off again exactly.

Merged mode (A1111's default, ``network_apply_weights``): for every layer a LoRA touches, a CPU copy of
the original weight is kept; the new weight is ``W + Σ ΔW_i * mult_i`` computed in float32 and rounded
once to the weight's dtype. When the set of networks changes, every touched weight is first restored
from its copy (a byte copy, so 100 switches leave no drift), then the new set is applied.

Functional mode (A1111's ``lora_functional`` option, kohya additional-networks style): weights stay
untouched; forward hooks add ``up(down(x)) * scale * mult`` (LoHa/LoKr/full: the layer's op with ΔW)
to each targeted layer's output.

Hypernetworks are installed as forward pre-hooks on the UNet attentions' ``to_k`` / ``to_v``
(see :mod:`voidprompt.models.networks.hypernetworks`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from voidprompt.errors import ModelLoadError
from voidprompt.models.networks.hypernetworks import Hypernetwork, install_hypernetworks, load_hypernetwork
from voidprompt.models.networks.lora import (
    LayerTarget,
    LoraModule,
    LoraNetwork,
    build_layer_map,
    load_lora,
    lora_call_params,
    lora_family,
)
from voidprompt.models.networks.names import HYPERNETWORK, LORA, NetworkKind, NetworkList, read_lora_alias

__all__ = ["AppliedLora", "AppliedNetworks", "NetworkManager"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AppliedLora:
    name: str
    te: float
    unet: float
    dyn: int | None
    shorthash: str
    layers: int


@dataclass
class AppliedNetworks:
    """What :meth:`NetworkManager.apply` did, for the engine and the infotext."""

    loras: list[AppliedLora] = field(default_factory=list)
    hypernets: list[tuple[str, float, str]] = field(default_factory=list)  # (name, multiplier, shorthash)
    infotext: dict[str, str] = field(default_factory=dict)
    model_key: str = ""
    notes: list[str] = field(default_factory=list)
    functional: bool = False


def _hyper_params(call: Any) -> tuple[str, float]:
    pos = call.positional
    return call.name, float(pos[1]) if len(pos) > 1 else 1.0


class NetworkManager:
    """Owns the network state of one set of modules at a time; see the module docstring."""

    def __init__(self) -> None:
        self._components: Any = None
        self._backups: dict[int, tuple[nn.Parameter, Tensor]] = {}
        self._hooks: list[RemovableHandle] = []
        self._state: tuple[Any, ...] | None = None
        self._applied = AppliedNetworks()
        self._lora_cache: dict[Path, tuple[int, LoraNetwork]] = {}
        self._hyper_cache: dict[Path, tuple[int, Hypernetwork]] = {}
        self._layer_map: dict[str, LayerTarget] | None = None
        self._lists: dict[tuple[str, NetworkKind], NetworkList] = {}
        self._aliases: dict[tuple[str, int, int], str] = {}

    # ------------------------------------------------------------------ public

    def apply(
        self,
        components: Any,
        calls: Sequence[Any],
        *,
        lora_dir: str | Path | None,
        hypernet_dir: str | Path | None,
        functional: bool = False,
        missing: str = "warn",
    ) -> AppliedNetworks:
        """Make the model carry exactly the networks of ``calls`` (``lora`` and ``hypernet`` kinds;
        others are ignored). Idempotent: the same calls on the same files do nothing the second time.

        ``missing="warn"`` is A1111's behaviour: a network whose file is not found is left out with a
        warning (and a note in the result) and generation goes on; ``"error"`` raises instead.
        """
        if missing not in ("warn", "error"):
            raise ValueError(f"missing={missing!r}: use 'warn' or 'error'")
        loras = [c for c in calls if c.kind == "lora"]
        hypers = [c for c in calls if c.kind == "hypernet"]
        not_found: list[str] = []
        lora_specs, lora_paths = self._locate(
            [lora_call_params(c) for c in loras], lora_dir, LORA, missing, not_found
        )
        hyper_specs, hyper_paths = self._locate(
            [_hyper_params(c) for c in hypers], hypernet_dir, HYPERNETWORK, missing, not_found
        )
        state = (
            id(components),
            functional,
            tuple(
                (str(p), p.stat().st_mtime_ns, *spec[1:])
                for p, spec in zip(lora_paths, lora_specs, strict=True)
            ),
            tuple(
                (str(p), p.stat().st_mtime_ns, m) for p, (_, m) in zip(hyper_paths, hyper_specs, strict=True)
            ),
        )
        if state == self._state and components is self._components:
            return self._applied
        self.restore()
        self._components = components
        self._layer_map = build_layer_map(
            components.unet, components.text_encoder, getattr(components, "text_encoder_2", None)
        )
        applied = AppliedNetworks(functional=functional)
        try:
            self._apply_loras(components, lora_specs, lora_paths, functional, applied)
            nets = []
            for (name, mult), path in zip(hyper_specs, hyper_paths, strict=True):
                net = self._hypernet(path, components.device)
                nets.append((net, mult))
                applied.hypernets.append((name, mult, net.shorthash))
            self._hooks += install_hypernetworks(components.unet, nets)
        except BaseException:
            self.restore()
            raise
        if applied.loras:
            applied.infotext["Lora hashes"] = ", ".join(f"{a.name}: {a.shorthash}" for a in applied.loras)
        if applied.hypernets:
            applied.infotext["Hypernet hashes"] = ", ".join(f"{n}: {h}" for n, _, h in applied.hypernets)
        applied.model_key = self._model_key(components, applied)
        if not_found:
            applied.notes.append("Networks not found: " + ", ".join(not_found))
        self._state = state
        self._applied = applied
        return applied

    def restore(self) -> None:
        """Take every network off: hooks removed, weights copied back byte for byte."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        with torch.no_grad():
            for param, backup in self._backups.values():
                param.copy_(backup.to(param.device))
        self._backups = {}
        self._state = None
        self._applied = AppliedNetworks()

    # ------------------------------------------------------------------ internals

    def _locate(
        self,
        specs: list[Any],
        folder: str | Path | None,
        kind: NetworkKind,
        missing: str,
        not_found: list[str],
    ) -> tuple[list[Any], list[Path]]:
        kept: list[Any] = []
        paths: list[Path] = []
        for spec in specs:
            try:
                paths.append(self._find(folder, spec[0], kind))
            except ModelLoadError as exc:
                if missing == "error":
                    raise
                # A1111 quirk: a network that cannot be found is skipped with a warning; the image is
                # still made without it.
                log.warning("%s; generating without it", exc)
                not_found.append(spec[0])
                continue
            kept.append(spec)
        return kept, paths

    def _find(self, folder: str | Path | None, name: str, kind: NetworkKind) -> Path:
        """The listed file of ``name`` (see :mod:`voidprompt.models.networks.names`). As A1111, the
        last scan answers first; a name it lacks, or whose file has gone, scans the folder again."""
        if folder is None:
            raise ModelLoadError(
                f"the prompt uses {kind.label} '{name}' but no {kind.label} folder is configured; set one."
            )
        key = (str(folder), kind)
        listing = self._lists.get(key)
        hit = listing.find(name) if listing is not None else None
        if listing is not None and hit is not None and hit.is_file():
            return hit
        listing = NetworkList.scan(kind, folder)
        listing.read_alias = self._alias
        self._lists[key] = listing
        return listing.resolve(name)

    def _alias(self, name: str, path: Path) -> str:
        """A LoRA's alias, read once per file version: an unknown name in every request must not
        re-read every header in the folder."""
        try:
            st = path.stat()
        except OSError:
            return name
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key not in self._aliases:
            self._aliases[key] = read_lora_alias(name, path)
        return self._aliases[key]

    def _lora(self, path: Path, name: str) -> LoraNetwork:
        mtime = path.stat().st_mtime_ns
        hit = self._lora_cache.get(path)
        if hit is not None and hit[0] == mtime:
            return hit[1]
        net = load_lora(path, name)
        self._lora_cache[path] = (mtime, net)
        return net

    def _hypernet(self, path: Path, device: torch.device) -> Hypernetwork:
        mtime = path.stat().st_mtime_ns
        hit = self._hyper_cache.get(path)
        if hit is not None and hit[0] == mtime:
            return hit[1]
        net = load_hypernetwork(path, device=device)
        self._hyper_cache[path] = (mtime, net)
        return net

    def _apply_loras(
        self,
        components: Any,
        specs: Sequence[tuple[str, float, float, int | None]],
        paths: Sequence[Path],
        functional: bool,
        applied: AppliedNetworks,
    ) -> None:
        assert self._layer_map is not None
        model = components.family.label
        model_family = "SDXL" if components.family.is_sdxl else "SD1"
        # Per target layer: the (module, multiplier, dyn) list, so a layer's deltas are summed once.
        per_layer: dict[str, list[tuple[LoraModule, float, int | None]]] = {}
        for (name, te, unet, dyn), path in zip(specs, paths, strict=True):
            net = self._lora(path, name)
            family = lora_family(net.modules)
            foreign = family is not None and model_family not in family[0].split("/")
            unmatched: list[str] = []
            misfits: list[str] = []
            matched: dict[str, tuple[LoraModule, LayerTarget]] = {}
            for mod in net.modules.values():
                target = self._layer_map.get(mod.name)
                if target is None:
                    unmatched.append(mod.name)
                    continue
                weight = target.module.weight
                assert isinstance(weight, Tensor)
                try:
                    mod.check(weight.shape, dyn_dim=dyn, model=model)
                except ModelLoadError:
                    if not foreign:
                        raise
                    # A1111 catches the failed update of a layer, counts it against the network
                    # ("Networks with errors") and goes on with the others.
                    misfits.append(mod.name)
                    continue
                matched[mod.name] = (mod, target)
            partial = _incomplete_fused_groups(matched)
            for kohya_name in partial:
                del matched[kohya_name]
            for mod, target in matched.values():
                mult = unet if target.component == "unet" else te
                per_layer.setdefault(mod.name, []).append((mod, mult, dyn))
            if foreign:
                assert family is not None
                skipped = len(unmatched) + len(misfits) + len(partial)
                msg = (
                    f"LoRA '{name}' was made for {family[0]} ({family[1]}) and the model is {model}: "
                    f"{skipped} of {len(net.modules)} layers skipped (no such layer, or another shape), as "
                    f"A1111 skips them, {len(matched)} applied; use a LoRA made for {model}"
                )
                log.warning(msg)
                applied.notes.append(msg)
            elif unmatched:
                # A1111 logs these and goes on ("Network X didn't match keys").
                msg = (
                    f"LoRA '{name}': {len(unmatched)} layers match nothing in this model, "
                    f"e.g. {', '.join(unmatched[:3])}"
                )
                log.warning(msg)
                applied.notes.append(msg)
            if partial and not foreign:
                groups = sorted({self._layer_map[n].fused or "" for n in partial})
                msg = (
                    f"LoRA '{name}': {len(partial)} bigG attention layers skipped, e.g. {partial[0]}: A1111 "
                    "changes a text_encoder_2 attention's q, k, v and out projections only when the LoRA "
                    f"has all four ({len(groups)} attentions lack some)"
                )
                log.warning(msg)
                applied.notes.append(msg)
            if net.bundled_embeddings:
                applied.notes.append(
                    f"LoRA '{name}': {len(net.bundled_embeddings)} bundled embedding tensors ignored"
                )
            applied.loras.append(AppliedLora(net.alias, te, unet, dyn, net.shorthash, len(matched)))

        for kohya_name, items in per_layer.items():
            target = self._layer_map[kohya_name]
            module = target.module
            weight = module.weight
            assert isinstance(weight, nn.Parameter)
            deltas = [
                (mod, mod.delta(weight.shape, dyn_dim=dyn, model=model) * mult) for mod, mult, dyn in items
            ]
            # A1111 has no functional path for open_clip's fused attention: it is always merged.
            if functional and target.fused is None:
                self._hooks.append(
                    _install_functional(
                        module,
                        [(m, d, mult, dyn) for (m, d), (_, mult, dyn) in zip(deltas, items, strict=True)],
                    )
                )
                continue
            total = deltas[0][1]
            for _, d in deltas[1:]:
                total = total + d
            with torch.no_grad():
                key = id(weight)
                if key not in self._backups:
                    self._backups[key] = (weight, weight.detach().to("cpu", copy=True))
                new = (weight.detach().to(torch.float32) + total.to(weight.device)).to(weight.dtype)
                weight.copy_(new)

    def _model_key(self, components: Any, applied: AppliedNetworks) -> str:
        base = str(components.checkpoint.short_hash)
        te = [a for a in applied.loras if a.te != 0.0]
        if not te:
            return base
        mode = "f" if applied.functional else "m"
        return base + "+" + ",".join(f"{a.name}@{a.shorthash}*{a.te!r}/{a.dyn}" for a in te) + f";{mode}"


_FUSED_ROLES = frozenset({"q_proj", "k_proj", "v_proj", "out_proj"})


def _incomplete_fused_groups(matched: dict[str, tuple[LoraModule, LayerTarget]]) -> list[str]:
    """The kohya names of one network's bigG attention modules that A1111 would not apply: those of
    an attention for which the network lacks one of q, k, v and out (or one of them did not fit)."""
    roles: dict[str, set[str]] = {}
    for _, target in matched.values():
        if target.fused is not None:
            roles.setdefault(target.fused, set()).add(target.name.rsplit(".", 1)[-1])
    incomplete = {group for group, have in roles.items() if have != _FUSED_ROLES}
    return sorted(n for n, (_, target) in matched.items() if target.fused in incomplete)


def _install_functional(
    module: nn.Module, items: Sequence[tuple[LoraModule, Tensor, float, int | None]]
) -> RemovableHandle:
    """Forward hook: output + Σ (network branch of x). Plain LoRAs run as up(down(x)) (or
    up(mid(down(x)))); other types and padded inpainting deltas run the layer's op with ΔW."""
    branches = [_branch(module, mod, delta, mult, dyn) for mod, delta, mult, dyn in items]

    def hook(_m: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
        x = args[0]
        for branch in branches:
            output = output + branch(x).to(output.dtype)
        return output

    return module.register_forward_hook(hook)


def _conv_args(module: nn.Module) -> dict[str, Any]:
    assert isinstance(module, nn.Conv2d)
    return {
        "stride": module.stride,
        "padding": module.padding,
        "dilation": module.dilation,
        "groups": module.groups,
    }


def _branch(module: nn.Module, mod: LoraModule, delta: Tensor, mult: float, dyn: int | None) -> Any:
    weight = module.weight
    assert isinstance(weight, Tensor)
    is_conv = isinstance(module, nn.Conv2d)
    plain = mod.kind == "lora" and "lora_mid.weight" not in mod.tensors
    if plain:
        up = mod.tensors["lora_up.weight"].to(weight.device, torch.float32)
        down = mod.tensors["lora_down.weight"].to(weight.device, torch.float32)
        if dyn is not None and dyn < down.shape[0]:
            up, down = up[:, :dyn], down[:dyn]
        factor = mod.scale * mult
        if is_conv and down.ndim == 4 and down.shape[1] == weight.shape[1]:
            args = _conv_args(module)
            up4 = up.reshape(up.shape[0], up.shape[1], 1, 1)

            def conv_branch(x: Tensor) -> Tensor:
                return F.conv2d(F.conv2d(x.to(torch.float32), down, **args), up4) * factor

            return conv_branch
        if not is_conv and down.ndim == 2 and down.shape[1] == weight.shape[1]:

            def linear_branch(x: Tensor) -> Tensor:
                return F.linear(F.linear(x.to(torch.float32), down), up.reshape(up.shape[0], -1)) * factor

            return linear_branch
    dw = delta.to(weight.device, torch.float32)
    if is_conv:
        args = _conv_args(module)
        return lambda x: F.conv2d(x.to(torch.float32), dw, **args)
    return lambda x: F.linear(x.to(torch.float32), dw)
