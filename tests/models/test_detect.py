"""Family detection on full-size fake state dicts (meta tensors: no memory)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from voidprompt.errors import ModelLoadError, UnsupportedModelError
from voidprompt.models.detect import ModelFamily, detect_family, require_supported

FakeFull = Callable[[ModelFamily], dict[str, torch.Tensor]]


def _shapes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in sd.items()}


@pytest.mark.parametrize(
    "family,expected",
    [
        (ModelFamily.SD1, ModelFamily.SD1),
        (ModelFamily.SD1_INPAINT, ModelFamily.SD1_INPAINT),
        # eps vs v is undecidable from shapes: every SD2 file reports SD2_EPS ("eps or v").
        (ModelFamily.SD2_EPS, ModelFamily.SD2_EPS),
        (ModelFamily.SD2_V, ModelFamily.SD2_EPS),
        (ModelFamily.SDXL, ModelFamily.SDXL),
        (ModelFamily.SDXL_REFINER, ModelFamily.SDXL_REFINER),
        (ModelFamily.SDXL_INPAINT, ModelFamily.SDXL_INPAINT),
    ],
)
def test_detect_each_family(family: ModelFamily, expected: ModelFamily, fake_full: FakeFull) -> None:
    sd = fake_full(family)
    assert all(t.is_meta for t in sd.values())
    assert detect_family(_shapes(sd)) is expected


def test_fake_sd15_has_the_real_sd15_size(fake_full: FakeFull) -> None:
    # SD1.5: UNet 859,520,964 + VAE 83,653,863 + CLIP-L text 123,060,480 parameters
    # (diffusers' and transformers' published counts for the same modules).
    sd = fake_full(ModelFamily.SD1)
    count = {p: 0 for p in ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")}
    for key, t in sd.items():
        for p in count:
            if key.startswith(p) and not key.endswith("position_ids"):
                count[p] += t.numel()
    assert count == {
        "model.diffusion_model.": 859_520_964,
        "first_stage_model.": 83_653_863,
        "cond_stage_model.": 123_060_480,
    }


def test_key_facts_of_the_fake_layouts(fake_full: FakeFull) -> None:
    sd2 = fake_full(ModelFamily.SD2_EPS)
    assert sd2["model.diffusion_model.input_blocks.1.1.proj_in.weight"].shape == (320, 320)  # linear
    assert (
        sd2["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape[1] == 1024
    )
    xl = fake_full(ModelFamily.SDXL)
    assert xl["model.diffusion_model.label_emb.0.0.weight"].shape == (1280, 2816)
    inp = fake_full(ModelFamily.SD1_INPAINT)
    assert inp["model.diffusion_model.input_blocks.0.0.weight"].shape == (320, 9, 3, 3)


@pytest.mark.parametrize("family", [ModelFamily.SD2_EPS, ModelFamily.SD2_V])
def test_unsupported_families_raise(family: ModelFamily) -> None:
    with pytest.raises(UnsupportedModelError, match=r"detected SD2.*not supported yet"):
        require_supported(family, source="x.safetensors")


@pytest.mark.parametrize(
    "family",
    [
        ModelFamily.SD1,
        ModelFamily.SD1_INPAINT,
        ModelFamily.SDXL,
        ModelFamily.SDXL_REFINER,
        ModelFamily.SDXL_INPAINT,
    ],
)
def test_sd1_and_sdxl_families_are_supported(family: ModelFamily) -> None:
    require_supported(family, source="x")


def test_is_sdxl() -> None:
    assert {f for f in ModelFamily if f.is_sdxl} == {
        ModelFamily.SDXL,
        ModelFamily.SDXL_REFINER,
        ModelFamily.SDXL_INPAINT,
    }


def test_unknown_files_explain_what_they_look_like(fake_full: FakeFull) -> None:
    vae = {"encoder.down.0.block.0.conv1.weight": torch.Size([128, 128, 3, 3])}
    with pytest.raises(ModelLoadError, match="VAE file"):
        detect_family(vae)
    lora = {"lora_unet_down_blocks_0.lora_up.weight": torch.Size([320, 4])}
    with pytest.raises(ModelLoadError, match="LoRA"):
        detect_family(lora)
    odd = _shapes(fake_full(ModelFamily.SD1))
    odd["model.diffusion_model.input_blocks.0.0.weight"] = torch.Size([320, 5, 3, 3])
    with pytest.raises(ModelLoadError, match="5 input channels"):
        detect_family(odd)


def test_sdxl_variants_from_unet_shapes_alone(fake_full: FakeFull) -> None:
    # A UNet-only refiner (no text encoder keys) is told by its 1280-wide context.
    refiner = {
        k: v.shape for k, v in fake_full(ModelFamily.SDXL_REFINER).items() if not k.startswith("conditioner.")
    }
    assert detect_family(refiner) is ModelFamily.SDXL_REFINER
    base = {k: v.shape for k, v in fake_full(ModelFamily.SDXL).items() if not k.startswith("conditioner.")}
    assert detect_family(base) is ModelFamily.SDXL
    base["model.diffusion_model.input_blocks.0.0.weight"] = torch.Size([320, 8, 3, 3])
    with pytest.raises(ModelLoadError, match="SDXL checkpoint whose UNet takes 8 input channels"):
        detect_family(base)


def test_prediction_markers() -> None:
    from voidprompt.models.detect import detect_prediction

    assert detect_prediction(["model.diffusion_model.out.2.weight"]) == ("eps", False)
    assert detect_prediction(["v_pred"]) == ("v", False)
    assert detect_prediction(["v_pred", "ztsnr"]) == ("v", True)
