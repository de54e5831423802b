"""load_model on tiny checkpoint files: every key accounted for, outputs bitwise equal to the source."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from voidprompt.errors import ModelLoadError, UnsupportedModelError
from voidprompt.models import ModelFamily, load_model
from voidprompt.models.convert import POSITION_IDS_KEY
from voidprompt.testing.fake_checkpoints import (
    tiny_sd1_modules,
    tiny_sd1_state_dict,
    tiny_vae_state_dict,
    write_tiny_checkpoint,
)

IGNORED = ["betas", "model_ema.decay", "model_ema.num_updates"]


def _outputs(unet, vae, te) -> tuple[torch.Tensor, ...]:  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 49408, (2, 77), generator=gen)
    x = torch.randn(1, 4, 16, 16, generator=gen)
    image = torch.randn(1, 3, 32, 32, generator=gen)
    with torch.no_grad():
        ctx = te(ids).last_hidden_state
        eps = unet(x, 10, ctx[:1]).sample
        dec = vae.decode(vae.encode(image).latent_dist.mean).sample
    return ctx, eps, dec


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_tiny_checkpoint_loads_exactly(
    tmp_path: Path, fmt: str, tiny_modules: tuple, stub_tokenizer: object
) -> None:
    path = write_tiny_checkpoint(tmp_path / f"tiny.{fmt}", fmt=fmt)  # type: ignore[arg-type]
    c = load_model(path, tokenizer=stub_tokenizer)
    sd = tiny_sd1_state_dict(0)
    assert c.family is ModelFamily.SD1 and not c.is_inpainting and c.unet_in_channels == 4
    # Every key: all module tensors + position_ids + alphas_cumprod consumed, the rest ignored.
    assert c.report.consumed == len(sd) - len(IGNORED)
    assert sorted(c.report.ignored) == IGNORED
    assert c.report.unused == [] and c.report.missing == []
    assert c.report.position_ids_damage is None
    for got, want in zip(_outputs(c.unet, c.vae, c.text_encoder), _outputs(*tiny_modules), strict=True):
        assert torch.equal(got, want)
    assert c.tokenizer is stub_tokenizer
    assert c.scaling_factor == 0.18215 and c.dtype == torch.float32
    assert c.checkpoint.name == "tiny" and c.vae_info is None
    assert torch.equal(c.alphas_cumprod, sd["alphas_cumprod"])
    no_meta = [n for m in (c.unet, c.vae, c.text_encoder) for n, t in m.state_dict().items() if t.is_meta]
    assert no_meta == []


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_files_load_into_fp32(
    tmp_path: Path, dtype: torch.dtype, stub_tokenizer: object
) -> None:
    path = write_tiny_checkpoint(tmp_path / "half.safetensors", dtype=dtype)
    c = load_model(path, tokenizer=stub_tokenizer)
    sd = tiny_sd1_state_dict(0, dtype=dtype)
    w = c.unet.conv_in.weight
    assert w.dtype == torch.float32
    assert torch.equal(w, sd["model.diffusion_model.input_blocks.0.0.weight"].float())
    assert c.report.file_dtypes[str(dtype).removeprefix("torch.")] > 300


def test_inpainting_checkpoint(tmp_path: Path, stub_tokenizer: object) -> None:
    path = write_tiny_checkpoint(tmp_path / "inp.safetensors", inpainting=True)
    c = load_model(path, tokenizer=stub_tokenizer)
    assert c.family is ModelFamily.SD1_INPAINT and c.is_inpainting and c.unet_in_channels == 9


@pytest.mark.parametrize(
    "damaged,expect",
    [
        (torch.arange(77, dtype=torch.float32).unsqueeze(0), "stored as torch.float32 instead of int64"),
        # What merges produce: 76.9998 truncates to 76, so position 77 is wrong... at index 76 below.
        (torch.cat([torch.arange(76.0), torch.tensor([75.9998])]).unsqueeze(0), "1 wrong positions"),
        (torch.arange(77).flip(0).unsqueeze(0), "wrong positions"),
    ],
)
def test_damaged_position_ids_replaced_and_reported(
    tmp_path: Path, damaged: torch.Tensor, expect: str, stub_tokenizer: object
) -> None:
    sd = tiny_sd1_state_dict(0)
    sd[POSITION_IDS_KEY] = damaged
    path = write_tiny_checkpoint(tmp_path / "bad.safetensors", state_dict=sd)
    c = load_model(path, tokenizer=stub_tokenizer)
    assert c.report.position_ids_damage is not None and expect in c.report.position_ids_damage
    pos = c.text_encoder.embeddings.position_ids
    assert pos.dtype == torch.int64 and torch.equal(pos, torch.arange(77).unsqueeze(0))


def test_alphas_cumprod_computed_like_ldm_when_absent(tmp_path: Path, stub_tokenizer: object) -> None:
    sd = tiny_sd1_state_dict(0)
    del sd["alphas_cumprod"]
    c = load_model(write_tiny_checkpoint(tmp_path / "m.safetensors", state_dict=sd), tokenizer=stub_tokenizer)
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    expected = np.cumprod(1.0 - betas).astype(np.float32)
    assert c.alphas_cumprod.dtype == torch.float32 and c.alphas_cumprod.shape == (1000,)
    np.testing.assert_array_equal(c.alphas_cumprod.numpy(), expected)
    sigmas = ((1 - c.alphas_cumprod) / c.alphas_cumprod) ** 0.5
    assert abs(sigmas[0].item() - 0.0292) < 1e-4 and abs(sigmas[-1].item() - 14.6146) < 1e-3


def test_truncated_safetensors(tmp_path: Path) -> None:
    path = write_tiny_checkpoint(tmp_path / "cut.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ModelLoadError, match=r"cut\.safetensors.*(damaged|truncated)"):
        load_model(path)


@pytest.mark.parametrize(
    "content", [b"\x89PNG\r\n\x1a\n" + bytes(100), b"hello, this is a text file\n" * 4, b""]
)
def test_non_checkpoint_files(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "image.safetensors"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match="not a checkpoint"):
        load_model(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no such file"):
        load_model(tmp_path / "nope.ckpt")


def test_incomplete_checkpoint_names_missing_tensors(tmp_path: Path) -> None:
    sd = tiny_sd1_state_dict(0)
    del sd["model.diffusion_model.out.2.bias"]
    with pytest.raises(ModelLoadError, match=r"lacks 1 model tensors.*unet\.conv_out\.bias"):
        load_model(write_tiny_checkpoint(tmp_path / "m.safetensors", state_dict=sd))


def test_unsupported_family_file(tmp_path: Path) -> None:
    sd = tiny_sd1_state_dict(0)
    sd["cond_stage_model.model.ln_final.weight"] = torch.zeros(4)  # OpenCLIP ViT-H: SD2
    with pytest.raises(UnsupportedModelError, match=r"detected SD2 .*not supported yet"):
        load_model(write_tiny_checkpoint(tmp_path / "sd2.safetensors", state_dict=sd))


def test_sd1_file_with_an_sdxl_key_is_an_incomplete_sdxl_file(tmp_path: Path) -> None:
    sd = tiny_sd1_state_dict(0)
    sd["model.diffusion_model.label_emb.0.0.weight"] = torch.zeros(4, 4)
    with pytest.raises(ModelLoadError, match=r"conditioner\.embedders\.0.*not a complete"):
        load_model(write_tiny_checkpoint(tmp_path / "xl.safetensors", state_dict=sd))


def test_unknown_keys_reported_as_unused(tmp_path: Path, stub_tokenizer: object) -> None:
    sd = tiny_sd1_state_dict(0)
    sd["merge_tool.extra"] = torch.zeros(3)
    c = load_model(write_tiny_checkpoint(tmp_path / "m.safetensors", state_dict=sd), tokenizer=stub_tokenizer)
    assert c.report.unused == ["merge_tool.extra"]


def test_external_vae_explicit_and_paired(tmp_path: Path, stub_tokenizer: object) -> None:
    model = write_tiny_checkpoint(tmp_path / "model.safetensors")
    vae_sd = tiny_vae_state_dict(seed=1)
    vae_sd["loss.logvar"] = torch.zeros(())  # real VAE files carry their training loss; ignored
    torch.save({"state_dict": vae_sd}, tmp_path / "other.pt")
    _, ref_vae, _ = tiny_sd1_modules(1)
    ref = ref_vae.decoder.conv_out.weight

    c = load_model(model, vae_path=tmp_path / "other.pt", tokenizer=stub_tokenizer)
    assert torch.equal(c.vae.decoder.conv_out.weight, ref)
    assert c.vae_info is not None and c.vae_info.name == "other.pt" and not c.vae_info.paired
    assert len([k for k in c.report.ignored if k.startswith("first_stage_model.")]) == len(vae_sd) - 1

    (tmp_path / "other.pt").rename(tmp_path / "model.vae.pt")  # A1111's automatic pairing
    c = load_model(model, tokenizer=stub_tokenizer)
    assert c.vae_info is not None and c.vae_info.paired and c.vae_info.name == "model.vae.pt"
    assert torch.equal(c.vae.decoder.conv_out.weight, ref)


def test_wrong_vae_file(tmp_path: Path, stub_tokenizer: object) -> None:
    model = write_tiny_checkpoint(tmp_path / "model.safetensors")
    vae_sd = tiny_vae_state_dict(seed=1)
    vae_sd["decoder.conv_out.weight"] = torch.zeros(3, 64, 3, 3)
    from safetensors.torch import save_file

    save_file(vae_sd, str(tmp_path / "wide.safetensors"))
    with pytest.raises(ModelLoadError, match=r"wide\.safetensors.*decoder\.conv_out\.weight \(3, 64, 3, 3\)"):
        load_model(model, vae_path=tmp_path / "wide.safetensors", tokenizer=stub_tokenizer)
    save_file({"lora_unet_x.lora_up.weight": torch.zeros(4, 2)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(ModelLoadError, match=r"lora\.safetensors: does not fit.*not VAE keys"):
        load_model(model, vae_path=tmp_path / "lora.safetensors", tokenizer=stub_tokenizer)


def test_full_checkpoint_as_vae_source(tmp_path: Path, stub_tokenizer: object) -> None:
    # A whole model passed as the VAE: its first_stage_model.* tensors are used, the rest noted.
    model = write_tiny_checkpoint(tmp_path / "model.safetensors")
    donor = write_tiny_checkpoint(tmp_path / "donor.safetensors", seed=1)
    c = load_model(model, vae_path=donor, tokenizer=stub_tokenizer)
    _, ref_vae, _ = tiny_sd1_modules(1)
    assert torch.equal(c.vae.encoder.conv_in.weight, ref_vae.encoder.conv_in.weight)
    assert any("unknown keys ignored" in n for n in c.report.notes)


def test_real_tokenizer_is_loaded_by_default(tmp_path: Path) -> None:
    pytest.importorskip("voidprompt.models.tokenizer")
    c = load_model(write_tiny_checkpoint(tmp_path / "m.safetensors"))
    assert type(c.tokenizer).__name__ == "ClipTokenizer"


def test_safetensors_whose_header_length_starts_with_0x80_is_not_taken_for_a_pickle(tmp_path: Path) -> None:
    # A header length with low byte 0x80 makes the file's first byte the pickle protocol marker.
    import json
    import struct

    from voidprompt.models.load import open_checkpoint

    tensor = torch.arange(4, dtype=torch.float32)
    header = {"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}
    text = json.dumps(header)
    text += " " * (0x80 - len(text) % 256) if len(text) % 256 <= 0x80 else " " * (0x180 - len(text) % 256)
    assert len(text) % 256 == 0x80
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text.encode() + tensor.numpy().tobytes())
    assert path.read_bytes()[:1] == b"\x80"
    with open_checkpoint(path) as reader:
        assert reader.format == "safetensors"
        assert torch.equal(reader.get("t"), tensor)


def test_a_precision_policy_sets_each_modules_dtype(
    tmp_path: Path, tiny_sd: dict[str, torch.Tensor], stub_tokenizer: object
) -> None:
    from voidprompt.models.placement import resolve_precision

    path = write_tiny_checkpoint(tmp_path / "m.safetensors")
    policy = resolve_precision("bf16", torch.device("cpu")).with_vae(torch.float32)
    c = load_model(path, precision=policy, tokenizer=stub_tokenizer)
    assert c.precision is policy and c.dtype == torch.bfloat16
    assert {p.dtype for p in c.unet.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in c.text_encoder.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in c.vae.parameters()} == {torch.float32}
    # Cast from the file's float32 values, nothing else.
    key = "model.diffusion_model.input_blocks.0.0.weight"
    assert torch.equal(c.unet.conv_in.weight, tiny_sd[key].to(torch.bfloat16))
    with pytest.raises(ModelLoadError, match="contradicts precision bf16"):
        load_model(path, precision=policy, dtype=torch.float32, tokenizer=stub_tokenizer)


def test_channels_last_is_off_on_the_cpu_unless_asked(tmp_path: Path, stub_tokenizer: object) -> None:
    path = write_tiny_checkpoint(tmp_path / "m.safetensors")
    plain = load_model(path, tokenizer=stub_tokenizer)
    weight = plain.unet.conv_in.weight
    assert weight.is_contiguous() and not weight.is_contiguous(memory_format=torch.channels_last)
    assert plain.precision.name == "fp32" and plain.precision.autocast is None
    fast = load_model(path, channels_last=True, tokenizer=stub_tokenizer)
    assert fast.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(fast.unet.conv_in.weight, weight)


def test_attention_is_scaled_dot_product_attention(tmp_path: Path, stub_tokenizer: object) -> None:
    # diffusers picks AttnProcessor2_0 (F.scaled_dot_product_attention) under torch 2 and
    # transformers picks "sdpa" for CLIP; the loader must keep both (flash / memory-efficient
    # kernels on CUDA).
    from diffusers.models.attention_processor import AttnProcessor2_0

    c = load_model(write_tiny_checkpoint(tmp_path / "m.safetensors"), tokenizer=stub_tokenizer)
    for module in (c.unet, c.vae):
        processors = module.attn_processors
        assert processors and all(type(p) is AttnProcessor2_0 for p in processors.values())
    assert c.text_encoder.config._attn_implementation == "sdpa"
