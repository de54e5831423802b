"""Key conversion, checked against diffusers' own LDM converters as an independent oracle."""

from __future__ import annotations

import pytest
import torch

from voidprompt.models.arch import ArchConstants, infer_arch
from voidprompt.models.convert import (
    POSITION_IDS_KEY,
    CheckpointKeyMap,
    compvis_to_modules,
    modules_to_compvis,
)
from voidprompt.testing.fake_checkpoints import TINY_ARCH, TINY_CONSTANTS


def test_arch_inferred_from_tiny_shapes(tiny_sd: dict[str, torch.Tensor]) -> None:
    arch = infer_arch({k: v.shape for k, v in tiny_sd.items()}, TINY_CONSTANTS)
    assert arch == TINY_ARCH


def test_sd15_config_values() -> None:
    from voidprompt.models.detect import ModelFamily
    from voidprompt.testing.fake_checkpoints import fake_full_state_dict

    arch = infer_arch({k: v.shape for k, v in fake_full_state_dict(ModelFamily.SD1).items()})
    cfg = arch.unet_config()
    assert cfg["block_out_channels"] == (320, 640, 1280, 1280)
    assert cfg["down_block_types"] == ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    assert cfg["up_block_types"] == ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    assert (cfg["layers_per_block"], cfg["attention_head_dim"], cfg["cross_attention_dim"]) == (2, 8, 768)
    clip = arch.clip_config()
    assert (clip["hidden_size"], clip["num_hidden_layers"], clip["num_attention_heads"]) == (768, 12, 12)
    assert (clip["intermediate_size"], clip["hidden_act"]) == (3072, "quick_gelu")
    assert arch.vae_config()["block_out_channels"] == (128, 256, 512, 512)


def test_round_trip_is_exact(tiny_modules: tuple, tiny_sd: dict[str, torch.Tensor]) -> None:
    unet, vae, te = tiny_modules
    conv = compvis_to_modules(tiny_sd, unet, vae, te)
    assert sorted(conv.unused) == sorted(
        [POSITION_IDS_KEY, "alphas_cumprod", "betas", "model_ema.decay", "model_ema.num_updates"]
    )
    for module, sd in ((unet, conv.unet), (vae, conv.vae), (te, conv.text_encoder)):
        ref = module.state_dict()
        assert set(sd) == set(ref)
        for key in ref:
            assert torch.equal(sd[key], ref[key]), key
    back = modules_to_compvis(unet, vae, te)
    assert set(back) == set(tiny_sd) - {"alphas_cumprod", "betas", "model_ema.decay", "model_ema.num_updates"}


def test_matches_diffusers_ldm_converters(tiny_modules: tuple, tiny_sd: dict[str, torch.Tensor]) -> None:
    # diffusers' converters are an independent implementation of the same key mapping.
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    unet, vae, te = tiny_modules
    ours = compvis_to_modules(tiny_sd, unet, vae, te)
    theirs_unet = convert_ldm_unet_checkpoint(dict(tiny_sd), dict(unet.config))
    theirs_vae = convert_ldm_vae_checkpoint(dict(tiny_sd), dict(vae.config))
    for mine, theirs in ((ours.unet, theirs_unet), (ours.vae, theirs_vae)):
        assert set(mine) == set(theirs)
        for key in mine:
            assert torch.equal(mine[key], theirs[key].reshape(mine[key].shape)), key
            assert mine[key].shape == theirs[key].shape or mine[key].numel() == theirs[key].numel()


def test_old_transformers_clip_prefix_is_understood(tiny_modules: tuple) -> None:
    keymap = CheckpointKeyMap(*tiny_modules)
    new = keymap.target("cond_stage_model.transformer.text_model.final_layer_norm.weight")
    old = keymap.target("cond_stage_model.transformer.final_layer_norm.weight")
    assert new is not None and new == old


def test_arch_metadata_overrides() -> None:
    meta = TINY_CONSTANTS.to_metadata()
    assert ArchConstants.from_metadata(meta) == TINY_CONSTANTS
    assert ArchConstants.from_metadata({}) == ArchConstants()
    assert ArchConstants().to_metadata() == {}


@pytest.mark.parametrize(
    "raw,match",
    [
        ('{"unet_head": 4}', "unknown key 'unet_head'"),
        ('{"unet_heads": "4"}', "expected a int"),
        ("[1]", "JSON object"),
        ("{", "not valid JSON"),
    ],
)
def test_bad_arch_metadata(raw: str, match: str) -> None:
    from voidprompt.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match=match):
        ArchConstants.from_metadata({"voidprompt.arch": raw}, source="m.safetensors")
