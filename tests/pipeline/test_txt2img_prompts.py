"""The prompt language as txt2img uses it: embeddings, emphasis modes, AND, and what the infotext says."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from voidprompt.infotext import parse_generation_parameters
from voidprompt.models.load import load_model
from voidprompt.pipeline.engine import Engine
from voidprompt.prompts.embeddings import EmbeddingDatabase
from voidprompt.request import GenerationRequest

BASE = GenerationRequest(seed=5, steps=3, width=64, height=64, sampler_name="Euler", clip_skip=2)


def pixels(result: object) -> np.ndarray:
    return np.asarray(result.images[0], dtype=np.int16)  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def engine_with_embedding(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Engine:
    components = load_model(tiny_checkpoint)
    width = int(components.text_encoder.config.hidden_size)
    folder = tmp_path_factory.mktemp("embeddings")
    torch.manual_seed(0)
    save_file({"emb_params": torch.randn(2, width)}, str(folder / "easynegative.safetensors"))
    db = EmbeddingDatabase(components.tokenizer, width=width)
    db.load_folder(folder)
    return Engine(components, embeddings=db)


def test_embedding_in_negative_prompt_changes_image_and_is_listed(engine_with_embedding: Engine) -> None:
    with_ti = engine_with_embedding.generate(BASE.replace(negative_prompt="easynegative, lowres"))
    without = engine_with_embedding.generate(BASE.replace(negative_prompt="easy negative, lowres"))
    assert not np.array_equal(pixels(with_ti), pixels(without))
    params = parse_generation_parameters(with_ti.infotexts[0])
    name, short = params["TI hashes"].split(": ")
    assert name == "easynegative" and len(short) == 12
    assert "TI hashes" not in parse_generation_parameters(without.infotexts[0])


def test_emphasis_mode_is_applied_and_written_only_when_not_original(tiny_engine: Engine) -> None:
    prompt = "(red:1.4) circle"
    original = tiny_engine.generate(BASE.replace(prompt=prompt))
    no_norm = tiny_engine.generate(BASE.replace(prompt=prompt, emphasis="No norm"))
    ignore = tiny_engine.generate(BASE.replace(prompt=prompt, emphasis="Ignore"))
    plain = tiny_engine.generate(BASE.replace(prompt="red circle"))
    assert "Emphasis" not in original.infotexts[0]
    assert "Emphasis: No norm" in no_norm.infotexts[0]
    assert not np.array_equal(pixels(original), pixels(no_norm))
    # "Ignore" parses the brackets away but applies no weight: the same as the plain words.
    assert np.array_equal(pixels(ignore), pixels(plain))


def test_extra_network_tags_stay_in_infotext_but_not_in_conditioning(tiny_engine: Engine) -> None:
    # With no LoRA folder the tag only has to be removed from the text the encoder sees.
    tagged = tiny_engine.generate(BASE.replace(prompt="red circle <lora:missing:0.5>"))
    plain = tiny_engine.generate(BASE.replace(prompt="red circle"))
    assert tagged.infotexts[0].startswith("red circle <lora:missing:0.5>\n")
    assert np.array_equal(pixels(tagged), pixels(plain))


def test_and_with_weight_zero_part_equals_the_single_prompt(tiny_engine: Engine) -> None:
    # uncond + 1*cfg*(c1 - uncond) + 0*cfg*(c2 - uncond) == uncond + cfg*(c1 - uncond)
    both = tiny_engine.generate(BASE.replace(prompt="red circle AND blue square :0"))
    single = tiny_engine.generate(BASE.replace(prompt="red circle"))
    assert np.abs(pixels(both) - pixels(single)).max() <= 1


def test_ti_hashes_follow_a1111s_encoder_calls(engine_with_embedding: Engine) -> None:
    # A1111 encodes the negative prompt first, then each distinct AND part (the last two parts are
    # both " easynegative": one call); every call puts its names in front, so a name used by both
    # prompts is written twice.
    request = BASE.replace(prompt="a cat AND easynegative AND easynegative", negative_prompt="easynegative")
    one = parse_generation_parameters(engine_with_embedding.generate(request).infotexts[0])["TI hashes"]
    item = one.split(", ")[0]
    assert item.startswith("easynegative: ") and one == ", ".join([item] * 2)
    # With hires fix the hires pass encodes after the first iteration's parameters are copied, and
    # from the cache afterwards: the second iteration's record holds its two calls as well.
    hires = BASE.replace(
        negative_prompt="easynegative", n_iter=2, enable_hr=True, hr_scale=1.5, denoising_strength=0.5
    )
    first, second = (
        parse_generation_parameters(text)["TI hashes"]
        for text in engine_with_embedding.generate(hires).infotexts
    )
    assert first == item and second == f"{item}, {item}"
