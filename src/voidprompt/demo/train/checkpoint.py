"""Checkpoint IO: the exported model file, the state files a run resumes from, and ``--init-from``.

State files hold CPU tensors whatever the device (a run moves between a GPU and a CPU) and load with
``torch.load(weights_only=True)``. Every file is written through :func:`voidprompt.files.atomic_write`.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from voidprompt.demo.train.config import TrainConfig, TrainError
from voidprompt.demo.train.modules import MINIATURE_CONSTANTS
from voidprompt.errors import ModelLoadError
from voidprompt.files import atomic_write
from voidprompt.models.convert import modules_to_compvis
from voidprompt.models.load import load_model, sd1_alphas_cumprod

__all__ = [
    "atomic_save",
    "export_model",
    "load_init_weights",
    "load_state",
    "on_cpu",
    "save_safetensors",
]


def export_model(
    path: Path,
    unet: Any,
    vae: Any,
    text_encoder: Any,
    scaling_factor: float,
    info: dict[str, Any],
    *,
    image_size: int = 64,
) -> Path:
    """Write one fp16 CompVis-layout .safetensors with the ``voidprompt.arch`` metadata (atomically).

    ``image_size`` is the side the model was trained at; it is stored as ``vae_sample_size`` (and
    ``unet_sample_size`` = side / 8), which is how measurements and the gallery find a model's native
    size (:func:`voidprompt.demo.generate.native_size`)."""
    sd = modules_to_compvis(unet, vae, text_encoder, alphas_cumprod=sd1_alphas_cumprod())
    tensors = {
        k: (v.detach().to(torch.float16) if v.is_floating_point() and k != "alphas_cumprod" else v.detach())
        .cpu()
        .contiguous()
        .clone()
        for k, v in sd.items()
    }
    constants = replace(
        MINIATURE_CONSTANTS,
        scaling_factor=float(scaling_factor),
        unet_sample_size=image_size // 8,
        vae_sample_size=image_size,
    )
    metadata = {**constants.to_metadata(), "voidprompt.training": json.dumps(info, sort_keys=True)}
    return save_safetensors(tensors, metadata, path)


def save_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> Path:
    """Write a .safetensors file atomically (a reader never sees half a model)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda temp: save_file(tensors, str(temp), metadata=metadata))


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file, then rename: a stopped run never leaves half a state file."""

    def write(temp: Path) -> None:
        # Through a handle: given a path, torch names the archive inside after the (random) file name.
        with temp.open("wb") as handle:
            torch.save(obj, handle)

    atomic_write(path, write)


def load_state(path: Path, config: TrainConfig) -> dict[str, Any]:
    """The contents of the state file ``path`` (CPU tensors), checked to belong to a run of ``config``."""
    saved: dict[str, Any] = torch.load(path, weights_only=True, map_location="cpu")
    if saved["config"]["seed"] != config.seed:
        raise TrainError(
            f"{path} was trained with seed {saved['config']['seed']}, not {config.seed}; "
            "pass the same --seed to resume"
        )
    # Runs from before --image-size existed were all 64 px.
    saved_size = saved["config"].get("image_size", 64)
    if saved_size != config.image_size:
        raise TrainError(
            f"{path} was trained on {saved_size} px pictures, not {config.image_size}; pass "
            f"--image-size {saved_size} to resume (its VAE, latents and UNet are of that size)"
        )
    return saved


def load_init_weights(path: str, image_size: int, unet: Any, vae: Any, text_encoder: Any) -> float:
    """Copy the weights of the checkpoint at ``path`` (``--init-from``) into the fresh modules; returns
    its latent scaling factor."""
    try:
        source = load_model(path, device="cpu", dtype=torch.float32)
    except ModelLoadError as error:
        raise TrainError(f"--init-from: {error}") from None
    native = int(source.arch.constants.vae_sample_size)
    if native != image_size:
        raise TrainError(
            f"--init-from {path} is a {native} px model, not {image_size}; pass --image-size {native}"
        )
    for name, module, loaded in (("UNet", unet, source.unet), ("VAE", vae, source.vae),
                                 ("text encoder", text_encoder, source.text_encoder)):
        try:
            module.load_state_dict(loaded.state_dict())
        except RuntimeError as error:
            first = str(error).strip().splitlines()[1:2] or [str(error)]
            raise TrainError(
                f"--init-from {path}: its {name} is not the miniature model's shape "
                f"({first[0].strip()}); start from a file `voidprompt demo train` wrote"
            ) from None
    return float(source.scaling_factor)


def on_cpu(obj: Any) -> Any:
    """``obj`` (nested dicts / lists of tensors, as state dicts are) with every tensor on the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: on_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(on_cpu(v) for v in obj)
    return obj
