"""What A1111 feeds an SDXL UNet besides the latent, seen at the UNet's door.

The size numbers (sd_models_xl.get_learned_conditioning): original size = target size = the pass's
picture size (height, width), crop from the sdxl_crop_top / sdxl_crop_left options; in hires fix's
second pass the upscaled size. The refiner takes original size, crop and an aesthetic score, the high
one for the prompt and the low one for the negative prompt. An empty negative prompt is zeroed, context
and pooled vector, but not its size numbers. Clip skip has no effect on SDXL unless "Clip skip SDXL" is
on, and the infotext writes it either way.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from voidprompt.errors import InvalidRequestError
from voidprompt.models import load_model
from voidprompt.pipeline.engine import Engine
from voidprompt.request import GenerationRequest
from voidprompt.sampling.registry import sampler_labels
from voidprompt.testing.fake_checkpoints import write_tiny_sdxl_checkpoint

BASE = GenerationRequest(
    prompt="a red circle", negative_prompt="blurry", seed=5, steps=2, width=48, height=32,
    sampler_name="Euler",
)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    path = write_tiny_sdxl_checkpoint(tmp_path_factory.mktemp("sdxl") / "base.safetensors")
    return Engine(load_model(path))


@pytest.fixture(scope="module")
def refiner(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    path = write_tiny_sdxl_checkpoint(tmp_path_factory.mktemp("sdxl") / "refiner.safetensors", refiner=True)
    return Engine(load_model(path))


class UNetCalls:
    """Every UNet call's context, pooled vector and size numbers."""

    def __init__(self, engine: Engine) -> None:
        self.calls: list[dict[str, torch.Tensor]] = []
        self.pooled_width = int(engine.components.text_encoder_2.config.projection_dim)

        def hook(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            added = kwargs["added_cond_kwargs"]
            self.calls.append(
                {
                    "context": kwargs["encoder_hidden_states"].detach().clone(),
                    "pooled": added["text_embeds"].detach().clone(),
                    "numbers": added["time_ids"].detach().clone(),
                    "latent": args[0].detach().clone(),
                }
            )

        self.handle = engine.components.unet.register_forward_pre_hook(hook, with_kwargs=True)

    def __enter__(self) -> UNetCalls:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


def _rows(values: list[float], n: int) -> torch.Tensor:
    return torch.tensor([values] * n)


def test_size_numbers_are_height_width_crop_height_width(base: Engine) -> None:
    with UNetCalls(base) as spy:
        base.generate(BASE.replace(sdxl_crop_top=16, sdxl_crop_left=8))
    assert len(spy.calls) == 2
    for call in spy.calls:
        # Rows: the prompt, then the negative prompt (A1111's cond-then-uncond batch).
        assert torch.equal(call["numbers"], _rows([32.0, 48.0, 16.0, 8.0, 32.0, 48.0], 2))


def test_hires_pass_carries_the_upscaled_size(base: Engine) -> None:
    request = BASE.replace(enable_hr=True, hr_scale=1.5, hr_upscaler="Latent", denoising_strength=0.6)
    with UNetCalls(base) as spy:
        base.generate(request)
    first = [c for c in spy.calls if c["latent"].shape[-2:] == spy.calls[0]["latent"].shape[-2:]]
    second = spy.calls[len(first) :]
    assert first and second
    assert all(torch.equal(c["numbers"], _rows([32.0, 48.0, 0.0, 0.0, 32.0, 48.0], 2)) for c in first)
    assert all(torch.equal(c["numbers"], _rows([48.0, 72.0, 0.0, 0.0, 48.0, 72.0], 2)) for c in second)


@pytest.mark.parametrize(("negative", "zeroed"), [("", True), (" ", False), ("[:blurry:0.5]", False)])
def test_an_empty_negative_prompt_is_zeroed_but_not_its_size(
    base: Engine, negative: str, zeroed: bool
) -> None:
    with UNetCalls(base) as spy:
        base.generate(BASE.replace(negative_prompt=negative))
    uncond = spy.calls[0]
    assert bool((uncond["context"][1] == 0).all()) == zeroed
    assert bool((uncond["pooled"][1] == 0).all()) == zeroed
    assert not (uncond["context"][0] == 0).all()
    assert torch.equal(uncond["numbers"][1], torch.tensor([32.0, 48.0, 0.0, 0.0, 32.0, 48.0]))


def test_refiner_numbers_carry_the_aesthetic_scores(refiner: Engine) -> None:
    assert refiner.components.text_encoder is None
    request = BASE.replace(sdxl_refiner_high_aesthetic_score=7.5, sdxl_refiner_low_aesthetic_score=1.5)
    with UNetCalls(refiner) as spy:
        result = refiner.generate(request)
    assert result.images
    for call in spy.calls:
        expected = torch.tensor([[32.0, 48.0, 0.0, 0.0, 7.5], [32.0, 48.0, 0.0, 0.0, 1.5]])
        assert torch.equal(call["numbers"], expected)
    defaults = BASE
    with UNetCalls(refiner) as spy:
        refiner.generate(defaults)
    assert spy.calls[0]["numbers"][:, -1].tolist() == [6.0, 2.5]  # A1111's defaults


def test_clip_skip_acts_only_with_clip_skip_sdxl(base: Engine) -> None:
    plain = base.generate(BASE)
    skip2 = base.generate(BASE.replace(clip_skip=2))
    assert plain.images[0].tobytes() == skip2.images[0].tobytes()
    assert "Clip skip: 2" in skip2.infotexts[0]
    # With the option, Clip skip 2 is the default layer and Clip skip 1 the last one.
    opt2 = base.generate(BASE.replace(clip_skip=2, sdxl_clip_l_skip=True))
    opt1 = base.generate(BASE.replace(clip_skip=1, sdxl_clip_l_skip=True))
    assert opt2.images[0].tobytes() == plain.images[0].tobytes()
    assert opt1.images[0].tobytes() != plain.images[0].tobytes()


def test_a_different_crop_changes_the_picture(base: Engine) -> None:
    a = base.generate(BASE)
    b = base.generate(BASE.replace(sdxl_crop_top=256))
    assert a.images[0].tobytes() != b.images[0].tobytes()


@pytest.fixture(scope="module")
def v_model(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    from voidprompt.testing.fake_checkpoints import tiny_sdxl_state_dict

    state = tiny_sdxl_state_dict()
    # NoobAI-XL V-Pred's markers (the reForge / later A1111 rule): v-prediction, zero terminal SNR.
    state["v_pred"] = torch.tensor([])
    state["ztsnr"] = torch.tensor([])
    path = tmp_path_factory.mktemp("sdxl") / "vpred.safetensors"
    return Engine(load_model(write_tiny_sdxl_checkpoint(path, state_dict=state)))


def test_a_v_prediction_ztsnr_file_samples_v_on_the_rescaled_schedule(
    v_model: Engine, base: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    from voidprompt.pipeline import engine as engine_module
    from voidprompt.sampling.denoiser import DiscreteVDenoiser

    components = v_model.components
    assert (components.prediction, components.zero_terminal_snr) == ("v", True)
    seen: list[Any] = []
    real = engine_module.run_sampler

    def spy(run: Any, model: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(model.schedule_model)
        return real(run, model, *args, **kwargs)

    monkeypatch.setattr(engine_module, "run_sampler", spy)
    result = v_model.generate(BASE.replace(steps=3))
    assert "Noise Schedule: Zero Terminal SNR" in result.infotexts[0]
    # v denoiser, on the rescaled schedule: its top sigma is the stand-in's ~4519, not SD1's 14.6.
    assert isinstance(seen[0], DiscreteVDenoiser)
    assert 4500 < float(seen[0].sigma_max) < 4530
    # Same weights, eps and the default schedule: a different picture.
    assert result.images[0].tobytes() != base.generate(BASE.replace(steps=3)).images[0].tobytes()
    with pytest.raises(InvalidRequestError, match="LCM sampler needs an eps-prediction model"):
        v_model.generate(BASE.replace(sampler_name="LCM"))


@pytest.mark.parametrize("sampler", sampler_labels())
def test_every_sampler_runs_on_sdxl(base: Engine, sampler: str) -> None:
    request = BASE.replace(sampler_name=sampler, steps=3, width=16, height=16, seed=11)
    with UNetCalls(base) as spy:
        result = base.generate(request)
    assert result.images[0].size == (16, 16)
    # Every UNet call got the vector conditioning: the pooled part and this size's numbers.
    assert spy.calls and all(
        torch.equal(c["numbers"][0], torch.tensor([16.0, 16.0, 0.0, 0.0, 16.0, 16.0])) for c in spy.calls
    )
    assert all(torch.isfinite(c["pooled"]).all() for c in spy.calls)


def test_img2img_and_an_sdxl_inpainting_model(base: Engine, tmp_path_factory: pytest.TempPathFactory) -> None:
    import numpy as np
    from PIL import Image

    init = Image.fromarray((np.random.default_rng(0).random((32, 48, 3)) * 255).astype(np.uint8))
    mask = Image.new("L", (48, 32), 0)
    mask.paste(255, (8, 8, 40, 24))
    request = BASE.replace(init_images=(init,), denoising_strength=0.6, steps=3)
    with UNetCalls(base) as spy:
        result = base.generate(request)
    # img2img at 0.6 of 3 steps runs the last 2 (A1111's t_enc = int(0.6 * 3) = 1 + 1 calls).
    assert result.images[0].size == (48, 32) and len(spy.calls) == 2
    path = tmp_path_factory.mktemp("sdxl") / "inpaint.safetensors"
    inpaint = Engine(load_model(write_tiny_sdxl_checkpoint(path, inpainting=True)))
    assert inpaint.components.is_inpainting
    with UNetCalls(inpaint) as spy:
        result = inpaint.generate(request.replace(mask=mask, mask_blur_x=0, mask_blur_y=0))
    # 4 latent channels + mask + masked-image latents go in; outside the mask the picture is kept.
    assert spy.calls[0]["latent"].shape[1] == 9
    kept = np.asarray(result.images[0])[:2, :2].astype(int)
    assert np.array_equal(kept, np.asarray(init)[:2, :2].astype(int))


def test_variation_seeds_on_sdxl(base: Engine) -> None:
    # Euler draws no noise after the first, so the slerp's ends are plain generations: strength 0
    # is the seed's picture, strength 1 the variation seed's.
    plain = BASE.replace(steps=3)
    seed_only = base.generate(plain).images[0].tobytes()
    subseed_only = base.generate(plain.replace(seed=77)).images[0].tobytes()
    assert base.generate(plain.replace(subseed=77, subseed_strength=0.0)).images[0].tobytes() == seed_only
    assert base.generate(plain.replace(subseed=77, subseed_strength=1.0)).images[0].tobytes() == subseed_only
    half = base.generate(plain.replace(subseed=77, subseed_strength=0.5))
    assert half.images[0].tobytes() not in (seed_only, subseed_only)
    assert "Variation seed: 77, Variation seed strength: 0.5" in half.infotexts[0]
