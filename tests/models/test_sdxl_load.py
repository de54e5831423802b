"""SDXL loading: the tiny SDXL files load exactly and round-trip; the full-size key sets agree with
diffusers' own single-file converters; the bigG conversion agrees with an open_clip forward written
here from the raw tensors."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from voidprompt.errors import ModelLoadError
from voidprompt.models import ModelFamily, load_model
from voidprompt.models.arch import ArchConstants
from voidprompt.models.arch_sdxl import SDXL_DEFAULTS, SDXLArch, infer_sdxl_arch
from voidprompt.models.convert_sdxl import (
    SDXL_POSITION_IDS_KEY,
    sdxl_checkpoint_to_modules,
    sdxl_key_map,
    sdxl_modules_to_checkpoint,
)
from voidprompt.models.detect import detect_family, detect_prediction
from voidprompt.models.load import sd1_alphas_cumprod
from voidprompt.testing.fake_checkpoints import (
    TINY_SDXL_CONSTANTS,
    tiny_sdxl_arch,
    tiny_sdxl_modules,
    tiny_sdxl_state_dict,
    tiny_vae_state_dict,
    write_tiny_sdxl_checkpoint,
)

VARIANTS = {
    "base": {},
    "refiner": {"refiner": True},
    "inpaint": {"inpainting": True},
}
LOGIT_SCALE = {
    "base": "conditioner.embedders.1.model.logit_scale",
    "refiner": "conditioner.embedders.0.model.logit_scale",
    "inpaint": "conditioner.embedders.1.model.logit_scale",
}
FAMILY = {"base": ModelFamily.SDXL, "refiner": ModelFamily.SDXL_REFINER, "inpaint": ModelFamily.SDXL_INPAINT}


class TinyXL:
    """The tiny SDXL variants, each built once per module: (state dict, modules)."""

    def __init__(self) -> None:
        self._made: dict[str, tuple[dict[str, torch.Tensor], tuple[Any, ...]]] = {}

    def __call__(self, variant: str) -> tuple[dict[str, torch.Tensor], tuple[Any, ...]]:
        if variant not in self._made:
            kw = VARIANTS[variant]
            self._made[variant] = (tiny_sdxl_state_dict(0, **kw), tiny_sdxl_modules(0, **kw))
        return self._made[variant]


@pytest.fixture(scope="module")
def tiny_xl() -> TinyXL:
    return TinyXL()


@pytest.fixture
def full_xl(fake_full: Any) -> Any:
    return fake_full


def _shapes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in sd.items()}


def _states(modules: tuple[Any, ...]) -> list[dict[str, torch.Tensor] | None]:
    return [None if m is None else m.state_dict() for m in modules]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tiny_sdxl_arch_is_read_back_from_shapes(variant: str, tiny_xl: TinyXL) -> None:
    sd, _ = tiny_xl(variant)
    shapes = _shapes(sd)
    assert detect_family(shapes) is FAMILY[variant]
    assert infer_sdxl_arch(shapes, TINY_SDXL_CONSTANTS) == tiny_sdxl_arch(**VARIANTS[variant])


def test_tiny_sdxl_unet_config() -> None:
    cfg = tiny_sdxl_arch().unet_config()
    # Head width 16 (the tiny constant): levels 32 and 64 wide have 2 and 4 heads.
    assert cfg["attention_head_dim"] == (2, 4)
    assert cfg["down_block_types"] == ("DownBlock2D", "CrossAttnDownBlock2D")
    assert cfg["up_block_types"] == ("CrossAttnUpBlock2D", "UpBlock2D")
    assert cfg["transformer_layers_per_block"] == (1, 2)
    assert cfg["cross_attention_dim"] == 64 and cfg["use_linear_projection"] is True
    assert (cfg["addition_embed_type"], cfg["addition_time_embed_dim"]) == ("text_time", 256)
    assert cfg["projection_class_embeddings_input_dim"] == 32 + 6 * 256
    assert tiny_sdxl_arch(refiner=True).unet_config()["projection_class_embeddings_input_dim"] == 32 + 5 * 256


@pytest.mark.parametrize(
    "family,heads,depth,adm,context",
    [
        # sgm's sd_xl_base.yaml: num_head_channels 64, transformer_depth [0, 2, 10], adm 2816
        (ModelFamily.SDXL, (5, 10, 20), (1, 2, 10), 2816, 2048),
        # sd_xl_refiner.yaml: model_channels 384, depth 4 at levels 1-2 and in the middle, adm 2560
        (ModelFamily.SDXL_REFINER, (6, 12, 24, 24), (1, 4, 4, 4), 2560, 1280),
    ],
)
def test_full_size_sdxl_configs(
    family: ModelFamily, heads: tuple[int, ...], depth: tuple[int, ...], adm: int, context: int, full_xl: Any
) -> None:
    arch = infer_sdxl_arch(_shapes(full_xl(family)))
    cfg = arch.unet_config()
    assert cfg["attention_head_dim"] == heads
    assert cfg["transformer_layers_per_block"] == depth
    assert cfg["projection_class_embeddings_input_dim"] == adm
    assert cfg["cross_attention_dim"] == context
    assert arch.constants == SDXL_DEFAULTS and arch.vae_config()["scaling_factor"] == 0.13025
    g = arch.clip_g_config()
    assert (g["hidden_size"], g["num_hidden_layers"], g["num_attention_heads"]) == (1280, 32, 20)
    assert (g["intermediate_size"], g["projection_dim"], g["hidden_act"]) == (5120, 1280, "gelu")
    if family is ModelFamily.SDXL:
        assert arch.clip_l is not None and arch.clip_l.num_layers == 12
    else:
        assert arch.clip_l is None and arch.is_refiner


def test_full_size_sdxl_has_the_published_parameter_counts(full_xl: Any) -> None:
    # diffusers' SDXL base UNet 2,567,463,684; VAE 83,653,863; CLIP ViT-L text 123,060,480;
    # OpenCLIP ViT-bigG text with projection 694,659,840 (the published model sizes).
    sd = full_xl(ModelFamily.SDXL)
    prefixes = {
        "model.diffusion_model.": 2_567_463_684,
        "first_stage_model.": 83_653_863,
        "conditioner.embedders.0.transformer.": 123_060_480,
        "conditioner.embedders.1.model.": 694_659_840,
    }
    counts = dict.fromkeys(prefixes, 0)
    for key, t in sd.items():
        if key.endswith(("position_ids", "logit_scale")):
            continue
        counts[next(p for p in prefixes if key.startswith(p))] += t.numel()
    assert counts == prefixes


@pytest.mark.parametrize(
    "variant,fmt",
    [("base", "safetensors"), ("base", "ckpt"), ("refiner", "safetensors"), ("inpaint", "ckpt")],
)
def test_tiny_sdxl_file_loads_exactly_and_round_trips(
    tmp_path: Path, fmt: str, variant: str, stub_tokenizer: object, tiny_xl: TinyXL
) -> None:
    sd, source_modules = tiny_xl(variant)
    path = write_tiny_sdxl_checkpoint(tmp_path / f"tiny.{fmt}", fmt=fmt, state_dict=sd)  # type: ignore[arg-type]
    c = load_model(path, tokenizer=stub_tokenizer)
    assert c.family is FAMILY[variant] and c.family.is_sdxl
    assert c.is_inpainting is (variant == "inpaint")
    assert isinstance(c.arch, SDXLArch) and c.arch.constants == TINY_SDXL_CONSTANTS
    # Every key accounted for: all module tensors (and CLIP-L's position_ids) consumed, logit_scale ignored.
    assert c.report.unused == [] and c.report.missing == []
    assert c.report.ignored == [LOGIT_SCALE[variant]]
    assert c.report.consumed == len(sd) - 1
    assert c.report.position_ids_damage is None
    assert (c.text_encoder is None) is (variant == "refiner")
    assert type(c.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert c.scaling_factor == 0.13025 and c.vae.config.scaling_factor == 0.13025
    assert (c.prediction, c.zero_terminal_snr) == ("eps", False)
    assert torch.equal(c.alphas_cumprod, sd1_alphas_cumprod())
    # The loaded modules hold exactly the source modules' tensors ...
    source = _states(source_modules)
    loaded = _states((c.unet, c.vae, c.text_encoder, c.text_encoder_2))
    for want, got in zip(source, loaded, strict=True):
        assert (want is None) == (got is None)
        if want is not None and got is not None:
            assert set(want) == set(got)
            for key in want:
                assert torch.equal(want[key], got[key]), key
                assert not got[key].is_meta
    # Each of bigG's q, k, v projections owns its storage (no views into the fused in_proj tensor).
    attn = c.text_encoder_2.text_model.encoder.layers[0].self_attn
    pointers = {p.weight.untyped_storage().data_ptr() for p in (attn.q_proj, attn.k_proj, attn.v_proj)}
    assert len(pointers) == 3
    assert attn.q_proj.weight.untyped_storage().nbytes() == attn.q_proj.weight.nbytes
    # ... and the reverse conversion gives back the file's tensors.
    back = sdxl_modules_to_checkpoint(c.unet, c.vae, c.text_encoder, c.text_encoder_2)
    assert set(back) == set(sd) - {LOGIT_SCALE[variant]}
    for key, value in back.items():
        assert value.dtype == sd[key].dtype and torch.equal(value, sd[key]), key


def test_sdxl_without_metadata_uses_the_sdxl_defaults() -> None:
    assert ArchConstants.from_metadata({}, defaults=SDXL_DEFAULTS) == SDXL_DEFAULTS
    assert SDXL_DEFAULTS.scaling_factor == 0.13025 and SDXL_DEFAULTS.vae_sample_size == 1024
    meta = TINY_SDXL_CONSTANTS.to_metadata(SDXL_DEFAULTS)
    assert ArchConstants.from_metadata(meta, defaults=SDXL_DEFAULTS) == TINY_SDXL_CONSTANTS
    # Relative to SD1's defaults the same metadata means something else: the family decides.
    assert ArchConstants.from_metadata(meta).scaling_factor == 0.18215
    # SD1 files are unaffected by the new keys.
    assert ArchConstants().to_metadata() == {}


@pytest.mark.parametrize(
    "markers,expected",
    [
        ((), ("eps", False)),
        (("v_pred",), ("v", False)),
        (("v_pred", "ztsnr"), ("v", True)),
        (("ztsnr",), ("eps", True)),
    ],
)
def test_v_prediction_markers(
    tmp_path: Path,
    markers: tuple[str, ...],
    expected: tuple[str, bool],
    stub_tokenizer: object,
    tiny_xl: TinyXL,
) -> None:
    sd = dict(tiny_xl("base")[0])
    for key in markers:
        sd[key] = torch.tensor([])  # the marker's presence is the information, not its value
    assert detect_prediction(sd) == expected
    c = load_model(
        write_tiny_sdxl_checkpoint(tmp_path / "v.safetensors", state_dict=sd), tokenizer=stub_tokenizer
    )
    assert (c.prediction, c.zero_terminal_snr) == expected
    assert c.report.unused == [] and c.report.consumed == len(sd) - 1


def test_stored_schedule_is_ignored_for_sdxl(tmp_path: Path, stub_tokenizer: object, tiny_xl: TinyXL) -> None:
    # A1111 always computes SDXL's schedule (sgm's LegacyDDPMDiscretization); a stored one is not used.
    sd = dict(tiny_xl("base")[0])
    sd["alphas_cumprod"] = torch.linspace(0.99, 0.01, 1000)
    c = load_model(
        write_tiny_sdxl_checkpoint(tmp_path / "s.safetensors", state_dict=sd), tokenizer=stub_tokenizer
    )
    assert torch.equal(c.alphas_cumprod, sd1_alphas_cumprod())
    assert "alphas_cumprod" in c.report.ignored


def test_sdxl_schedule_is_the_scaled_linear_one() -> None:
    # sgm LegacyDDPMDiscretization: betas = linspace(sqrt(0.00085), sqrt(0.012), 1000) ** 2.
    alphas = sd1_alphas_cumprod().to(torch.float64)
    betas = [
        (math.sqrt(0.00085) + (math.sqrt(0.012) - math.sqrt(0.00085)) * i / 999) ** 2 for i in range(1000)
    ]
    assert math.isclose(alphas[0].item(), 1 - betas[0], rel_tol=1e-6)
    assert math.isclose(alphas[-1].item(), math.prod(1 - b for b in betas), rel_tol=1e-5)


def test_external_vae_on_sdxl(tmp_path: Path, stub_tokenizer: object, tiny_xl: TinyXL) -> None:
    model = write_tiny_sdxl_checkpoint(tmp_path / "xl.safetensors", state_dict=tiny_xl("base")[0])
    vae_sd = tiny_vae_state_dict(seed=3)
    from safetensors.torch import save_file

    save_file(vae_sd, str(tmp_path / "xl.vae.safetensors"))
    c = load_model(model, tokenizer=stub_tokenizer)  # paired by name, as A1111 does
    assert c.vae_info is not None and c.vae_info.paired
    from voidprompt.models.convert import vae_module_to_compvis

    got = vae_module_to_compvis(c.vae)
    assert all(torch.equal(got[k], vae_sd[k]) for k in vae_sd)
    assert c.scaling_factor == 0.13025
    bad = {k: v for k, v in vae_sd.items() if "decoder" not in k}
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ModelLoadError, match="Use an SDXL VAE file"):
        load_model(model, vae_path=tmp_path / "bad.safetensors", tokenizer=stub_tokenizer)


def test_incomplete_sdxl_file_names_missing_tensors(tmp_path: Path, tiny_xl: TinyXL) -> None:
    sd = dict(tiny_xl("base")[0])
    del sd["conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_bias"]
    with pytest.raises(ModelLoadError, match=r"lacks 3 model tensors.*text_encoder_2\.text_model"):
        load_model(write_tiny_sdxl_checkpoint(tmp_path / "m.safetensors", state_dict=sd))


def test_distilled_unet_layout_is_refused(tiny_xl: TinyXL) -> None:
    shapes = _shapes(tiny_xl("base")[0])
    extra = "model.diffusion_model.output_blocks.0.1.transformer_blocks.2.attn1.to_q.weight"
    shapes[extra] = torch.Size([64, 64])
    with pytest.raises(ModelLoadError, match=r"output block 0 has 3 transformer blocks.*not supported"):
        infer_sdxl_arch(shapes, TINY_SDXL_CONSTANTS)


# --- diffusers' single-file converters as the oracle -------------------------------------------------


def _original_config(family: ModelFamily) -> dict[str, Any]:
    """sgm's model yaml, the parts diffusers' config builders read (values from sd_xl_base.yaml and
    sd_xl_refiner.yaml)."""
    if family is ModelFamily.SDXL_REFINER:
        net = {
            "adm_in_channels": 2560,
            "model_channels": 384,
            "channel_mult": [1, 2, 4, 4],
            "transformer_depth": 4,
            "context_dim": [1280, 1280, 1280, 1280],
        }
    else:
        net = {
            "adm_in_channels": 2816,
            "model_channels": 320,
            "channel_mult": [1, 2, 4],
            "transformer_depth": [1, 2, 10],
            "context_dim": 2048,
        }
    net |= {
        "num_classes": "sequential",
        "in_channels": 9 if family is ModelFamily.SDXL_INPAINT else 4,
        "out_channels": 4,
        "attention_resolutions": [4, 2],
        "num_res_blocks": 2,
        "num_head_channels": 64,
        "use_linear_in_transformer": True,
    }
    ddconfig = {
        "ch": 128,
        "ch_mult": [1, 2, 4, 4],
        "num_res_blocks": 2,
        "in_channels": 3,
        "out_ch": 3,
        "z_channels": 4,
    }
    return {
        "model": {
            "params": {
                "network_config": {"params": net},
                "first_stage_config": {"params": {"ddconfig": ddconfig}},
                "scale_factor": 0.13025,
            }
        }
    }


# CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 text towers as published (openai/clip-vit-large-patch14,
# laion/CLIP-ViT-bigG-14-laion2B-39B-b160k), written out here rather than read from voidprompt.
CLIP_L = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}
CLIP_G = {
    "vocab_size": 49408,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}


def _diffusers_convert(
    checkpoint: dict[str, torch.Tensor], unet_cfg: dict[str, Any], vae_cfg: dict[str, Any], refiner: bool
) -> dict[str, dict[str, torch.Tensor]]:
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    out = {
        "unet": convert_ldm_unet_checkpoint(dict(checkpoint), unet_cfg),
        "vae": convert_ldm_vae_checkpoint(dict(checkpoint), vae_cfg),
        "text_encoder": {},
    }
    if not refiner:
        # transformers >= 5.6 flattened CLIPTextModel (diffusers' own loader strips the level the same way);
        # position_ids is a non-persistent buffer that diffusers' loader drops as unexpected.
        clip = convert_ldm_clip_checkpoint(dict(checkpoint))
        out["text_encoder"] = {
            k.removeprefix("text_model."): v for k, v in clip.items() if not k.endswith("position_ids")
        }
    return out


def _strict_meta_load(module: Any, state: dict[str, torch.Tensor]) -> None:
    module.load_state_dict(state, strict=True, assign=True)


@pytest.mark.parametrize(
    "family",
    [
        ModelFamily.SDXL,
        pytest.param(ModelFamily.SDXL_REFINER, marks=pytest.mark.slow),
        pytest.param(ModelFamily.SDXL_INPAINT, marks=pytest.mark.slow),
    ],
)
def test_full_size_keys_agree_with_diffusers_single_file_converters(
    family: ModelFamily, full_xl: Any
) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_open_clip_checkpoint,
        create_unet_diffusers_config_from_ldm,
        create_vae_diffusers_config_from_ldm,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    checkpoint = full_xl(family)
    refiner = family is ModelFamily.SDXL_REFINER
    original = _original_config(family)
    unet_cfg = create_unet_diffusers_config_from_ldm(original, checkpoint)
    vae_cfg = create_vae_diffusers_config_from_ldm(original, checkpoint)
    theirs = _diffusers_convert(checkpoint, unet_cfg, vae_cfg, refiner)
    with torch.device("meta"):
        modules: dict[str, Any] = {
            "unet": UNet2DConditionModel(**unet_cfg),
            "vae": AutoencoderKL(**vae_cfg),
            "text_encoder": None if refiner else CLIPTextModel(CLIPTextConfig(**CLIP_L)),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G)),
        }
    prefix = "conditioner.embedders.0.model." if refiner else "conditioner.embedders.1.model."
    theirs["text_encoder_2"] = convert_open_clip_checkpoint(
        modules["text_encoder_2"], checkpoint, prefix=prefix
    )
    # The oracle: diffusers' conversion fills every tensor of the published architectures, and only them.
    for name, module in modules.items():
        if module is not None:
            _strict_meta_load(module, theirs[name])

    # voidprompt builds the same networks from the shapes alone (they take the oracle's tensors) ...
    ours_modules = infer_sdxl_arch(_shapes(checkpoint)).build(device="meta")
    for name, module in zip(modules, ours_modules, strict=True):
        assert (module is None) is (modules[name] is None)
        if module is not None:
            _strict_meta_load(module, theirs[name])
    # ... and converts every key of the file to the same module tensors with the same shapes.
    ours = sdxl_checkpoint_to_modules(checkpoint, *ours_modules)
    assert sorted(ours.unused) == sorted(
        [prefix + "logit_scale"] + ([] if refiner else [SDXL_POSITION_IDS_KEY])
    )
    mine = {
        "unet": ours.unet,
        "vae": ours.vae,
        "text_encoder": ours.text_encoder,
        "text_encoder_2": ours.text_encoder_2,
    }
    for name in mine:
        assert {k: tuple(v.shape) for k, v in mine[name].items()} == {
            k: tuple(v.shape) for k, v in theirs.get(name, {}).items()
        }, name


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tiny_sdxl_conversion_equals_diffusers_numerically(variant: str, tiny_xl: TinyXL) -> None:
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    sd, (unet, vae, te, te2) = tiny_xl(variant)
    refiner = te is None
    theirs = _diffusers_convert(sd, dict(unet.config), dict(vae.config), refiner)
    prefix = "conditioner.embedders.0.model." if refiner else "conditioner.embedders.1.model."
    theirs["text_encoder_2"] = convert_open_clip_checkpoint(te2, sd, prefix=prefix)
    ours = sdxl_checkpoint_to_modules(sd, unet, vae, te, te2)
    mine = {
        "unet": ours.unet,
        "vae": ours.vae,
        "text_encoder": ours.text_encoder,
        "text_encoder_2": ours.text_encoder_2,
    }
    for name, state in mine.items():
        assert set(state) == set(theirs[name]), name
        for key, value in state.items():
            assert torch.equal(value, theirs[name][key].reshape(value.shape)), (name, key)


def test_key_map_names_every_module_tensor_once(tiny_xl: TinyXL) -> None:
    unet, vae, te, te2 = tiny_xl("base")[1]
    keymap = sdxl_key_map(unet, vae, te, te2)
    for component, module in (("unet", unet), ("vae", vae), ("text_encoder", te), ("text_encoder_2", te2)):
        for key in module.state_dict():
            assert (component, key) in keymap.reverse
    fused = [t for t in keymap.forward.values() if t.layout == "qkv"]
    assert len(fused) == 2 * 2  # weight and bias of each of bigG's two layers
    assert keymap.forward["conditioner.embedders.1.model.text_projection"].layout == "transposed"


# --- bigG against an open_clip forward written from the raw tensors -----------------------------------


def _open_clip_forward(
    sd: dict[str, torch.Tensor], prefix: str, ids: torch.Tensor, heads: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip's text tower as sgm's FrozenOpenCLIPEmbedder2 runs it, in float64: returns the
    penultimate block's output and the pooled projection (ln_final at the argmax token, @ projection)."""

    def w(name: str) -> torch.Tensor:
        return sd[prefix + name].to(torch.float64)

    def layer_norm(x: torch.Tensor, name: str) -> torch.Tensor:
        return torch.nn.functional.layer_norm(x, x.shape[-1:], w(name + ".weight"), w(name + ".bias"), 1e-5)

    x = w("token_embedding.weight")[ids] + w("positional_embedding")
    n, width = x.shape[1], x.shape[2]
    causal = torch.full((n, n), float("-inf"), dtype=torch.float64).triu(1)
    blocks = sorted(
        {int(k[len(prefix) :].split(".")[2]) for k in sd if k.startswith(prefix + "transformer.resblocks.")}
    )
    penultimate = x
    for i in blocks:
        b = f"transformer.resblocks.{i}."
        if i == len(blocks) - 1:
            penultimate = x
        h = layer_norm(x, b + "ln_1")
        q, k, v = (h @ w(b + "attn.in_proj_weight").T + w(b + "attn.in_proj_bias")).chunk(3, dim=-1)

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(t.shape[0], n, heads, width // heads).transpose(1, 2)

        scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(width // heads) + causal
        attn = (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(x.shape)
        x = x + attn @ w(b + "attn.out_proj.weight").T + w(b + "attn.out_proj.bias")
        h = layer_norm(x, b + "ln_2")
        h = torch.nn.functional.gelu(h @ w(b + "mlp.c_fc.weight").T + w(b + "mlp.c_fc.bias"))
        x = x + h @ w(b + "mlp.c_proj.weight").T + w(b + "mlp.c_proj.bias")
    last = layer_norm(x, "ln_final")
    pooled = last[torch.arange(ids.shape[0]), ids.argmax(dim=-1)] @ w("text_projection")
    return penultimate, pooled


@pytest.mark.parametrize("variant", ["base", "refiner"])
def test_big_g_matches_an_open_clip_forward(variant: str, tiny_xl: TinyXL) -> None:
    sd, (*_, te2) = tiny_xl(variant)
    prefix = "conditioner.embedders.0.model." if variant == "refiner" else "conditioner.embedders.1.model."
    gen = torch.Generator().manual_seed(5)
    ids = torch.zeros(2, 77, dtype=torch.int64)  # A1111's bigG padding: 0 after the end token
    for row, length in enumerate((5, 40)):
        ids[row, 0] = 49406
        ids[row, 1 : length + 1] = torch.randint(1, 49406, (length,), generator=gen)
        ids[row, length + 1] = 49407
    heads = 32 // TINY_SDXL_CONSTANTS.clip_g_head_dim
    want_hidden, want_pooled = _open_clip_forward(sd, prefix, ids, heads)
    with torch.no_grad():
        out = te2(ids, output_hidden_states=True)
    torch.testing.assert_close(out.hidden_states[-2], want_hidden.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.text_embeds, want_pooled.float(), rtol=1e-5, atol=1e-5)


def test_damaged_sdxl_position_ids_are_reported_and_replaced(
    tmp_path: Path, stub_tokenizer: object, tiny_xl: TinyXL
) -> None:
    sd = dict(tiny_xl("base")[0])
    sd[SDXL_POSITION_IDS_KEY] = sd[SDXL_POSITION_IDS_KEY].float() + 0.5  # truncates back to 0..76
    c = load_model(
        write_tiny_sdxl_checkpoint(tmp_path / "p.safetensors", state_dict=sd), tokenizer=stub_tokenizer
    )
    assert c.report.position_ids_damage is not None and "float32" in c.report.position_ids_damage
    for encoder in (c.text_encoder, c.text_encoder_2):
        ids = dict(encoder.named_buffers())[
            "embeddings.position_ids" if encoder is c.text_encoder else "text_model.embeddings.position_ids"
        ]
        assert torch.equal(ids, torch.arange(77).unsqueeze(0))


def test_tiny_sdxl_unet_runs_with_its_size_conditioning(tiny_xl: TinyXL) -> None:
    # label_emb's width fits what diffusers feeds it: the pooled bigG vector and 6 (refiner: 5)
    # numbers, each embedded 256 wide.
    for variant, numbers in (("base", 6), ("refiner", 5)):
        _, (unet, _, _, te2) = tiny_xl(variant)
        context = unet.config.cross_attention_dim
        with torch.no_grad():
            out = unet(
                torch.randn(2, 4, 8, 8),
                torch.tensor([10, 500]),
                torch.randn(2, 77, context),
                added_cond_kwargs={
                    "text_embeds": torch.randn(2, te2.config.projection_dim),
                    "time_ids": torch.rand(2, numbers) * 1024,
                },
            ).sample
        assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()


def test_clip_l_saved_without_text_model_level_loads(
    tmp_path: Path, stub_tokenizer: object, tiny_xl: TinyXL
) -> None:
    # Checkpoints saved with pre-4.x transformers have no "text_model." level under the CLIP prefix.
    sd, (_, _, te, _) = tiny_xl("base")
    old = {k.replace("transformer.text_model.", "transformer."): v for k, v in sd.items()}
    assert old.keys() != sd.keys()
    c = load_model(
        write_tiny_sdxl_checkpoint(tmp_path / "old.safetensors", state_dict=old), tokenizer=stub_tokenizer
    )
    assert c.report.unused == [] and c.report.consumed == len(sd) - 1
    assert c.report.position_ids_damage is None
    want = te.state_dict()
    assert all(torch.equal(want[k], v) for k, v in c.text_encoder.state_dict().items())
