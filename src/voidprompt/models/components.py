"""What :func:`voidprompt.models.load_model` returns: the modules plus everything known about the file."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from voidprompt.models.arch import SD1Arch
from voidprompt.models.arch_sdxl import SDXLArch
from voidprompt.models.detect import ModelFamily
from voidprompt.models.hashes import old_model_hash, sha256_file
from voidprompt.models.latent_rgb import LatentRGB
from voidprompt.models.placement import PrecisionPolicy

__all__ = ["CheckpointInfo", "Components", "LoadReport", "VaeInfo"]


@dataclass
class CheckpointInfo:
    """A checkpoint file's identity. The full sha256 is computed on first use (seconds for a 2-7 GB
    file) and cached across runs by :mod:`voidprompt.models.hashes`."""

    path: Path
    name: str
    old_hash: str

    @classmethod
    def of(cls, path: Path) -> CheckpointInfo:
        return cls(path=path, name=path.stem, old_hash=old_model_hash(path))

    @cached_property
    def sha256(self) -> str:
        return sha256_file(self.path)

    @cached_property
    def short_hash(self) -> str:
        """A1111's "Model hash" (first 10 hex of the sha256)."""
        return self.sha256[:10]


@dataclass
class VaeInfo:
    """An external VAE file (explicit or paired by name). ``name`` is the file name, as A1111 shows it."""

    path: Path
    name: str
    paired: bool = False  # found next to the checkpoint by A1111's naming rule, not passed explicitly

    @cached_property
    def sha256(self) -> str:
        return sha256_file(self.path)

    @cached_property
    def short_hash(self) -> str:
        """A1111's "VAE hash" (first 10 hex of the sha256)."""
        return self.sha256[:10]


@dataclass
class LoadReport:
    """Where every key of the file went.

    consumed: tensors loaded into a module; ignored: keys known to carry no inference weights
    (training schedule buffers, EMA copies, VAE loss, or the checkpoint's VAE when another was given);
    unused: keys voidprompt does not know (worth a look: a merge tool may have added them);
    missing: module tensors the file lacked (loading fails when this is not empty).
    """

    source: str
    consumed: int = 0
    ignored: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    position_ids_damage: str | None = None
    file_dtypes: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def format(self) -> str:
        lines = [
            f"{self.source}: {self.consumed} tensors loaded, {len(self.ignored)} ignored, "
            f"{len(self.unused)} unused, {len(self.missing)} missing"
        ]
        if self.file_dtypes:
            lines.append(
                "  file dtypes: " + ", ".join(f"{k} x{v}" for k, v in sorted(self.file_dtypes.items()))
            )
        if self.position_ids_damage:
            lines.append(f"  position_ids: {self.position_ids_damage} (replaced by 0..76)")
        if self.unused:
            lines.append(
                f"  unused keys: {', '.join(self.unused[:8])}{' ...' if len(self.unused) > 8 else ''}"
            )
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


@dataclass
class Components:
    """A loaded model: the modules, the tokenizer and the facts about the file.

    SDXL adds ``text_encoder_2`` (OpenCLIP ViT-bigG); its refiner has no ``text_encoder`` (None).
    ``prediction`` ("eps" or "v") and ``zero_terminal_snr`` come from the file's marker keys
    (:func:`voidprompt.models.detect.detect_prediction`); ``alphas_cumprod`` is the schedule as
    trained, before any zero-terminal-SNR rescaling, which is the sampling side's to apply.
    """

    unet: Any  # diffusers.UNet2DConditionModel
    vae: Any  # diffusers.AutoencoderKL
    text_encoder: Any  # transformers.CLIPTextModel (CLIP ViT-L); None for the SDXL refiner
    tokenizer: Any  # voidprompt.models.tokenizer.ClipTokenizer
    family: ModelFamily
    alphas_cumprod: torch.Tensor  # float32, (1000,)
    scaling_factor: float
    checkpoint: CheckpointInfo
    vae_info: VaeInfo | None
    report: LoadReport
    device: torch.device
    dtype: torch.dtype  # the UNet's and text encoder's weights (precision.weights)
    arch: SD1Arch | SDXLArch
    # How the modules compute. The Engine replaces it with a float32-VAE policy when a half
    # decode overflows (A1111's auto_vae_precision): the VAE stays float32 from then on.
    precision: PrecisionPolicy
    text_encoder_2: Any = None  # transformers.CLIPTextModelWithProjection (SDXL's OpenCLIP ViT-bigG)
    prediction: str = "eps"  # "eps" or "v"
    zero_terminal_snr: bool = False
    # The file's own cheap-preview map (its ``voidprompt.latent_rgb`` metadata); None: the family's.
    latent_rgb: LatentRGB | None = None

    @property
    def unet_in_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def is_inpainting(self) -> bool:
        return self.unet_in_channels == 9
