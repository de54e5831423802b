"""``voidprompt info FILE``: what a checkpoint is, without building a model.

The VAE weights hash identifies a VAE by its *weights*, whatever file carries it (a full checkpoint
with a baked-in VAE, a ``.vae.pt``, a ``.safetensors``) and whether it was saved in fp32 or fp16:
sha256 over the VAE tensors in sorted key order (CompVis names without ``first_stage_model.``; loss
and EMA keys excluded), each contributing ``key + "\\0" + shape as text + "\\0"`` followed by its values
rounded to float16, little-endian. fp16 rounding makes an fp32 file and its fp16 copy hash alike;
bf16 copies differ (they round differently). First 10 hex digits.

Known VAEs (:data:`KNOWN_VAES`) map this hash to a name. The table holds only entries computed by
running :func:`vae_weights_hash` on the named file; none have been verified yet, so it ships empty
rather than with guessed values. Separate VAE files are also recognised by their published file
sha256 (:data:`KNOWN_VAE_FILES`, e.g. NovelAI's animevae.pt). To add a weights entry: run
``voidprompt info <the VAE file>`` on an authentic copy (check its sha256 against the
publisher's), and add ``"<vae weights hash>": "<name>"`` with a comment giving that sha256.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from voidprompt.errors import ModelLoadError
from voidprompt.models.arch import CLIP_PREFIX_OLD, UNET_PREFIX, VAE_PREFIX
from voidprompt.models.arch_sdxl import OPEN_CLIP_PREFIX, OPEN_CLIP_PREFIX_REFINER
from voidprompt.models.convert import POSITION_IDS_KEY
from voidprompt.models.convert_sdxl import SDXL_POSITION_IDS_KEY
from voidprompt.models.detect import V_PRED_KEY, ZTSNR_KEY, ModelFamily, detect_family, detect_prediction
from voidprompt.models.hashes import old_model_hash, sha256_file
from voidprompt.models.load import (
    CheckpointReader,
    _check_position_ids,
    _is_ignored,
    arch_constants,
    open_checkpoint,
)

__all__ = [
    "KNOWN_VAES",
    "KNOWN_VAE_FILES",
    "CheckpointSummary",
    "checkpoint_native_size",
    "describe_checkpoint",
    "vae_weights_hash",
]

KNOWN_VAES: dict[str, str] = {}

# Separate VAE files by the sha256 of the whole file, as their publishers list it (each value was
# checked against at least two independent public listings). This names a VAE *file*; a VAE baked
# into a checkpoint is named through KNOWN_VAES, by its weights.
KNOWN_VAE_FILES: dict[str, str] = {
    # NovelAI's VAE, also shipped as Anything-V3.0.vae.pt, anything-v4.0.vae.pt, orangemix.vae.pt.
    "f921fb3f29891d2a77a6571e56b8b5052420d2884129517a333c60b1b4816cdf": "animevae (NovelAI)",
    "c6a580b13a5bc05a5e16e4dbb80608ff2ec251a162311590c1f34c013d7f3dab": (
        "vae-ft-mse-840000-ema-pruned (.ckpt)"
    ),
    "735e4c3a447a3255760d7f86845f09f937809baa529c17370d83e4c3758f3c75": (
        "vae-ft-mse-840000-ema-pruned (.safetensors)"
    ),
    "df3c506e51b7ee1d7b5a6a2bb7142d47d488743c96aa778afb0f53a2cdc2d38d": "kl-f8-anime2",
}

# The names Components gives the modules: SDXL's CLIP ViT-L is ``text_encoder``, its OpenCLIP ViT-bigG
# (the refiner's only text encoder) ``text_encoder_2``.
_COMPONENTS = (
    ("unet", UNET_PREFIX),
    ("vae", VAE_PREFIX),
    ("text_encoder", "cond_stage_model."),
    ("text_encoder", "conditioner.embedders.0.transformer."),
    ("text_encoder_2", OPEN_CLIP_PREFIX),
    ("text_encoder_2", OPEN_CLIP_PREFIX_REFINER),
)


@dataclass
class CheckpointSummary:
    path: Path
    container: str  # "safetensors" or "ckpt"
    family: ModelFamily | None
    family_error: str | None
    file_size: int
    dtypes: dict[str, int]
    parameters: dict[str, int]
    old_hash: str
    sha256: str
    vae_hash: str | None
    vae_name: str | None
    position_ids_damage: str | None
    metadata_keys: list[str] = field(default_factory=list)
    prediction: str = "eps"  # from the v_pred / ztsnr marker keys (voidprompt.models.detect)
    zero_terminal_snr: bool = False
    native_size: int | None = None  # the side it was trained at; None for a VAE or network file

    @property
    def short_hash(self) -> str:
        return self.sha256[:10]

    def format(self) -> str:
        """The text ``voidprompt info FILE`` prints."""
        fam = self.family.label if self.family else f"unknown ({self.family_error})"
        lines = [
            f"file:          {self.path}",
            f"size:          {self.file_size / 2**20:.1f} MiB ({self.container})",
            f"family:        {fam}",
        ]
        if self.native_size is not None:
            lines.append(f"native size:   {self.native_size}x{self.native_size} (txt2img's default size)")
        lines += [
            f"model hash:    {self.short_hash} (old hash {self.old_hash})",
            f"sha256:        {self.sha256}",
            "dtypes:        " + ", ".join(f"{k} x{v}" for k, v in sorted(self.dtypes.items())),
            "parameters:    " + ", ".join(f"{k} {v:,}" for k, v in self.parameters.items()),
        ]
        if self.prediction != "eps" or self.zero_terminal_snr:
            lines.append(
                f"prediction:    {'v-prediction' if self.prediction == 'v' else 'eps'}"
                + (", zero terminal SNR" if self.zero_terminal_snr else "")
            )
        if self.vae_hash:
            lines.append(f"VAE weights:   {self.vae_hash}" + (f" ({self.vae_name})" if self.vae_name else ""))
        pos = self.position_ids_damage
        lines.append("position_ids:  " + (f"DAMAGED: {pos}" if pos else "ok"))
        if self.metadata_keys:
            lines.append("metadata:      " + ", ".join(self.metadata_keys))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


def vae_weights_hash(reader: CheckpointReader, prefix: str) -> str | None:
    """The VAE weights hash (see the module docstring) of the keys under ``prefix``; None if none."""
    keys = sorted(
        k for k in reader.tensor_names() if k.startswith(prefix) and not _is_ignored(k[len(prefix) :])
    )
    if not keys:
        return None
    h = hashlib.sha256()
    for key in keys:
        t = reader.get(key)
        name = key[len(prefix) :]
        h.update(f"{name}\0{tuple(t.shape)}\0".encode())
        h.update(t.to(torch.float16).contiguous().numpy().astype("<f2").tobytes())
    return h.hexdigest()[:10]


def describe_checkpoint(path: str | Path) -> CheckpointSummary:
    """Family, dtypes, parameter counts, hashes, VAE identity and position_ids health of a file."""
    p = Path(path)
    with open_checkpoint(p) as reader:
        shapes = reader.shapes
        family: ModelFamily | None = None
        error = None
        try:
            family = detect_family(shapes)
        except Exception as exc:  # a VAE or LoRA file still gets described
            error = str(exc)
        params: Counter[str] = Counter()
        for key, shape in shapes.items():
            if _is_ignored(key) or key.endswith("position_ids") or key in (V_PRED_KEY, ZTSNR_KEY):
                continue
            part = next((name for name, pre in _COMPONENTS if key.startswith(pre)), "other")
            params[part] += shape.numel()
        is_bare_vae = family is None and any(k.startswith("encoder.down.") for k in shapes)
        vae_hash = vae_weights_hash(reader, "" if is_bare_vae else VAE_PREFIX)
        damage = None
        for key in (POSITION_IDS_KEY, CLIP_PREFIX_OLD + "embeddings.position_ids", SDXL_POSITION_IDS_KEY):
            if key in shapes:
                positions = int(shapes[key][-1]) if len(shapes[key]) else 77
                damage = _check_position_ids(reader.get(key), max(positions, 1))
                if damage is None and positions != 77:
                    damage = f"has {positions} positions"
        dtypes = Counter(str(d).removeprefix("torch.") for d in reader.dtypes.values())
        metadata_keys = sorted(reader.metadata)
        fmt = reader.format
        prediction, zero_terminal_snr = detect_prediction(shapes)
        native = None
        # A damaged voidprompt.arch entry: loading names it; describing goes on without the size.
        with contextlib.suppress(ModelLoadError):
            native = int(arch_constants(reader, family).vae_sample_size) if family is not None else None
    sha256 = sha256_file(p)
    vae_name = KNOWN_VAES.get(vae_hash) if vae_hash else None
    if vae_name is None and is_bare_vae:
        vae_name = KNOWN_VAE_FILES.get(sha256)
    return CheckpointSummary(
        path=p,
        container=fmt,
        family=family,
        family_error=error,
        file_size=p.stat().st_size,
        dtypes=dict(dtypes),
        parameters=dict(params),
        old_hash=old_model_hash(p),
        sha256=sha256,
        vae_hash=vae_hash,
        vae_name=vae_name,
        position_ids_damage=damage,
        metadata_keys=metadata_keys,
        prediction=prediction,
        zero_terminal_snr=zero_terminal_snr,
        native_size=native,
    )


def checkpoint_native_size(path: str | Path) -> int:
    """The picture side ``path``'s model was trained at, from its header alone (no tensor is read):
    SD1 512, SDXL 1024, or the file's ``voidprompt.arch`` ``vae_sample_size`` (the miniature's 128)."""
    with open_checkpoint(path) as reader:
        return int(arch_constants(reader, detect_family(reader.shapes)).vae_sample_size)
