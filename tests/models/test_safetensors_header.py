"""voidprompt's safetensors header reader against the safetensors library: every malformed file is
refused by both (ours with a message that says what is wrong), every well-formed one read equally."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from voidprompt.errors import ModelLoadError
from voidprompt.models.load import open_checkpoint
from voidprompt.models.safetensors_stream import MAX_HEADER_BYTES, read_safetensors_header


def _t(begin: int, end: int, shape: Any = None, dtype: str = "F32") -> dict[str, Any]:
    return {
        "dtype": dtype,
        "shape": [(end - begin) // 4] if shape is None else shape,
        "data_offsets": [begin, end],
    }


def _write(
    path: Path, header: Any, data: bytes, *, raw: bytes | None = None, length: int | None = None
) -> Path:
    text = raw if raw is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)
    return path


# name: (header or None, data bytes, raw header bytes or None, declared length or None, our message)
MALFORMED: dict[str, tuple[Any, bytes, bytes | None, int | None, str]] = {
    "overlapping offsets": ({"a": _t(0, 8), "b": _t(4, 8)}, bytes(8), None, None, "without gaps or overlaps"),
    "negative offset": ({"a": _t(-4, 4, [2])}, bytes(8), None, None, "not two non-negative integers"),
    "offsets past the data": ({"a": _t(0, 8)}, bytes(4), None, None, "it is truncated"),
    "end before begin": ({"a": _t(4, 0, [0]), "b": _t(0, 4)}, bytes(4), None, None, "gaps or overlaps"),
    "gap between tensors": ({"a": _t(0, 4), "b": _t(8, 12)}, bytes(12), None, None, "without gaps"),
    "trailing bytes": ({"a": _t(0, 4)}, bytes(8), None, None, "trailing bytes"),
    "three offsets": (
        {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 4]}},
        bytes(4),
        None,
        None,
        "not two non-negative integers",
    ),
    "duplicate keys": (
        None,
        bytes(8),
        b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
        b'"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}',
        None,
        "'a' appears twice",
    ),
    "negative dimension": (
        {"a": _t(0, 4, [-1])},
        bytes(4),
        None,
        None,
        "not a list of non-negative integers",
    ),
    "float dimension": ({"a": _t(0, 4, [1.0])}, bytes(4), None, None, "not a list of non-negative integers"),
    "boolean dimension": (
        {"a": _t(0, 4, [True])},
        bytes(4),
        None,
        None,
        "not a list of non-negative integers",
    ),
    "shape not a list": ({"a": _t(0, 4, "1")}, bytes(4), None, None, "not a list of non-negative integers"),
    "nested shape": ({"a": _t(0, 4, [[1]])}, bytes(4), None, None, "not a list of non-negative integers"),
    "bytes do not match dtype x shape": (
        {"a": _t(0, 4, [2])},
        bytes(4),
        None,
        None,
        "has 4 bytes for shape (2,)",
    ),
    "bytes do not match a wide shape": ({"a": _t(0, 8, [3, 0, 5])}, bytes(8), None, None, "has 8 bytes"),
    "unknown dtype": ({"a": _t(0, 4, dtype="F17")}, bytes(4), None, None, "unknown dtype 'F17'"),
    "no dtype": ({"a": {"shape": [1], "data_offsets": [0, 4]}}, bytes(4), None, None, "has no dtype"),
    "integer metadata": (
        {"__metadata__": {"k": 1}, "a": _t(0, 4)},
        bytes(4),
        None,
        None,
        "strings to strings",
    ),
    "nested metadata": (
        {"__metadata__": {"k": {"x": "y"}}, "a": _t(0, 4)},
        bytes(4),
        None,
        None,
        "strings to strings",
    ),
    "metadata a list": ({"__metadata__": ["k"], "a": _t(0, 4)}, bytes(4), None, None, "strings to strings"),
    "header an array": (None, b"", b"[]", None, "not a JSON object"),
    "NaN in the header": (
        None,
        bytes(4),
        b'{"__metadata__":{"k":NaN},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
        None,
        "NaN is not valid JSON",
    ),
    "header not UTF-8": (None, b"", b'{"\xff":1}', None, "utf-8"),
    "header not JSON": (None, b"", b"{nope", None, "Expecting"),
    "header longer than the file": ({"a": _t(0, 4)}, bytes(4), None, 10_000, "claims 10,000 bytes"),
    "header over 100 MB": ({"a": _t(0, 4)}, bytes(4), None, MAX_HEADER_BYTES + 1, "limit of 100,000,000"),
    "file shorter than 8 bytes": (None, b"", b"", -1, "fewer than the 8"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_header_refused_by_the_library_and_by_us(tmp_path: Path, case: str) -> None:
    header, data, raw, length, message = MALFORMED[case]
    path = tmp_path / "bad.safetensors"
    if length == -1:
        path.write_bytes(b"\x10\x00\x00")
    else:
        _write(path, header, data, raw=raw, length=length)
    with pytest.raises(SafetensorError):
        load_file(str(path))
    with pytest.raises(ModelLoadError, match=r"damaged \.safetensors file") as caught:
        read_safetensors_header(path)
    assert message in str(caught.value)
    assert str(path) in str(caught.value)


def test_a_dtype_the_format_has_but_voidprompt_cannot_use_is_named(tmp_path: Path) -> None:
    path = _write(tmp_path / "f8.safetensors", {"a": _t(0, 1, [1], "F8_E4M3")}, bytes(1))
    load_file(str(path))  # a valid file for the library
    with pytest.raises(ModelLoadError, match="tensor 'a' has dtype F8_E4M3, which voidprompt cannot load"):
        read_safetensors_header(path)


def test_well_formed_files_read_the_same(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "w": torch.randn(3, 5, generator=g),
        "half": torch.randn(7, generator=g).half(),
        "bf": torch.randn(2, 2, generator=g).bfloat16(),
        "ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(2.5),
    }
    path = tmp_path / "ok.safetensors"
    save_file(tensors, str(path), metadata={"ss_network_dim": "4", "note": "ünïcode"})
    header = read_safetensors_header(path)
    with safe_open(str(path), "pt") as f:
        assert header.metadata == f.metadata()
    theirs = load_file(str(path))
    with open_checkpoint(path) as reader:
        assert sorted(reader.tensor_names()) == sorted(theirs)
        for key, value in theirs.items():
            ours = reader.get(key)
            assert ours.dtype == value.dtype and ours.shape == value.shape
            assert torch.equal(ours, value)


def test_header_order_is_kept_and_null_metadata_is_empty(tmp_path: Path) -> None:
    # Offsets in the opposite order of the keys; metadata null: both are valid for the library.
    header = {"__metadata__": None, "b": _t(4, 8), "a": _t(0, 4)}
    path = _write(tmp_path / "order.safetensors", header, struct.pack("<ff", 1.0, 2.0))
    assert set(load_file(str(path))) == {"a", "b"}
    got = read_safetensors_header(path)
    assert list(got.tensors) == ["b", "a"]
    assert got.metadata == {}
    with open_checkpoint(path) as reader:
        assert reader.get("a").item() == 1.0 and reader.get("b").item() == 2.0
