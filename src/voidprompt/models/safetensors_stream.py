"""Streaming ``.safetensors`` writing, one tensor at a time, and the format's dtype names.

``safetensors.torch.save_file`` needs the whole state dict in memory. (Reading goes through the
loader's :func:`voidprompt.models.load.open_checkpoint`, which parses the header and reads each tensor
with plain reads into fresh memory: ``safe_open`` maps the file, and every page read would stay
resident until the mapping goes away.)

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

import torch

from voidprompt.files import PendingFile

__all__ = [
    "DTYPE_TO_ST",
    "ST_TO_DTYPE",
    "SafetensorsStreamWriter",
    "TensorSpec",
]

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
