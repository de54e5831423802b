"""The cheap latent-to-RGB preview: A1111's "Approx cheap" bytes, the least-squares fit, the file's map."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from voidprompt.errors import ModelLoadError
from voidprompt.models.detect import ModelFamily
from voidprompt.models.latent_rgb import (
    CHEAP_SD1,
    CHEAP_SDXL,
    LATENT_RGB_METADATA_KEY,
    LatentRGB,
    fit_latent_rgb,
    latent_rgb_for,
)
from voidprompt.models.load import load_model
from voidprompt.testing.fake_checkpoints import TINY_CONSTANTS

# Typed in by hand from A1111's modules/sd_vae_approx.py (cheap_approximation), not from the module.
A1111_SD1 = [[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264], [-0.184, -0.271, -0.473]]
A1111_SDXL = [
    [0.3448, 0.4168, 0.4395],
    [-0.1953, -0.0290, 0.0250],
    [0.1074, 0.0886, -0.0163],
    [-0.3730, -0.2499, -0.2088],
]


def _a1111_bytes(latent: np.ndarray, coefs: list[list[float]]) -> np.ndarray:
    """A1111's single_sample_to_image over cheap_approximation, per picture, in numpy float32."""
    out = []
    for sample in latent.astype(np.float32):
        x = np.einsum("lxy,lr->rxy", sample, np.asarray(coefs, dtype=np.float32))
        x = np.clip(x * np.float32(0.5) + np.float32(0.5), 0.0, 1.0)
        out.append((np.float32(255.0) * x.transpose(1, 2, 0)).astype(np.uint8))
    return np.stack(out)


@pytest.mark.parametrize(("mapping", "coefs"), [(CHEAP_SD1, A1111_SD1), (CHEAP_SDXL, A1111_SDXL)])
def test_the_constants_give_a1111s_bytes(mapping: LatentRGB, coefs: list[list[float]]) -> None:
    gen = torch.Generator().manual_seed(3)
    latent = torch.randn(3, 4, 9, 7, generator=gen) * 2.5  # wide enough that both clamps act
    got = mapping.to_rgb(latent)
    assert got.dtype == torch.uint8 and got.device.type == "cpu" and tuple(got.shape) == (3, 9, 7, 3)
    want = _a1111_bytes(latent.numpy(), coefs)
    assert np.array_equal(got.numpy(), want)
    assert (want == 0).any() and (want == 255).any()


def test_one_channel_alone_reads_its_row() -> None:
    latent = torch.zeros(1, 4, 2, 2, dtype=torch.float16)  # a half latent is read as float32
    latent[0, 0] = 1.0
    # (1 + row) / 2 * 255, truncated: 1.298 -> 165.495, 1.207 -> 153.89, 1.208 -> 154.02.
    assert CHEAP_SD1.to_rgb(latent)[0, 1, 1].tolist() == [165, 153, 154]
    assert CHEAP_SDXL.to_rgb(latent)[0, 0, 0].tolist() == [171, 180, 183]
    with pytest.raises(ValueError, match="4, height, width"):
        CHEAP_SD1.to_rgb(torch.zeros(1, 3, 2, 2))


def test_the_bias_shifts_before_the_clamp() -> None:
    mapping = LatentRGB(matrix=((0.0, 0.0, 0.0),) * 4, bias=(-2.0, 0.0, 0.5))
    assert mapping.to_rgb(torch.zeros(1, 4, 1, 1))[0, 0, 0].tolist() == [0, 127, 191]


def test_the_fit_recovers_a_known_map_from_cell_averages() -> None:
    gen = torch.Generator().manual_seed(0)
    matrix = torch.randn(4, 3, generator=gen, dtype=torch.float64) * 0.3
    bias = torch.tensor([0.1, -0.2, 0.05], dtype=torch.float64)
    latents = torch.randn(5, 4, 6, 6, generator=gen, dtype=torch.float64)
    cells = torch.einsum("bchw,cr->brhw", latents, matrix) + bias.view(1, 3, 1, 1)
    pixels = cells.repeat_interleave(8, dim=2).repeat_interleave(8, dim=3)
    # Detail inside every 8x8 cell that averages to zero: only the cell's mean may be fitted.
    checker = (torch.arange(8).view(8, 1) + torch.arange(8).view(1, 8)) % 2 * 2.0 - 1.0
    pixels = pixels + 0.4 * checker.repeat(6, 6).to(torch.float64)
    fit = fit_latent_rgb(latents, pixels)
    assert np.allclose(np.array(fit.matrix), matrix.numpy(), atol=1e-10)
    assert np.allclose(np.array(fit.bias), bias.numpy(), atol=1e-10)
    with pytest.raises(ValueError, match="tile"):
        fit_latent_rgb(latents, pixels[:, :, :45])


def test_a_files_own_map_wins_then_the_family_decides() -> None:
    own = LatentRGB(matrix=((1.0, 0.0, 0.0),) * 4)
    assert latent_rgb_for(SimpleNamespace(family=ModelFamily.SD1, latent_rgb=own)) is own
    assert latent_rgb_for(SimpleNamespace(family=ModelFamily.SDXL, latent_rgb=own)) is own
    for family in (ModelFamily.SDXL, ModelFamily.SDXL_REFINER, ModelFamily.SDXL_INPAINT):
        assert latent_rgb_for(SimpleNamespace(family=family, latent_rgb=None)) is CHEAP_SDXL
    for family in (ModelFamily.SD1, ModelFamily.SD1_INPAINT):
        assert latent_rgb_for(SimpleNamespace(family=family, latent_rgb=None)) is CHEAP_SD1


FITTED = LatentRGB(
    matrix=((0.5, -0.25, 0.125), (0.1, 0.2, 0.3), (-1.5, 0.0, 2.0), (0.0, 0.75, -0.5)), bias=(0.1, 0.2, -0.3)
)


def _tiny_file(path: Path, tiny_sd: dict[str, torch.Tensor], entry: str | None) -> Path:
    meta = TINY_CONSTANTS.to_metadata()
    if entry is not None:
        meta[LATENT_RGB_METADATA_KEY] = entry
    if path.suffix == ".ckpt":
        torch.save({"state_dict": tiny_sd, **meta}, path)
    else:
        save_file(tiny_sd, str(path), metadata=meta)
    return path


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_the_loader_reads_the_files_map(
    tmp_path: Path, suffix: str, tiny_sd: dict[str, torch.Tensor], stub_tokenizer: object
) -> None:
    entry = FITTED.to_metadata()[LATENT_RGB_METADATA_KEY]
    assert json.loads(entry) == {
        "matrix": [[0.5, -0.25, 0.125], [0.1, 0.2, 0.3], [-1.5, 0.0, 2.0], [0.0, 0.75, -0.5]],
        "bias": [0.1, 0.2, -0.3],
    }
    c = load_model(_tiny_file(tmp_path / f"own{suffix}", tiny_sd, entry), tokenizer=stub_tokenizer)
    assert c.latent_rgb == FITTED and latent_rgb_for(c) == FITTED
    assert any(LATENT_RGB_METADATA_KEY in note for note in c.report.notes)
    plain = load_model(_tiny_file(tmp_path / f"plain{suffix}", tiny_sd, None), tokenizer=stub_tokenizer)
    assert plain.latent_rgb is None and latent_rgb_for(plain) is CHEAP_SD1


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ("{not json", "is not valid JSON"),
        ("[[1, 2, 3]]", "must be a JSON object"),
        ('{"matrix": [[1, 2, 3]], "bias": [0, 0, 0]}', "'matrix' has 1 rows but the model's latents have 4"),
        ('{"matrix": [[1, 2, 3], [1, 2, 3], [1, 2], [1, 2, 3]]}', "matrix row 2 must be 3 finite numbers"),
        ('{"matrix": [[1, 2, 3], [1, 2, 3], [1, 2, 3], [1, 2, 3]], "bias": [0, NaN, 0]}', "'bias' must be"),
        ('{"matrix": [[1, 2, 3], [1, 2, 3], [1, 2, 3], [1, "2", 3]]}', "matrix row 3 must be 3 finite"),
        ('{"matrix": [[1, 2, 3], [1, 2, 3], [1, 2, 3], [1, 2, 3]], "bias": [1e999, 0, 0]}', "'bias' must be"),
        ('{"matrix": [[1, 2, 3], [1, 2, 3], [1, 2, 3], [1, 2, 3]], "gain": 2}', "must be a JSON object"),
    ],
)
def test_a_malformed_map_is_refused_naming_the_key(
    tmp_path: Path, tiny_sd: dict[str, torch.Tensor], stub_tokenizer: object, entry: str, problem: str
) -> None:
    path = _tiny_file(tmp_path / "bad.safetensors", tiny_sd, entry)
    with pytest.raises(ModelLoadError) as caught:
        load_model(path, tokenizer=stub_tokenizer)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message and LATENT_RGB_METADATA_KEY in message
    assert problem in message and "remove the key" in message


def test_the_shipped_model_carries_a_map_closer_than_sd1s(stub_tokenizer: object) -> None:
    from voidprompt.demo.miniature import miniature_model_path
    from voidprompt.demo.preview_fit import decode_to_unit, preview_error, world_latents

    components = load_model(miniature_model_path(), tokenizer=stub_tokenizer)
    own = components.latent_rgb
    assert own is not None and latent_rgb_for(components) is own
    # Two world pictures of a seed the fit never saw, previewed against the full VAE decode.
    latents = world_latents(components, 5, 2)
    pictures = decode_to_unit(components, latents)
    fitted, sd1 = preview_error(own, latents, pictures), preview_error(CHEAP_SD1, latents, pictures)
    assert fitted < 0.5 * sd1, (fitted, sd1)
