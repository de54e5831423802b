"""The restricted unpickler: real checkpoint shapes load, payloads never run."""

from __future__ import annotations

import collections
import pickle
import sys
import types
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from voidprompt.errors import ModelLoadError, UnsafePickleError
from voidprompt.models.safe_pickle import (
    InertObject,
    iter_lazy_tensors,
    load_pickle_checkpoint,
)


def _unpickle(folder: Path, data: bytes) -> Any:
    """``data`` loaded as a checkpoint's pickle: written as the ``data.pkl`` of a torch zip file, which
    :func:`load_pickle_checkpoint` opens as it opens any ``.ckpt``."""
    path = folder / "crafted.ckpt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", data)
    with load_pickle_checkpoint(path) as ck:
        return ck.obj


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with load_pickle_checkpoint(path) as ck:
        return {k: ck.materialize(t) for k, t in iter_lazy_tensors(ck.obj)}


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_tensors_views_and_dtypes_round_trip(tmp_path: Path, legacy: bool) -> None:
    base = torch.arange(24, dtype=torch.float16).reshape(4, 6)
    obj = {
        "state_dict": collections.OrderedDict(
            a=base,
            transposed=base.t(),  # non-contiguous view sharing the storage
            window=base[1:3, 2:],  # offset view
            ids=torch.tensor([[0, 1, 2]], dtype=torch.int64),
            param=torch.nn.Parameter(torch.full((3,), 2.5)),
            bf=torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
        ),
        "global_step": 470000,
    }
    path = tmp_path / "x.ckpt"
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    got = _tensors(path)
    for key, ref in obj["state_dict"].items():
        t = got[f"state_dict.{key}"]
        assert t.dtype == ref.dtype
        assert torch.equal(t, ref.detach())


class _Payload:
    """Pickles as os.system(...) - the classic malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        import os

        return (os.system, (f"touch {self.marker}",))


class _ExecPayload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        import builtins

        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').write('x')",))


@pytest.mark.parametrize("payload", [_Payload, _ExecPayload])
def test_malicious_checkpoint_is_refused_and_never_runs(tmp_path: Path, payload: type) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "x": payload(marker)}, path)
    with pytest.raises(UnsafePickleError) as err:
        load_pickle_checkpoint(path)
    msg = str(err.value)
    assert str(path) in msg
    # os.system pickles as posix.system; protocol 2 spells builtins as __builtin__.
    assert ("posix.system" in msg) or ("__builtin__.exec" in msg)
    assert ".safetensors" in msg
    assert not marker.exists()


def test_malicious_plain_pickle_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    with pytest.raises(UnsafePickleError):
        _unpickle(tmp_path, pickle.dumps(_Payload(marker)))
    assert not marker.exists()


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def test_lightning_callback_state_and_numpy_scalars_load(tmp_path: Path) -> None:
    # Hand-written protocol-2 pickle like sd-v1-4.ckpt's: {"callbacks": {ModelCheckpoint: {...}},
    # "step": numpy.int64(5)} - the classes are referenced by name only and must not be imported.
    cls = _global("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint")
    scalar = (
        _global("numpy.core.multiarray", "scalar")
        + _global("numpy", "dtype")
        + b"(X\x02\x00\x00\x00i8K\x00K\x01tR"  # numpy.dtype('i8', False, True)
        + b"(K\x03X\x01\x00\x00\x00<NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"  # dtype state
        + _global("_codecs", "encode")
        + b"(X\x08\x00\x00\x00\x05\x00\x00\x00\x00\x00\x00\x00X\x06\x00\x00\x00latin1tR"
        + b"\x86R"
    )
    data = (
        b"\x80\x02}(X\x09\x00\x00\x00callbacks}" + cls + b"}X\x04\x00\x00\x00best"
        b"G?\xe0\x00\x00\x00\x00\x00\x00ss" + b"X\x04\x00\x00\x00step" + scalar + b"u."
    )
    obj = _unpickle(tmp_path, data)
    (key,) = obj["callbacks"].keys()
    assert repr(key) == "<inert class pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint>"
    assert obj["callbacks"][key] == {"best": 0.5}
    assert obj["step"] == np.int64(5) and isinstance(obj["step"], np.int64)


def test_checkpoint_with_fake_lightning_global_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A stand-in module registered under Lightning's name, so torch.save writes exactly the GLOBAL
    # that sd-v1-4.ckpt carries; the loader must map it without importing anything.
    for parent in ("pytorch_lightning", "pytorch_lightning.callbacks"):
        monkeypatch.setitem(sys.modules, parent, types.ModuleType(parent))
    mod = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        def __init__(self) -> None:
            self.best_model_score = 0.25

    ModelCheckpoint.__module__ = mod.__name__
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    mod.ModelCheckpoint = ModelCheckpoint  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    path = tmp_path / "lightning.ckpt"
    torch.save(
        {
            "state_dict": {"w": torch.ones(2)},
            "callbacks": {ModelCheckpoint: {"best": 0.5}},
            "trainer": ModelCheckpoint(),
        },
        path,
    )
    for name in (mod.__name__, "pytorch_lightning.callbacks", "pytorch_lightning"):
        monkeypatch.delitem(sys.modules, name)
    with load_pickle_checkpoint(path) as ck:
        assert isinstance(ck.obj["trainer"], InertObject)
        assert ck.obj["trainer"].state == {"best_model_score": 0.25}
        assert list(ck.obj["callbacks"].values()) == [{"best": 0.5}]
        assert torch.equal(ck.materialize(ck.obj["state_dict"]["w"]), torch.ones(2))
    assert "pytorch_lightning" not in sys.modules


def test_inert_object_swallows_state(tmp_path: Path) -> None:
    cls = _global("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint")
    obj = _unpickle(tmp_path, b"\x80\x02" + cls + b")\x81}X\x01\x00\x00\x00kK\x01sb.")
    assert isinstance(obj, InertObject)
    assert obj.state == {"k": 1}


@pytest.mark.parametrize(
    "module,name", [("os", "system"), ("subprocess", "Popen"), ("builtins", "eval"), ("torch", "load")]
)
def test_any_other_global_is_refused(tmp_path: Path, module: str, name: str) -> None:
    with pytest.raises(UnsafePickleError, match=f"{module}.{name}"):
        _unpickle(tmp_path, b"\x80\x02" + _global(module, name) + b".")


def test_truncated_zip_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "t.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1000)}}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match=str(path)), load_pickle_checkpoint(path) as ck:
        for _, t in iter_lazy_tensors(ck.obj):
            ck.materialize(t)
