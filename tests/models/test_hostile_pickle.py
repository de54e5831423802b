"""Hostile pickles: each is refused with a clear error, in bounded time and memory, before any caller
walks or reads what it declares. Each file is made here, a few KB at most."""

from __future__ import annotations

import collections
import io
import pickle
import struct
import time
import tracemalloc
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from voidprompt.errors import ModelLoadError, UnsafePickleError
from voidprompt.models import safe_pickle
from voidprompt.models.load import open_checkpoint
from voidprompt.models.networks.hypernetworks import load_hypernetwork
from voidprompt.models.safe_pickle import iter_lazy_tensors, load_pickle_checkpoint


class _Storage:
    """A storage in the pickle: written as torch's persistent id for zip member ``data/<key>``."""

    def __init__(self, key: str, numel: int) -> None:
        self.key = key
        self.numel = numel


class _Tensor:
    """A tensor as torch pickles one, with any shape, stride and offset we like."""

    def __init__(self, storage: _Storage, shape: tuple[int, ...], stride: tuple[int, ...], offset: int = 0):
        self.args = (storage, offset, shape, stride, False, collections.OrderedDict())

    def __reduce__(self) -> tuple[Any, ...]:
        return (torch._utils._rebuild_tensor_v2, self.args)


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _Storage):
            return ("storage", torch.FloatStorage, obj.key, "cpu", obj.numel)
        return None


def _crafted_zip(path: Path, obj: Any, members: dict[str, bytes], *, deflate: tuple[str, ...] = ()) -> Path:
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(obj)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", buf.getvalue())
        for name, data in members.items():
            kind = zipfile.ZIP_DEFLATED if name in deflate else zipfile.ZIP_STORED
            zf.writestr(f"archive/data/{name}", data, compress_type=kind)
    return path


def _raw_zip(path: Path, data_pkl: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", data_pkl)
    return path


def _binput(i: int) -> bytes:
    return pickle.BINPUT + bytes([i])


def _binget(i: int) -> bytes:
    return pickle.BINGET + bytes([i])


@contextmanager
def _peak_python_memory_below(limit: int) -> Iterator[None]:
    """Python's own allocations (objects, bytes, zip buffers) stay below ``limit`` bytes in the block."""
    tracemalloc.start()
    try:
        yield
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < limit, f"peak {peak:,} bytes"


def _refused(call: Callable[[], object], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        call()


def _billion_laughs(levels: int, width: int) -> bytes:
    """A dict whose value is a list of ``width`` copies of a list of ``width`` copies ... ``levels``
    deep, every copy a memo reference: width**levels leaves from a few hundred bytes."""
    key = b"state_dict"
    out = pickle.PROTO + b"\x02" + pickle.EMPTY_DICT + pickle.BINUNICODE + struct.pack("<I", len(key)) + key
    out += pickle.BINUNICODE + struct.pack("<I", 3) + b"lol" + _binput(0) + pickle.POP
    for level in range(1, levels + 1):
        out += pickle.MARK + _binget(level - 1) * width + pickle.LIST + _binput(level) + pickle.POP
    return out + _binget(levels) + pickle.SETITEM + pickle.STOP


def test_stride_zero_view_is_refused_before_anything_is_read(tmp_path: Path) -> None:
    # One stored float, seen as a 100000 x 100000 tensor: materialising it would take 40 GB.
    storage = _Storage("0", 1)
    obj = {"state_dict": {"w": _Tensor(storage, (100000, 100000), (0, 0))}}
    path = _crafted_zip(tmp_path / "stride0.ckpt", obj, {"0": struct.pack("<f", 1.0)})
    assert path.stat().st_size < 2048
    with pytest.raises(ModelLoadError, match=r"shape \(100000, 100000\).*storage 0 holds \(1 elements\)"):
        load_pickle_checkpoint(path)


def test_a_legit_view_inside_its_storage_still_loads(tmp_path: Path) -> None:
    storage = _Storage("0", 6)
    obj = {"state_dict": {"w": _Tensor(storage, (2, 2), (1, 2), offset=1)}}
    path = _crafted_zip(tmp_path / "view.ckpt", obj, {"0": np.arange(6, dtype="<f4").tobytes()})
    with load_pickle_checkpoint(path) as ck:
        got = ck.materialize(ck.obj["state_dict"]["w"])
    # offset 1, element [i, j] at 1 + i + 2j: [[1, 3], [2, 4]]
    assert got.tolist() == [[1.0, 3.0], [2.0, 4.0]]


def test_storage_larger_than_its_zip_member_is_refused(tmp_path: Path) -> None:
    # Storage 0 claims 4 floats but its member holds 1; reading it would run into member 1's bytes.
    obj = {
        "state_dict": {"w": _Tensor(_Storage("0", 4), (4,), (1,)), "b": _Tensor(_Storage("1", 1), (1,), (1,))}
    }
    members = {"0": struct.pack("<f", 1.0), "1": struct.pack("<f", 2.0)}
    path = _crafted_zip(tmp_path / "overrun.ckpt", obj, members)
    with pytest.raises(ModelLoadError, match="storage 0 is declared as 16 bytes but its zip member holds 4"):
        load_pickle_checkpoint(path)


def test_memo_billion_laughs_is_refused_quickly(tmp_path: Path) -> None:
    data = _billion_laughs(levels=30, width=10)  # 10**30 leaves when walked as a tree
    assert len(data) < 1500
    path = _raw_zip(tmp_path / "laughs.ckpt", data)
    start = time.perf_counter()
    with _peak_python_memory_below(4 * 1024 * 1024):
        _refused(lambda: load_pickle_checkpoint(path), ModelLoadError, "MAX_OBJECTS = 2,000,000")
        # The same file as a hypernetwork, whose loader walks the whole object.
        _refused(lambda: load_hypernetwork(path), ModelLoadError, "MAX_OBJECTS")
    assert time.perf_counter() - start < 5.0


def test_a_structure_shared_a_few_times_is_fine(tmp_path: Path) -> None:
    path = _raw_zip(tmp_path / "shared.ckpt", _billion_laughs(levels=3, width=10))
    with load_pickle_checkpoint(path) as ck:
        top = ck.obj["state_dict"]
        assert len(top) == 10 and top[0] is top[9] and top[0][0][0] == "lol"


def test_memo_size_is_capped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(safe_pickle, "MAX_MEMO_ENTRIES", 100)
    data = (
        pickle.PROTO
        + b"\x04"
        + pickle.MARK
        + (pickle.NONE + pickle.MEMOIZE) * 101
        + pickle.LIST
        + pickle.STOP
    )
    with pytest.raises(ModelLoadError, match=r"memo grew too large.*MAX_MEMO_ENTRIES = 100"):
        load_pickle_checkpoint(_raw_zip(tmp_path / "memo.ckpt", data))
    ok = (
        pickle.PROTO
        + b"\x04"
        + pickle.MARK
        + (pickle.NONE + pickle.MEMOIZE) * 100
        + pickle.LIST
        + pickle.STOP
    )
    with load_pickle_checkpoint(_raw_zip(tmp_path / "memo_ok.ckpt", ok)) as ck:
        assert ck.obj == [None] * 100


def test_self_referential_list_is_a_clear_error(tmp_path: Path) -> None:
    # {"state_dict": L} where L = [L]
    key = b"state_dict"
    data = (
        pickle.PROTO
        + b"\x02"
        + pickle.EMPTY_DICT
        + pickle.BINUNICODE
        + struct.pack("<I", len(key))
        + key
        + pickle.EMPTY_LIST
        + _binput(0)
        + _binget(0)
        + pickle.APPEND
        + pickle.SETITEM
        + pickle.STOP
    )
    path = _raw_zip(tmp_path / "cycle.ckpt", data)
    with pytest.raises(ModelLoadError, match="list that contains itself"):
        load_pickle_checkpoint(path)
    with pytest.raises(ModelLoadError, match="contains itself"):
        load_hypernetwork(path)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_100000_deep_nesting_is_a_clear_error(tmp_path: Path, legacy: bool) -> None:
    depth = 100_000
    body = pickle.EMPTY_LIST * depth + pickle.APPEND * (depth - 1)
    if legacy:
        head = b"".join(pickle.dumps(v, protocol=2) for v in (safe_pickle._LEGACY_MAGIC, 1001, {}))
        path = tmp_path / "deep.pt"
        path.write_bytes(head + pickle.PROTO + b"\x02" + body + pickle.STOP + pickle.dumps([], protocol=2))
    else:
        path = _raw_zip(tmp_path / "deep.ckpt", pickle.PROTO + b"\x02" + body + pickle.STOP)
    with _peak_python_memory_below(64 * 1024 * 1024):
        _refused(
            lambda: load_pickle_checkpoint(path),
            ModelLoadError,
            r"nests containers too deeply.*MAX_NESTING_DEPTH = 100",
        )


def test_nesting_within_the_limit_loads(tmp_path: Path) -> None:
    depth = safe_pickle.MAX_NESTING_DEPTH
    data = pickle.PROTO + b"\x02" + pickle.EMPTY_LIST * depth + pickle.APPEND * (depth - 1) + pickle.STOP
    with load_pickle_checkpoint(_raw_zip(tmp_path / "ok.ckpt", data)) as ck:
        level, seen = ck.obj, 1
        while level:
            level, seen = level[0], seen + 1
    assert seen == depth


@pytest.mark.parametrize(
    ("module", "name", "target"),
    [
        ("torch._utils", "_rebuild_tensor_v2", "_rebuild_tensor"),
        ("numpy.core.multiarray", "scalar", "_numpy_scalar"),
        ("torch._tensor", "Tensor", None),
    ],
)
@pytest.mark.parametrize("slots", [False, True], ids=["dict", "slots"])
def test_build_on_an_allow_listed_global_is_refused(
    tmp_path: Path, module: str, name: str, target: str | None, slots: bool
) -> None:
    state = (
        pickle.EMPTY_DICT
        + pickle.BINUNICODE
        + struct.pack("<I", 5)
        + b"pwned"
        + pickle.NEWTRUE
        + pickle.SETITEM
    )
    if slots:
        state = pickle.NONE + state + pickle.TUPLE2
    data = (
        pickle.PROTO
        + b"\x02"
        + pickle.GLOBAL
        + f"{module}\n{name}\n".encode()
        + state
        + pickle.BUILD
        + pickle.STOP
    )
    with pytest.raises(UnsafePickleError, match=r"set attributes on .* \(BUILD\)"):
        load_pickle_checkpoint(_raw_zip(tmp_path / "build.ckpt", data))
    if target is not None:
        assert not hasattr(getattr(safe_pickle, target), "pwned")
    assert not hasattr(torch.Tensor, "pwned")


def test_build_on_a_builtin_numpy_dtype_changes_only_a_copy(tmp_path: Path) -> None:
    # numpy pickles a dtype as dtype("i8") plus BUILD(state); the shared int64 dtype must stay as it is.
    obj = {"step": np.dtype(">i8")}
    path = _raw_zip(tmp_path / "dtype.ckpt", pickle.dumps(obj, protocol=2))
    with load_pickle_checkpoint(path) as ck:
        assert ck.obj["step"] == np.dtype(">i8")
    assert np.dtype("i8").byteorder in ("=", "<")


def test_zip_bomb_storage_is_refused(tmp_path: Path) -> None:
    numel = 2 * 1024 * 1024  # 8 MiB of zeros deflate to about 8 KB
    obj = {"state_dict": {"w": _Tensor(_Storage("0", numel), (numel,), (1,))}}
    path = _crafted_zip(tmp_path / "bomb.ckpt", obj, {"0": bytes(4 * numel)}, deflate=("0",))
    assert path.stat().st_size < 16 * 1024
    with pytest.raises(
        ModelLoadError, match=r"compressed zip members expand to 8,388,608 bytes.*MAX_COMPRESSION_RATIO"
    ):
        load_pickle_checkpoint(path)


def test_zip_bomb_pickle_is_refused_before_it_is_inflated(tmp_path: Path) -> None:
    blob = bytes(16 * 1024 * 1024)  # 16 MiB of zeros inside the pickle itself
    data = pickle.PROTO + b"\x04" + pickle.BINBYTES8 + struct.pack("<Q", len(blob)) + blob + pickle.STOP
    path = tmp_path / "bomb_pkl.ckpt"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/data.pkl", data)
    del blob, data
    assert path.stat().st_size < 64 * 1024
    with _peak_python_memory_below(2 * 1024 * 1024):
        _refused(lambda: load_pickle_checkpoint(path), ModelLoadError, "MAX_COMPRESSION_RATIO = 32")


def test_deflated_members_within_the_ratio_load(tmp_path: Path) -> None:
    values = np.random.default_rng(0).standard_normal(256).astype("<f4")
    obj = {"state_dict": {"w": _Tensor(_Storage("0", 256), (16, 16), (16, 1))}}
    path = _crafted_zip(tmp_path / "packed.ckpt", obj, {"0": values.tobytes()}, deflate=("0",))
    with load_pickle_checkpoint(path) as ck:
        got = ck.materialize(ck.obj["state_dict"]["w"])
    assert torch.equal(got, torch.from_numpy(values).reshape(16, 16))


def test_stored_members_claiming_more_than_the_file_are_refused(tmp_path: Path) -> None:
    path = _crafted_zip(tmp_path / "liar.ckpt", {"state_dict": {}}, {"0": b"\0" * 64})
    raw = bytearray(path.read_bytes())
    # The central directory entry of data/0: sizes at +20 (compressed) and +24, name at +46.
    name = b"archive/data/0"
    entry = raw.find(b"PK\x01\x02")
    while raw[entry + 46 : entry + 46 + len(name)] != name:
        entry = raw.find(b"PK\x01\x02", entry + 4)
    raw[entry + 20 : entry + 28] = struct.pack("<II", 1 << 30, 1 << 30)
    path.write_bytes(bytes(raw))
    with pytest.raises(ModelLoadError, match="uncompressed zip members claim"):
        load_pickle_checkpoint(path)


def test_oversized_pickle_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(safe_pickle, "MAX_PICKLE_BYTES", 1000)
    data = pickle.dumps({"state_dict": {}, "notes": "x" * 2000}, protocol=2)
    with pytest.raises(ModelLoadError, match=r"data\.pkl is larger than the limit.*MAX_PICKLE_BYTES = 1,000"):
        load_pickle_checkpoint(_raw_zip(tmp_path / "big.ckpt", data))
    legacy = tmp_path / "big.pt"
    legacy.write_bytes(
        b"".join(
            pickle.dumps(v, protocol=2)
            for v in (safe_pickle._LEGACY_MAGIC, 1001, {}, {"notes": "x" * 2000}, [])
        )
    )
    with pytest.raises(ModelLoadError, match="MAX_PICKLE_BYTES = 1,000"):
        load_pickle_checkpoint(legacy)


def test_one_tensor_named_by_many_keys_is_refused(tmp_path: Path) -> None:
    storage = _Storage("0", 256)
    shared = _Tensor(storage, (256,), (1,))
    obj = {"state_dict": {f"k{i}": shared for i in range(5)}}
    path = _crafted_zip(tmp_path / "reuse.ckpt", obj, {"0": bytes(1024)})
    with pytest.raises(ModelLoadError, match="MAX_TENSOR_REUSE = 4"):
        load_pickle_checkpoint(path)
    # Tied weights (one tensor under two names) are ordinary.
    obj = {"state_dict": {"a": shared, "b": shared}}
    with load_pickle_checkpoint(_crafted_zip(tmp_path / "tied.ckpt", obj, {"0": bytes(1024)})) as ck:
        assert [k for k, _ in iter_lazy_tensors(ck.obj)] == ["state_dict.a", "state_dict.b"]


def test_sd1_shaped_checkpoint_with_training_state_loads(tmp_path: Path) -> None:
    # The layout of an ldm training save: ~1100 model tensors, an EMA copy, optimizer state nested a
    # few levels, Lightning-style callbacks and numpy scalars. All of it stays well inside the limits.
    model = collections.OrderedDict(
        (f"model.diffusion_model.block_{i}.weight", torch.full((2,), float(i))) for i in range(1100)
    )
    ema = collections.OrderedDict((f"model_ema.block_{i}", t) for i, t in enumerate(model.values()))
    state = {
        "state_dict": collections.OrderedDict({**model, **ema}),
        "optimizer_states": [
            {"state": {i: {"exp_avg": torch.zeros(2)} for i in range(50)}, "param_groups": []}
        ],
        "global_step": np.int64(470000),
        "epoch": 6,
    }
    path = tmp_path / "sd1.ckpt"
    torch.save(state, path)
    with open_checkpoint(path) as reader:
        assert len(reader.tensor_names()) == 2200
        assert torch.equal(reader.get("model.diffusion_model.block_7.weight"), torch.full((2,), 7.0))
