"""LoRA through the Engine: the tag applies it, the infotext names it, and it comes off exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from voidprompt.errors import ModelLoadError
from voidprompt.models.load import load_model
from voidprompt.models.networks.lora import build_layer_map
from voidprompt.pipeline.engine import Engine
from voidprompt.request import GenerationRequest

BASE = GenerationRequest(prompt="red circle", seed=3, steps=3, width=64, height=64, sampler_name="Euler")
LAYERS = (
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q",
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
)


@pytest.fixture(scope="module")
def engine(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Engine:
    components = load_model(tiny_checkpoint)
    folder = tmp_path_factory.mktemp("loras")
    layers = build_layer_map(components.unet, components.text_encoder)
    gen = torch.Generator().manual_seed(0)
    tensors: dict[str, torch.Tensor] = {}
    for name in LAYERS:
        out_features, in_features = layers[name].module.weight.shape
        tensors[f"{name}.lora_up.weight"] = torch.randn(out_features, 2, generator=gen)
        tensors[f"{name}.lora_down.weight"] = torch.randn(2, in_features, generator=gen)
        tensors[f"{name}.alpha"] = torch.tensor(2.0)
    save_file(tensors, str(folder / "style.safetensors"))
    return Engine(components, lora_dir=folder)


def pixels(result: object) -> np.ndarray:
    return np.asarray(result.images[0], dtype=np.int16)  # type: ignore[attr-defined]


def test_lora_tag_changes_the_image_and_comes_off_exactly(engine: Engine) -> None:
    plain = pixels(engine.generate(BASE))
    styled = engine.generate(BASE.replace(prompt="red circle <lora:style:1>"))
    assert not np.array_equal(pixels(styled), plain)
    assert styled.infotexts[0].startswith("red circle <lora:style:1>\n")
    assert 'Lora hashes: "style: ' in styled.infotexts[0]
    # Taking the tag away restores the weights byte for byte, and the conditioning cache is not
    # fooled by the text encoder having carried a LoRA.
    assert np.array_equal(pixels(engine.generate(BASE)), plain)


def test_multiplier_zero_equals_no_lora(engine: Engine) -> None:
    plain = pixels(engine.generate(BASE))
    zero = pixels(engine.generate(BASE.replace(prompt="red circle <lora:style:0>")))
    assert np.array_equal(zero, plain)


def test_missing_lora_warns_and_generates_without_it(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    plain = pixels(engine.generate(BASE))
    with caplog.at_level("WARNING"):
        result = engine.generate(BASE.replace(prompt="red circle <lora:nothere:1>"))
    assert np.array_equal(pixels(result), plain)
    assert "nothere" in caplog.text


def test_missing_lora_is_an_error_when_strict(tiny_checkpoint: Path, tmp_path: Path) -> None:
    strict = Engine(load_model(tiny_checkpoint), lora_dir=tmp_path, missing_networks="error")
    with pytest.raises(ModelLoadError, match="nothere"):
        strict.generate(BASE.replace(prompt="<lora:nothere:1>"))
