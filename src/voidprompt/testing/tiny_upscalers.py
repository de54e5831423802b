"""Tiny ESRGAN-family (RRDBNet) files with random weights, written in the key layouts users have, for
tests. The key names are spelt out here from the layouts' definitions, not taken from voidprompt's
loader, so that a test of the loader checks it against the layouts themselves."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

__all__ = ["rrdb_state_dict", "write_tiny_rrdb"]


def _conv(gen: torch.Generator, cin: int, cout: int, std: float) -> tuple[Tensor, Tensor]:
    return torch.randn(cout, cin, 3, 3, generator=gen) * std, torch.randn(cout, generator=gen) * std


def rrdb_state_dict(
    layout: str = "old",
    *,
    nf: int = 8,
    nb: int = 1,
    gc: int = 32,
    ups: int = 2,
    unshuffle: int = 1,
    channels: int = 3,
    seed: int = 0,
    std: float = 0.05,
) -> dict[str, Tensor]:
    """A random RRDBNet state dict. ``layout``: ``"old"`` (ESRGAN's ``model.N``), ``"basicsr"``
    (``conv_first`` / ``body.N.rdbJ`` / ``conv_upK``) or ``"old-basicsr"`` (``RRDB_trunk`` /
    ``trunk_conv`` / ``upconvK`` / ``HRconv``)."""
    gen = torch.Generator().manual_seed(seed)
    named: list[tuple[str, int, int]] = [("first", channels * unshuffle * unshuffle, nf)]
    for i in range(nb):
        for j in (1, 2, 3):
            for k in range(1, 6):
                named.append((f"rdb.{i}.{j}.{k}", nf + (k - 1) * gc, gc if k < 5 else nf))
    named.append(("trunk", nf, nf))
    named += [(f"up.{u}", nf, nf) for u in range(1, ups + 1)]
    named += [("hr", nf, nf), ("last", nf, channels)]
    out: dict[str, Tensor] = {}
    for name, cin, cout in named:
        w, b = _conv(gen, cin, cout, std)
        parts = name.split(".")
        if layout == "old":
            key = {
                "first": "model.0",
                "trunk": f"model.1.sub.{nb}",
                "hr": f"model.{3 * ups + 2}",
                "last": f"model.{3 * ups + 4}",
            }.get(name)
            if parts[0] == "rdb":
                key = f"model.1.sub.{parts[1]}.RDB{parts[2]}.conv{parts[3]}.0"
            elif parts[0] == "up":
                key = f"model.{3 * int(parts[1])}"
        elif layout in ("basicsr", "old-basicsr"):
            old = layout == "old-basicsr"
            key = {
                "first": "conv_first",
                "trunk": "trunk_conv" if old else "conv_body",
                "hr": "HRconv" if old else "conv_hr",
                "last": "conv_last",
            }.get(name)
            if parts[0] == "rdb":
                key = (
                    f"RRDB_trunk.{parts[1]}.RDB{parts[2]}.conv{parts[3]}"
                    if old
                    else f"body.{parts[1]}.rdb{parts[2]}.conv{parts[3]}"
                )
            elif parts[0] == "up":
                key = f"upconv{parts[1]}" if old else f"conv_up{parts[1]}"
        else:
            raise ValueError(f"unknown layout {layout!r}")
        assert key is not None
        out[f"{key}.weight"], out[f"{key}.bias"] = w, b
    return out


def write_tiny_rrdb(
    path: str | Path, layout: str = "old", *, wrapper: str | None = None, **shape: int
) -> Path:
    """Write :func:`rrdb_state_dict` to ``path`` (``.safetensors`` or a torch pickle), nested under
    ``wrapper`` (e.g. BasicSR's ``"params_ema"``) when given."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    state = rrdb_state_dict(layout, **shape)
    if p.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(p))
    else:
        torch.save({wrapper: state} if wrapper else state, p)
    return p
