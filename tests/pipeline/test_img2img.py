"""img2img in the Engine: A1111's start part-way down the schedule, preprocessing, batching."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import voidprompt.pipeline.engine as engine_module
from voidprompt.errors import InvalidRequestError
from voidprompt.models.load import load_model
from voidprompt.pipeline.engine import Engine
from voidprompt.pipeline.images import resize_image
from voidprompt.pipeline.img2img import encode_images
from voidprompt.request import GenerationRequest
from voidprompt.sampling.rng import ImageRNG
from voidprompt.testing.fake_checkpoints import write_tiny_checkpoint

SIZE = 32  # pixels; the tiny VAE has two levels, so latents are 16 x 16


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    path = write_tiny_checkpoint(Path(tmp_path_factory.mktemp("img2img")) / "tiny.safetensors")
    return Engine(load_model(path))


@dataclasses.dataclass
class SamplerCall:
    x: torch.Tensor  # the latent the sampler starts from
    schedule: torch.Tensor  # sigmas (k-diffusion samplers) or timesteps (DDIM, PLMS, UniPC)


@pytest.fixture
def sampler_calls(monkeypatch: pytest.MonkeyPatch) -> list[SamplerCall]:
    """Record what every sampler function the engine runs receives."""
    calls: list[SamplerCall] = []
    real_resolve = engine_module.resolve

    def resolve(name: str, scheduler: str | None = None) -> Any:
        spec, sched = real_resolve(name, scheduler)
        inner = spec.function

        @functools.wraps(inner)  # keeps the signature: the runner inspects it for eta & co.
        def spy(model: Any, x: torch.Tensor, schedule: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            calls.append(SamplerCall(x.clone(), schedule.clone()))
            return inner(model, x, schedule, *args, **kwargs)

        return dataclasses.replace(spec, function=spy), sched

    monkeypatch.setattr(engine_module, "resolve", resolve)
    return calls


def init_image(seed: int = 0, size: tuple[int, int] = (SIZE, SIZE)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def request(**kw: Any) -> GenerationRequest:
    base: dict[str, Any] = dict(prompt="a red ball", seed=1234, steps=6, width=SIZE, height=SIZE)
    base.update(kw)
    if "init_images" not in base:
        base["init_images"] = (init_image(),)
    return GenerationRequest(**base)


@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2M"])
@pytest.mark.parametrize(("steps", "strength"), [(6, 0.75), (10, 0.3), (7, 1.0), (8, 0.999)])
def test_sigmas_are_a1111_slice_of_full_schedule(
    engine: Engine, sampler_calls: list[SamplerCall], sampler: str, steps: int, strength: float
) -> None:
    txt2img = request(sampler_name=sampler, steps=steps, init_images=())
    engine.generate(txt2img)
    full = sampler_calls.pop().schedule
    assert len(full) == steps + 1  # steps sigmas and the final 0

    engine.generate(txt2img.replace(init_images=(init_image(),), denoising_strength=strength))
    got = sampler_calls.pop().schedule
    t_enc = int(min(strength, 0.999) * steps)  # A1111 setup_img2img_steps
    expected = full[steps - t_enc - 1 :]
    # A1111 quirk: the slice keeps t_enc + 1 steps (t_enc + 2 sigmas with the final 0), one more than t_enc.
    assert len(got) == t_enc + 2
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_strength_zero_runs_one_step_at_smallest_sigma_with_noise(
    engine: Engine, sampler_calls: list[SamplerCall], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine.generate(request(init_images=(), steps=5))
    full = sampler_calls.pop().schedule
    unet_calls: list[torch.Size] = []
    real = engine._unet_eps

    def counting(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        unet_calls.append(x.shape)
        return real(x, t, context)

    monkeypatch.setattr(engine, "_unet_eps", counting)
    req = request(steps=5, denoising_strength=0.0)
    engine.generate(req)
    call = sampler_calls.pop()
    smallest = full[-2]
    torch.testing.assert_close(call.schedule, torch.stack([smallest, full[-1]]), rtol=0, atol=0)
    assert float(full[-1]) == 0.0 and float(smallest) > 0
    assert len(unet_calls) == 1  # one Euler step, cond and uncond in one batch

    # The start is the encoded image plus the seed's noise at that sigma (x = init + noise * sigma0).
    source = torch.from_numpy(np.asarray(init_image(), dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    init = encode_images(engine.components, source * 2 - 1, [req.seed])
    noise = ImageRNG((4, 16, 16), [req.seed]).next()
    torch.testing.assert_close(call.x, init + noise * smallest)


def test_initial_noise_multiplier_scales_the_noise(engine: Engine, sampler_calls: list[SamplerCall]) -> None:
    req = request(denoising_strength=0.5)
    engine.generate(req)
    plain = sampler_calls.pop()
    engine.generate(req.replace(initial_noise_multiplier=0.5))
    scaled = sampler_calls.pop()
    sigma0 = plain.schedule[0]
    # Both starts are init + noise * sigma0, the second with the noise halved.
    noise = ImageRNG((4, 16, 16), [req.seed]).next()
    torch.testing.assert_close(plain.x - scaled.x, 0.5 * noise * sigma0, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("steps", "strength"), [(20, 0.75), (10, 0.5), (8, 0.3)])
def test_ddim_starts_at_a1111_timestep(
    engine: Engine, sampler_calls: list[SamplerCall], steps: int, strength: float
) -> None:
    req = request(sampler_name="DDIM", steps=steps, denoising_strength=strength)
    engine.generate(req)
    call = sampler_calls.pop()
    t_enc = int(min(strength, 0.999) * steps)
    # A1111: timesteps = clip(range(0, 1000, 1000 // steps) + 1, 0, 999); run the first t_enc of them
    # (from the top down), starting from the image noised to timesteps[t_enc].
    timesteps = [min(max(t + 1, 0), 999) for t in range(0, 1000, 1000 // steps)]
    assert call.schedule.tolist() == timesteps[:t_enc]
    abar = engine.components.alphas_cumprod[timesteps[t_enc]]
    source = torch.from_numpy(np.asarray(init_image(), dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    init = encode_images(engine.components, source * 2 - 1, [req.seed])
    noise = ImageRNG((4, 16, 16), [req.seed]).next()
    torch.testing.assert_close(call.x, init * abar.sqrt() + noise * (1 - abar).sqrt())


def test_batch_of_two_equals_two_single_runs(engine: Engine) -> None:
    req = request(denoising_strength=0.6, batch_size=2)
    batch = engine.generate(req)
    assert batch.seeds == [1234, 1235]
    for index, seed in enumerate(batch.seeds):
        single = engine.generate(req.replace(batch_size=1, seed=seed))
        a = np.asarray(batch.images[index], dtype=np.int16)
        b = np.asarray(single.images[0], dtype=np.int16)
        # Batched and single convolutions may round differently in the last float bit.
        assert np.abs(a - b).max() <= 1
        assert (a == b).mean() > 0.99


def test_one_init_image_per_batch_entry(engine: Engine) -> None:
    images = (init_image(1), init_image(2))
    result = engine.generate(request(init_images=images, batch_size=2, denoising_strength=0.5))
    single = engine.generate(request(init_images=(images[1],), seed=1235, denoising_strength=0.5))
    a = np.asarray(result.images[1], dtype=np.int16)
    assert np.abs(a - np.asarray(single.images[0], dtype=np.int16)).max() <= 1


def test_more_images_than_batch_is_an_error(engine: Engine) -> None:
    with pytest.raises(InvalidRequestError, match="3 init images for batch_size=2"):
        engine.generate(request(init_images=(init_image(1), init_image(2), init_image(3)), batch_size=2))


def test_default_denoising_strength_and_infotext(engine: Engine) -> None:
    result = engine.generate(request(initial_noise_multiplier=0.9))
    assert "Denoising strength: 0.75" in result.infotexts[0]
    assert "Noise multiplier: 0.9" in result.infotexts[0]
    assert result.images[0].size == (SIZE, SIZE)


def test_latent_resize_mode_encodes_at_image_size_then_resizes_latent(
    engine: Engine, sampler_calls: list[SamplerCall]
) -> None:
    small = init_image(3, (16, 16))
    engine.generate(request(init_images=(small,), resize_mode=3, denoising_strength=0.5))
    assert sampler_calls.pop().x.shape == (1, 4, 16, 16)  # the 8x8 latent of a 16 px image, upscaled


def test_non_pil_init_image_is_rejected(engine: Engine) -> None:
    with pytest.raises(InvalidRequestError, match="pass PIL images"):
        engine.generate(request(init_images=(np.zeros((32, 32, 3)),)))


# -- resize modes (A1111 images.resize_image), geometry derived by hand ----------------------------


def test_resize_mode_0_just_resizes() -> None:
    out = resize_image(0, init_image(0, (40, 20)), 32, 32)
    assert out.size == (32, 32)
    assert np.array_equal(
        np.asarray(out), np.asarray(init_image(0, (40, 20)).resize((32, 32), Image.Resampling.LANCZOS))
    )


def test_resize_mode_1_crops_centre() -> None:
    # 64x32 source into 32x32: scale to cover (height 32 -> width 64), paste at x = 16 - 32 = -16.
    src = Image.new("RGB", (64, 32))
    src.paste((255, 0, 0), (0, 0, 16, 32))  # left quarter red: cropped away
    src.paste((0, 255, 0), (16, 0, 48, 32))  # middle half green: what remains
    out = np.asarray(resize_image(1, src, 32, 32))
    assert out.shape == (32, 32, 3)
    assert (out[:, 4:28, 1] == 255).all() and (out[:, 4:28, 0] == 0).all()


def test_resize_mode_2_fills_bands_with_stretched_edges() -> None:
    # 32x16 source into 32x32: fit width (32x16), pasted at y = 16 - 8 = 8; bands of 8 rows above/below.
    src = Image.new("RGB", (32, 16), (10, 20, 30))
    src.paste((200, 100, 50), (0, 0, 32, 1))  # a distinct top row
    src.paste((5, 250, 5), (0, 15, 32, 16))  # a distinct bottom row
    out = np.asarray(resize_image(2, src, 32, 32)).astype(int)
    middle = np.asarray(src.resize((32, 16), Image.Resampling.LANCZOS)).astype(int)
    assert np.array_equal(out[8:24], middle)
    # Every band row repeats one stretched edge row, coloured like that edge.
    assert (out[0:8] == out[0]).all() and (out[24:32] == out[24]).all()
    assert np.abs(out[0] - [200, 100, 50]).max() <= 30
    assert np.abs(out[24] - [5, 250, 5]).max() <= 30


@pytest.mark.parametrize(("steps", "strength"), [(6, 0.5), (5, 0.3), (4, 1.0)])
def test_img2img_fix_steps_runs_exactly_the_requested_steps(
    engine: Engine, sampler_calls: list[SamplerCall], steps: int, strength: float
) -> None:
    # A1111's img2img_fix_steps (setup_img2img_steps): the schedule has
    # int(steps / min(strength, 0.999)) entries and t_enc = steps - 1, so the slice
    # sigmas[schedule - t_enc - 1:] holds steps sigmas and the final 0: exactly `steps` steps.
    schedule = int(steps / min(strength, 0.999))
    engine.generate(request(sampler_name="Euler", steps=schedule, init_images=()))
    full = sampler_calls.pop().schedule
    fixed = request(sampler_name="Euler", steps=steps, denoising_strength=strength, img2img_fix_steps=True)
    engine.generate(fixed)
    got = sampler_calls.pop().schedule
    assert len(got) == steps + 1
    torch.testing.assert_close(got, full[schedule - (steps - 1) - 1 :], rtol=0, atol=0)
    # Without the option the same request runs int(strength * steps) + 1 steps of a `steps` schedule.
    engine.generate(request(sampler_name="Euler", steps=steps, denoising_strength=strength))
    assert len(sampler_calls.pop().schedule) == int(min(strength, 0.999) * steps) + 2
