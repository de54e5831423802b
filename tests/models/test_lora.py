"""LoRA / LyCORIS: layer names, exact merged deltas and restore, functional mode, LoHa/LoKr formulas,
errors, infotext hashes, model key, and extraction by SVD."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from voidprompt.errors import ModelLoadError
from voidprompt.models.hashes import addnet_hash_safetensors
from voidprompt.models.load import load_model
from voidprompt.models.networks import NetworkManager, build_layer_map, load_lora
from voidprompt.models.networks.extract import extract_lora
from voidprompt.models.networks.lora import fit_delta, lora_call_params
from voidprompt.prompts.extra_networks import extract_extra_networks
from voidprompt.testing.fake_checkpoints import tiny_sd1_state_dict, write_tiny_checkpoint

# Layers of the tiny model, by kohya name, with their weight shapes (diffusers / transformers paths).
LINEAR_UNET = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q"
CONV1X1_UNET = "lora_unet_down_blocks_0_attentions_0_proj_in"
CONV3X3_UNET = "lora_unet_down_blocks_0_resnets_0_conv1"
LINEAR_TE = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
MLP_TE = "lora_te_text_model_encoder_layers_1_mlp_fc1"


class _Tok:
    pass


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("m") / "tiny.safetensors")


@pytest.fixture
def comps(tiny_file: Path):  # type: ignore[no-untyped-def]
    return load_model(tiny_file, tokenizer=_Tok())


def _dyadic(gen: torch.Generator, *shape: int) -> torch.Tensor:
    """Small multiples of 1/8: every product and short sum of them is exact in float32, so the
    expected weights can be computed in float64 and compared bit for bit."""
    return torch.randint(-4, 5, shape, generator=gen).to(torch.float32) / 8


def _weight(comps, kohya: str) -> torch.Tensor:  # type: ignore[no-untyped-def]
    return build_layer_map(comps.unet, comps.text_encoder)[kohya].module.weight


def _lora_tensors(comps, rank: int = 4, alpha: float = 2.0, seed: int = 0) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name in (LINEAR_UNET, CONV1X1_UNET, CONV3X3_UNET, LINEAR_TE, MLP_TE):
        w = _weight(comps, name)
        if w.ndim == 2:
            up, down = _dyadic(gen, w.shape[0], rank), _dyadic(gen, rank, w.shape[1])
        else:
            up = _dyadic(gen, w.shape[0], rank, 1, 1)
            down = _dyadic(gen, rank, w.shape[1], w.shape[2], w.shape[3])
        out[f"{name}.lora_up.weight"] = up
        out[f"{name}.lora_down.weight"] = down
        out[f"{name}.alpha"] = torch.tensor(alpha)
    return out


def _expected_delta(t: dict[str, torch.Tensor], name: str, shape: torch.Size, mult: float) -> torch.Tensor:
    up = t[f"{name}.lora_up.weight"].double().numpy()
    down = t[f"{name}.lora_down.weight"].double().numpy()
    rank = down.shape[0]
    scale = float(t[f"{name}.alpha"]) / rank
    d = up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)
    return torch.from_numpy(d.reshape(tuple(shape)) * scale * mult)


def test_layer_map_covers_kohya_names_both_ways(comps) -> None:  # type: ignore[no-untyped-def]
    m = build_layer_map(comps.unet, comps.text_encoder)
    for name in (LINEAR_UNET, CONV1X1_UNET, CONV3X3_UNET, LINEAR_TE, MLP_TE):
        assert name in m
    # the CompVis-style (old LyCORIS) spelling of the same UNet layer
    assert m["lora_unet_input_blocks_1_1_proj_in"].module is m[CONV1X1_UNET].module
    assert m["lora_unet_input_blocks_1_0_in_layers_2"].module is m[CONV3X3_UNET].module
    assert m[LINEAR_TE].component == "text_encoder"


def test_merged_lora_changes_each_weight_by_exact_delta_and_restores_bytes(tmp_path: Path, comps) -> None:  # type: ignore[no-untyped-def]
    t = _lora_tensors(comps)
    save_file(t, str(tmp_path / "style.safetensors"))
    names = (LINEAR_UNET, CONV1X1_UNET, CONV3X3_UNET, LINEAR_TE, MLP_TE)
    before = {n: _weight(comps, n).detach().clone() for n in names}
    all_before = {k: v.clone() for k, v in comps.unet.state_dict().items()}
    te_mult, unet_mult = 0.5, 1.5
    calls = extract_extra_networks(f"a <lora:style:{te_mult}:{unet_mult}> cat")[1]
    mgr = NetworkManager()
    applied = mgr.apply(comps, calls, lora_dir=tmp_path, hypernet_dir=None)
    for n in names:
        mult = te_mult if n.startswith("lora_te_") else unet_mult
        w = _weight(comps, n)
        expected = (before[n].double() + _expected_delta(t, n, w.shape, mult)).to(torch.float32)
        assert torch.equal(w.detach(), expected), n
    # nothing else moved
    changed = {k for k, v in comps.unet.state_dict().items() if not torch.equal(v, all_before[k])}
    assert changed == {
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q.weight",
        "down_blocks.0.attentions.0.proj_in.weight",
        "down_blocks.0.resnets.0.conv1.weight",
    }
    assert (
        applied.infotext["Lora hashes"]
        == f"style: {addnet_hash_safetensors(tmp_path / 'style.safetensors')[:12]}"
    )
    mgr.apply(comps, [], lora_dir=tmp_path, hypernet_dir=None)
    for n in names:
        assert torch.equal(_weight(comps, n).detach(), before[n])


def test_no_drift_after_100_switches(tmp_path: Path, comps) -> None:  # type: ignore[no-untyped-def]
    save_file(_lora_tensors(comps, seed=1), str(tmp_path / "a.safetensors"))
    save_file(_lora_tensors(comps, seed=2), str(tmp_path / "b.safetensors"))
    before = {k: v.clone() for k, v in comps.unet.state_dict().items()}
    te_before = {k: v.clone() for k, v in comps.text_encoder.state_dict().items()}
    mgr = NetworkManager()
    prompts = ["<lora:a:0.7>", "<lora:b:1.3>", "<lora:a:0.3><lora:b:0.9>", "<lora:b:0.1:2>"]
    for i in range(100):
        mgr.apply(comps, extract_extra_networks(prompts[i % 4])[1], lora_dir=tmp_path, hypernet_dir=None)
    mgr.restore()
    for k, v in comps.unet.state_dict().items():
        assert torch.equal(v, before[k]), k
    for k, v in comps.text_encoder.state_dict().items():
        assert torch.equal(v, te_before[k]), k


def test_functional_mode_equals_merged(tmp_path: Path, comps) -> None:  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(3)
    t = {k: v * 0.2 for k, v in _lora_tensors(comps, seed=4).items() if not k.endswith("alpha")}
    t.update({k: torch.tensor(3.0) for k in _lora_tensors(comps) if k.endswith("alpha")})
    save_file(t, str(tmp_path / "s.safetensors"))
    calls = extract_extra_networks("<lora:s:0.8:1.2>")[1]
    x = torch.randn(1, 4, 16, 16, generator=gen)
    ctx = torch.randn(1, 77, 32, generator=gen)
    ids = torch.randint(0, 49408, (1, 77), generator=gen)
    mgr = NetworkManager()
    with torch.no_grad():
        base = comps.unet(x, 10, encoder_hidden_states=ctx).sample
        mgr.apply(comps, calls, lora_dir=tmp_path, hypernet_dir=None, functional=False)
        merged = comps.unet(x, 10, encoder_hidden_states=ctx).sample
        merged_te = comps.text_encoder(ids).last_hidden_state
        a = mgr.apply(comps, calls, lora_dir=tmp_path, hypernet_dir=None, functional=True)
        assert a.functional
        functional = comps.unet(x, 10, encoder_hidden_states=ctx).sample
        functional_te = comps.text_encoder(ids).last_hidden_state
    assert (merged - base).abs().max() > 1e-2  # the LoRA does something
    torch.testing.assert_close(functional, merged, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(functional_te, merged_te, rtol=1e-4, atol=1e-4)


def test_model_key_changes_with_text_encoder_loras_only(tmp_path: Path, comps) -> None:  # type: ignore[no-untyped-def]
    save_file(_lora_tensors(comps), str(tmp_path / "s.safetensors"))
    mgr = NetworkManager()
    k0 = mgr.apply(comps, [], lora_dir=tmp_path, hypernet_dir=None).model_key
    k1 = mgr.apply(
        comps, extract_extra_networks("<lora:s:1>")[1], lora_dir=tmp_path, hypernet_dir=None
    ).model_key
    k2 = mgr.apply(
        comps, extract_extra_networks("<lora:s:0.5>")[1], lora_dir=tmp_path, hypernet_dir=None
    ).model_key
    k3 = mgr.apply(
        comps, extract_extra_networks("<lora:s:0:1>")[1], lora_dir=tmp_path, hypernet_dir=None
    ).model_key
    assert k0 == comps.checkpoint.short_hash
    assert len({k0, k1, k2}) == 3
    assert k3 == k0  # te multiplier 0: the text encoder is unchanged


def test_call_params_follow_a1111() -> None:
    calls = extract_extra_networks(
        "<lora:x><lora:x:0.5><lora:x:0.5:0.7:8><lora:x:te=0.2:unet=0.3:dyn=4><lora:x:1:unet=2>"
    )[1]
    assert [lora_call_params(c)[1:] for c in calls] == [
        (1.0, 1.0, None),
        (0.5, 0.5, None),
        (0.5, 0.7, 8),
        (0.2, 0.3, 4),
        (1.0, 2.0, None),
    ]


def test_dyn_dim_truncates_rank_but_keeps_alpha_over_full_rank(tmp_path: Path, comps) -> None:  # type: ignore[no-untyped-def]
    t = _lora_tensors(comps, rank=4, alpha=2.0)
    save_file(t, str(tmp_path / "d.safetensors"))
    w0 = _weight(comps, LINEAR_UNET).detach().clone()
    NetworkManager().apply(
        comps, extract_extra_networks("<lora:d:1:1:2>")[1], lora_dir=tmp_path, hypernet_dir=None
    )
    up = t[f"{LINEAR_UNET}.lora_up.weight"].double()[:, :2]
    down = t[f"{LINEAR_UNET}.lora_down.weight"].double()[:2]
    expected = (w0.double() + up @ down * (2.0 / 4)).float()  # A1111 quirk: scale stays alpha / 4
    assert torch.equal(_weight(comps, LINEAR_UNET).detach(), expected)


def test_shape_mismatch_names_lora_layer_and_shapes(tmp_path: Path, comps) -> None:  # type: ignore[no-untyped-def]
    save_file(
        {
            f"{LINEAR_UNET}.lora_up.weight": torch.zeros(320, 4),
            f"{LINEAR_UNET}.lora_down.weight": torch.zeros(4, 320),
        },
        str(tmp_path / "big.safetensors"),
    )
    before = _weight(comps, LINEAR_UNET).detach().clone()
    mgr = NetworkManager()
    with pytest.raises(ModelLoadError) as err:
        mgr.apply(comps, extract_extra_networks("<lora:big:1>")[1], lora_dir=tmp_path, hypernet_dir=None)
    msg = str(err.value)
    assert "'big'" in msg and LINEAR_UNET in msg and "(320, 320)" in msg and "(32, 32)" in msg
    assert torch.equal(_weight(comps, LINEAR_UNET).detach(), before)


def test_missing_lora_file_is_a_clear_error_when_strict(tmp_path: Path, comps) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ModelLoadError, match="unknown network 'nothere'"):
        NetworkManager().apply(
            comps,
            extract_extra_networks("<lora:nothere:1>")[1],
            lora_dir=tmp_path,
            hypernet_dir=None,
            missing="error",
        )


def test_missing_lora_file_is_skipped_with_a_note_by_default(tmp_path: Path, comps) -> None:  # type: ignore[no-untyped-def]
    # A1111 warns and generates without it.
    before = _weight(comps, LINEAR_UNET).detach().clone()
    applied = NetworkManager().apply(
        comps, extract_extra_networks("<lora:nothere:1>")[1], lora_dir=tmp_path, hypernet_dir=None
    )
    assert applied.loras == [] and applied.notes == ["Networks not found: nothere"]
    assert torch.equal(_weight(comps, LINEAR_UNET).detach(), before)


def test_inpainting_conv_in_delta_is_zero_padded() -> None:
    d = torch.ones(8, 4, 3, 3)
    out = fit_delta(d, torch.Size((8, 9, 3, 3)), network="n", layer="l")
    assert torch.equal(out[:, :4], d) and not out[:, 4:].any()


# ---------------------------------------------------------------- LyCORIS formulas (float64 numpy oracle)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.double().numpy()


def _module(tmp_path: Path, tensors: dict[str, torch.Tensor], name: str = LINEAR_UNET):  # type: ignore[no-untyped-def]
    save_file({f"{name}.{k}": v for k, v in tensors.items()}, str(tmp_path / "n.safetensors"))
    return load_lora(tmp_path / "n.safetensors").modules[name]


def test_loha_linear_and_tucker_conv(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(5)
    r = 3
    t = {
        k: torch.randn(*s, generator=g)
        for k, s in {
            "hada_w1_a": (16, r),
            "hada_w1_b": (r, 12),
            "hada_w2_a": (16, r),
            "hada_w2_b": (r, 12),
        }.items()
    }
    t["alpha"] = torch.tensor(1.5)
    mod = _module(tmp_path, t)
    expected = (
        (_np(t["hada_w1_a"]) @ _np(t["hada_w1_b"])) * (_np(t["hada_w2_a"]) @ _np(t["hada_w2_b"])) * 1.5 / r
    )
    np.testing.assert_allclose(
        mod.delta(torch.Size((16, 12))).double().numpy(), expected, rtol=1e-5, atol=1e-6
    )

    tt = {
        "hada_t1": torch.randn(r, r, 3, 3, generator=g),
        "hada_w1_a": torch.randn(r, 8, generator=g),
        "hada_w1_b": torch.randn(r, 6, generator=g),
        "hada_t2": torch.randn(r, r, 3, 3, generator=g),
        "hada_w2_a": torch.randn(r, 8, generator=g),
        "hada_w2_b": torch.randn(r, 6, generator=g),
    }
    mod = _module(tmp_path, tt)

    def tucker(core: np.ndarray, wa: np.ndarray, wb: np.ndarray) -> np.ndarray:
        out = np.zeros((wa.shape[1], wb.shape[1], 3, 3))
        for a in range(r):
            for b in range(r):
                out += np.multiply.outer(np.outer(wa[a], wb[b]), core[a, b])
        return out

    expected = tucker(_np(tt["hada_t1"]), _np(tt["hada_w1_a"]), _np(tt["hada_w1_b"])) * tucker(
        _np(tt["hada_t2"]), _np(tt["hada_w2_a"]), _np(tt["hada_w2_b"])
    )
    np.testing.assert_allclose(
        mod.delta(torch.Size((8, 6, 3, 3))).double().numpy(), expected, rtol=1e-4, atol=1e-5
    )


def test_lokr_full_and_factored(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(6)
    w1 = torch.randn(4, 2, generator=g)
    w2a, w2b = torch.randn(8, 2, generator=g), torch.randn(2, 16, generator=g)
    mod = _module(tmp_path, {"lokr_w1": w1, "lokr_w2_a": w2a, "lokr_w2_b": w2b, "alpha": torch.tensor(1.0)})
    expected = np.kron(_np(w1), _np(w2a) @ _np(w2b)) * (1.0 / 2)
    np.testing.assert_allclose(
        mod.delta(torch.Size((32, 32))).double().numpy(), expected, rtol=1e-5, atol=1e-6
    )
    # conv with a 4-D w2 (no factorisation, no alpha: scale 1)
    w2 = torch.randn(8, 4, 3, 3, generator=g)
    mod = _module(tmp_path, {"lokr_w1": w1, "lokr_w2": w2}, CONV3X3_UNET)
    got = mod.delta(torch.Size((32, 8, 3, 3))).double().numpy()
    for o1 in range(4):
        for i1 in range(2):
            np.testing.assert_allclose(
                got[o1 * 8 : (o1 + 1) * 8, i1 * 4 : (i1 + 1) * 4],
                float(w1[o1, i1]) * _np(w2),
                rtol=1e-5,
                atol=1e-6,
            )


def test_lora_cp_mid(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(7)
    up, mid, down = (
        torch.randn(8, 2, 1, 1, generator=g),
        torch.randn(2, 2, 3, 3, generator=g),
        torch.randn(2, 5, 1, 1, generator=g),
    )
    mod = _module(
        tmp_path,
        {"lora_up.weight": up, "lora_mid.weight": mid, "lora_down.weight": down, "scale": torch.tensor(0.25)},
        CONV3X3_UNET,
    )
    expected = np.einsum("oa,abhw,bi->oihw", _np(up)[:, :, 0, 0], _np(mid), _np(down)[:, :, 0, 0]) * 0.25
    np.testing.assert_allclose(
        mod.delta(torch.Size((8, 5, 3, 3))).double().numpy(), expected, rtol=1e-5, atol=1e-6
    )


# ---------------------------------------------------------------- extraction


def test_extract_recovers_low_rank_difference(tmp_path: Path) -> None:
    sd_a = tiny_sd1_state_dict(0)
    g = torch.Generator().manual_seed(8)
    sd_b = {k: v.clone() for k, v in sd_a.items()}
    targets = {
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_v.weight": LINEAR_UNET.replace(
            "to_q", "to_v"
        ),
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": CONV1X1_UNET,
        "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": LINEAR_TE,
    }
    deltas = {}
    for key in targets:
        w = sd_a[key]
        d = (torch.randn(w.shape[0], 2, generator=g) @ torch.randn(2, w[0].numel(), generator=g)).reshape(
            w.shape
        ) * 0.05
        sd_b[key] = w + d
        deltas[key] = sd_b[key] - w  # the difference as float32 actually stored
    a = write_tiny_checkpoint(tmp_path / "a.safetensors", state_dict=sd_a)
    b = write_tiny_checkpoint(tmp_path / "b.safetensors", state_dict=sd_b)
    res = extract_lora(a, b, tmp_path / "lora" / "x.safetensors", rank=2)
    assert res.layers == 3 and res.text_encoder_included
    net = load_lora(res.path)
    assert set(net.modules) == set(targets.values())
    for key, kohya in targets.items():
        mod = net.modules[kohya]
        assert float(mod.tensors["alpha"]) == 2.0 and mod.scale == 1.0
        torch.testing.assert_close(mod.delta(deltas[key].shape), deltas[key], rtol=0, atol=1e-5)
    # and applied at multiplier 1 it turns A into (nearly) B
    ca = load_model(a, tokenizer=_Tok())
    cb = load_model(b, tokenizer=_Tok())
    NetworkManager().apply(
        ca, extract_extra_networks("<lora:x:1>")[1], lora_dir=tmp_path / "lora", hypernet_dir=None
    )
    for k, v in cb.unet.state_dict().items():
        torch.testing.assert_close(ca.unet.state_dict()[k], v, rtol=0, atol=1e-5)


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_rank_zero_lora_is_a_clear_error_naming_file_and_tensor(tmp_path: Path, fmt: str) -> None:
    layer = "lora_unet_down_blocks_0_attentions_0_proj_in"
    tensors = {
        f"{layer}.lora_down.weight": torch.zeros(0, 32),
        f"{layer}.lora_up.weight": torch.zeros(32, 0),
        f"{layer}.alpha": torch.tensor(1.0),
    }
    path = tmp_path / f"rank0.{fmt}"
    if fmt == "safetensors":
        save_file(tensors, str(path))
    else:
        torch.save(tensors, path)
    with pytest.raises(
        ModelLoadError,
        match=rf"rank0\.{fmt}: tensor '{layer}\.lora_(down|up)\.weight' has shape \((0, 32|32, 0)\)",
    ):
        load_lora(path)


@pytest.mark.parametrize(
    ("tensors", "shape"),
    [
        # rank-1 factors of 800 KB whose product would be 100000 x 100000 floats (40 GB)
        (
            {"lora_down.weight": torch.ones(1, 100000), "lora_up.weight": torch.ones(100000, 1)},
            (100000, 100000),
        ),
        # a Kronecker product of two 300 x 300 factors (32 GB)
        ({"lokr_w1": torch.ones(300, 300), "lokr_w2": torch.ones(300, 300)}, (90000, 90000)),
    ],
    ids=["lora", "lokr"],
)
def test_an_oversized_delta_is_refused_before_it_is_computed(
    tensors: dict[str, torch.Tensor], shape: tuple[int, int]
) -> None:
    from voidprompt.models.networks.lora import LoraModule

    module = LoraModule("big", "lora_unet_x", tensors)
    with pytest.raises(
        ModelLoadError, match=rf"weight change of shape \({shape[0]}, {shape[1]}\) but the model's"
    ):
        module.delta(torch.Size([320, 320]))


def test_factors_that_do_not_combine_are_a_clear_error() -> None:
    from voidprompt.models.networks.lora import LoraModule

    module = LoraModule(
        "odd", "lora_unet_x", {"lora_down.weight": torch.ones(4, 7), "lora_up.weight": torch.ones(8, 5)}
    )
    with pytest.raises(ModelLoadError, match=r"lora_down.weight \(4, 7\), lora_up.weight \(8, 5\).*damaged"):
        module.delta(torch.Size([8, 7]))
