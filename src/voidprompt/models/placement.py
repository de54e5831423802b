"""Where a model computes and in which precision: decided once, at the edge, then passed down.

:func:`resolve_device` turns a user's ``--device`` into a ``torch.device`` that exists on this
machine, or refuses with one line naming what does exist. :func:`resolve_precision` turns
``--precision`` into a :class:`PrecisionPolicy` for that device:

======  ========================  ==================================  ===============
name    weights (UNet, CLIP)      autocast around UNet and CLIP       VAE
======  ========================  ==================================  ===============
fp32    float32                   off                                 float32
fp16    float16                   ``torch.autocast("cuda")`` fp16     float16
bf16    bfloat16                  ``torch.autocast(device)`` bf16     bfloat16
auto    fp16 on CUDA, fp32 elsewhere (A1111's defaults: ``model.half()`` and
        ``devices.autocast()`` on a GPU; a CPU run needs ``--no-half``)
======  ==================================================================================

Autocast keeps A1111's numerics on CUDA: matrix products and convolutions in half precision,
normalisations, softmax and the other precision-sensitive ops in float32 (CUDA autocast's fp32
list). The VAE decodes without autocast in its own dtype, as A1111's ``without_autocast`` decode;
a half-precision decode that overflows is redone in float32 (:mod:`voidprompt.models.vae_decode`).

fp16 on the CPU is refused by choice: A1111 has no such path (it needs ``--no-half`` on a CPU),
and CPU half-precision kernels are slow and overflow where fp32 does not. bf16 has float32's
range and runs on the CPU under CPU autocast.

:func:`use_a1111_cuda_settings` sets torch's CUDA switches as A1111 does when it starts on a GPU:
TF32 for float32 matrix products and cuDNN convolutions (what float32 work remains under autocast -
the fp32 list, an fp32 VAE retry, ``--precision fp32`` - runs on tensor cores, with TF32's 10-bit
mantissa), and cuDNN's autotuner only when a card of compute capability 7.5 (Turing, the GTX 16xx
among them) is present, which A1111 turns on so that those cards run fp16 at all.

:func:`default_randn_source` is the RNG source a front end uses when the user names none: A1111's
default "GPU" on CUDA, "CPU" elsewhere (on a CPU device the two give the same numbers; voidprompt
writes "CPU" so that the infotext regenerates the image on a GPU machine too).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch

from voidprompt.errors import DeviceError

__all__ = [
    "PRECISIONS",
    "PrecisionPolicy",
    "available_devices",
    "default_randn_source",
    "resolve_device",
    "resolve_precision",
    "use_a1111_cuda_settings",
]

PRECISIONS: tuple[str, ...] = ("auto", "fp32", "fp16", "bf16")

_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_DEVICE_FORMS = "cpu, cuda, cuda:N or mps"


@dataclass(frozen=True)
class PrecisionPolicy:
    """How one model computes: ``weights`` is the UNet's and text encoder's dtype, ``autocast`` the
    dtype of ``torch.autocast(device_type)`` around their calls (None: no autocast), ``vae`` the
    VAE's dtype. ``name`` is the resolved precision ("fp32", "fp16" or "bf16"; never "auto")."""

    name: str
    weights: torch.dtype
    autocast: torch.dtype | None
    vae: torch.dtype
    device_type: str = "cpu"

    @classmethod
    def uniform(cls, dtype: torch.dtype, device: torch.device | str = "cpu") -> PrecisionPolicy:
        """Everything in ``dtype``, no autocast: what a caller that names only a dtype gets."""
        name = _DTYPE_NAMES.get(dtype)
        if name is None:
            raise DeviceError(f"dtype {dtype}: use torch.float32, torch.float16 or torch.bfloat16")
        return cls(name, dtype, None, dtype, torch.device(device).type)

    @property
    def is_half(self) -> bool:
        """True when the weights are 16-bit (fp16 or bf16)."""
        return self.weights != torch.float32

    def with_vae(self, dtype: torch.dtype) -> PrecisionPolicy:
        """The same policy with the VAE in ``dtype`` (A1111's switch to a float32 VAE after a NaN)."""
        return replace(self, vae=dtype)

    @contextlib.contextmanager
    def autocast_context(self) -> Iterator[None]:
        """``torch.autocast`` as the policy says around UNet and text-encoder calls; nothing else."""
        if self.autocast is None:
            yield
            return
        with torch.autocast(self.device_type, dtype=self.autocast):
            yield


def available_devices() -> list[str]:
    """The devices this torch can use here, as ``--device`` spells them (CUDA ones with their name)."""
    found = ["cpu"]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            found.append(f"cuda:{index} ({torch.cuda.get_device_name(index)})")
    if _mps_available():
        found.append("mps")
    return found


def resolve_device(name: str | torch.device) -> torch.device:
    """``name`` ("cpu", "cuda", "cuda:N", "mps") as a device that exists here; "cuda" means the
    current CUDA device, with its index. Raises :class:`DeviceError` listing what is available."""
    text = str(name).strip().lower()
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise DeviceError(
            f"--device {name!r}: not a device name; use {_DEVICE_FORMS}. {_available_text()}"
        ) from None
    if device.type == "cpu":
        if device.index not in (None, 0):
            raise DeviceError(f"--device {name!r}: the CPU has no index; use cpu. {_available_text()}")
        return torch.device("cpu")
    if device.type == "cuda":
        return _resolve_cuda(str(name), device)
    if device.type == "mps":
        if not _mps_available():
            raise DeviceError(
                f"--device {name!r}: this torch has no usable MPS (Apple GPU) backend. {_available_text()}"
            )
        return torch.device("mps")
    raise DeviceError(f"--device {name!r}: voidprompt runs on {_DEVICE_FORMS}. {_available_text()}")


def _resolve_cuda(name: str, device: torch.device) -> torch.device:
    if not torch.cuda.is_available():
        if torch.version.cuda is None and torch.version.hip is None:
            why = f"this torch ({torch.__version__}) is a CPU-only build; install a CUDA build of torch"
        else:
            why = "torch sees no CUDA GPU (check the driver and CUDA_VISIBLE_DEVICES)"
        raise DeviceError(f"--device {name!r}: {why}. {_available_text()}")
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if device.index is None else device.index
    if not 0 <= index < count:
        raise DeviceError(
            f"--device {name!r}: there {'is' if count == 1 else 'are'} only {count} CUDA "
            f"device{'' if count == 1 else 's'}. {_available_text()}"
        )
    return torch.device("cuda", index)


def resolve_precision(name: str, device: torch.device) -> PrecisionPolicy:
    """``name`` (auto, fp32, fp16, bf16) as the policy for ``device`` (from :func:`resolve_device`).

    Raises :class:`DeviceError` for an unknown name, fp16 on the CPU, and a precision the device
    lacks (bf16 on a CUDA card older than Ampere).
    """
    text = str(name).strip().lower()
    if text not in PRECISIONS:
        raise DeviceError(f"--precision {name!r}: choose one of {', '.join(PRECISIONS)}")
    kind = device.type
    if text == "auto":
        # A1111: half weights under autocast on a GPU; the CPU runs everything in float32.
        text = "fp16" if kind == "cuda" else "fp32"
    if text == "fp32":
        return PrecisionPolicy("fp32", torch.float32, None, torch.float32, kind)
    if text == "fp16":
        if kind == "cpu":
            raise DeviceError(
                "--precision fp16 on the CPU: refused - A1111 has no half-precision CPU path, and CPU "
                "fp16 kernels are slow and overflow; use fp32 (the CPU default) or bf16"
            )
        # MPS: no autocast (A1111 casts by hand there); plain half weights.
        autocast = torch.float16 if kind == "cuda" else None
        return PrecisionPolicy("fp16", torch.float16, autocast, torch.float16, kind)
    # bf16
    if kind == "cuda" and not _cuda_bf16(device):
        index = device.index if device.index is not None else torch.cuda.current_device()
        gpu = torch.cuda.get_device_name(index)
        raise DeviceError(
            f"--precision bf16 on {device} ({gpu}): this GPU has no bfloat16 arithmetic (it needs "
            "compute capability 8.0, Ampere or newer); use fp16 (the CUDA default) or fp32"
        )
    autocast = torch.bfloat16 if kind in ("cuda", "cpu") else None
    return PrecisionPolicy("bf16", torch.bfloat16, autocast, torch.bfloat16, kind)


# The compute capability whose cards A1111 runs with cuDNN's autotuner (devices.enable_tf32).
_AUTOTUNED_CAPABILITY = (7, 5)


def use_a1111_cuda_settings() -> None:
    """Turn on TF32 for float32 matmuls and cuDNN, and the cuDNN autotuner when a compute-capability
    7.5 card is present, as A1111 does at start-up; nothing without CUDA. Process-wide, like A1111's."""
    if not torch.cuda.is_available():
        return
    capabilities = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
    if _AUTOTUNED_CAPABILITY in capabilities:
        torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def default_randn_source(device: torch.device) -> str:
    """The RNG source when the user names none: "GPU" on CUDA (A1111's default), else "CPU"."""
    return "GPU" if device.type == "cuda" else "CPU"


def _cuda_bf16(device: torch.device) -> bool:
    # torch.cuda.is_bf16_supported(including_emulation=False), asked of this device rather than
    # the current one: emulated bf16 on an older card runs, but at a fraction of fp16's speed.
    if torch.version.hip:
        return True
    index = device.index if device.index is not None else torch.cuda.current_device()
    return int(torch.cuda.get_device_properties(index).major) >= 8


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def _available_text() -> str:
    return f"Available here: {', '.join(available_devices())}."
