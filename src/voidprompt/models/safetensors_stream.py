"""``.safetensors`` files: the header reader every loader uses, streaming writing one tensor at a
time, and the format's dtype names.

``safetensors.torch.save_file`` needs the whole state dict in memory, and ``safe_open`` maps the file
(every page read would stay resident until the mapping goes away), so voidprompt reads and writes the
format itself. :func:`read_safetensors_header` refuses every header the safetensors library refuses
(and duplicate keys, which it does not look for), so a file either library would reject never gets as
far as a read: the loader's :func:`voidprompt.models.load.open_checkpoint` then reads each tensor with
plain reads into fresh memory.

* :class:`SafetensorsStreamWriter` takes every output name, dtype and shape up front, writes the
  header, then accepts the tensors one by one in that order, checking each against its declaration.
  It writes to a :class:`voidprompt.files.PendingFile` and renames it into place on :meth:`commit`;
  :meth:`abort` (or leaving the ``with`` block by an exception) removes the temporary file, so no
  partial output is ever left under the target name.

File format (https://github.com/huggingface/safetensors): 8-byte little-endian header length N, N bytes
of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`` padded
with spaces to a multiple of 8, then the raw little-endian tensor bytes; offsets are relative to the end
of the header and must tile the data region without gaps.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from voidprompt.errors import ModelLoadError
from voidprompt.files import PendingFile

__all__ = [
    "DTYPE_TO_ST",
    "MAX_HEADER_BYTES",
    "ST_TO_DTYPE",
    "SafetensorsEntry",
    "SafetensorsHeader",
    "SafetensorsStreamWriter",
    "TensorSpec",
    "read_safetensors_header",
]

# The safetensors library's own limit on the JSON header.
MAX_HEADER_BYTES = 100_000_000
# The format's other dtypes: the library accepts them, voidprompt cannot compute with them.
_FOREIGN_DTYPES = frozenset(
    {"F8_E4M3", "F8_E5M2", "F8_E8M0", "F6_E2M3", "F6_E3M2", "F4", "U16", "U32", "U64", "C64"}
)

ST_TO_DTYPE: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_TO_ST: dict[torch.dtype, str] = {v: k for k, v in ST_TO_DTYPE.items()}


@dataclass(frozen=True)
class SafetensorsEntry:
    """One tensor of a file: where its bytes are (absolute file offset) and what they hold."""

    name: str
    dtype: torch.dtype
    shape: torch.Size
    offset: int
    nbytes: int


@dataclass(frozen=True)
class SafetensorsHeader:
    """A checked header: the tensors in file order and the ``__metadata__`` strings."""

    tensors: dict[str, SafetensorsEntry]
    metadata: dict[str, str]


class _BadHeader(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _BadHeader(f"the key '{key}' appears twice")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise _BadHeader(f"{name} is not valid JSON")


def _is_count(value: Any) -> bool:
    return type(value) is int and 0 <= value < 2**64


def _parse_entry(name: str, info: Any) -> tuple[str, list[int], int, int]:
    if not isinstance(info, dict):
        raise _BadHeader(f"tensor '{name}' is described by a {type(info).__name__}, not an object")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in info]
    if missing:
        raise _BadHeader(f"tensor '{name}' has no {', '.join(missing)}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str):
        raise _BadHeader(f"tensor '{name}' has dtype {dtype!r:.40}, not a name")
    if not isinstance(shape, list) or not all(_is_count(n) for n in shape):
        raise _BadHeader(f"tensor '{name}' has shape {shape!r:.80}, not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(n) for n in offsets):
        raise _BadHeader(f"tensor '{name}' has data_offsets {offsets!r:.80}, not two non-negative integers")
    return dtype, shape, offsets[0], offsets[1]


def read_safetensors_header(path: str | Path) -> SafetensorsHeader:
    """Read and check a ``.safetensors`` header as the safetensors library does: the length fits the
    file and is at most :data:`MAX_HEADER_BYTES`; the JSON is one UTF-8 object without duplicate
    keys; every shape is a list of non-negative integers; each tensor's bytes match dtype x shape; the
    tensors' byte ranges tile the data region exactly (no overlap, gap or trailing bytes); metadata is
    strings only. Raises :class:`~voidprompt.errors.ModelLoadError` naming what is wrong."""
    p = Path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _BadHeader(f"the file has {size} bytes, fewer than the 8 of the header length")
            header_len = int.from_bytes(head, "little")
            if header_len > MAX_HEADER_BYTES:
                raise _BadHeader(
                    f"its header claims {header_len:,} bytes, over the format's limit of {MAX_HEADER_BYTES:,}"
                )
            if 8 + header_len > size:
                raise _BadHeader(f"its header claims {header_len:,} bytes but the file has {size:,}")
            raw = f.read(header_len)
        text = raw.decode("utf-8")
        header = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
        if not isinstance(header, dict):
            raise _BadHeader("the header is not a JSON object")
        metadata = header.pop("__metadata__", None)
        if metadata is None:
            metadata = {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise _BadHeader("__metadata__ must map strings to strings")
        entries = []
        for name, info in header.items():
            dt, shape, begin, end = _parse_entry(name, info)
            entries.append((begin, end, name, dt, shape))
        data_start = 8 + header_len
        tensors: dict[str, SafetensorsEntry] = {}
        position = 0
        for begin, end, name, dt, shape in sorted(entries, key=lambda e: (e[0], e[1])):
            if begin != position or end < begin:
                raise _BadHeader(
                    f"tensor '{name}' occupies bytes [{begin}, {end}) of the data but the previous tensor "
                    f"ends at {position} (tensors must follow each other without gaps or overlaps)"
                )
            if dt not in ST_TO_DTYPE:
                if dt in _FOREIGN_DTYPES:
                    raise ModelLoadError(
                        f"{p}: tensor '{name}' has dtype {dt}, which voidprompt cannot load."
                    )
                raise _BadHeader(f"tensor '{name}' has an unknown dtype {dt!r:.40}")
            dtype = ST_TO_DTYPE[dt]
            numel = 1
            for n in shape:
                numel *= n
            nbytes = numel * torch.empty((), dtype=dtype).element_size()
            if end - begin != nbytes:
                raise _BadHeader(
                    f"tensor '{name}' has {end - begin} bytes for shape {tuple(shape)} {dt} ({nbytes})"
                )
            tensors[name] = SafetensorsEntry(name, dtype, torch.Size(shape), data_start + begin, nbytes)
            position = end
        tensors = {name: tensors[name] for _, _, name, _, _ in entries}  # the header's own order
        if data_start + position != size:
            raise _BadHeader(
                f"the tensors end at byte {data_start + position:,} but the file has {size:,} "
                f"({'trailing bytes' if data_start + position < size else 'it is truncated'})"
            )
    except ModelLoadError:
        raise
    except (_BadHeader, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ModelLoadError(
            f"{p}: damaged .safetensors file ({exc}); download or copy it again from its source."
        ) from exc
    except OSError as exc:
        raise ModelLoadError(f"{p}: cannot read ({exc}).") from exc
    return SafetensorsHeader(tensors, {str(k): v for k, v in metadata.items()})


@dataclass(frozen=True)
class TensorSpec:
    """One output tensor's declaration: written into the header before any data."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


class SafetensorsStreamWriter:
    """Write a ``.safetensors`` file tensor by tensor; see the module docstring.

    Usage::

        with SafetensorsStreamWriter(out, specs, metadata) as w:
            for spec in specs:
                w.write(spec.name, tensor_for(spec))
            w.commit()
    """

    def __init__(
        self, path: str | Path, specs: Sequence[TensorSpec], metadata: Mapping[str, str] | None = None
    ):
        self.path = Path(path)
        self._specs = list(specs)
        names = [s.name for s in self._specs]
        if len(set(names)) != len(names):
            raise ValueError("duplicate tensor names in the output declaration")
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        offset = 0
        for s in self._specs:
            header[s.name] = {
                "dtype": DTYPE_TO_ST[s.dtype],
                "shape": list(s.shape),
                "data_offsets": [offset, offset + s.nbytes],
            }
            offset += s.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # align the data region to 8 bytes, as safetensors does
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._pending = PendingFile(self.path)
        try:
            self._f = self._pending.open()
            self._f.write(len(raw).to_bytes(8, "little"))
            self._f.write(raw)
        except BaseException:
            self._pending.discard()
            raise
        self._next = 0
        self._done = False

    def pending(self) -> Iterator[TensorSpec]:
        return iter(self._specs[self._next :])

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._specs):
            raise ValueError(f"tensor '{name}' was not declared")
        spec = self._specs[self._next]
        if name != spec.name or tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise ValueError(
                f"tensor {name} {tensor.dtype} {tuple(tensor.shape)} does not match the declared "
                f"{spec.name} {spec.dtype} {spec.shape} (tensors must come in declaration order)"
            )
        t = tensor.detach().to("cpu").contiguous()
        if t.numel():
            # A byte view avoids numpy's missing bfloat16 and the copy tobytes() would make.
            self._f.write(t.reshape(-1).view(torch.uint8).numpy().data)
        self._next += 1

    def commit(self) -> Path:
        if self._next != len(self._specs):
            missing = [s.name for s in self._specs[self._next :]]
            raise ValueError(f"{len(missing)} declared tensors were not written, e.g. {missing[:3]}")
        self._f.close()
        self._done = True
        return self._pending.commit()

    def abort(self) -> None:
        if not self._done:
            self._pending.discard()  # closes the file without letting a failed flush stop the unlink
            self._done = True

    def __enter__(self) -> SafetensorsStreamWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # Leaving the block without commit() (an exception, or a forgotten call) leaves nothing behind.
        self.abort()
