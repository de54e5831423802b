# ruff: noqa: E501  (the preset table below is data, kept as the extension ships it)
"""Checkpoint merger: A1111's "Checkpoint Merger" tab plus the block-weighted merge extension.

Methods (A = primary, B = secondary, C = tertiary, M = multiplier):

* ``weighted_sum``: ``(1 - M) A + M B`` (A1111 ``run_modelmerger``).
* ``add_difference``: ``A + M (B - C)``.
* ``no_interpolation``: A alone (for fp16 conversion, baking a VAE or discarding keys).
* ``block_weighted``: bbc-mc/sdweb-merge-block-weighted-gui (after kohya_ss' note): a weighted sum whose
  alpha is one of 25 block weights for UNet keys (IN00-IN11, M00, OUT00-OUT11; ``time_embed`` counts
  as IN00, the final ``out.`` as OUT11) and ``base_alpha`` for every other merged key - the text
  encoder *and* the VAE.

Exactness: A1111 evaluates ``(1-M)*A + M*B`` in the tensors' own dtype, which does not return A when
A == B (``(1-M)*a + M*a != a`` in floating point for many M). Here every merged key is computed in
float64 as ``A + M (B - A)`` (``A + M (B - C)``), which is exactly A when B == A and exactly A / B at
M = 0 / 1, and rounded once to the output dtype: every element is within half an ulp of the exact
value of A1111's formula.

Key rules (A1111's unless marked): only keys containing ``model`` are merged; the CLIP ``position_ids``
buffer is never merged (A's copy is kept; SDXL's too, and only floating-point tensors are ever
merged); inpainting A (9 input channels) with a 4-channel B merges channels 0:4 only; keys without ``model`` (the schedule buffers) are copied from A; ``model_ema.*``
keys are dropped (voidprompt: EMA copies of A would not match the merged weights).
SDXL merges with SDXL (its inpainting variant as SD1's does); models of different families - SD1
with SDXL, the SDXL base with its refiner - are refused before anything is written, and so is the
block-weighted merge of an SDXL model, whose 25 weights name SD1's blocks.
A model key of A missing from B (or C) is an error unless ``allow_missing`` - A1111 silently keeps A's
value there (and zeroes B - C for keys missing from C), which hides a wrong input file.

Output: ``.safetensors`` written key by key through :class:`SafetensorsStreamWriter`: every output
name, dtype and shape is derived from the inputs' headers first, the header is written, then each
tensor is computed from one tensor of each input and written at once. Peak memory is a few tensors,
not a state dict (see ``benchmarks/merge_memory.py``). The file appears under its name only when
complete; the temporary files of merges that were killed outright are swept from the output folder
first (:func:`voidprompt.files.sweep_stale_partials`).

NaN and inf: every input tensor the output is made of, and every output tensor, is checked as it
streams by. Non-finite values are reported in :attr:`MergeResult.warnings` (and logged), naming the
first few tensors and the count: a model holding them gives black images. With ``strict`` the first
one stops the merge with :class:`MergeError` and nothing is written. (A1111's merger does not check.)
"""

from __future__ import annotations

import enum
import json
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from voidprompt.errors import ModelLoadError, VoidpromptError
from voidprompt.files import sweep_stale_partials
from voidprompt.models.arch import ARCH_METADATA_KEY, UNET_PREFIX, VAE_PREFIX
from voidprompt.models.convert import POSITION_IDS_KEY
from voidprompt.models.convert_sdxl import SDXL_POSITION_IDS_KEY
from voidprompt.models.detect import ModelFamily, detect_family
from voidprompt.models.hashes import old_model_hash, sha256_file
from voidprompt.models.load import open_checkpoint
from voidprompt.models.safetensors_stream import SafetensorsStreamWriter, TensorSpec

__all__ = [
    "BLOCK_NAMES",
    "BLOCK_PRESETS",
    "MergeError",
    "MergeMethod",
    "MergeOptions",
    "MergeResult",
    "block_index",
    "merge_checkpoints",
    "parse_block_weights",
]

log = logging.getLogger(__name__)


class MergeError(VoidpromptError):
    """A merge cannot be done with these inputs or options; nothing was written."""


class MergeMethod(enum.Enum):
    WEIGHTED_SUM = "weighted_sum"
    ADD_DIFFERENCE = "add_difference"
    NO_INTERPOLATION = "no_interpolation"
    BLOCK_WEIGHTED = "block_weighted"

    @property
    def a1111_label(self) -> str:
        return {
            MergeMethod.WEIGHTED_SUM: "Weighted sum",
            MergeMethod.ADD_DIFFERENCE: "Add difference",
            MergeMethod.NO_INTERPOLATION: "No interpolation",
            MergeMethod.BLOCK_WEIGHTED: "Block weighted",
        }[self]


NUM_INPUT_BLOCKS = 12
NUM_TOTAL_BLOCKS = 25
BLOCK_NAMES: tuple[str, ...] = (
    *(f"IN{i:02d}" for i in range(12)),
    "M00",
    *(f"OUT{i:02d}" for i in range(12)),
)

# The extension's csv/preset.tsv (bbc-mc/sdweb-merge-block-weighted-gui), as shipped; values copied
# digit for digit. Its duplicate RING10_3 row is identical, so one entry suffices.
_PRESET_TSV = """\
GRAD_V	1,0.9166666667,0.8333333333,0.75,0.6666666667,0.5833333333,0.5,0.4166666667,0.3333333333,0.25,0.1666666667,0.0833333333,0,0.0833333333,0.1666666667,0.25,0.3333333333,0.4166666667,0.5,0.5833333333,0.6666666667,0.75,0.8333333333,0.9166666667,1.0
GRAD_A	0,0.0833333333,0.1666666667,0.25,0.3333333333,0.4166666667,0.5,0.5833333333,0.6666666667,0.75,0.8333333333,0.9166666667,1.0,0.9166666667,0.8333333333,0.75,0.6666666667,0.5833333333,0.5,0.4166666667,0.3333333333,0.25,0.1666666667,0.0833333333,0
FLAT_25	0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25,0.25
FLAT_75	0.75,0.75,0.75,0.75,0.75,0.75,0.75,0.75,0.75,0.75,0.75,0.75,0.75,0.75,0.75,0.75,0.75,0.75,0.75,0.75,0.75,0.75,0.75,0.75,0.75
WRAP08	1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1
WRAP12	1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1,1
WRAP14	1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1,1,1
WRAP16	1,1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1
MID12_50	0,0,0,0,0,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0,0,0,0,0,0
OUT07	0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1,1,1
OUT12	0,0,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1,1,1,1
OUT12_5	0,0,0,0,0,0,0,0,0,0,0,0,0.5,1,1,1,1,1,1,1,1,1,1,1,1
RING08_SOFT	0,0,0,0,0,0.5,1,1,1,0.5,0,0,0,0,0,0.5,1,1,1,0.5,0,0,0,0,0
RING08_5	0,0,0,0,0,0,1,1,1,1,0,0,0,0,0,1,1,1,1,0,0,0,0,0,0
RING10_5	0,0,0,0,0,1,1,1,1,1,0,0,0,0,0,1,1,1,1,1,0,0,0,0,0
RING10_3	0,0,0,0,0,0,1,1,1,1,1,0,0,0,1,1,1,1,1,0,0,0,0,0,0
NORMAL-SIGMOID	0,0.00506365740740741,0.0196759259259259,0.04296875,0.0740740740740741,0.112123842592593,0.15625,0.205584490740741,0.259259259259259,0.31640625,0.376157407407407,0.437644675925926,0.5,0.562355324074074,0.623842592592592,0.68359375,0.740740740740741,0.794415509259259,0.84375,0.887876157407408,0.925925925925926,0.95703125,0.980324074074074,0.994936342592593,1
REVERSE-SIGMOID	1,0.994936342592593,0.980324074074074,0.95703125,0.925925925925926,0.887876157407407,0.84375,0.794415509259259,0.740740740740741,0.68359375,0.623842592592593,0.562355324074074,0.5,0.437644675925926,0.376157407407408,0.31640625,0.259259259259259,0.205584490740741,0.15625,0.112123842592592,0.0740740740740742,0.0429687499999996,0.0196759259259258,0.00506365740740744,0
"""

BLOCK_PRESETS: dict[str, tuple[float, ...]] = {
    line.split("\t")[0]: tuple(float(v) for v in line.split("\t")[1].split(","))
    for line in _PRESET_TSV.strip().splitlines()
}

_RE_IN = re.compile(r"\.input_blocks\.(\d+)\.")
_RE_MID = re.compile(r"\.middle_block\.(\d+)\.")
_RE_OUT = re.compile(r"\.output_blocks\.(\d+)\.")


def block_index(key: str) -> int | None:
    """The block-weight index (0..24) of a CompVis key, or None when base_alpha applies.

    The extension's rule, in its order: only ``model.diffusion_model.`` keys; ``time_embed`` -> 0;
    any ``.out.`` -> 24; ``.input_blocks.N.`` -> N; ``.middle_block.`` -> 12; ``.output_blocks.N.`` -> 13 + N.
    """
    if UNET_PREFIX not in key:
        return None
    if "time_embed" in key:
        return 0
    if ".out." in key:
        return NUM_TOTAL_BLOCKS - 1
    if m := _RE_IN.search(key):
        index = int(m.group(1))
    elif _RE_MID.search(key):
        index = NUM_INPUT_BLOCKS
    elif m := _RE_OUT.search(key):
        index = NUM_INPUT_BLOCKS + 1 + int(m.group(1))
    else:
        return None  # A1111 quirk (extension): unmatched UNet keys get base_alpha
    if index >= NUM_TOTAL_BLOCKS:
        raise MergeError(
            f"'{key}' has block index {index}; an SD1 UNet has 25 blocks - is this an SDXL model?"
        )
    return index


_POSITION_IDS_KEYS = frozenset({POSITION_IDS_KEY, SDXL_POSITION_IDS_KEY})
# (inpainting A, normal B) pairs that merge channels 0:4 of the UNet's input convolution.
_INPAINT_OF = {ModelFamily.SD1_INPAINT: ModelFamily.SD1, ModelFamily.SDXL_INPAINT: ModelFamily.SDXL}


def parse_block_weights(text: str) -> tuple[float, ...]:
    """25 comma-separated weights, or a preset name from :data:`BLOCK_PRESETS`."""
    name = text.strip()
    if name.upper() in BLOCK_PRESETS:
        return BLOCK_PRESETS[name.upper()]
    try:
        weights = tuple(float(v) for v in name.split(","))
    except ValueError as exc:
        raise MergeError(
            f"block weights '{text}': not 25 comma-separated numbers nor a preset "
            f"({', '.join(BLOCK_PRESETS)})."
        ) from exc
    if len(weights) != NUM_TOTAL_BLOCKS:
        raise MergeError(
            f"block weights '{text}': {len(weights)} values; the block-weighted merge needs 25 "
            "(IN00-IN11, M00, OUT00-OUT11)."
        )
    return weights


@dataclass(frozen=True)
class MergeOptions:
    """What to merge and how; see the module docstring."""

    method: MergeMethod = MergeMethod.WEIGHTED_SUM
    multiplier: float = 0.5
    block_weights: tuple[float, ...] | None = None
    base_alpha: float = 0.0
    fp16: bool = False
    discard: str | None = None
    allow_missing: bool = False
    strict: bool = False  # refuse inputs (or results) holding NaN or inf

    def validate(self, has_b: bool, has_c: bool) -> None:
        if self.method is not MergeMethod.NO_INTERPOLATION and not has_b:
            raise MergeError(f"{self.method.value} needs a secondary model B.")
        if self.method is MergeMethod.ADD_DIFFERENCE and not has_c:
            raise MergeError("add_difference needs a tertiary model C (A + M (B - C)).")
        for name, v in (("multiplier", self.multiplier), ("base_alpha", self.base_alpha)):
            if not math.isfinite(v):
                raise MergeError(f"{name} {v} is not a finite number.")
        if self.method is MergeMethod.BLOCK_WEIGHTED and (
            self.block_weights is None or len(self.block_weights) != NUM_TOTAL_BLOCKS
        ):
            raise MergeError("block_weighted needs 25 block weights (--weights or --preset).")
        if self.discard:
            try:
                re.compile(self.discard)
            except re.error as exc:
                raise MergeError(f"discard regex '{self.discard}' is invalid: {exc}.") from exc


@dataclass
class MergeResult:
    path: Path | None
    recipe: dict[str, Any]
    keys_written: int
    merged_keys: int
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


class _Source:
    """A merge input: names, shapes and dtypes up front, tensors on demand."""

    name: str
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    metadata: dict[str, str]

    def get(self, key: str) -> torch.Tensor:
        raise NotImplementedError


class _FileSource(_Source):
    """A checkpoint read tensor by tensor through the loader's reader: plain reads for safetensors
    (no mapping, so merged inputs never count twice against memory), the restricted unpickler for
    .ckpt/.pt."""

    def __init__(self, path: Path) -> None:
        self.name = str(path)
        self.path = path
        if not path.is_file():
            raise MergeError(f"{path}: no such file; check the path.")
        try:
            self._reader = open_checkpoint(path)
        except ModelLoadError as exc:
            raise MergeError(f"cannot read merge input: {exc}") from exc
        self.shapes = {k: tuple(v) for k, v in self._reader.shapes.items()}
        self.dtypes = dict(self._reader.dtypes)
        self.metadata = dict(self._reader.metadata)

    def get(self, key: str) -> torch.Tensor:
        return self._reader.get(key)

    def close(self) -> None:
        self._reader.close()


def _strip_vae_key(key: str) -> str | None:
    k = key[len(VAE_PREFIX) :] if key.startswith(VAE_PREFIX) else key
    if k.startswith(("loss.", "model_ema.")) or k in ("global_step", "epoch"):
        return None
    return k


@dataclass(frozen=True)
class _Step:
    """How one output tensor is made."""

    spec: TensorSpec
    kind: str  # "copy_a", "copy_b", "merge", "vae"
    key: str
    alpha: float = 0.0
    narrow: bool = False  # merge channels 0:4 only (inpainting A, 4-channel B)


def _family(src: _Source) -> ModelFamily:
    try:
        return detect_family({k: torch.Size(v) for k, v in src.shapes.items()})
    except ModelLoadError as exc:
        raise MergeError(f"{src.name}: {exc}") from exc


def _plan(
    a: _Source, b: _Source | None, c: _Source | None, vae: _Source | None, options: MergeOptions
) -> tuple[list[_Step], dict[str, Any]]:
    method = options.method
    facts: dict[str, Any] = {"is_inpainting": False}
    fa = _family(a)
    for other in (b, c):
        if other is None:
            continue
        fo = _family(other)
        if fo is fa:
            continue
        if _INPAINT_OF.get(fa) is fo:
            facts["is_inpainting"] = True
            continue
        if _INPAINT_OF.get(fo) is fa:
            raise MergeError(
                f"A ({a.name}) is a normal model and {other.name} an inpainting one: when merging an "
                "inpainting model with a normal one, A must be the inpainting model (swap A and B)."
            )
        raise MergeError(
            f"cannot merge {fa.label} ({a.name}) with {fo.label} ({other.name}): the "
            "architectures differ; use models of the same family."
        )
    if method is MergeMethod.BLOCK_WEIGHTED and fa.is_sdxl:
        raise MergeError(
            f"A ({a.name}) is {fa.label}: the block-weighted merge's 25 weights name SD1's UNet blocks, "
            "and SDXL's UNet has other blocks; use weighted_sum or add_difference."
        )

    merging = method is not MergeMethod.NO_INTERPOLATION
    others = [s for s in (b, c) if s is not None] if merging else []
    missing: list[str] = []
    for src in others:
        gone = [
            k
            for k in a.shapes
            if "model" in k
            and not k.startswith("model_ema.")
            and k not in src.shapes
            and k not in _POSITION_IDS_KEYS
        ]
        missing += [f"{k} (not in {src.name})" for k in gone]
    if missing and not options.allow_missing:
        raise MergeError(
            f"{len(missing)} model keys of A are missing from the other input(s), e.g. "
            f"{'; '.join(missing[:3])}. The inputs are not complete checkpoints of the same model type "
            "(a pruned file, a LoRA, a VAE?). Pass --allow-missing to keep A's values there (A1111's behaviour)."
        )

    discard = re.compile(options.discard) if options.discard else None
    steps: list[_Step] = []

    def out_dtype(dtype: torch.dtype, key: str) -> torch.dtype:
        if options.fp16 and dtype == torch.float32 and "model" in key:
            return torch.float16
        return dtype

    vae_map: dict[str, str] = {}
    if vae is not None:
        for k in vae.shapes:
            inner = _strip_vae_key(k)
            if inner is not None:
                vae_map[VAE_PREFIX + inner] = k
        if not any(k in a.shapes for k in vae_map):
            raise MergeError(f"{vae.name}: none of its keys is a VAE key of A; it is not a VAE file.")

    merged = 0
    for key, shape in a.shapes.items():
        if key.startswith("model_ema."):
            continue
        dtype = a.dtypes[key]
        if key in vae_map:
            vkey = vae_map[key]
            vshape = vae.shapes[vkey] if vae is not None else shape
            if math.prod(vshape) != math.prod(shape):
                raise MergeError(
                    f"{key}: the VAE to bake has shape {vshape}, the model {shape}; not a VAE of this model."
                )
            vdt = vae.dtypes[vkey] if vae is not None else dtype
            steps.append(_Step(TensorSpec(key, out_dtype(vdt, key), shape), "vae", vkey))
            continue
        mergeable = (
            merging
            and "model" in key
            and key not in _POSITION_IDS_KEYS
            and dtype.is_floating_point
            and all(key in s.shapes for s in others)
        )
        if not mergeable:
            steps.append(_Step(TensorSpec(key, out_dtype(dtype, key), shape), "copy_a", key))
            continue
        narrow = False
        for s in others:
            sshape = s.shapes[key]
            if sshape == shape:
                continue
            if (
                len(shape) == 4
                and len(sshape) == 4
                and shape[1] == 9
                and sshape[1] == 4
                and shape[:1] + shape[2:] == sshape[:1] + sshape[2:]
            ):
                narrow = True
                continue
            raise MergeError(
                f"'{key}' has shape {shape} in A but {sshape} in {s.name}; the models differ "
                "in architecture and cannot be merged key by key."
            )
        rdtype = dtype
        for s in others:
            rdtype = torch.promote_types(rdtype, s.dtypes[key])  # what A1111's tensor arithmetic gives
        alpha = options.multiplier
        if method is MergeMethod.BLOCK_WEIGHTED:
            assert options.block_weights is not None
            idx = block_index(key)
            alpha = options.block_weights[idx] if idx is not None else options.base_alpha
        steps.append(_Step(TensorSpec(key, out_dtype(rdtype, key), shape), "merge", key, alpha, narrow))
        merged += 1

    if method is MergeMethod.BLOCK_WEIGHTED and b is not None:
        # The extension copies keys only B has (its "Stage 2/2").
        for key, shape in b.shapes.items():
            if "model" in key and key not in a.shapes and not key.startswith("model_ema."):
                steps.append(_Step(TensorSpec(key, out_dtype(b.dtypes[key], key), shape), "copy_b", key))

    if discard is not None:
        steps = [s for s in steps if not discard.search(s.spec.name)]
    facts["merged_keys"] = merged
    facts["missing"] = missing
    return steps, facts


_CHUNK_ELEMENTS = 1 << 22  # float64 temporaries of at most 32 MB each


def _formula(
    method: MergeMethod, alpha: float, x: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None
) -> torch.Tensor:
    """The per-element formula in float64 (inputs of any float dtype are exact there)."""
    x, b = x.to(torch.float64), b.to(torch.float64)
    if method is MergeMethod.ADD_DIFFERENCE:
        assert c is not None
        return x + alpha * (b - c.to(torch.float64))
    if alpha == 0.0:
        return x
    if alpha == 1.0:
        return b
    return x + alpha * (b - x)


def _combine(
    step: _Step, method: MergeMethod, a: torch.Tensor, b: torch.Tensor | None, c: torch.Tensor | None
) -> torch.Tensor:
    """One merged key: the formula in float64, rounded once to the output dtype, so the result is
    within half an ulp of the exact value (and exactly A for a self-merge). Large tensors are done
    in row chunks so the float64 temporaries stay small."""
    assert b is not None
    out = a.to(step.spec.dtype, copy=True)
    if step.narrow:
        cc = c[:, 0:4] if c is not None and c.shape[1] == 9 else c
        out[:, 0:4] = _formula(method, step.alpha, a[:, 0:4], b, cc).to(out.dtype)
        return out
    if out.ndim == 0:
        return _formula(method, step.alpha, a, b, c).to(out.dtype)
    rows = max(1, _CHUNK_ELEMENTS // max(1, out[0].numel()))
    for start in range(0, out.shape[0], rows):
        sl = slice(start, start + rows)
        out[sl] = _formula(method, step.alpha, a[sl], b[sl], c[sl] if c is not None else None).to(out.dtype)
    return out


_SHOWN_NONFINITE = 5


@dataclass
class _FiniteCheck:
    """Counts the NaN / inf values of each tensor that streams through the merge."""

    strict: bool
    found: list[str] = field(default_factory=list)  # "A 'key' (n of m values)"

    def __call__(self, label: str, key: str, t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            where = f"{label} '{key}' ({bad} of {t.numel()} values)"
            if self.strict:
                raise MergeError(
                    f"{where} is NaN or inf; --strict refuses non-finite weights and nothing was "
                    "written (fix or replace that input, or merge without --strict)."
                )
            self.found.append(where)
        return t

    def warning(self) -> str | None:
        if not self.found:
            return None
        more = len(self.found) - _SHOWN_NONFINITE
        shown = ", ".join(self.found[:_SHOWN_NONFINITE]) + (f" and {more} more" if more > 0 else "")
        count = f"{len(self.found)} tensor{'s hold' if len(self.found) > 1 else ' holds'}"
        return (
            f"{count} NaN or inf values: {shown}; a model with them makes black images (--strict "
            "refuses to write it)."
        )


def _run(
    steps: Sequence[_Step],
    method: MergeMethod,
    sources: dict[str, _Source],
    sink: Callable[[str, torch.Tensor], None],
    check: _FiniteCheck,
) -> None:
    def read(label: str, key: str) -> torch.Tensor:
        return check(label, key, sources[label].get(key))

    for step in steps:
        known = len(check.found)
        if step.kind == "copy_a":
            t = read("A", step.key)
        elif step.kind == "copy_b":
            t = read("B", step.key)
        elif step.kind == "vae":
            t = read("VAE", step.key).reshape(step.spec.shape)
        else:
            t = _combine(
                step,
                method,
                read("A", step.key),
                read("B", step.key) if "B" in sources else None,
                read("C", step.key) if "C" in sources else None,
            )
        out = t.to(step.spec.dtype)
        if len(check.found) == known and (step.kind == "merge" or out.dtype != t.dtype):
            # Finite inputs can still overflow: a sum, or float16 (largest 65504).
            check("output", step.spec.name, out)
        sink(step.spec.name, out)


def merge_checkpoints(
    a: str | Path,
    b: str | Path | None = None,
    c: str | Path | None = None,
    *,
    out: str | Path,
    options: MergeOptions,
    bake_vae: str | Path | None = None,
) -> MergeResult:
    """Merge checkpoint files into a new ``.safetensors`` file, streamed key by key.

    Raises :class:`MergeError` (bad options, mismatched families, missing keys, unreadable inputs)
    before anything is written; an error while writing removes the partial file.
    """
    out_path = Path(out)
    if out_path.suffix.lower() != ".safetensors":
        raise MergeError(f"{out_path}: the merger writes .safetensors only; name the output '*.safetensors'.")
    options.validate(b is not None, c is not None)
    sweep_stale_partials(out_path.parent)
    paths = {
        "A": Path(a),
        "B": Path(b) if b is not None else None,
        "C": Path(c) if c is not None else None,
        "VAE": Path(bake_vae) if bake_vae is not None else None,
    }
    for label, p in paths.items():
        if p is not None and out_path.exists() and p.resolve() == out_path.resolve():
            raise MergeError(f"the output {out_path} is input {label}; write to a new file.")
    sources: dict[str, _FileSource] = {}
    try:
        for label, p in paths.items():
            if p is not None:
                sources[label] = _FileSource(p)
        sa, sb, sc, sv = (sources.get(x) for x in ("A", "B", "C", "VAE"))
        assert sa is not None
        steps, facts = _plan(sa, sb, sc, sv, options)
        hashes = {label: sha256_file(p) for label, p in paths.items() if p is not None}
        recipe: dict[str, Any] = {
            "type": "voidprompt",
            "primary_model_hash": hashes["A"],
            "secondary_model_hash": hashes.get("B"),
            "tertiary_model_hash": hashes.get("C"),
            "interp_method": options.method.a1111_label,
            "multiplier": options.multiplier,
            "save_as_half": options.fp16,
            "custom_name": out_path.stem,
            "config_source": 0,
            "bake_in_vae": paths["VAE"].name if paths["VAE"] is not None else "None",
            "discard_weights": options.discard or "",
            "is_inpainting": facts["is_inpainting"],
            "is_instruct_pix2pix": False,
        }
        if options.method is MergeMethod.BLOCK_WEIGHTED:
            recipe["block_weights"] = list(options.block_weights or ())
            recipe["base_alpha"] = options.base_alpha
        models = {
            hashes[label]: {"name": p.stem, "legacy_hash": old_model_hash(p)}
            for label, p in paths.items()
            if p is not None and label != "VAE"
        }
        metadata = {
            "format": "pt",
            "sd_merge_recipe": json.dumps(recipe),
            "sd_merge_models": json.dumps(models),
        }
        if ARCH_METADATA_KEY in sa.metadata:
            metadata[ARCH_METADATA_KEY] = sa.metadata[ARCH_METADATA_KEY]  # needed to load A's architecture
        check = _FiniteCheck(options.strict)
        with SafetensorsStreamWriter(out_path, [s.spec for s in steps], metadata) as writer:
            _run(steps, options.method, dict(sources), writer.write, check)
            writer.commit()
        notes = []
        if facts["missing"]:
            notes.append(f"{len(facts['missing'])} keys missing from B/C kept from A")
        warning = check.warning()
        if warning is not None:
            log.warning("%s: %s", out_path, warning)
        return MergeResult(
            out_path, recipe, len(steps), facts["merged_keys"], notes, [warning] if warning else []
        )
    finally:
        for s in sources.values():
            s.close()
