"""Read torch pickles (``.ckpt`` / ``.pt``) without executing anything they ask for.

A pickle is a program: every ``GLOBAL`` opcode names a ``module.attribute`` that the stock unpickler
imports and may then call. This reader overrides :meth:`pickle.Unpickler.find_class` so that a name is
resolved only from a fixed allow-list of *our own* stand-ins; nothing is ever imported and any other name
raises :class:`~voidprompt.errors.UnsafePickleError` before a single call is made.

``torch.load(weights_only=True)`` is not enough for real checkpoints: ``sd-v1-4.ckpt`` pickles a
``pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint`` callback state and many files carry numpy
scalars (``global_step``) which it refuses. Here those map to inert stand-ins (:class:`InertObject`).

Tensors are *not* read while unpickling. ``persistent_load`` returns a :class:`LazyStorage` (where the bytes
live in the file) and the tensor rebuild functions return a :class:`LazyTensor` (dtype, shape, strides,
offset). The caller can look at every shape first (family detection) and then materialise the tensors one
at a time, so a loader never holds the whole checkpoint and the model at once.

Both container formats are handled: the zip format (torch >= 1.6, ``archive/data.pkl`` plus one zip member
per storage) and the legacy stream format (magic number, protocol, sys info, the pickle, the storage key
list, then each storage's bytes preceded by an int64 element count). The even older tar format is refused.

Bounded cost: a pickle is also a tiny program that can ask for a lot of memory or time (a 1 KB view
with stride 0 over a 2 GB shape, a memo "billion laughs", a zip bomb, a list that contains itself).
Every file is checked against the limits below before a caller sees its object, and each refusal
names the limit it hit. The limits sit far above what real checkpoints need: an SD1.5 ``.ckpt`` with
its EMA copy has about 2,300 tensors, a pickle of well under 1 MiB, nesting depth below 10, and every
tensor inside its own storage.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

import numpy as np
import torch

from voidprompt.errors import ModelLoadError, UnsafePickleError

__all__ = [
    "InertObject",
    "LazyStorage",
    "LazyTensor",
    "PickleCheckpoint",
    "load_pickle_checkpoint",
]

# The pickle program itself (data.pkl, or the pickles at the head of a legacy file).
MAX_PICKLE_BYTES = 32 * 1024 * 1024
# Memo entries: a real checkpoint memoises about 10 per tensor.
MAX_MEMO_ENTRIES = 1_000_000
# Containers inside containers; Lightning checkpoints nest about 6 deep.
MAX_NESTING_DEPTH = 100
# Objects counted as a tree: a structure that reuses one list many times (the memo "billion laughs")
# counts every use, since that is what any walk over it does.
MAX_OBJECTS = 2_000_000
# Deflated zip members may expand at most this much in total (torch itself stores them uncompressed).
MAX_COMPRESSION_RATIO = 32
# Bytes of all tensor references over the bytes of the storages they view: tied weights count twice,
# a million keys naming one tensor would make every reader copy it a million times.
MAX_TENSOR_REUSE = 4

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "ComplexDoubleStorage": torch.complex128,
    "ComplexFloatStorage": torch.complex64,
    "UntypedStorage": torch.uint8,
}

_TORCH_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in (
        "float64",
        "float32",
        "float16",
        "bfloat16",
        "int64",
        "int32",
        "int16",
        "int8",
        "uint8",
        "bool",
        "complex64",
        "complex128",
        "half",
        "float",
        "double",
        "long",
        "int",
    )
}


@dataclass(frozen=True)
class _StorageType:
    """Stand-in for ``torch.FloatStorage`` and friends: only its dtype matters."""

    dtype: torch.dtype


@dataclass(frozen=True)
class LazyStorage:
    """Where a storage's bytes are: a zip member, or an offset in a legacy stream."""

    key: str
    dtype: torch.dtype
    numel: int
    zip_member: str | None = None
    file_offset: int | None = None  # legacy format: filled in after the pickle was read
    byte_offset: int = 0  # legacy views into a larger root storage


@dataclass(frozen=True)
class LazyTensor:
    """A tensor that has not been read yet; :meth:`PickleCheckpoint.materialize` reads it."""

    storage: LazyStorage
    offset: int
    shape: torch.Size
    stride: tuple[int, ...]
    dtype: torch.dtype


class InertObject:
    """What a harmless foreign class (a Lightning callback state, ...) becomes: it swallows its
    arguments and state and does nothing. Each allowed name gets its own subclass (a real type, so
    ``NEWOBJ`` accepts it) whose ``qualname`` says what the file asked for."""

    qualname = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> InertObject:
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<inert {self.qualname}>"


class _InertMeta(type):
    def __repr__(cls) -> str:
        return f"<inert class {cls.qualname}>"  # type: ignore[attr-defined]


def _inert_class(qualname: str) -> _InertMeta:
    return _InertMeta(qualname.rsplit(".", 1)[-1], (InertObject,), {"qualname": qualname})


# Classes real checkpoints pickle that we never need the behaviour of. Add a name here only after
# checking that the object is plain data in every checkpoint that carries it.
_INERT_CLASSES = frozenset(
    {
        "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
        "pytorch_lightning.callbacks.early_stopping.EarlyStopping",
        "pytorch_lightning.utilities.argparse.Namespace",  # hyper_parameters of some Lightning saves
        "argparse.Namespace",
        "numpy.core.multiarray._reconstruct",  # numpy arrays in trainer state: not model weights
        "numpy._core.multiarray._reconstruct",
        "numpy.ndarray",
    }
)


def _int_list(value: Any, what: str) -> list[int]:
    if not isinstance(value, tuple | list | torch.Size) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        raise pickle.UnpicklingError(f"tensor {what} {value!r} is not a list of non-negative integers")
    return [int(v) for v in value]


def _rebuild_tensor(storage: LazyStorage, offset: int, size: Any, stride: Any, *_rest: Any) -> LazyTensor:
    if not isinstance(storage, LazyStorage):
        raise pickle.UnpicklingError(f"tensor rebuilt from {type(storage).__name__}, not a storage")
    shape = _int_list(size, "shape")
    strides = _int_list(stride, "stride")
    if len(shape) != len(strides) or not isinstance(offset, int) or offset < 0:
        raise pickle.UnpicklingError(f"tensor shape {shape}, stride {strides}, offset {offset!r} do not fit")
    numel = 1
    for n in shape:
        numel *= n
    if numel:
        span = 1 + sum((n - 1) * st for n, st in zip(shape, strides, strict=True))
        # A tensor holds no more elements than its storage: a view that repeats elements (stride 0)
        # would turn a few stored bytes into an allocation of any size.
        if numel > storage.numel or offset + span > storage.numel:
            raise _TensorOutsideStorage(
                f"a tensor of shape {tuple(shape)} (stride {tuple(strides)}, offset {offset}) needs more "
                f"than its storage {storage.key} holds ({storage.numel} elements)"
            )
    return LazyTensor(storage, offset, torch.Size(shape), tuple(strides), storage.dtype)


def _rebuild_tensor_v3(
    storage: LazyStorage,
    offset: int,
    size: Any,
    stride: Any,
    requires_grad: Any,
    hooks: Any,
    dtype: torch.dtype,
    *_rest: Any,
) -> LazyTensor:
    tensor = _rebuild_tensor(storage, offset, size, stride)
    if dtype != storage.dtype:
        raise pickle.UnpicklingError(f"tensor dtype {dtype} differs from its storage's {storage.dtype}")
    return tensor


def _rebuild_parameter(data: Any, *_rest: Any) -> Any:
    # A Parameter is its data for our purposes; requires_grad and hooks are training state.
    return data


def _rebuild_from_type_v2(func: Callable[..., Any], new_type: Any, args: Any, state: Any) -> Any:
    if func not in (_rebuild_tensor, _rebuild_tensor_v3, _rebuild_parameter):
        raise pickle.UnpicklingError("_rebuild_from_type_v2 with a function that is not a tensor rebuild")
    return func(*args)


def _numpy_scalar(dtype: Any, data: Any = None) -> Any:
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise pickle.UnpicklingError(f"numpy scalar with dtype {dtype!r}")
    if not isinstance(data, bytes | bytearray):
        raise pickle.UnpicklingError("numpy scalar without raw bytes")
    return np.frombuffer(bytes(data), dtype=dtype, count=1)[0]


def _numpy_dtype(spec: Any, align: Any = False, copy: Any = False) -> np.dtype[Any]:
    if not isinstance(spec, str):
        raise pickle.UnpicklingError(f"numpy dtype spec {spec!r}")
    # A copy: numpy pickles a dtype as a call plus BUILD, and BUILD on the shared built-in dtype would
    # change it for the whole process.
    dt = np.dtype(spec, copy=True)
    if dt.hasobject:
        raise pickle.UnpicklingError(f"numpy object dtype {spec!r}")
    return dt


def _codecs_encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    # Protocol-2 pickles written by Python 3 spell bytes as _codecs.encode(str, "latin1").
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise pickle.UnpicklingError(f"_codecs.encode({type(obj).__name__}, {encoding!r})")
    return obj.encode(encoding)


def _allowed(module: str, name: str) -> Any:
    """The whole allow-list. Returns our stand-in for ``module.name``, or None if refused."""
    qual = f"{module}.{name}"
    if module in ("torch._utils", "torch"):
        if name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if name == "_rebuild_tensor_v3":
            return _rebuild_tensor_v3
        if name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
            return _rebuild_parameter
    if module == "torch._tensor" and name == "_rebuild_from_type_v2":
        return _rebuild_from_type_v2
    if module in ("torch", "torch.storage") and name in _STORAGE_DTYPES:
        return _StorageType(_STORAGE_DTYPES[name])
    if module == "torch" and name in _TORCH_DTYPES:
        return _TORCH_DTYPES[name]
    if module == "torch" and name == "Size":
        return torch.Size
    if module == "torch.nn.parameter" and name == "Parameter":
        return _rebuild_parameter
    if module == "torch._tensor" and name == "Tensor":
        # Only ever an argument of _rebuild_from_type_v2, which ignores it; the real class would let
        # NEWOBJ allocate an uninitialised tensor of any size.
        return _inert_class(qual)
    if module == "collections" and name == "OrderedDict":
        return collections.OrderedDict
    if module in ("builtins", "__builtin__") and name in ("set", "frozenset", "slice", "complex"):
        return {"set": set, "frozenset": frozenset, "slice": slice, "complex": complex}[name]
    if module == "_codecs" and name == "encode":
        return _codecs_encode
    if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "scalar":
        return _numpy_scalar
    if module == "numpy" and name == "dtype":
        return _numpy_dtype
    if qual in _INERT_CLASSES:
        return _inert_class(qual)
    return None


class _TensorOutsideStorage(pickle.UnpicklingError):
    """A tensor declared larger than the bytes behind it."""


def _limit_error(source: str, what: str, name: str, limit: int) -> ModelLoadError:
    return ModelLoadError(
        f"{source}: {what}, over voidprompt's limit {name} = {limit:,}; the file is malformed or "
        "hostile, so it was not loaded. A real checkpoint stays far below this limit; get the file "
        "again from its source."
    )


def _memo_checked(load_op: Callable[[Any], None]) -> Callable[[Any], None]:
    def op(self: _RestrictedUnpickler) -> None:
        load_op(self)
        if len(self.memo) > MAX_MEMO_ENTRIES:
            raise _limit_error(
                self._source, "the pickle's memo grew too large", "MAX_MEMO_ENTRIES", MAX_MEMO_ENTRIES
            )

    return op


class _RestrictedUnpickler(pickle._Unpickler):
    """The pure-Python unpickler, so that BUILD and the memo can be watched opcode by opcode (the C
    unpickler offers no hook for either). A checkpoint's pickle is small, so its speed is enough."""

    dispatch: ClassVar[dict[int, Callable[[Any], None]]] = dict(pickle._Unpickler.dispatch)
    memo: dict[int, Any]  # the pure-Python unpickler's own state, read by the checks below
    stack: list[Any]

    def __init__(self, file: BinaryIO, source: str, persistent: Callable[[Any], Any] | None = None) -> None:
        super().__init__(file, encoding="utf-8")
        self._source = source
        self._persistent = persistent
        self._inert: dict[str, Any] = {}  # one stand-in class per name, so equal names stay equal

    def load_build(self) -> None:
        # BUILD sets attributes on the object below the state. Allowed only on objects the pickle made
        # itself and that expect it: an OrderedDict (torch stores the state dict's ``_metadata`` so),
        # a numpy dtype copy and the inert stand-ins. Anything else - an allow-listed function or
        # class - would keep the attributes for the rest of the process.
        target = self.stack[-2] if len(self.stack) >= 2 else None
        fresh_dtype = isinstance(target, np.dtype) and not target.isbuiltin
        if not (type(target) is collections.OrderedDict or isinstance(target, InertObject) or fresh_dtype):
            raise UnsafePickleError(
                f"{self._source}: the pickle tries to set attributes on {target!r:.80} (BUILD), which only "
                "a state dict or a plain-data object may receive; the file was not loaded and nothing in "
                "it was run."
            )
        super().load_build()  # type: ignore[misc]

    dispatch[pickle.BUILD[0]] = load_build
    for _code in (pickle.PUT, pickle.BINPUT, pickle.LONG_BINPUT, pickle.MEMOIZE):
        dispatch[_code[0]] = _memo_checked(dispatch[_code[0]])
    del _code

    def find_class(self, module: str, name: str) -> Any:
        qual = f"{module}.{name}"
        if qual in self._inert:
            return self._inert[qual]
        found = _allowed(module, name)
        if isinstance(found, _InertMeta):
            self._inert[qual] = found
        if found is None:
            raise UnsafePickleError(
                f"{self._source}: the pickle asks for '{module}.{name}', which is not on voidprompt's "
                "allow-list, so the file was not loaded and nothing in it was run. If you trust the file, "
                "convert it to .safetensors with a tool you trust and load that instead."
            )
        return found

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent is None:
            raise pickle.UnpicklingError("persistent id in a pickle that has no storages")
        return self._persistent(pid)


def _children(obj: Any) -> Iterator[Any] | None:
    """The objects a container holds, or None for a leaf."""
    if isinstance(obj, dict):
        return iter([*obj.keys(), *obj.values()])
    if isinstance(obj, list | tuple | set | frozenset) and not isinstance(obj, torch.Size):
        return iter(obj)
    if isinstance(obj, InertObject):
        return iter([getattr(obj, "args", ()), getattr(obj, "state", None)])
    return None


def _check_structure(obj: Any, source: str) -> None:
    """Refuse a cycle, nesting past MAX_NESTING_DEPTH, more than MAX_OBJECTS objects counted as a tree,
    and tensor references over MAX_TENSOR_REUSE times the bytes of their storages.

    Iterative (a 100,000-deep list must not exhaust the interpreter's stack) and linear in the objects
    the pickle really made: a shared container's totals are computed once and reused."""
    done: dict[int, tuple[int, int]] = {}  # id -> (objects, tensor bytes) of a finished container
    on_path: set[int] = set()
    storages: dict[int, int] = {}
    # Each frame: the container, its children still to visit, objects so far, tensor bytes so far.
    root_children = _children(obj)
    if root_children is None:
        return
    stack: list[list[Any]] = [[obj, root_children, 1, 0]]
    on_path.add(id(obj))
    while stack:
        frame = stack[-1]
        child = next(frame[1], _END)
        if child is _END:
            stack.pop()
            on_path.discard(id(frame[0]))
            done[id(frame[0])] = (frame[2], frame[3])
            if stack:
                stack[-1][2] += frame[2]
                stack[-1][3] += frame[3]
                if stack[-1][2] > MAX_OBJECTS:
                    raise _limit_error(
                        source,
                        "the pickle holds too many objects (counting each reuse)",
                        "MAX_OBJECTS",
                        MAX_OBJECTS,
                    )
            continue
        if isinstance(child, LazyTensor):
            elem = _element_size(child.dtype)
            frame[2] += 1
            frame[3] += child.shape.numel() * elem
            storages[id(child.storage)] = child.storage.numel * elem
            continue
        key = id(child)
        if key in done:
            frame[2] += done[key][0]
            frame[3] += done[key][1]
            continue
        grandchildren = _children(child)
        if grandchildren is None:
            frame[2] += 1
            continue
        if key in on_path:
            raise ModelLoadError(
                f"{source}: the pickle holds a {type(child).__name__} that contains itself; no checkpoint "
                "is built that way, so the file was not loaded (it is malformed or hostile)."
            )
        if len(stack) >= MAX_NESTING_DEPTH:
            raise _limit_error(
                source, "the pickle nests containers too deeply", "MAX_NESTING_DEPTH", MAX_NESTING_DEPTH
            )
        on_path.add(key)
        stack.append([child, grandchildren, 1, 0])
    objects, tensor_bytes = done[id(obj)]
    if objects > MAX_OBJECTS:
        raise _limit_error(
            source, "the pickle holds too many objects (counting each reuse)", "MAX_OBJECTS", MAX_OBJECTS
        )
    stored = sum(storages.values())
    if tensor_bytes > MAX_TENSOR_REUSE * stored:
        raise _limit_error(
            source,
            f"its tensors name {tensor_bytes:,} bytes but their storages hold {stored:,} (times reused)",
            "MAX_TENSOR_REUSE",
            MAX_TENSOR_REUSE,
        )


_END = object()


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _read_pickle_head(f: BinaryIO, source: str, what: str) -> io.BytesIO:
    """At most MAX_PICKLE_BYTES of ``f``; the limit is reported only if the pickle needs more."""
    data = f.read(MAX_PICKLE_BYTES + 1)
    if len(data) > MAX_PICKLE_BYTES and what:
        raise _limit_error(source, f"{what} is larger than the limit", "MAX_PICKLE_BYTES", MAX_PICKLE_BYTES)
    return io.BytesIO(data[:MAX_PICKLE_BYTES])


def _decode(value: Any) -> Any:
    return value.decode("ascii") if isinstance(value, bytes) else value


class PickleCheckpoint:
    """An opened torch pickle: ``.obj`` is the unpickled object with :class:`LazyTensor` leaves."""

    def __init__(self, path: Path, obj: Any, *, zip_file: zipfile.ZipFile | None) -> None:
        self.path = path
        self.obj = obj
        self._zip = zip_file
        self._member_offsets: dict[str, int] = {}

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip = None

    def __enter__(self) -> PickleCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read_storage_bytes(self, storage: LazyStorage, start: int, nbytes: int) -> torch.Tensor:
        """Read ``nbytes`` starting ``start`` bytes into the storage, into a fresh uint8 tensor."""
        buf = torch.empty(nbytes, dtype=torch.uint8)
        view = memoryview(buf.numpy())  # type: ignore[arg-type]  # ndarray is a buffer
        if storage.zip_member is not None:
            assert self._zip is not None
            info = self._zip.getinfo(storage.zip_member)
            if info.compress_type == zipfile.ZIP_STORED:
                # torch writes storages uncompressed: read straight from the file, no temporary copy.
                data_start = self._member_offsets.get(info.filename)
                with open(self.path, "rb") as f:
                    if data_start is None:
                        f.seek(info.header_offset)
                        header = f.read(30)
                        name_len, extra_len = struct.unpack("<HH", header[26:30])
                        data_start = info.header_offset + 30 + name_len + extra_len
                        self._member_offsets[info.filename] = data_start
                    f.seek(data_start + start)
                    got = f.readinto(view)
            else:
                with self._zip.open(info) as member:
                    member.seek(start)
                    got = member.readinto(view)  # type: ignore[attr-defined]
        else:
            if storage.file_offset is None:
                raise ModelLoadError(f"{self.path}: storage {storage.key} has no data in the file")
            with open(self.path, "rb") as f:
                f.seek(storage.file_offset + start)
                got = f.readinto(view)
        if got != nbytes:
            raise ModelLoadError(
                f"{self.path}: the file ends inside tensor data (storage {storage.key}); it is truncated - "
                "download or copy it again."
            )
        return buf

    def materialize(self, lazy: LazyTensor) -> torch.Tensor:
        """Read one tensor from the file (always a fresh, contiguous CPU tensor)."""
        elem = torch.empty((), dtype=lazy.dtype).element_size()
        numel = lazy.shape.numel()
        if numel == 0:
            return torch.empty(lazy.shape, dtype=lazy.dtype)
        # The span of storage elements the view touches; storages shared between tensors are read
        # piecewise, so a small view never pulls in a big root storage.
        span = 1 + sum((n - 1) * s for n, s in zip(lazy.shape, lazy.stride, strict=True))
        if lazy.offset + span > lazy.storage.numel:
            raise ModelLoadError(
                f"{self.path}: a tensor of shape {tuple(lazy.shape)} reaches past its storage "
                f"{lazy.storage.key}; the file is damaged."
            )
        start = lazy.storage.byte_offset + lazy.offset * elem
        raw = self._read_storage_bytes(lazy.storage, start, span * elem).view(lazy.dtype)
        if numel == span and _is_contiguous(lazy):
            return raw.view(lazy.shape)
        return raw.as_strided(lazy.shape, lazy.stride).clone()


def _is_contiguous(lazy: LazyTensor) -> bool:
    expected = 1
    for n, s in reversed(list(zip(lazy.shape, lazy.stride, strict=True))):
        if n != 1 and s != expected:
            return False
        expected *= n
    return True


def _load_zip(path: Path) -> PickleCheckpoint:
    try:
        zf = zipfile.ZipFile(path)
        names = zf.namelist()
    except zipfile.BadZipFile as exc:
        raise ModelLoadError(
            f"{path}: damaged zip container ({exc}); the file is truncated or corrupt."
        ) from exc
    pkl = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
    if len(pkl) != 1:
        zf.close()
        raise ModelLoadError(
            f"{path}: a zip file but not a torch checkpoint (found {len(pkl)} data.pkl entries)."
        )
    prefix = pkl[0][: -len("data.pkl")]
    source = str(path)
    try:
        _check_zip_sizes(zf, path)
    except ModelLoadError:
        zf.close()
        raise
    members = {info.filename: info for info in zf.infolist()}

    storages: dict[str, LazyStorage] = {}

    def persistent(pid: Any) -> LazyStorage:
        if not isinstance(pid, tuple) or len(pid) < 5 or _decode(pid[0]) != "storage":
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid[:5]
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"storage type {storage_type!r}")
        if not isinstance(numel, int) or isinstance(numel, bool) or numel < 0:
            raise pickle.UnpicklingError(f"storage size {numel!r}")
        key = str(_decode(key))
        if key not in storages:
            member = f"{prefix}data/{key}"
            if member not in members:
                raise ModelLoadError(f"{path}: storage {key} is missing from the zip; the file is damaged.")
            nbytes = numel * _element_size(storage_type.dtype)
            if nbytes > members[member].file_size:
                # Reading it would run on into the next member's bytes.
                raise ModelLoadError(
                    f"{path}: storage {key} is declared as {nbytes:,} bytes but its zip member holds "
                    f"{members[member].file_size:,}; the file is damaged or hostile, so it was not loaded."
                )
            storages[key] = LazyStorage(key, storage_type.dtype, numel, zip_member=member)
        elif storages[key].dtype != storage_type.dtype or storages[key].numel != numel:
            raise pickle.UnpicklingError(f"storage {key} declared twice with different types or sizes")
        return storages[key]

    try:
        with zf.open(pkl[0]) as pf:
            data = _read_pickle_head(pf, source, "the checkpoint's data.pkl")  # type: ignore[arg-type]
        obj = _RestrictedUnpickler(data, source, persistent).load()
        _check_structure(obj, source)
    except UnsafePickleError:
        zf.close()
        raise
    except ModelLoadError:
        zf.close()
        raise
    except Exception as exc:
        zf.close()
        raise ModelLoadError(
            f"{path}: cannot read the checkpoint's pickle ({exc}); the file is damaged."
        ) from exc
    return PickleCheckpoint(path, obj, zip_file=zf)


def _check_zip_sizes(zf: zipfile.ZipFile, path: Path) -> None:
    """Uncompressed members must fit in the file; deflated ones may expand MAX_COMPRESSION_RATIO times."""
    size = path.stat().st_size
    stored = sum(i.file_size for i in zf.infolist() if i.compress_type == zipfile.ZIP_STORED)
    if stored > size:
        raise ModelLoadError(
            f"{path}: its uncompressed zip members claim {stored:,} bytes in a file of {size:,}; the file "
            "is damaged or hostile, so it was not loaded."
        )
    packed = [i for i in zf.infolist() if i.compress_type != zipfile.ZIP_STORED]
    expanded = sum(i.file_size for i in packed)
    if expanded > MAX_COMPRESSION_RATIO * max(size, 1):
        raise _limit_error(
            str(path),
            f"its compressed zip members expand to {expanded:,} bytes from a file of {size:,}",
            "MAX_COMPRESSION_RATIO",
            MAX_COMPRESSION_RATIO,
        )


def _load_legacy(path: Path, file: BinaryIO) -> PickleCheckpoint:
    source = str(path)
    # The pickles sit at the head of the file, the storages' bytes after them.
    f = _read_pickle_head(file, source, "")
    magic = _RestrictedUnpickler(f, source).load()
    if magic != _LEGACY_MAGIC:
        raise ModelLoadError(f"{path}: a pickle but not a torch checkpoint (no torch magic number).")
    protocol = _RestrictedUnpickler(f, source).load()
    if protocol != _LEGACY_PROTOCOL:
        raise ModelLoadError(f"{path}: unsupported legacy torch protocol {protocol!r}.")
    _RestrictedUnpickler(f, source).load()  # sys info: endianness and type sizes

    roots: dict[str, LazyStorage] = {}
    views: list[tuple[LazyStorage, str]] = []
    placeholders: dict[tuple[str, int, int], LazyStorage] = {}

    def persistent(pid: Any) -> LazyStorage:
        if not isinstance(pid, tuple) or len(pid) != 6 or _decode(pid[0]) != "storage":
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        _, storage_type, root_key, _location, numel, view = pid
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"storage type {storage_type!r}")
        if not isinstance(numel, int) or isinstance(numel, bool) or numel < 0:
            raise pickle.UnpicklingError(f"storage size {numel!r}")
        root_key = str(_decode(root_key))
        root = roots.setdefault(root_key, LazyStorage(root_key, storage_type.dtype, numel))
        if root.numel != numel or root.dtype != storage_type.dtype:
            raise pickle.UnpicklingError(f"storage {root_key} declared twice with different types or sizes")
        if view is None:
            return root
        view_key, offset, view_numel = view
        elem = _element_size(root.dtype)
        key = (str(_decode(view_key)), int(offset), int(view_numel))
        if key[1] < 0 or key[2] < 0 or key[1] + key[2] > root.numel:
            raise pickle.UnpicklingError(f"storage view {key} reaches past its root storage {root_key}")
        if key not in placeholders:
            placeholders[key] = LazyStorage(key[0], root.dtype, key[2], byte_offset=key[1] * elem)
            views.append((placeholders[key], root_key))
        return placeholders[key]

    try:
        obj = _RestrictedUnpickler(f, source, persistent).load()
        _check_structure(obj, source)
        keys = _RestrictedUnpickler(f, source).load()
    except EOFError as exc:
        if len(f.getbuffer()) >= MAX_PICKLE_BYTES:
            raise _limit_error(
                source,
                "the pickle at the head of the file is larger than the limit",
                "MAX_PICKLE_BYTES",
                MAX_PICKLE_BYTES,
            ) from exc
        raise
    if not isinstance(keys, list):
        raise ModelLoadError(f"{path}: damaged legacy torch file (storage key list missing).")
    # Storages follow in key order, each as an int64 element count and the raw bytes.
    offsets: dict[str, int] = {}
    pos = f.tell()
    size = os.fstat(file.fileno()).st_size
    for key in keys:
        key = str(_decode(key))
        if key not in roots:
            raise ModelLoadError(f"{path}: damaged legacy torch file (unknown storage {key}).")
        file.seek(pos)
        header = file.read(8)
        if len(header) != 8:
            raise ModelLoadError(f"{path}: the file ends inside tensor data; it is truncated.")
        (count,) = struct.unpack("<q", header)
        if count < roots[key].numel:
            raise ModelLoadError(
                f"{path}: storage {key} is declared as {roots[key].numel:,} elements but the file holds "
                f"{count:,}; the file is damaged or hostile, so it was not loaded."
            )
        offsets[key] = pos + 8
        pos += 8 + count * _element_size(roots[key].dtype)
        if count < 0 or pos > size:
            raise ModelLoadError(f"{path}: the file ends inside tensor data; it is truncated.")
    fixed: dict[int, LazyStorage] = {}
    for key, root in roots.items():
        fixed[id(root)] = LazyStorage(root.key, root.dtype, root.numel, file_offset=offsets.get(key))
    for view, root_key in views:
        root = roots[root_key]
        fixed[id(view)] = LazyStorage(
            view.key, view.dtype, view.numel, file_offset=offsets.get(root_key), byte_offset=view.byte_offset
        )
    return PickleCheckpoint(path, _replace_storages(obj, fixed), zip_file=None)


def _replace_storages(obj: Any, fixed: Mapping[int, LazyStorage]) -> Any:
    """Swap the placeholder storages (made before the file offsets were known) for the final ones."""
    if isinstance(obj, LazyTensor):
        return LazyTensor(
            fixed.get(id(obj.storage), obj.storage), obj.offset, obj.shape, obj.stride, obj.dtype
        )
    if isinstance(obj, dict):
        out = type(obj)() if isinstance(obj, collections.OrderedDict) else {}
        for k, v in obj.items():
            out[k] = _replace_storages(v, fixed)
        return out
    if isinstance(obj, list | tuple) and not isinstance(obj, torch.Size):
        return (
            type(obj)(_replace_storages(v, fixed) for v in obj)
            if isinstance(obj, list)
            else tuple(_replace_storages(v, fixed) for v in obj)
        )
    return obj


def load_pickle_checkpoint(path: str | Path) -> PickleCheckpoint:
    """Open a ``.ckpt``/``.pt``; tensors stay in the file until :meth:`PickleCheckpoint.materialize`.

    Raises :class:`UnsafePickleError` for any class outside the allow-list (nothing is executed or
    imported) and :class:`ModelLoadError` for a missing, truncated or foreign file.
    """
    p = Path(path)
    try:
        f = open(p, "rb")  # noqa: SIM115 - closed in the finally below
    except FileNotFoundError as exc:
        raise ModelLoadError(f"{p}: no such file; check the path.") from exc
    except OSError as exc:
        raise ModelLoadError(f"{p}: cannot open ({exc}).") from exc
    head = f.read(4)
    f.seek(0)
    try:
        if head.startswith(b"PK"):
            return _load_zip(p)
        if head[:1] == b"\x80":
            return _load_legacy(p, f)
    except (UnsafePickleError, ModelLoadError):
        raise
    except Exception as exc:
        raise ModelLoadError(f"{p}: cannot read as a torch checkpoint ({exc}); the file is damaged.") from exc
    finally:
        f.close()
    raise ModelLoadError(
        f"{p}: not a torch checkpoint (starts with {head!r}); expected a .ckpt/.pt zip or pickle, "
        "or a .safetensors file."
    )


def iter_lazy_tensors(obj: Any, prefix: str = "") -> Iterator[tuple[str, LazyTensor]]:
    """Every :class:`LazyTensor` in a nested dict, with dotted keys (for inspecting odd files)."""
    if isinstance(obj, LazyTensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from iter_lazy_tensors(v, f"{prefix}.{k}" if prefix else str(k))
