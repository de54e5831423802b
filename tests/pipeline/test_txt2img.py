"""txt2img through the Engine on a tiny random SD1-layout checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from voidprompt.errors import InvalidRequestError
from voidprompt.infotext import parse_generation_parameters, request_fields_from_params
from voidprompt.pipeline.engine import Engine, GenerationHooks, Progress, to_pil_images
from voidprompt.prompts.nai import NOVELAI_NEGATIVE, weight_tags
from voidprompt.request import GenerationRequest
from voidprompt.sampling.registry import resolve

BASE = GenerationRequest(
    prompt="",
    negative_prompt="lowres, bad anatomy, (blurry:1.2)",
    seed=1234,
    steps=4,
    width=64,
    height=64,
    cfg_scale=7.0,
    sampler_name="Euler a",
    clip_skip=2,
)


def pixels(image: object) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_same_request_gives_same_image(tiny_engine: Engine) -> None:
    a = tiny_engine.generate(BASE)
    b = tiny_engine.generate(BASE)
    assert np.array_equal(pixels(a.images[0]), pixels(b.images[0]))
    assert a.infotexts == b.infotexts


def test_batch_images_equal_single_images(tiny_engine: Engine) -> None:
    batch = tiny_engine.generate(BASE.replace(batch_size=3, seed=50))
    assert batch.seeds == [50, 51, 52]
    for index, seed in enumerate(batch.seeds):
        single = tiny_engine.generate(BASE.replace(seed=seed))
        # Batched convolutions may sum in another order: allow one 8-bit level.
        assert np.abs(pixels(batch.images[index]) - pixels(single.images[0])).max() <= 1
        assert f"Seed: {seed}," in batch.infotexts[index]


def test_n_iter_continues_seeds(tiny_engine: Engine) -> None:
    result = tiny_engine.generate(BASE.replace(batch_size=2, n_iter=2, seed=7))
    assert result.seeds == [7, 8, 9, 10]
    assert len(result.images) == 4


def test_random_seed_is_recorded_and_reproducible(tiny_engine: Engine) -> None:
    first = tiny_engine.generate(BASE.replace(seed=-1))
    seed = first.seeds[0]
    assert 0 <= seed < 4294967294
    again = tiny_engine.generate(BASE.replace(seed=seed))
    assert np.array_equal(pixels(first.images[0]), pixels(again.images[0]))


def test_infotext_alone_regenerates_the_image(tiny_engine: Engine) -> None:
    request = BASE.replace(
        sampler_name="DPM++ 2M Karras",
        seed=99,
        cfg_scale=5.5,
        eta_noise_seed_delta=31337,
        subseed=3,
        subseed_strength=0.25,
    )
    result = tiny_engine.generate(request)
    params = parse_generation_parameters(result.infotexts[0])
    assert params["Sampler"] == "DPM++ 2M"
    assert params["Schedule type"] == "Karras"
    assert params["Clip skip"] == "2"
    assert params["RNG"] == "CPU"
    assert "ENSD" not in params  # DPM++ 2M draws no eta noise, so A1111 does not write it
    fields = request_fields_from_params(params)
    rebuilt = GenerationRequest(
        **{k: v for k, v in fields.items() if k in GenerationRequest.__dataclass_fields__}
    )
    again = tiny_engine.generate(rebuilt)
    assert np.array_equal(pixels(result.images[0]), pixels(again.images[0]))


def test_ensd_written_only_for_samplers_that_use_it(tiny_engine: Engine) -> None:
    ancestral = tiny_engine.generate(BASE.replace(eta_noise_seed_delta=31337))
    assert "ENSD: 31337" in ancestral.infotexts[0]
    plain = tiny_engine.generate(BASE.replace(eta_noise_seed_delta=31337, sampler_name="Euler"))
    assert "ENSD" not in plain.infotexts[0]
    # ENSD changes ancestral noise, not the deterministic Euler trajectory.
    euler = tiny_engine.generate(BASE.replace(sampler_name="Euler"))
    assert np.array_equal(pixels(euler.images[0]), pixels(plain.images[0]))
    ancestral_no_ensd = tiny_engine.generate(BASE)
    assert not np.array_equal(pixels(ancestral_no_ensd.images[0]), pixels(ancestral.images[0]))


def test_pure_negative_prompt_weight_changes_the_image(tiny_engine: Engine) -> None:
    images = {}
    for w in (0.9, 1.0, 1.1):
        request = BASE.replace(negative_prompt=weight_tags(NOVELAI_NEGATIVE, w), sampler_name="Euler")
        images[w] = pixels(tiny_engine.generate(request).images[0])
    assert not np.array_equal(images[0.9], images[1.0])
    assert not np.array_equal(images[1.1], images[1.0])
    plain = pixels(
        tiny_engine.generate(BASE.replace(negative_prompt=NOVELAI_NEGATIVE, sampler_name="Euler")).images[0]
    )
    assert np.array_equal(images[1.0], plain)


def test_clip_skip_is_used_and_written(tiny_engine: Engine) -> None:
    one = tiny_engine.generate(BASE.replace(clip_skip=1))
    two = tiny_engine.generate(BASE)
    assert "Clip skip" not in one.infotexts[0]
    assert "Clip skip: 2" in two.infotexts[0]
    assert not np.array_equal(pixels(one.images[0]), pixels(two.images[0]))


def test_bad_size_is_refused_before_sampling(tiny_engine: Engine) -> None:
    with pytest.raises(InvalidRequestError, match="multiple of 8"):
        tiny_engine.generate(BASE.replace(width=60))
    with pytest.raises(InvalidRequestError, match="sampler"):
        tiny_engine.generate(BASE.replace(sampler_name="Euler z"))


def test_progress_and_interrupt(tiny_engine: Engine) -> None:
    steps: list[int] = []
    tiny_engine.generate(BASE.replace(n_iter=2), GenerationHooks(progress=lambda p: steps.append(p.step)))
    assert steps == [1, 2, 3, 4, 1, 2, 3, 4]
    calls = {"n": 0}

    def stop_after_two() -> bool:
        calls["n"] += 1
        return calls["n"] > 2

    result = tiny_engine.generate(BASE.replace(n_iter=2), GenerationHooks(should_stop=stop_after_two))
    # Stopped inside the first iteration: nothing finished, and the second iteration never ran.
    assert result.interrupted and len(result) == 0 and result.seeds == []


def test_skip_abandons_one_iteration_and_the_rest_are_unchanged(tiny_engine: Engine) -> None:
    request = BASE.replace(n_iter=3, batch_size=2, seed=40)
    full = tiny_engine.generate(request)
    state = {"skip": False, "iteration": -1}

    def before_iteration(n: int) -> bool:
        state["iteration"] = n
        state["skip"] = False  # as A1111 clears its skip flag at each iteration
        return True

    def on_progress(progress: Progress) -> None:
        if progress.iteration == 1 and progress.step == 2:
            state["skip"] = True

    hooks = GenerationHooks(on_progress, lambda: bool(state["skip"]), before_iteration)
    skipped = tiny_engine.generate(request, hooks)
    assert not skipped.interrupted and state["iteration"] == 2
    assert skipped.seeds == [40, 41, 44, 45] == full.seeds[:2] + full.seeds[4:]
    kept = full.images[:2] + full.images[4:]
    for a, b in zip(skipped.images, kept, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert skipped.infotexts == full.infotexts[:2] + full.infotexts[4:]


def test_eight_bit_conversion_truncates_like_a1111() -> None:
    # A1111: 255 * x then astype(uint8): truncation, so 0.999 -> 254 and 0.5 -> 127 (rounding gives 128).
    values = torch.tensor([0.0, 0.5, 0.999, 1.0]).view(1, 1, 1, 4).expand(1, 3, 1, 4).contiguous()
    image = to_pil_images(values)[0]
    assert np.asarray(image)[0, :, 0].tolist() == [0, 127, 254, 255]


@pytest.mark.parametrize(
    "sampler",
    [
        "Euler",
        "Euler a",
        "Heun",
        "DPM2",
        "DPM2 a",
        "LMS",
        "DPM++ 2S a",
        "DPM++ 2M",
        "DPM++ SDE",
        "DPM++ 2M SDE",
        "DPM++ 2M SDE Heun",
        "DPM++ 3M SDE",
        "DPM fast",
        "Restart",
        "DDIM",
        "DDIM CFG++",
        "PLMS",
        "UniPC",
        "LCM",
    ],
)
def test_every_sampler_runs_and_names_itself(tiny_engine: Engine, sampler: str) -> None:
    result = tiny_engine.generate(BASE.replace(sampler_name=sampler, steps=3))
    array = pixels(result.images[0])
    assert array.shape[2] == 3
    assert f"Sampler: {sampler}," in result.infotexts[0]


def test_explicit_seed_list_gives_each_image_its_own_seed(tiny_engine: Engine) -> None:
    listed = tiny_engine.generate(BASE.replace(batch_size=2), seeds=[900, 17])
    assert listed.seeds == [900, 17]
    for image, seed in zip(listed.images, (900, 17), strict=True):
        alone = tiny_engine.generate(BASE.replace(seed=seed))
        assert np.abs(pixels(image) - pixels(alone.images[0])).max() <= 1
    with pytest.raises(InvalidRequestError, match="one per image"):
        tiny_engine.generate(BASE.replace(batch_size=2), seeds=[1])


def test_pad_conds_pads_with_the_cached_empty_prompt(tiny_engine: Engine) -> None:
    # A 2-chunk prompt against a 1-chunk negative: without padding A1111 runs cond and uncond as
    # separate UNet calls; "Pad conds" appends the encoded empty prompt to the shorter one instead.
    long_prompt = ", ".join(["red circle"] * 40)
    request = BASE.replace(prompt=long_prompt, sampler_name="Euler", n_iter=2)
    plain = tiny_engine.generate(request)
    padded = tiny_engine.generate(request.replace(pad_cond_uncond=True))
    assert "Pad conds: True" in padded.infotexts[0]
    assert not np.array_equal(pixels(plain.images[0]), pixels(padded.images[0]))
    empty = tiny_engine.encoder.encode_texts([""], clip_skip=BASE.clip_skip)[0]
    conditioning = tiny_engine._conditioning(request, resolve("Euler")[0])
    hits, misses = tiny_engine.encoder.cache_hits, tiny_engine.encoder.cache_misses
    cached = tiny_engine._empty_prompt_cond(request, conditioning)
    assert torch.equal(cached, empty)
    # Encoded during the padded run already: this is a cache hit, not a new encode.
    assert (tiny_engine.encoder.cache_hits, tiny_engine.encoder.cache_misses) == (hits + 1, misses)
