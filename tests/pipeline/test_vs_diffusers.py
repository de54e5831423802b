"""Our Euler txt2img against diffusers' StableDiffusionPipeline, same modules, same initial latent.

diffusers is an independent implementation of the same maths. With EulerDiscreteScheduler and
``timestep_spacing="linspace"`` the two should agree up to these documented differences:

1. Schedule interpolation: A1111 (and we) place the n sigmas at t = linspace(999, 0, n) and
   interpolate *log sigma* between the integer timesteps; diffusers interpolates *sigma* linearly in t.
   At fractional t the sigmas differ by up to ~1.5e-5 relative (python-sd-stack.md 1c.1).
2. diffusers runs the UNet on [uncond, cond] and combines eps; A1111 runs [cond, uncond] and combines
   the denoised x0. Both are the same linear map (x0 = x - sigma * eps), so only float rounding differs.
3. diffusers applies ``clip_skip`` to the positive prompt only: its negative prompt always comes from
   the last layer. A1111 applies Clip skip to both. For clip skip 2 the test therefore hands diffusers
   both embeddings, computed by hand here (penultimate hidden state, then the final layer norm).
4. Nothing else: tokens (pad = EOS, 77), position ids, the penultimate-layer clip skip with the final
   layer norm (A1111 "Clip skip 2" = diffusers ``clip_skip=1``), CFG, the Euler update and the VAE
   scaling all coincide. "Original" emphasis with all weights 1 is an exact no-op (mean / mean = 1).

So: with diffusers' own sigmas substituted into our sampler the latents agree to float rounding; with
our schedule they agree to the size of difference 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from engine_spies import sampled_latents

from voidprompt.pipeline import engine as engine_module
from voidprompt.pipeline.engine import Engine
from voidprompt.request import GenerationRequest
from voidprompt.sampling.rng import ImageRNG

diffusers = pytest.importorskip("diffusers")

STEPS = 8
SEED = 4321
NEGATIVE = "lowres, bad anatomy, watermark"


def _diffusers_pipeline(engine: Engine, tmp_path: Path) -> Any:
    from voidprompt.testing.hf_tokenizer import hf_clip_tokenizer

    c = engine.components
    scheduler = diffusers.EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="linspace",
    )
    pipe = diffusers.StableDiffusionPipeline(
        vae=c.vae,
        text_encoder=c.text_encoder,
        tokenizer=hf_clip_tokenizer(tmp_path / "tok"),
        unet=c.unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def _penultimate_embeds(pipe: Any, text: str) -> torch.Tensor:
    ids = pipe.tokenizer(text, padding="max_length", max_length=77, return_tensors="pt").input_ids
    hidden = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
    return pipe.text_encoder.final_layer_norm(hidden)  # type: ignore[no-any-return]


def _their_latents(pipe: Any, noise: torch.Tensor, clip_skip: int) -> torch.Tensor:
    # diffusers multiplies the given latents by init_noise_sigma (= sigma_max for linspace), as we do.
    texts: dict[str, Any] = {"prompt": "", "negative_prompt": NEGATIVE}
    if clip_skip == 2:
        texts = {
            "prompt_embeds": _penultimate_embeds(pipe, ""),
            "negative_prompt_embeds": _penultimate_embeds(pipe, NEGATIVE),
        }
    out = pipe(
        **texts,
        num_inference_steps=STEPS,
        guidance_scale=7.0,
        latents=noise.clone(),
        height=64,
        width=64,
        output_type="latent",
    )
    return out.images  # type: ignore[no-any-return]


@pytest.fixture()
def setup(tiny_engine: Engine, tmp_path: Path) -> tuple[Engine, Any, torch.Tensor]:
    pipe = _diffusers_pipeline(tiny_engine, tmp_path)
    factor = engine_module.latent_factor(tiny_engine.components)
    noise = ImageRNG((4, 64 // factor, 64 // factor), [SEED]).first()
    return tiny_engine, pipe, noise


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_euler_txt2img_matches_diffusers_up_to_the_schedule(
    setup: tuple[Engine, Any, torch.Tensor], monkeypatch: pytest.MonkeyPatch, clip_skip: int
) -> None:
    engine, pipe, noise = setup
    request = GenerationRequest(
        prompt="",
        negative_prompt=NEGATIVE,
        seed=SEED,
        steps=STEPS,
        width=64,
        height=64,
        cfg_scale=7.0,
        sampler_name="Euler",
        clip_skip=clip_skip,
    )
    ours = sampled_latents(engine, request, monkeypatch)
    theirs = _their_latents(pipe, noise, clip_skip)
    scale = theirs.abs().max()
    # Difference 1 only: the log-sigma vs linear-sigma interpolation of the schedule.
    assert (ours - theirs).abs().max() <= 2e-4 * scale
    # The schedules themselves differ by that documented amount, and no more.
    our_sigmas = engine_module.DiscreteEpsDenoiser(
        engine._unet_eps, engine.components.alphas_cumprod
    ).get_sigmas(STEPS)
    pipe.scheduler.set_timesteps(STEPS)
    their_sigmas = pipe.scheduler.sigmas.float()
    relative = ((our_sigmas[:-1] - their_sigmas[:-1]) / their_sigmas[:-1]).abs()
    assert relative.max() < 2e-5
    assert relative.max() > 0  # they really do differ: this test would catch a silent switch


def test_with_diffusers_sigmas_the_trajectories_coincide(
    setup: tuple[Engine, Any, torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, pipe, noise = setup
    pipe.scheduler.set_timesteps(STEPS)
    their_sigmas = pipe.scheduler.sigmas.float().clone()
    from voidprompt.pipeline import run_sampler

    monkeypatch.setattr(run_sampler, "compute_sigmas", lambda *a, **k: their_sigmas.clone())
    request = GenerationRequest(
        prompt="",
        negative_prompt=NEGATIVE,
        seed=SEED,
        steps=STEPS,
        width=64,
        height=64,
        cfg_scale=7.0,
        sampler_name="Euler",
        clip_skip=2,
    )
    ours = sampled_latents(engine, request, monkeypatch)
    theirs = _their_latents(pipe, noise, 2)
    assert (ours - theirs).abs().max() <= 2e-5 * theirs.abs().max()
