"""SDXL txt2img on the tiny SDXL file against diffusers' StableDiffusionXLPipeline, same modules.

The same documented differences as the SD1 comparison (test_vs_diffusers.py): diffusers interpolates
the schedule's sigma linearly in t where A1111 interpolates log sigma, and combines eps where A1111
combines x0. Beyond those the two must agree: both encoders' penultimate hidden states side by side,
bigG's pooled vector, the size numbers (original = target = the picture's size, crop 0, 0), CFG and
the Euler update. The traps on diffusers' side are avoided rather than matched: its negative prompt is
zeroed only when it is None or empty (ours is neither), its second tokenizer must pad with "!" (id 0)
as bigG's does, and its ``clip_skip`` would act on both encoders (left None here).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from engine_spies import sampled_latents

from voidprompt.models import load_model
from voidprompt.pipeline import engine as engine_module
from voidprompt.pipeline.engine import Engine
from voidprompt.request import GenerationRequest
from voidprompt.sampling.rng import ImageRNG
from voidprompt.testing.fake_checkpoints import write_tiny_sdxl_checkpoint

diffusers = pytest.importorskip("diffusers")

STEPS = 6
SEED = 977
SIZE = (64, 48)  # width, height: unequal, so a swapped size number would show
PROMPT = "a red circle on a blue background"
NEGATIVE = "lowres, blurry"


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    path = write_tiny_sdxl_checkpoint(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl.safetensors")
    return Engine(load_model(path))


def _pipeline(engine: Engine, tmp_path: Path) -> Any:
    from transformers import CLIPTokenizer

    from voidprompt.testing.hf_tokenizer import hf_clip_tokenizer, write_hf_clip_tokenizer_files

    c = engine.components
    scheduler = diffusers.EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="linspace",
    )
    # bigG pads with id 0, which is "!" in the CLIP vocabulary.
    tokenizer_2 = CLIPTokenizer.from_pretrained(
        str(write_hf_clip_tokenizer_files(tmp_path / "tok2")),
        local_files_only=True,
        pad_token="!",
        model_max_length=77,
    )
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=c.vae,
        text_encoder=c.text_encoder,
        text_encoder_2=c.text_encoder_2,
        tokenizer=hf_clip_tokenizer(tmp_path / "tok"),
        tokenizer_2=tokenizer_2,
        unet=c.unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_sdxl_euler_txt2img_matches_diffusers_up_to_the_schedule(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    width, height = SIZE
    request = GenerationRequest(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        seed=SEED,
        steps=STEPS,
        width=width,
        height=height,
        cfg_scale=6.0,
        sampler_name="Euler",
    )
    ours = sampled_latents(engine, request, monkeypatch)
    factor = engine_module.latent_factor(engine.components)
    noise = ImageRNG((4, height // factor, width // factor), [SEED]).first()
    pipe = _pipeline(engine, tmp_path)
    theirs = pipe(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        num_inference_steps=STEPS,
        guidance_scale=6.0,
        latents=noise.clone(),
        height=height,
        width=width,
        output_type="latent",
    ).images
    scale = theirs.abs().max()
    assert (ours - theirs).abs().max() <= 2e-4 * scale
    # Not a vacuous agreement: another picture size changes the size numbers, and the result.
    moved = pipe(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        num_inference_steps=STEPS,
        guidance_scale=6.0,
        latents=noise.clone(),
        height=height,
        width=width,
        original_size=(height * 2, width * 2),
        target_size=(height * 2, width * 2),
        output_type="latent",
    ).images
    assert (ours - moved).abs().max() > 100 * (ours - theirs).abs().max()
