"""LoRA / LyCORIS on SDXL with kohya's key names: the layers each name reaches (A1111 1.10's rules),
exact deltas on exactly the targeted weights of the UNet and both text encoders, byte-exact restore
in merged and functional mode, bigG's fused attention, the other family's LoRAs, and the Engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from voidprompt.errors import ModelLoadError
from voidprompt.models.hashes import addnet_hash_safetensors
from voidprompt.models.load import load_model
from voidprompt.models.networks import NetworkManager, build_layer_map
from voidprompt.prompts.extra_networks import extract_extra_networks
from voidprompt.testing.fake_checkpoints import write_tiny_checkpoint, write_tiny_sdxl_checkpoint

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")

# kohya name -> (component, module path) of the tiny SDXL model, written out by hand from the sgm
# layout (2 levels, 2 res blocks each, attention at level 1; input block 4 is level 1's first).
_ATTN1_SGM = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_"
_ATTN1 = "down_blocks.1.attentions.0.transformer_blocks.0.attn1."
UNET_LAYERS = {
    **{_ATTN1_SGM + p: _ATTN1 + p.replace("out_0", "out.0") for p in ("to_q", "to_k", "to_v", "to_out_0")},
    "lora_unet_middle_block_1_transformer_blocks_1_attn2_to_k": (
        "mid_block.attentions.0.transformer_blocks.1.attn2.to_k"
    ),
    "lora_unet_input_blocks_1_0_in_layers_2": "down_blocks.0.resnets.0.conv1",
    "lora_unet_output_blocks_0_0_out_layers_3": "up_blocks.0.resnets.0.conv2",
    "lora_unet_output_blocks_2_2_conv": "up_blocks.0.upsamplers.0.conv",
    "lora_unet_label_emb_0_0": "add_embedding.linear_1",
    "lora_unet_time_embed_0": "time_embedding.linear_1",
}
TE1_LAYERS = {
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": "encoder.layers.0.self_attn.q_proj",
    "lora_te1_text_model_encoder_layers_1_mlp_fc2": "encoder.layers.1.mlp.fc2",
}
TE2_ATTENTION = {
    f"lora_te2_text_model_encoder_layers_0_self_attn_{p}": f"text_model.encoder.layers.0.self_attn.{p}"
    for p in ("q_proj", "k_proj", "v_proj", "out_proj")
}
TE2_LAYERS = {
    **TE2_ATTENTION,
    "lora_te2_text_model_encoder_layers_1_mlp_fc1": "text_model.encoder.layers.1.mlp.fc1",
}


class _Tok:
    pass


@pytest.fixture(scope="module")
def xl_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_sdxl_checkpoint(tmp_path_factory.mktemp("xl") / "xl.safetensors")


@pytest.fixture
def xl(xl_file: Path) -> Any:
    return load_model(xl_file, tokenizer=_Tok())


def _module(comps: Any, component: str, path: str) -> torch.nn.Module:
    module = getattr(comps, component).get_submodule(_flat(getattr(comps, component), path))
    assert isinstance(module, torch.nn.Module)
    return module


def _flat(root: torch.nn.Module, path: str) -> str:
    # transformers >= 5 flattened CLIPTextModel (no text_model level); CLIPTextModelWithProjection kept it.
    names = dict(root.named_modules())
    if path in names:
        return path
    return next(n for n in names if n.endswith("." + path) or "text_model." + n == path)


def _state(comps: Any) -> dict[tuple[str, str], torch.Tensor]:
    return {
        (c, k): v.detach().clone()
        for c in COMPONENTS
        if getattr(comps, c) is not None
        for k, v in getattr(comps, c).state_dict().items()
    }


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().view(torch.uint8)


def _assert_bytes_equal(comps: Any, before: dict[tuple[str, str], torch.Tensor]) -> None:
    after = _state(comps)
    assert after.keys() == before.keys()
    assert [k for k in before if not torch.equal(_bytes(after[k]), _bytes(before[k]))] == []


def _dyadic(gen: torch.Generator, *shape: int) -> torch.Tensor:
    """Multiples of 1/8 in [-1/2, 1/2]: products and short sums are exact in float32, so expected
    weights computed in float64 compare bit for bit."""
    return torch.randint(-4, 5, shape, generator=gen).to(torch.float32) / 8


def _lora(
    comps: Any, layers: dict[str, tuple[str, str]], rank: int = 2, alpha: float = 1.0
) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    out: dict[str, torch.Tensor] = {}
    for name, (component, path) in layers.items():
        w = _module(comps, component, path).weight
        if w.ndim == 2:
            up, down = _dyadic(gen, w.shape[0], rank), _dyadic(gen, rank, w.shape[1])
        else:
            up, down = _dyadic(gen, w.shape[0], rank, 1, 1), _dyadic(gen, rank, *w.shape[1:])
        out[f"{name}.lora_up.weight"] = up
        out[f"{name}.lora_down.weight"] = down
        out[f"{name}.alpha"] = torch.tensor(alpha)
    return out


def _delta(t: dict[str, torch.Tensor], name: str, shape: torch.Size, mult: float) -> np.ndarray:
    up = t[f"{name}.lora_up.weight"].double().numpy()
    down = t[f"{name}.lora_down.weight"].double().numpy()
    rank = down.shape[0]
    scale = float(t[f"{name}.alpha"]) / rank
    return (up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)).reshape(tuple(shape)) * scale * mult


ALL_LAYERS = {
    **{k: ("unet", v) for k, v in UNET_LAYERS.items()},
    **{k: ("text_encoder", v) for k, v in TE1_LAYERS.items()},
    **{k: ("text_encoder_2", v) for k, v in TE2_LAYERS.items()},
}


def _apply(comps: Any, folder: Path, prompt: str, **kwargs: Any) -> Any:
    return NetworkManager().apply(
        comps, extract_extra_networks(prompt)[1], lora_dir=folder, hypernet_dir=None, **kwargs
    )


# ---------------------------------------------------------------- names


def test_kohya_sdxl_names_reach_the_layers_a1111_reaches(xl: Any) -> None:
    m = build_layer_map(xl.unet, xl.text_encoder, xl.text_encoder_2)
    for name, (component, path) in ALL_LAYERS.items():
        assert m[name].component == component, name
        assert m[name].module is _module(xl, component, path), name
    # diffusers spellings of UNet layers work where A1111's SD1 formulas reach them ...
    assert (
        m["lora_unet_down_blocks_1_attentions_0_proj_in"].module
        is xl.unet.down_blocks[1].attentions[0].proj_in
    )
    assert m["lora_unet_mid_block_resnets_1_conv2"].module is xl.unet.mid_block.resnets[1].conv2
    # ... and not where they do not: no formula for add_embedding, and the first up block's
    # upsampler put at index 1 of output block 2, where SDXL has its attention.
    assert "lora_unet_add_embedding_linear_1" not in m
    assert "lora_unet_up_blocks_0_upsamplers_0_conv" not in m
    assert "lora_unet_output_blocks_2_1_conv" not in m
    # lora_te_ is SD1's name for the text encoder: nothing on SDXL; bigG's projection is no layer
    assert not [n for n in m if n.startswith("lora_te_")]
    assert "lora_te2_text_projection" not in m and "lora_te2_text_model_text_projection" not in m
    assert (
        m["lora_te2_text_model_encoder_layers_0_self_attn_v_proj"].fused
        == "text_model.encoder.layers.0.self_attn"
    )
    assert m["lora_te2_text_model_encoder_layers_1_mlp_fc1"].fused is None
    assert m["lora_te1_text_model_encoder_layers_0_self_attn_q_proj"].fused is None


def test_refiner_is_reached_by_unet_names_only(tmp_path: Path) -> None:
    # A1111 looks lora_te2_ up under the second embedder, and the refiner's bigG is its first.
    refiner = load_model(
        write_tiny_sdxl_checkpoint(tmp_path / "r.safetensors", refiner=True), tokenizer=_Tok()
    )
    m = build_layer_map(refiner.unet, refiner.text_encoder, refiner.text_encoder_2)
    assert not [n for n in m if n.startswith("lora_te")]
    assert m["lora_unet_label_emb_0_0"].module is refiner.unet.add_embedding.linear_1


def test_lora_te1_names_reach_sd1_text_encoder_too(tmp_path: Path) -> None:
    sd1 = load_model(write_tiny_checkpoint(tmp_path / "sd1.safetensors"), tokenizer=_Tok())
    m = build_layer_map(sd1.unet, sd1.text_encoder)
    name = "text_model_encoder_layers_1_mlp_fc1"
    assert m["lora_te1_" + name].module is m["lora_te_" + name].module
    assert not [n for n in m if n.startswith("lora_te2_")]


# ---------------------------------------------------------------- merged and functional


def test_merged_sdxl_lora_changes_exactly_the_targeted_weights_and_restores_bytes(
    tmp_path: Path, xl: Any
) -> None:
    t = _lora(xl, ALL_LAYERS)
    save_file(t, str(tmp_path / "xl_style.safetensors"))
    before = _state(xl)
    te, unet = 0.5, 1.5
    mgr = NetworkManager()
    applied = mgr.apply(
        xl, extract_extra_networks(f"<lora:xl_style:{te}:{unet}>")[1], lora_dir=tmp_path, hypernet_dir=None
    )
    after = _state(xl)
    changed = {k for k in before if not torch.equal(after[k], before[k])}
    expected_keys = set()
    for name, (component, path) in ALL_LAYERS.items():
        key = (component, _flat(getattr(xl, component), path) + ".weight")
        expected_keys.add(key)
        mult = unet if component == "unet" else te
        expected = (before[key].double() + torch.from_numpy(_delta(t, name, before[key].shape, mult))).float()
        assert torch.equal(after[key], expected), name
    assert changed == expected_keys
    assert applied.loras[0].layers == len(ALL_LAYERS) and applied.notes == []
    assert (
        applied.infotext["Lora hashes"]
        == f"xl_style: {addnet_hash_safetensors(tmp_path / 'xl_style.safetensors')[:12]}"
    )
    mgr.apply(xl, [], lora_dir=tmp_path, hypernet_dir=None)
    _assert_bytes_equal(xl, before)


def test_bigg_q_k_v_deltas_land_on_open_clips_in_proj_rows(tmp_path: Path, xl: Any) -> None:
    """Seen in the original layout: a te2 q/k/v LoRA changes the rows q, k, v of open_clip's fused
    in_proj_weight by its own delta each, and out_proj by its delta."""
    from voidprompt.models.convert_sdxl import sdxl_modules_to_checkpoint

    layers = {k: ("text_encoder_2", v) for k, v in TE2_ATTENTION.items()}
    t = _lora(xl, layers)
    save_file(t, str(tmp_path / "g.safetensors"))
    modules = (xl.unet, xl.vae, xl.text_encoder, xl.text_encoder_2)
    prefix = "conditioner.embedders.1.model.transformer.resblocks.0.attn."
    sd_before = {
        k: v.clone() for k, v in sdxl_modules_to_checkpoint(*modules).items() if k.startswith(prefix)
    }
    _apply(xl, tmp_path, "<lora:g:0.75>")
    sd_after = {k: v for k, v in sdxl_modules_to_checkpoint(*modules).items() if k.startswith(prefix)}
    width = sd_before[prefix + "out_proj.weight"].shape[0]
    square = torch.Size((width, width))
    expected = {
        "in_proj_weight": np.concatenate(
            [
                _delta(t, f"lora_te2_text_model_encoder_layers_0_self_attn_{p}_proj", square, 0.75)
                for p in "qkv"
            ]
        ),
        "out_proj.weight": _delta(t, "lora_te2_text_model_encoder_layers_0_self_attn_out_proj", square, 0.75),
    }
    for key, delta in expected.items():
        closed_form = (sd_before[prefix + key].double() + torch.from_numpy(delta)).float()
        assert torch.equal(sd_after[prefix + key], closed_form), key
    assert torch.equal(sd_after[prefix + "in_proj_bias"], sd_before[prefix + "in_proj_bias"])


def test_functional_mode_on_sdxl_matches_merged_and_restores_bytes(tmp_path: Path, xl: Any) -> None:
    t = _lora(xl, ALL_LAYERS)
    save_file(t, str(tmp_path / "f.safetensors"))
    before = _state(xl)
    gen = torch.Generator().manual_seed(1)
    inputs = {}
    for name, (component, path) in ALL_LAYERS.items():
        mod = _module(xl, component, path)
        w = mod.weight
        inputs[name] = (
            torch.randn(3, w.shape[1], generator=gen)
            if w.ndim == 2
            else torch.randn(1, w.shape[1], 8, 8, generator=gen)
        )

    def outputs() -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {n: _module(xl, c, p)(inputs[n]) for n, (c, p) in ALL_LAYERS.items()}

    plain = outputs()
    merged_mgr = NetworkManager()
    merged_mgr.apply(xl, extract_extra_networks("<lora:f:0.5:1.5>")[1], lora_dir=tmp_path, hypernet_dir=None)
    merged = outputs()
    merged_state = _state(xl)
    merged_mgr.restore()
    _assert_bytes_equal(xl, before)

    mgr = NetworkManager()
    mgr.apply(
        xl,
        extract_extra_networks("<lora:f:0.5:1.5>")[1],
        lora_dir=tmp_path,
        hypernet_dir=None,
        functional=True,
    )
    # Only bigG's attention projections are merged (A1111 has no functional path for open_clip's
    # fused attention); every other weight stays as it was and hooks add the LoRA.
    now = _state(xl)
    changed = {k for k in before if not torch.equal(now[k], before[k])}
    assert changed == {("text_encoder_2", v + ".weight") for v in TE2_ATTENTION.values()}
    assert all(torch.equal(now[k], merged_state[k]) for k in changed)
    functional = outputs()
    for name in ALL_LAYERS:
        torch.testing.assert_close(functional[name], merged[name], rtol=1e-5, atol=1e-5, msg=name)
    mgr.restore()
    _assert_bytes_equal(xl, before)
    unhooked = outputs()  # the hooks are gone too
    assert all(torch.equal(unhooked[n], plain[n]) for n in ALL_LAYERS)


def test_bigg_attention_changes_only_with_all_four_projections(tmp_path: Path, xl: Any) -> None:
    partial = {
        k: ("text_encoder_2", v) for k, v in TE2_LAYERS.items() if not k.endswith(("_k_proj", "_out_proj"))
    }
    t = _lora(xl, partial)
    save_file(t, str(tmp_path / "p.safetensors"))
    before = _state(xl)
    applied = _apply(xl, tmp_path, "<lora:p:1>")
    after = _state(xl)
    changed = {k for k in before if not torch.equal(after[k], before[k])}
    assert changed == {("text_encoder_2", "text_model.encoder.layers.1.mlp.fc1.weight")}
    assert applied.loras[0].layers == 1
    assert (
        len(applied.notes) == 1
        and "all four" in applied.notes[0]
        and "2 bigG attention layers" in applied.notes[0]
    )


def test_te_multiplier_acts_on_both_text_encoders_only(tmp_path: Path, xl: Any) -> None:
    save_file(_lora(xl, ALL_LAYERS), str(tmp_path / "m.safetensors"))
    before = _state(xl)
    mgr = NetworkManager()
    for prompt, components, count in (
        ("<lora:m:te=0:unet=1>", {"unet"}, len(UNET_LAYERS)),
        ("<lora:m:1:0>", {"text_encoder", "text_encoder_2"}, len(TE1_LAYERS) + len(TE2_LAYERS)),
    ):
        mgr.apply(xl, extract_extra_networks(prompt)[1], lora_dir=tmp_path, hypernet_dir=None)
        after = _state(xl)
        changed = {k for k in before if not torch.equal(after[k], before[k])}
        assert {c for c, _ in changed} == components and len(changed) == count, prompt


# ---------------------------------------------------------------- LyCORIS


def test_lycoris_modules_through_sdxl_names(tmp_path: Path, xl: Any) -> None:
    gen = torch.Generator().manual_seed(3)
    loha = "lora_te2_text_model_encoder_layers_1_mlp_fc1"  # (128, 32)
    lokr = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"  # (64, 64)
    full = "lora_unet_label_emb_0_0"
    full_w = xl.unet.add_embedding.linear_1.weight
    t = {
        f"{loha}.hada_w1_a": _dyadic(gen, 128, 2),
        f"{loha}.hada_w1_b": _dyadic(gen, 2, 32),
        f"{loha}.hada_w2_a": _dyadic(gen, 128, 2),
        f"{loha}.hada_w2_b": _dyadic(gen, 2, 32),
        f"{loha}.alpha": torch.tensor(1.0),
        f"{lokr}.lokr_w1": _dyadic(gen, 8, 8),
        f"{lokr}.lokr_w2": _dyadic(gen, 8, 8),
        f"{full}.diff": _dyadic(gen, *full_w.shape),
    }
    save_file(t, str(tmp_path / "ly.safetensors"))
    before = _state(xl)
    _apply(xl, tmp_path, "<lora:ly:0.5:2>")
    after = _state(xl)
    n = {k: v.double().numpy() for k, v in t.items()}
    expected = {
        ("text_encoder_2", "text_model.encoder.layers.1.mlp.fc1.weight"): (
            (n[f"{loha}.hada_w1_a"] @ n[f"{loha}.hada_w1_b"])
            * (n[f"{loha}.hada_w2_a"] @ n[f"{loha}.hada_w2_b"])
            * 0.5
            * 0.5
        ),
        ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"): (
            np.kron(n[f"{lokr}.lokr_w1"], n[f"{lokr}.lokr_w2"]) * 2
        ),
        ("unet", "add_embedding.linear_1.weight"): n[f"{full}.diff"] * 2,
    }
    changed = {k for k in before if not torch.equal(after[k], before[k])}
    assert changed == set(expected)
    for key, delta in expected.items():
        assert torch.equal(after[key], (before[key].double() + torch.from_numpy(delta)).float()), key


# ---------------------------------------------------------------- the other family


def test_sd1_lora_on_sdxl_skips_what_does_not_fit_and_names_both_families(tmp_path: Path, xl: Any) -> None:
    # kohya's SD1 names: lora_te_ for the text encoder, diffusers paths for the UNet. On SDXL, A1111
    # finds no lora_te_ layer, applies what exists and fits, and skips a layer of another shape.
    attn1 = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"  # exists, fits
    attn2 = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"  # SD1's 32-wide context
    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    gen = torch.Generator().manual_seed(5)
    t = {
        f"{attn1}.lora_up.weight": _dyadic(gen, 64, 2),
        f"{attn1}.lora_down.weight": _dyadic(gen, 2, 64),
        f"{attn2}.lora_up.weight": _dyadic(gen, 64, 2),
        f"{attn2}.lora_down.weight": _dyadic(gen, 2, 32),
        f"{te}.lora_up.weight": _dyadic(gen, 32, 2),
        f"{te}.lora_down.weight": _dyadic(gen, 2, 32),
    }
    save_file(t, str(tmp_path / "sd1.safetensors"))
    before = _state(xl)
    applied = _apply(xl, tmp_path, "<lora:sd1:1>")
    after = _state(xl)
    key = ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight")
    assert {k for k in before if not torch.equal(after[k], before[k])} == {key}
    up, down = t[f"{attn1}.lora_up.weight"].double(), t[f"{attn1}.lora_down.weight"].double()
    assert torch.equal(after[key], (before[key].double() + up @ down).float())  # no alpha: scale 1
    assert applied.loras[0].layers == 1
    (note,) = applied.notes
    assert "'sd1' was made for SD1/SD2 (lora_te_ keys) and the model is SDXL" in note
    assert "2 of 3 layers skipped" in note


def test_sdxl_lora_on_sd1_is_told_by_its_context_width(tmp_path: Path) -> None:
    sd1 = load_model(write_tiny_checkpoint(tmp_path / "sd1.safetensors"), tokenizer=_Tok())
    folder = tmp_path / "loras"
    folder.mkdir()
    to_k = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k"  # exists in SD1, 2048 wide in SDXL
    te1 = "lora_te1_text_model_encoder_layers_0_mlp_fc1"  # CLIP-L: A1111 applies it to SD1's encoder
    gen = torch.Generator().manual_seed(2)
    t = {
        f"{to_k}.lora_up.weight": _dyadic(gen, 32, 2),
        f"{to_k}.lora_down.weight": _dyadic(gen, 2, 2048),
        f"{te1}.lora_up.weight": _dyadic(gen, 64, 2),
        f"{te1}.lora_down.weight": _dyadic(gen, 2, 32),
        "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": _dyadic(gen, 5120, 2),
        "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": _dyadic(gen, 2, 1280),
    }
    save_file(t, str(folder / "xl.safetensors"))
    before = _state(sd1)
    applied = _apply(sd1, folder, "<lora:xl:1>")
    after = _state(sd1)
    changed = {k for k in before if not torch.equal(after[k], before[k])}
    assert changed == {
        ("text_encoder", _flat(sd1.text_encoder, "text_model.encoder.layers.0.mlp.fc1") + ".weight")
    }
    (note,) = applied.notes
    assert "made for SDXL (its cross-attention takes a 2048-wide context) and the model is SD1.x" in note
    assert "2 of 3 layers skipped" in note and "1 applied" in note


def test_a_misfit_in_a_lora_of_no_known_family_is_an_error_naming_sdxl(tmp_path: Path, xl: Any) -> None:
    name = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    save_file(
        {f"{name}.lora_up.weight": torch.ones(320, 2), f"{name}.lora_down.weight": torch.ones(2, 320)},
        str(tmp_path / "wide.safetensors"),
    )
    before = _state(xl)
    with pytest.raises(
        ModelLoadError, match=rf"'wide': layer {name} .*\(320, 320\).*\(64, 64\).*this SDXL model"
    ):
        _apply(xl, tmp_path, "<lora:wide:1>")
    _assert_bytes_equal(xl, before)


# ---------------------------------------------------------------- the Engine


def test_engine_applies_an_sdxl_lora_and_takes_it_off(tmp_path: Path, xl_file: Path) -> None:
    from voidprompt.pipeline.engine import Engine
    from voidprompt.request import GenerationRequest

    comps = load_model(xl_file)
    save_file(_lora(comps, ALL_LAYERS, alpha=2.0), str(tmp_path / "xl_style.safetensors"))
    engine = Engine(comps, lora_dir=tmp_path)
    base = GenerationRequest(prompt="red circle", seed=3, steps=2, width=32, height=32, sampler_name="Euler")
    plain = np.asarray(engine.generate(base).images[0], dtype=np.int16)
    styled = engine.generate(base.replace(prompt="red circle <lora:xl_style:1>"))
    assert not np.array_equal(np.asarray(styled.images[0], dtype=np.int16), plain)
    digest = addnet_hash_safetensors(tmp_path / "xl_style.safetensors")[:12]
    assert f'Lora hashes: "xl_style: {digest}"' in styled.infotexts[0]
    assert np.array_equal(np.asarray(engine.generate(base).images[0], dtype=np.int16), plain)


# ---------------------------------------------------------------- extraction


def test_extract_from_sdxl_writes_kohyas_sdxl_names_and_recovers_the_difference(tmp_path: Path) -> None:
    from voidprompt.models.load import open_checkpoint
    from voidprompt.models.networks import load_lora
    from voidprompt.models.networks.extract import extract_lora
    from voidprompt.testing.fake_checkpoints import tiny_sdxl_state_dict

    sd_a = tiny_sdxl_state_dict(0)
    sd_b = {k: v.clone() for k, v in sd_a.items()}
    g = torch.Generator().manual_seed(4)
    unet = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_v.weight"
    clip_l = "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    in_proj = "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight"
    c_fc = "conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_fc.weight"
    width = sd_a[in_proj].shape[1]
    low_rank = {}
    for key, rows in ((unet, None), (clip_l, None), (in_proj, slice(width, 2 * width)), (c_fc, None)):
        w = sd_a[key] if rows is None else sd_a[key][rows]
        d = torch.randn(w.shape[0], 2, generator=g) @ torch.randn(2, w.shape[1], generator=g) * 0.05
        if rows is None:
            sd_b[key] = w + d
        else:
            sd_b[key][rows] = w + d
        low_rank[key] = (sd_b[key] if rows is None else sd_b[key][rows]) - w
    a = write_tiny_sdxl_checkpoint(tmp_path / "a.safetensors", state_dict=sd_a)
    b = write_tiny_sdxl_checkpoint(tmp_path / "b.safetensors", state_dict=sd_b)
    res = extract_lora(a, b, tmp_path / "lora" / "x.safetensors", rank=2)
    names = {
        unet: "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_v",
        clip_l: "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
        in_proj: "lora_te2_text_model_encoder_layers_1_self_attn_k_proj",
        c_fc: "lora_te2_text_model_encoder_layers_0_mlp_fc1",
    }
    assert res.layers == 4 and res.text_encoder_included
    net = load_lora(res.path)
    assert set(net.modules) == set(names.values())
    for key, kohya in names.items():
        torch.testing.assert_close(
            net.modules[kohya].delta(low_rank[key].shape), low_rank[key], rtol=0, atol=1e-5
        )
    with open_checkpoint(res.path) as reader:
        assert reader.metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    # Applied at multiplier 1 it turns A into (nearly) B, bigG's fused attention included: the LoRA
    # has only k for that layer, so A1111's all-four rule leaves it out, as it does there.
    ca = load_model(a, tokenizer=_Tok())
    cb = load_model(b, tokenizer=_Tok())
    applied = _apply(ca, tmp_path / "lora", "<lora:x:1>")
    assert applied.loras[0].layers == 3 and "all four" in applied.notes[0]
    for component in ("unet", "text_encoder"):
        for k, v in getattr(cb, component).state_dict().items():
            torch.testing.assert_close(getattr(ca, component).state_dict()[k], v, rtol=0, atol=1e-5)
    fc1 = "text_model.encoder.layers.0.mlp.fc1.weight"
    torch.testing.assert_close(
        ca.text_encoder_2.state_dict()[fc1], cb.text_encoder_2.state_dict()[fc1], rtol=0, atol=1e-5
    )


def test_extract_refuses_two_families(tmp_path: Path) -> None:
    from voidprompt.models.networks.extract import extract_lora

    a = write_tiny_sdxl_checkpoint(tmp_path / "xl.safetensors")
    b = write_tiny_checkpoint(tmp_path / "sd1.safetensors")
    with pytest.raises(ModelLoadError, match=r"xl.safetensors is SDXL and .*sd1.safetensors is SD1.x"):
        extract_lora(a, b, tmp_path / "x.safetensors", rank=2)
    assert not (tmp_path / "x.safetensors").exists()
