"""Storing a fitted preview map in a model file: only the header changes, atomically."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from voidprompt.demo.preview_fit import write_latent_rgb
from voidprompt.errors import ModelLoadError
from voidprompt.models.latent_rgb import LATENT_RGB_METADATA_KEY, LatentRGB
from voidprompt.models.safetensors_stream import read_safetensors_header

MAP = LatentRGB(
    matrix=((0.5, 0.25, 0.0), (1.0, -1.0, 0.125), (0.0, 0.0, 2.0), (-0.5, 0.5, 0.5)), bias=(0.1, 0.0, -0.1)
)


def _tensor_bytes(path: Path) -> dict[str, bytes]:
    header = read_safetensors_header(path)
    data = path.read_bytes()
    return {name: data[e.offset : e.offset + e.nbytes] for name, e in header.tensors.items()}


def test_the_map_goes_into_the_header_and_every_tensor_byte_stays(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(3, 5, generator=gen).to(torch.float16),
        "b": torch.arange(7, dtype=torch.int64),
        "c": torch.randn(2, generator=gen),
    }
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path), metadata={"voidprompt.arch": '{"unet_heads": 4}', "other": "kept"})
    before = _tensor_bytes(path)

    write_latent_rgb(path, MAP)
    header = read_safetensors_header(path)  # the format's own checks: offsets tile the data exactly
    assert _tensor_bytes(path) == before
    assert header.metadata["voidprompt.arch"] == '{"unet_heads": 4}' and header.metadata["other"] == "kept"
    assert LatentRGB.from_metadata(header.metadata, source="t", channels=4) == MAP
    assert (8 + int.from_bytes(path.read_bytes()[:8], "little")) % 8 == 0  # data stays 8-byte aligned
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temporary file left

    # A second fit replaces the first, and the file still loads with the safetensors library.
    other = LatentRGB(matrix=((0.0, 0.0, 0.0),) * 4)
    write_latent_rgb(path, other)
    assert json.loads(read_safetensors_header(path).metadata[LATENT_RGB_METADATA_KEY])["bias"] == [0.0] * 3
    from safetensors.torch import load_file

    loaded = load_file(str(path))
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)


def test_a_damaged_file_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "cut.safetensors"
    save_file({"a": torch.zeros(64)}, str(path))
    damaged = path.read_bytes()[:-8]
    path.write_bytes(damaged)
    with pytest.raises(ModelLoadError, match="truncated"):
        write_latent_rgb(path, MAP)
    assert path.read_bytes() == damaged and len(list(tmp_path.iterdir())) == 1
