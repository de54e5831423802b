"""Read checkpoint files and load them into modules, one tensor at a time.

Memory: the modules are built on the meta device (no storage), then every tensor is read from the
file, cast to the target dtype, moved to the target device and put in place of its meta parameter.
At no point do the file's state dict and the model both exist in full: the peak is the model plus one
tensor (plus, for safetensors, the file pages the OS keeps mapped).

The container format is read from the file's first bytes, not its extension: ``PK`` is a torch zip,
``0x80`` a legacy torch pickle, and anything else must parse as a safetensors header.

SD1.x and SDXL (base, refiner, inpainting) load through the same loop; the family decides the
architecture reader (:mod:`~voidprompt.models.arch` or :mod:`~voidprompt.models.arch_sdxl`) and the
key map. SDXL's noise schedule is sgm's ``LegacyDDPMDiscretization``, the same scaled-linear schedule
as SD1's, and A1111 always computes it for SDXL: an ``alphas_cumprod`` stored in an SDXL file is
ignored. The ``v_pred`` / ``ztsnr`` marker keys are recorded on the components
(:func:`voidprompt.models.detect.detect_prediction`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from voidprompt.errors import ModelLoadError
from voidprompt.models.arch import (
    ARCH_METADATA_KEY,
    CLIP_PREFIX_OLD,
    VAE_PREFIX,
    ArchConstants,
    SD1Arch,
    build_modules,
    infer_arch,
)
from voidprompt.models.arch_sdxl import SDXL_DEFAULTS, SDXLArch, infer_sdxl_arch
from voidprompt.models.components import CheckpointInfo, Components, LoadReport, VaeInfo
from voidprompt.models.convert import POSITION_IDS_KEY, CheckpointKeyMap, fit_shape, to_module_tensors
from voidprompt.models.convert_open_clip import IGNORED_OPEN_CLIP_KEYS
from voidprompt.models.convert_sdxl import SDXL_POSITION_IDS_KEY, sdxl_key_map
from voidprompt.models.detect import (
    V_PRED_KEY,
    ZTSNR_KEY,
    ModelFamily,
    detect_family,
    detect_prediction,
    require_supported,
)
from voidprompt.models.latent_rgb import LATENT_RGB_METADATA_KEY, LatentRGB
from voidprompt.models.placement import PrecisionPolicy, use_a1111_cuda_settings
from voidprompt.models.safe_pickle import LazyTensor, PickleCheckpoint, load_pickle_checkpoint
from voidprompt.models.safetensors_stream import read_safetensors_header
from voidprompt.models.tokenizer import load_clip_tokenizer

__all__ = [
    "CheckpointReader",
    "find_paired_vae",
    "load_model",
    "open_checkpoint",
    "sd1_alphas_cumprod",
]

log = logging.getLogger(__name__)

# ldm's DDPM registers these training buffers in every checkpoint; inference uses only alphas_cumprod.
_SCHEDULE_KEYS = frozenset(
    {
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "logvar",
        "lvlb_weights",
    }
)


def _is_ignored(key: str) -> bool:
    return (
        key in _SCHEDULE_KEYS
        or key.startswith("model_ema.")
        or key.startswith(VAE_PREFIX + "loss.")
        or key.startswith("loss.")
        # open_clip's contrastive-loss temperature (and an attention mask some saves carry)
        or (key.startswith("conditioner.embedders.") and key.rsplit(".", 1)[-1] in IGNORED_OPEN_CLIP_KEYS)
    )


def sd1_alphas_cumprod() -> torch.Tensor:
    """SD1's training schedule exactly as ldm registers it: scaled-linear betas (0.00085 .. 0.012,
    1000 steps) computed in float64, cumulative product in float64, then stored as float32."""
    betas = (torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2).numpy()
    return torch.tensor(np.cumprod(1.0 - betas, axis=0), dtype=torch.float32)


class CheckpointReader:
    """Keys, shapes and dtypes of a checkpoint without reading its tensors; :meth:`get` reads one."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.metadata: dict[str, str] = {}
        self.shapes: dict[str, torch.Size] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self.format = ""
        self._spans: dict[str, tuple[int, int]] = {}  # safetensors: key -> (file offset, bytes)
        self._pickle: PickleCheckpoint | None = None
        self._lazy: dict[str, LazyTensor] = {}
        self.non_tensor_keys: list[str] = []

    def _read_span(self, key: str) -> torch.Tensor:
        # Plain reads into fresh tensors instead of mmap: mapped file pages would count against the
        # process until unmapped (a fp16 2 GB file + the fp32 model = 1.5x the model), and views into
        # the map are not 64-byte aligned, which changes CPU kernel results in the last bits.
        offset, nbytes = self._spans[key]
        out = torch.empty(self.shapes[key], dtype=self.dtypes[key])
        if nbytes:
            view = memoryview(out.view(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]
            with open(self.path, "rb") as f:
                f.seek(offset)
                if f.readinto(view) != nbytes:
                    raise ModelLoadError(
                        f"{self.path}: the file ends inside tensor '{key}'; it is truncated."
                    )
        return out

    def tensor_names(self) -> list[str]:
        return list(self.shapes)

    def get(self, key: str) -> torch.Tensor:
        try:
            if key in self._spans:
                return self._read_span(key)
            assert self._pickle is not None
            return self._pickle.materialize(self._lazy[key])
        except ModelLoadError:
            raise
        except Exception as exc:
            raise ModelLoadError(
                f"{self.path}: cannot read tensor '{key}' ({exc}); the file is damaged."
            ) from exc

    def close(self) -> None:
        if self._pickle is not None:
            self._pickle.close()
            self._pickle = None

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _unwrap(obj: Any, path: Path) -> dict[str, Any]:
    # ldm/Lightning saves {"state_dict": {...}, "global_step": ..., ...}; some tools nest it twice.
    for _ in range(3):
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ModelLoadError(f"{path}: the pickle holds a {type(obj).__name__}, not a state dict.")
    return obj


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    """An 8-byte little-endian header length that fits the file, then the JSON header's "{".

    Checked before the pickle signatures: a safetensors header length whose low byte is 0x80 makes
    the file start like a pickle (protocol marker 0x80), about one file in 256.
    """
    if len(head) < 9 or head[8:9] != b"{":
        return False
    header_len = int.from_bytes(head[:8], "little")
    return 0 < header_len <= size - 8


def arch_constants(reader: CheckpointReader, family: ModelFamily) -> ArchConstants:
    """The constants shapes cannot tell (the native picture size among them): the family's defaults,
    overridden key by key by the file's ``voidprompt.arch`` metadata."""
    defaults = SDXL_DEFAULTS if family.is_sdxl else None
    return ArchConstants.from_metadata(reader.metadata, source=str(reader.path), defaults=defaults)


def open_checkpoint(path: str | Path) -> CheckpointReader:
    """Open a ``.safetensors`` / ``.ckpt`` / ``.pt`` file for tensor-by-tensor reading."""
    p = Path(path)
    if not p.is_file():
        raise ModelLoadError(f"{p}: no such file; check the path.")
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(9)
    reader = CheckpointReader(p)
    if not _looks_like_safetensors(head, size) and (head.startswith(b"PK") or head[:1] == b"\x80"):
        ck = load_pickle_checkpoint(p)
        for meta_key in (ARCH_METADATA_KEY, LATENT_RGB_METADATA_KEY):
            if isinstance(ck.obj, dict) and isinstance(ck.obj.get(meta_key), str):
                # Pickles have no metadata block; voidprompt writes its entries next to "state_dict".
                reader.metadata[meta_key] = ck.obj[meta_key]
        state = _unwrap(ck.obj, p)
        reader.format = "ckpt"
        reader._pickle = ck
        for key, value in state.items():
            if isinstance(value, LazyTensor):
                reader._lazy[str(key)] = value
                reader.shapes[str(key)] = value.shape
                reader.dtypes[str(key)] = value.dtype
            else:
                reader.non_tensor_keys.append(str(key))
        return reader
    header_len = int.from_bytes(head[:8], "little") if len(head) >= 8 else -1
    if len(head) < 9 or head[8:9] != b"{" or header_len <= 0 or 8 + header_len > size:
        raise ModelLoadError(
            f"{p}: not a checkpoint - neither a .safetensors file nor a torch .ckpt/.pt (starts with "
            f"{head[:8]!r}). If it is a truncated download, download it again."
        )
    header = read_safetensors_header(p)
    reader.metadata = dict(header.metadata)
    for key, entry in header.tensors.items():
        reader.shapes[key] = entry.shape
        reader.dtypes[key] = entry.dtype
        reader._spans[key] = (entry.offset, entry.nbytes)
    reader.format = "safetensors"
    return reader


def find_paired_vae(checkpoint: str | Path) -> Path | None:
    """A1111's automatic pairing: ``model.vae.pt`` / ``.vae.safetensors`` / ``.vae.ckpt`` next to
    ``model.ckpt`` or ``model.safetensors`` (first found in that order)."""
    p = Path(checkpoint)
    for suffix in (".vae.pt", ".vae.safetensors", ".vae.ckpt"):
        candidate = p.with_name(p.stem + suffix)
        if candidate.is_file():
            return candidate
    return None


def _assign(module: nn.Module, key: str, tensor: torch.Tensor) -> None:
    owner_path, _, leaf = key.rpartition(".")
    owner = module.get_submodule(owner_path) if owner_path else module
    if leaf in owner._parameters:
        old = owner._parameters[leaf]
        owner._parameters[leaf] = nn.Parameter(
            tensor, requires_grad=bool(old is not None and old.requires_grad)
        )
    elif leaf in owner._buffers:
        owner._buffers[leaf] = tensor
    else:
        raise ModelLoadError(f"internal: module has no tensor '{key}'")


def _meta_tensors(module: nn.Module) -> Iterator[str]:
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if t.is_meta:
            yield name


def _prepare(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    # Readers hand out fresh tensors, so a no-op .to() shares memory safely.
    if tensor.is_floating_point():
        return tensor.to(device=device, dtype=dtype)
    return tensor.to(device=device)


def _check_position_ids(value: torch.Tensor, positions: int) -> str | None:
    """Describe damage to a stored position_ids buffer, or None when it is exactly 0..positions-1."""
    expected = torch.arange(positions, dtype=torch.int64)
    flat = value.reshape(-1)
    if flat.numel() != positions:
        return f"has {flat.numel()} entries instead of {positions}"
    if value.is_floating_point():
        # What a float buffer does in a model that uses it as an index: it is truncated to int64.
        truncated = flat.to(torch.float64).trunc().to(torch.int64)
        bad = (truncated != expected).nonzero().flatten().tolist()
        if bad:
            shown = ", ".join(f"{i}: {flat[i].item():.4f}" for i in bad[:5])
            return f"stored as {value.dtype} with {len(bad)} wrong positions after truncation ({shown})"
        return f"stored as {value.dtype} instead of int64 (values intact)"
    bad = (flat.to(torch.int64) != expected).nonzero().flatten().tolist()
    if bad:
        return f"{len(bad)} wrong positions (first at index {bad[0]}: {flat[bad[0]].item()})"
    return None


def _valid_schedule(value: torch.Tensor) -> bool:
    if value.shape != (1000,) or not value.is_floating_point():
        return False
    v = value.to(torch.float64)
    return bool(torch.isfinite(v).all() and (v > 0).all() and (v <= 1).all() and (v[1:] <= v[:-1]).all())


def _load_external_vae(
    vae: nn.Module,
    vae_path: Path,
    device: torch.device,
    dtype: torch.dtype,
    report: LoadReport,
    family: ModelFamily = ModelFamily.SD1,
) -> None:
    keymap = CheckpointKeyMap(vae=vae, vae_prefix="")
    mismatched: list[str] = []
    unknown: list[str] = []
    loaded = 0
    with open_checkpoint(vae_path) as reader:
        for raw_key in reader.tensor_names():
            # A VAE extracted without removing the prefix still is a VAE.
            key = raw_key[len(VAE_PREFIX) :] if raw_key.startswith(VAE_PREFIX) else raw_key
            if _is_ignored(key):
                continue
            target = keymap.target(key)
            if target is None:
                unknown.append(raw_key)
                continue
            shape = reader.shapes[raw_key]
            if shape != target.shape and (shape.numel() != target.shape.numel()):
                mismatched.append(f"{raw_key} {tuple(shape)} (model wants {tuple(target.shape)})")
                continue
            tensor = fit_shape(reader.get(raw_key), target.shape, what=f"{vae_path}: {raw_key}")
            _assign(vae, target.module_key, _prepare(tensor, device, dtype))
            loaded += 1
    missing = list(_meta_tensors(vae))
    if mismatched or missing or loaded == 0:
        parts = []
        if mismatched:
            parts.append(f"{len(mismatched)} tensors of the wrong shape, e.g. {'; '.join(mismatched[:3])}")
        if missing:
            parts.append(f"{len(missing)} VAE tensors missing, e.g. {', '.join(missing[:3])}")
        if unknown:
            parts.append(f"{len(unknown)} keys that are not VAE keys, e.g. {', '.join(unknown[:3])}")
        examples = (
            "an SDXL VAE file (such as sdxl_vae.safetensors or sdxl-vae-fp16-fix)"
            if family.is_sdxl
            else "an SD1 VAE file (such as vae-ft-mse-840000-ema-pruned or NovelAI's animevae.pt)"
        )
        raise ModelLoadError(
            f"{vae_path}: does not fit this model's VAE: {'; '.join(parts) or 'no VAE tensors'}. "
            f"Use {examples} or load without a VAE."
        )
    report.consumed += loaded
    if unknown:
        report.notes.append(f"VAE file {vae_path.name}: {len(unknown)} unknown keys ignored")


def load_model(
    path: str | Path,
    *,
    vae_path: str | Path | None = None,
    device: str | torch.device = "cpu",
    precision: PrecisionPolicy | None = None,
    dtype: torch.dtype | None = None,
    channels_last: bool | None = None,
    tokenizer: Any = None,
) -> Components:
    """Load an SD1.x or SDXL checkpoint (and their inpainting variants, and the SDXL refiner) into
    diffusers/transformers modules.

    ``vae_path`` replaces the checkpoint's VAE; without it, a ``<stem>.vae.pt`` /
    ``.vae.safetensors`` / ``.vae.ckpt`` next to the checkpoint is used as A1111 does.
    ``device`` and ``precision`` come from :mod:`voidprompt.models.placement` (resolved at the
    edge): the UNet and text encoder are loaded in ``precision.weights``, the VAE in
    ``precision.vae``. Without a policy, ``dtype`` (default float32) is used for all three with no
    autocast. ``channels_last`` (default: on CUDA only) stores the UNet's convolution weights
    channels-last, the layout cuDNN's fastest kernels use; CPU results stay as they were.
    ``channels_last=True`` stores the VAE that way too (on a CPU both
    run their convolutions about 5% faster, with results that differ in their last bits).
    ``tokenizer`` defaults to :func:`voidprompt.models.tokenizer.load_clip_tokenizer`.
    Raises :class:`ModelLoadError` (missing, damaged or foreign file; missing tensors),
    :class:`UnsafePickleError` and :class:`UnsupportedModelError` (SD2).
    """
    p = Path(path)
    dev = torch.device(device)
    if precision is None:
        precision = PrecisionPolicy.uniform(torch.float32 if dtype is None else dtype, dev)
    elif dtype is not None and dtype != precision.weights:
        raise ModelLoadError(
            f"load_model: dtype={dtype} contradicts precision {precision.name}; pass one of the two"
        )
    dtypes = {
        "unet": precision.weights,
        "text_encoder": precision.weights,
        "text_encoder_2": precision.weights,
        "vae": precision.vae,
    }
    report = LoadReport(source=str(p))
    with open_checkpoint(p) as reader:
        shapes = reader.shapes
        family = detect_family(shapes)
        require_supported(family, source=str(p))
        constants = arch_constants(reader, family)
        if ARCH_METADATA_KEY in reader.metadata:
            report.notes.append(f"architecture constants from '{ARCH_METADATA_KEY}' metadata")
        arch: SD1Arch | SDXLArch
        text_encoder_2: Any = None
        if family.is_sdxl:
            arch = infer_sdxl_arch(shapes, constants)
            unet, vae, text_encoder, text_encoder_2 = arch.build(device="meta")
            keymap = sdxl_key_map(unet, vae, text_encoder, text_encoder_2)
            position_keys = {}
            if arch.clip_l is not None:
                old_key = SDXL_POSITION_IDS_KEY.replace("text_model.", "")  # pre-4.x transformers saves
                position_keys = dict.fromkeys((SDXL_POSITION_IDS_KEY, old_key), arch.clip_l.max_positions)
        else:
            arch = infer_arch(shapes, constants)
            unet, vae, text_encoder = build_modules(arch, device="meta")
            keymap = CheckpointKeyMap(unet, vae, text_encoder)
            position_keys = {
                POSITION_IDS_KEY: arch.clip.max_positions,
                CLIP_PREFIX_OLD + "embeddings.position_ids": arch.clip.max_positions,
            }
        candidates = {
            "unet": unet,
            "vae": vae,
            "text_encoder": text_encoder,
            "text_encoder_2": text_encoder_2,
        }
        modules: dict[str, nn.Module] = {name: m for name, m in candidates.items() if m is not None}
        latent_rgb = LatentRGB.from_metadata(
            reader.metadata, source=str(p), channels=int(vae.config.latent_channels)
        )
        if latent_rgb is not None:
            report.notes.append(f"cheap preview map from '{LATENT_RGB_METADATA_KEY}' metadata")
        prediction, zero_terminal_snr = detect_prediction(shapes)

        external_vae = Path(vae_path) if vae_path is not None else find_paired_vae(p)
        if external_vae is not None and not external_vae.is_file():
            raise ModelLoadError(f"{external_vae}: VAE file not found; check the path.")

        stored_alphas: torch.Tensor | None = None
        for key in reader.tensor_names():
            report.file_dtypes[str(reader.dtypes[key]).removeprefix("torch.")] = (
                report.file_dtypes.get(str(reader.dtypes[key]).removeprefix("torch."), 0) + 1
            )
            if key in position_keys:
                positions = position_keys[key]
                damage = _check_position_ids(reader.get(key), positions)
                report.position_ids_damage = damage
                if damage:
                    log.warning("%s: position_ids %s; using 0..%d", p, damage, positions - 1)
                report.consumed += 1
                continue
            if key == "alphas_cumprod" and not family.is_sdxl:
                stored_alphas = reader.get(key)
                report.consumed += 1
                continue
            if key in (V_PRED_KEY, ZTSNR_KEY):
                report.consumed += 1  # a marker: its presence is the information
                continue
            target = keymap.target(key)
            if target is None:
                (report.ignored if _is_ignored(key) else report.unused).append(key)
                continue
            if target.component == "vae" and external_vae is not None:
                report.ignored.append(key)  # replaced by the external VAE; never read
                continue
            if reader.shapes[key] != target.shape and reader.shapes[key].numel() != target.shape.numel():
                raise ModelLoadError(
                    f"{p}: '{key}' has shape {tuple(reader.shapes[key])} but the architecture read from "
                    f"the file wants {tuple(target.shape)}; the checkpoint is inconsistent (a bad merge?)."
                )
            module = modules[target.component]
            dtype = dtypes[target.component]
            for module_key, tensor in to_module_tensors(target, reader.get(key), what=f"{p}: {key}"):
                _assign(module, module_key, _prepare(tensor, dev, dtype))
            report.consumed += 1
        if reader.non_tensor_keys:
            report.ignored.extend(reader.non_tensor_keys)

    # The CLIP position ids are a non-persistent buffer: always the clean 0..N-1, whatever the file had.
    for encoder in (text_encoder, text_encoder_2):
        if encoder is None:
            continue
        for name, buf in list(encoder.named_buffers()):
            if name.endswith("position_ids"):
                _assign(
                    encoder, name, torch.arange(buf.shape[-1], dtype=torch.int64, device=dev).expand(1, -1)
                )

    missing = [
        f"{c}.{k}" for c, m in modules.items() if not (c == "vae" and external_vae) for k in _meta_tensors(m)
    ]
    if missing:
        report.missing = missing
        raise ModelLoadError(
            f"{p}: the checkpoint lacks {len(missing)} model tensors (e.g. {', '.join(missing[:4])}); "
            "it is incomplete - a pruned or partial file, or a LoRA rather than a model."
        )

    vae_info = None
    if external_vae is not None:
        _load_external_vae(vae, external_vae, dev, precision.vae, report, family)
        vae_info = VaeInfo(path=external_vae, name=external_vae.name, paired=vae_path is None)

    if prediction == "v":
        report.notes.append(f"v-prediction ('{V_PRED_KEY}' key)")
    if zero_terminal_snr:
        report.notes.append(f"zero terminal SNR schedule asked for ('{ZTSNR_KEY}' key)")
    if stored_alphas is not None and _valid_schedule(stored_alphas):
        alphas = stored_alphas.to(torch.float32)
    else:
        alphas = sd1_alphas_cumprod()
        if stored_alphas is not None:
            report.notes.append("stored alphas_cumprod is not a valid 1000-step schedule; using SD1's")

    if tokenizer is None:
        tokenizer = load_clip_tokenizer()

    for module in modules.values():
        module.eval()
    if dev.type == "cuda":
        use_a1111_cuda_settings()
    if channels_last is None:
        # The device default: the UNet on CUDA (cuDNN's fastest layout); the VAE only when asked.
        if dev.type == "cuda":
            unet.to(memory_format=torch.channels_last)
    elif channels_last:
        unet.to(memory_format=torch.channels_last)
        vae.to(memory_format=torch.channels_last)
    if not math.isclose(constants.scaling_factor, float(vae.config.scaling_factor)):
        raise ModelLoadError("internal: VAE scaling factor differs from the architecture's")
    return Components(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        family=family,
        alphas_cumprod=alphas,
        scaling_factor=constants.scaling_factor,
        checkpoint=CheckpointInfo.of(p),
        vae_info=vae_info,
        report=report,
        device=dev,
        dtype=precision.weights,
        arch=arch,
        precision=precision,
        text_encoder_2=text_encoder_2,
        prediction=prediction,
        zero_terminal_snr=zero_terminal_snr,
        latent_rgb=latent_rgb,
    )
