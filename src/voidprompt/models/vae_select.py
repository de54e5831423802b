"""VAE files in a folder, choosing one by name, and the fp16 NaN fallback for decoding.

Listing follows A1111 (``modules/sd_vae.py``): every ``*.pt`` / ``*.ckpt`` / ``*.safetensors`` under the
VAE folder (recursively) is a VAE, shown by its file name (``animevae.pt``,
``vae-ft-mse-840000-ema-pruned.safetensors``); in a checkpoint folder only ``*.vae.pt`` /
``*.vae.ckpt`` / ``*.vae.safetensors`` count. The infotext carries ``VAE: <file name>`` and
``VAE hash: <sha256[:10]>`` (:class:`voidprompt.models.components.VaeInfo`).

NaN fallback: some VAEs (SD1's original one among them) overflow fp16 in the decoder's last blocks,
and the image comes out black. A1111 offers ``--no-half-vae`` and "automatically revert VAE to
32-bit floats"; here it is the default: :func:`decode_with_nan_fallback` decodes in the VAE's dtype,
and if any value is NaN or inf, logs a warning and decodes again in float32.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from voidprompt.errors import ModelLoadError

__all__ = ["VaeDecode", "VaeEntry", "choose_vae", "decode_with_nan_fallback", "list_vaes"]

log = logging.getLogger(__name__)

VAE_FOLDER_SUFFIXES = (".pt", ".ckpt", ".safetensors")
CHECKPOINT_FOLDER_SUFFIXES = (".vae.pt", ".vae.ckpt", ".vae.safetensors")


@dataclass(frozen=True)
class VaeEntry:
    name: str  # file name, as A1111 lists it and writes it in the infotext
    path: Path


def list_vaes(vae_dir: str | Path | None, checkpoint_dir: str | Path | None = None) -> list[VaeEntry]:
    """VAE files of a VAE folder (any .pt/.ckpt/.safetensors) and of a checkpoint folder (``*.vae.*``),
    sorted case-insensitively by name; a name found twice keeps the VAE folder's file."""
    found: dict[str, VaeEntry] = {}
    for folder, suffixes in ((checkpoint_dir, CHECKPOINT_FOLDER_SUFFIXES), (vae_dir, VAE_FOLDER_SUFFIXES)):
        if folder is None or not Path(folder).is_dir():
            continue
        for p in Path(folder).rglob("*"):
            if p.is_file() and p.name.lower().endswith(suffixes):
                found[p.name] = VaeEntry(p.name, p)
    return sorted(found.values(), key=lambda e: e.name.lower())


def choose_vae(
    name: str | None, vae_dir: str | Path | None, checkpoint_dir: str | Path | None = None
) -> Path | None:
    """The VAE file for a name: ``None`` / "None" / "Automatic" -> None (the checkpoint's own VAE or
    the automatic pairing); else an exact file name, then a file name without its suffix."""
    if name is None or name in ("None", "Automatic", ""):
        return None
    entries = list_vaes(vae_dir, checkpoint_dir)
    for e in entries:
        if e.name == name:
            return e.path
    for e in entries:
        for suffix in (*CHECKPOINT_FOLDER_SUFFIXES, *VAE_FOLDER_SUFFIXES):
            if e.name.lower().endswith(suffix) and e.name[: -len(suffix)] == name:
                return e.path
    raise ModelLoadError(
        f"no VAE named '{name}' in {vae_dir}; available: {', '.join(e.name for e in entries) or 'none'}. "
        "Use one of those names, 'Automatic' or 'None'."
    )


@dataclass
class VaeDecode:
    sample: Tensor  # float32 decoder output (in [-1, 1] for a working VAE)
    upcast: bool  # True when the half-precision decode overflowed and float32 was used
    message: str | None = None


@torch.no_grad()
def decode_with_nan_fallback(vae: Any, z: Tensor, *, keep_fp32: bool = False) -> VaeDecode:
    """``vae.decode(z).sample`` in float32, redone in float32 when a half-precision decode gives
    NaN/inf. ``z`` is the VAE's input (latents already divided by the scaling factor).

    The fallback casts the VAE to float32 in place for the second decode and back afterwards (exact:
    fp16 -> fp32 -> fp16 returns the same bits) unless ``keep_fp32``, which leaves it in float32 as
    A1111 does for the rest of the session.
    """
    dtype = next(vae.parameters()).dtype
    out = vae.decode(z.to(dtype)).sample
    if dtype == torch.float32 or bool(torch.isfinite(out).all()):
        return VaeDecode(out.float(), False)
    # A1111 quirk: A1111 only reacts when *all* values are NaN; any NaN/inf already spoils the image.
    bad = int((~torch.isfinite(out)).sum())
    message = (
        f"VAE decode in {str(dtype).removeprefix('torch.')} produced {bad} NaN/inf values of {out.numel()} "
        "(the VAE overflows half precision); decoded again in float32. Use a fixed VAE (such as "
        "vae-ft-mse-840000-ema-pruned) or run the VAE in float32 to avoid the extra decode."
    )
    log.warning(message)
    vae.to(torch.float32)
    try:
        out32 = vae.decode(z.to(torch.float32)).sample
    finally:
        if not keep_fp32:
            vae.to(dtype)
    return VaeDecode(out32.float(), True, message)
