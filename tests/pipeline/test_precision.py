"""Precision through the Engine: bf16 against fp32 on the shipped miniature model, A1111's VAE
float32 fallback and that it sticks, A1111's NaN check on the latents, and torch.compile's reuse."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from voidprompt.demo.miniature import miniature_model_path
from voidprompt.errors import NansError
from voidprompt.models.load import load_model
from voidprompt.models.placement import PrecisionPolicy, resolve_precision
from voidprompt.models.vae_decode import vae_dtype
from voidprompt.pipeline.engine import Engine, decode_latents
from voidprompt.prompts.nai import NOVELAI_NEGATIVE
from voidprompt.request import GenerationRequest

CPU = torch.device("cpu")

TINY = GenerationRequest(prompt="a cat", seed=3, steps=2, width=64, height=64, batch_size=2)


def pixels(result: Any) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.int16) for image in result.images])


def test_bf16_on_the_cpu_stays_within_a_few_levels_of_fp32_on_the_miniature_model() -> None:
    """bf16 keeps 8 significant bits (relative rounding 2**-9), so each UNet call differs from fp32
    by about 1%, and sampling carries that into the picture. Measured here (the demo study's centre
    point: 128 px, empty prompt, the NovelAI negative list, CFG 7, clip skip 2; Euler, 6 steps; 10
    batches of 8 seeds): the median picture of a batch differs from fp32 by 1.2-2.7 levels of 255
    on average per pixel. The tail is chaotic: in some seeds the sampler's path forks and a shape
    appears or goes (up to 90 levels on average), at most 2 of 8 above 16 levels. So the tolerance
    is on the median picture (4 levels) and on how many may fork (3 of 8)."""
    policy = resolve_precision("bf16", CPU)
    full = Engine(load_model(miniature_model_path()))
    half = Engine(load_model(miniature_model_path(), precision=policy))
    assert {p.dtype for p in half.components.unet.parameters()} == {torch.bfloat16}
    request = GenerationRequest(
        prompt="",
        negative_prompt=NOVELAI_NEGATIVE,
        seed=77,
        steps=6,
        width=128,
        height=128,
        cfg_scale=7.0,
        sampler_name="Euler",
        clip_skip=2,
        batch_size=8,
    )
    a, b = pixels(full.generate(request)), pixels(half.generate(request))
    per_image = np.abs(a - b).reshape(8, -1).mean(axis=1)
    assert (per_image > 0).all()  # bf16 really ran: no picture is the fp32 one
    assert np.median(per_image) <= 4.0
    assert (per_image > 16.0).sum() <= 3


def _blow_up_decoder(vae: Any) -> None:
    """Decoder activations around 3e5 for unit-size latents: past fp16's 65504, fine in float32."""
    with torch.no_grad():
        w = vae.decoder.conv_in.weight
        w.copy_(w / w.abs().max() * 20000)


def test_the_vae_fallback_redoes_the_decode_in_fp32_and_sticks(
    tiny_checkpoint: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # fp32 UNet, fp16 VAE: the latents are exactly fp32's, only the decode is half (CPU fp16 convs
    # exist, so A1111's CUDA fallback can be exercised here).
    policy = PrecisionPolicy("fp32", torch.float32, None, torch.float16, "cpu")
    engine = Engine(load_model(tiny_checkpoint, precision=policy))
    _blow_up_decoder(engine.components.vae)
    reference = load_model(tiny_checkpoint)  # the same fp16 VAE weights, held in float32
    reference.vae.load_state_dict({k: v.float() for k, v in engine.components.vae.state_dict().items()})
    with torch.no_grad():
        z = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(0))
        assert not torch.isfinite(engine.components.vae.decode(z.half()).sample).all()

    with caplog.at_level(logging.WARNING, logger="voidprompt"):
        first = engine.generate(TINY)
    assert len([r for r in caplog.records if "VAE decode in float16" in r.message]) == 1
    assert engine.components.precision == policy.with_vae(torch.float32)
    assert vae_dtype(engine.components.vae) == torch.float32
    expected = pixels(Engine(reference).generate(TINY))
    assert np.array_equal(pixels(first), expected)
    assert expected.std() > 10  # a picture, not a black square

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="voidprompt"):
        second = engine.generate(TINY)
    assert caplog.records == []  # straight to float32: no half decode, no second warning
    assert np.array_equal(pixels(second), expected)


def test_a_half_precision_unet_that_overflows_fails_the_batch(tiny_checkpoint: Path) -> None:
    # A1111's test_for_nans(samples, "unet"): no VAE can repair NaN latents.
    components = load_model(tiny_checkpoint, precision=resolve_precision("bf16", CPU))
    with torch.no_grad():
        components.unet.conv_out.weight.mul_(1e37)
    with pytest.raises(NansError) as info:
        Engine(components).generate(TINY)
    message = str(info.value)
    assert "\n" not in message and message.startswith("A tensor with NaNs was produced in Unet.")
    assert "overflow bf16" in message and "--precision fp32" in message


def test_the_decode_checks_the_latents_in_every_precision(tiny_checkpoint: Path) -> None:
    # A1111's decode_latent_batch tests the samples whatever the precision; without the check, NaN
    # latents give the picture they give (NaN, black once converted to 8 bits).
    components = load_model(tiny_checkpoint)
    nan = torch.full((1, 4, 8, 8), float("nan"))
    with pytest.raises(NansError, match=r"^A tensor with NaNs was produced in Unet\. It ran in fp32"):
        decode_latents(components, nan)
    assert decode_latents(components, nan, nan_check=False).isnan().all()
    # A1111 quirk: only the first latent value is tested; one NaN elsewhere passes that test, and the
    # VAE's group norms spread it over the whole picture, which the VAE check then finds.
    some = torch.zeros(1, 4, 8, 8)
    some[0, 3, 5, 5] = float("nan")
    with pytest.raises(NansError, match=r"^A tensor with NaNs was produced in VAE\."):
        decode_latents(components, some)


@pytest.fixture
def counting_compile(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """torch.compile with a backend that counts the graphs dynamo hands it and runs them eagerly:
    dynamo's tracing and per-shape caching are real, inductor's minute of C++ compiling is not."""
    graphs: list[int] = []
    real_compile = torch.compile

    def backend(graph: Any, example_inputs: list[Any]) -> Any:
        graphs.append(len(example_inputs))
        return graph.forward

    def compile_counting(model: Any, **options: Any) -> Any:
        return real_compile(model, backend=backend, **options)

    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", compile_counting)
    yield graphs
    torch._dynamo.reset()


def test_compile_is_reused_across_batches_of_the_same_shape(
    tiny_checkpoint: Path, counting_compile: list[int]
) -> None:
    eager = Engine(load_model(tiny_checkpoint))
    compiled = Engine(load_model(tiny_checkpoint), compile=True)
    request = TINY.replace(steps=1)
    first = compiled.generate(request)
    traced = len(counting_compile)
    assert traced >= 1
    compiled.generate(request.replace(seed=11))
    assert len(counting_compile) == traced  # same shape: the graphs are reused, nothing traced again
    assert np.array_equal(pixels(first), pixels(eager.generate(request)))


def test_compile_steps_aside_while_networks_hook_the_unet(
    tiny_checkpoint: Path, counting_compile: list[int]
) -> None:
    engine = Engine(load_model(tiny_checkpoint), compile=True)
    unet = engine.components.unet
    assert engine._unet_for_pass() is not unet  # the compiled wrapper
    handle = unet.down_blocks[0].resnets[0].conv1.register_forward_hook(lambda m, a, out: out)
    try:
        assert engine._unet_for_pass() is unet
    finally:
        handle.remove()
    plain = Engine(load_model(tiny_checkpoint))
    assert plain._unet_for_pass() is plain.components.unet
    assert counting_compile == []  # choosing the module traces nothing


@pytest.mark.slow
def test_inductor_compiled_unet_gives_the_same_pictures_within_a_level(tiny_checkpoint: Path) -> None:
    # About a minute of C++ compiling on a CPU. Fused kernels sum in another order: one level.
    torch._dynamo.reset()
    try:
        eager = Engine(load_model(tiny_checkpoint))
        compiled = Engine(load_model(tiny_checkpoint), compile=True)
        a, b = pixels(eager.generate(TINY)), pixels(compiled.generate(TINY))
        assert np.abs(a - b).max() <= 1
    finally:
        torch._dynamo.reset()
