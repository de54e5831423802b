"""Checkpoint merger: per-key formulas, self-merge exactness, block assignment on a full-size layout,
presets, inpainting, options and the recipe, errors leave no file behind. Every merge goes through
merge_checkpoints, the streaming file merge that ``voidprompt merge`` runs."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from voidprompt.models import merge as merge_mod
from voidprompt.models.arch import build_modules
from voidprompt.models.convert import POSITION_IDS_KEY, CheckpointKeyMap
from voidprompt.models.detect import ModelFamily
from voidprompt.models.hashes import sha256_file
from voidprompt.models.load import load_model
from voidprompt.models.merge import (
    BLOCK_PRESETS,
    MergeError,
    MergeMethod,
    MergeOptions,
    block_index,
    merge_checkpoints,
    parse_block_weights,
)
from voidprompt.models.networks_cli import main as cli_main
from voidprompt.testing.fake_checkpoints import (
    SD15_ARCH,
    fake_full_state_dict,
    tiny_sd1_state_dict,
    tiny_vae_state_dict,
    write_tiny_checkpoint,
)

WS = MergeMethod.WEIGHTED_SUM


class _Tok:
    pass


@pytest.fixture(scope="module")
def sds() -> tuple[dict[str, torch.Tensor], ...]:
    return tiny_sd1_state_dict(0), tiny_sd1_state_dict(1), tiny_sd1_state_dict(2)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The merger hashes its inputs; keep the hash cache out of the user's cache directory.
    monkeypatch.setenv("VOIDPROMPT_CACHE_DIR", str(tmp_path / "cache"))


def merged(
    folder: Path,
    *state_dicts: dict[str, torch.Tensor],
    options: MergeOptions,
    vae: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """The merge of in-memory CompVis state dicts (A, B, C) through :func:`merge_checkpoints`: each
    written to a .safetensors file, the merged file read back."""
    work = Path(tempfile.mkdtemp(dir=folder))
    paths = []
    for label, sd in zip("abc", state_dicts, strict=False):
        save_file(sd, str(work / f"{label}.safetensors"))
        paths.append(work / f"{label}.safetensors")
    bake = None
    if vae is not None:
        bake = work / "x.vae.safetensors"
        save_file(vae, str(bake))
    result = merge_checkpoints(*paths, out=work / "out.safetensors", options=options, bake_vae=bake)
    return load_file(str(result.path))


def _is_model_weight(key: str) -> bool:
    return "model" in key and not key.startswith("model_ema.") and key != POSITION_IDS_KEY


def test_weighted_sum_and_add_difference_match_formulas(tmp_path: Path, sds) -> None:  # type: ignore[no-untyped-def]
    a, b, c = sds
    for m in (0.3, 1.0):
        ws = merged(tmp_path, a, b, options=MergeOptions(WS, multiplier=m))
        ad = merged(tmp_path, a, b, c, options=MergeOptions(MergeMethod.ADD_DIFFERENCE, multiplier=m))
        for k in a:
            if k.startswith("model_ema."):
                assert k not in ws and k not in ad
                continue
            if not _is_model_weight(k):
                assert torch.equal(ws[k], a[k]) and torch.equal(ad[k], a[k]), k
                continue
            ea, eb, ec = (x[k].double() for x in (a, b, c))
            # float64 oracle, A1111's formula; one rounding to float32 allows half an ulp (plus a hair)
            torch.testing.assert_close(ws[k].double(), (1 - m) * ea + m * eb, rtol=1.2e-7, atol=1e-12)
            torch.testing.assert_close(ad[k].double(), ea + m * (eb - ec), rtol=1.2e-7, atol=1e-9)
    assert torch.equal(
        merged(tmp_path, a, b, options=MergeOptions(WS, multiplier=0.0))[
            "model.diffusion_model.out.2.weight"
        ],
        a["model.diffusion_model.out.2.weight"],
    )
    assert torch.equal(
        merged(tmp_path, a, b, options=MergeOptions(WS, multiplier=1.0))[
            "model.diffusion_model.out.2.weight"
        ],
        b["model.diffusion_model.out.2.weight"],
    )
    ni = merged(tmp_path, a, b, options=MergeOptions(MergeMethod.NO_INTERPOLATION))
    assert all(torch.equal(ni[k], a[k]) for k in ni)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_self_merge_returns_the_model_within_one_ulp(tmp_path: Path, sds, dtype: torch.dtype) -> None:  # type: ignore[no-untyped-def]
    a = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sds[0].items()}
    # A1111's (1-M)A + M B is not exact: show that the naive formula moves some elements
    k0 = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    naive = (1 - 0.3) * a[k0] + 0.3 * a[k0]
    assert not torch.equal(naive, a[k0])
    for m in (0.1, 1 / 3, 0.7, 0.123456):
        out = merged(tmp_path, a, a, options=MergeOptions(WS, multiplier=m))
        for k, v in out.items():
            assert v.dtype == a[k].dtype
            if v.is_floating_point():
                ulp = torch.finfo(dtype).eps * a[k].abs().to(torch.float64)  # >= 1 ulp of each element
                assert ((v.double() - a[k].double()).abs() <= ulp).all(), (m, k)
            else:
                assert torch.equal(v, a[k])


def _block_of_diffusers_name(name: str) -> int:
    """The 25-block rule derived from the diffusers module layout (independent of CompVis names)."""
    parts = name.split(".")
    if parts[0] in ("time_embedding", "conv_in"):
        return 0
    if parts[0] == "mid_block":
        return 12
    if parts[0] in ("conv_norm_out", "conv_out"):
        return 24
    level = int(parts[1])
    if parts[0] == "down_blocks":
        return 3 + 3 * level if parts[2] == "downsamplers" else 1 + 3 * level + int(parts[3])
    assert parts[0] == "up_blocks"
    return 13 + 3 * level + (2 if parts[2] == "upsamplers" else int(parts[3]))


def test_block_assignment_of_every_full_size_key() -> None:
    sd = fake_full_state_dict(ModelFamily.SD1)
    unet, vae, te = build_modules(SD15_ARCH, device="meta")
    keymap = CheckpointKeyMap(unet, vae, te)
    counts = [0] * 25
    for key in sd:
        got = block_index(key)
        target = keymap.target(key)
        if target is None or target.component != "unet":
            assert got is None, key
            continue
        expected = _block_of_diffusers_name(target.module_key)
        assert got == expected, (key, target.module_key)
        counts[expected] += 1
    assert all(counts), counts  # every block has keys
    assert sum(counts) == sum(1 for k in sd if k.startswith("model.diffusion_model."))


def test_presets_and_weight_parsing() -> None:
    assert BLOCK_PRESETS["FLAT_25"] == (0.25,) * 25
    assert BLOCK_PRESETS["WRAP08"] == (1,) * 4 + (0,) * 17 + (1,) * 4
    assert (
        BLOCK_PRESETS["GRAD_V"][0] == 1
        and BLOCK_PRESETS["GRAD_V"][12] == 0
        and BLOCK_PRESETS["GRAD_V"][24] == 1
    )
    assert BLOCK_PRESETS["GRAD_A"][12] == 1
    assert all(len(v) == 25 for v in BLOCK_PRESETS.values())
    assert parse_block_weights("grad_v") == BLOCK_PRESETS["GRAD_V"]
    assert parse_block_weights(",".join(["0.5"] * 25)) == (0.5,) * 25
    with pytest.raises(MergeError, match="25"):
        parse_block_weights("0.1,0.2")


def test_block_weighted_uses_block_weights_and_base_alpha(tmp_path: Path, sds) -> None:  # type: ignore[no-untyped-def]
    a, b, _ = sds
    weights = tuple(i / 24 for i in range(25))
    out = merged(
        tmp_path,
        a,
        b,
        options=MergeOptions(MergeMethod.BLOCK_WEIGHTED, block_weights=weights, base_alpha=0.25),
    )
    for k in a:
        if not _is_model_weight(k):
            continue
        if k.startswith("model.diffusion_model."):
            m = re.search(r"\.input_blocks\.(\d+)\.", k)
            idx = (
                0
                if "time_embed" in k
                else 24
                if k.startswith("model.diffusion_model.out.")
                else (
                    int(m.group(1))
                    if m
                    else 12
                    if ".middle_block." in k
                    else 13 + int(re.search(r"\.output_blocks\.(\d+)\.", k).group(1))
                )
            )  # type: ignore[union-attr]
            alpha = weights[idx]
        else:
            alpha = 0.25  # text encoder and VAE
        torch.testing.assert_close(
            out[k].double(), (1 - alpha) * a[k].double() + alpha * b[k].double(), rtol=1.2e-7, atol=1e-12
        )


def test_inpainting_a_merges_first_four_channels(tmp_path: Path, sds) -> None:  # type: ignore[no-untyped-def]
    a = tiny_sd1_state_dict(3, inpainting=True)
    b = sds[1]
    key = "model.diffusion_model.input_blocks.0.0.weight"
    out = merged(tmp_path, a, b, options=MergeOptions(WS, multiplier=0.5))
    assert out[key].shape == a[key].shape
    torch.testing.assert_close(
        out[key][:, :4].double(),
        0.5 * a[key][:, :4].double() + 0.5 * b[key].double(),
        rtol=1.2e-7,
        atol=1e-12,
    )
    assert torch.equal(out[key][:, 4:], a[key][:, 4:])
    with pytest.raises(MergeError, match="A must be the inpainting model"):
        merged(tmp_path, b, a, options=MergeOptions(WS))


def test_family_mismatch_and_missing_keys_are_errors(tmp_path: Path, sds) -> None:  # type: ignore[no-untyped-def]
    a, b, _ = sds
    sd2 = {k.replace("cond_stage_model.transformer.", "cond_stage_model.model."): v for k, v in b.items()}
    with pytest.raises(MergeError, match=r"cannot merge SD1\.x"):
        merged(tmp_path, a, sd2, options=MergeOptions(WS))
    pruned = {k: v for k, v in b.items() if not k.startswith("first_stage_model.")}
    with pytest.raises(MergeError, match="missing from the other input"):
        merged(tmp_path, a, pruned, options=MergeOptions(WS))
    out = merged(tmp_path, a, pruned, options=MergeOptions(WS, allow_missing=True))
    assert torch.equal(
        out["first_stage_model.decoder.conv_out.weight"], a["first_stage_model.decoder.conv_out.weight"]
    )


def test_options_fp16_discard_and_baked_vae_and_the_recipe(tmp_path: Path, sds) -> None:  # type: ignore[no-untyped-def]
    a, b, _ = sds
    pa = write_tiny_checkpoint(tmp_path / "a.safetensors", state_dict=a)
    pb = write_tiny_checkpoint(tmp_path / "b.ckpt", fmt="ckpt", state_dict=b)  # pickles stream too
    vae = tiny_vae_state_dict(5)
    save_file(vae, str(tmp_path / "x.vae.safetensors"))
    opts = MergeOptions(WS, multiplier=0.3, fp16=True, discard=r"^model\.diffusion_model\.out\.")
    res = merge_checkpoints(
        pa, pb, out=tmp_path / "out.safetensors", options=opts, bake_vae=tmp_path / "x.vae.safetensors"
    )
    got = load_file(str(res.path))
    assert set(got) == {k for k in a if not k.startswith(("model_ema.", "model.diffusion_model.out."))}
    for k, v in got.items():
        if k.startswith("first_stage_model."):  # the baked VAE, halved
            assert torch.equal(v, vae[k.removeprefix("first_stage_model.")].half()), k
        elif _is_model_weight(k):  # weighted sum in float64, rounded once to fp16
            exact = 0.7 * a[k].double() + 0.3 * b[k].double()
            assert v.dtype == torch.float16, k
            torch.testing.assert_close(v.double(), exact, rtol=2**-11, atol=2**-25)
        else:
            assert torch.equal(v, a[k]), k  # not a model key: A's, not halved
    assert got["alphas_cumprod"].dtype == torch.float32
    with safe_open(str(res.path), "pt") as f:
        meta = f.metadata()
    recipe = json.loads(meta["sd_merge_recipe"])
    assert recipe["primary_model_hash"] == sha256_file(pa) and recipe["secondary_model_hash"] == sha256_file(
        pb
    )
    assert (
        recipe["interp_method"] == "Weighted sum" and recipe["multiplier"] == 0.3 and recipe["save_as_half"]
    )
    assert "voidprompt.arch" in meta
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []


def test_error_while_writing_leaves_no_file(tmp_path: Path, sds, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    tmp_path = tmp_path / "work"
    tmp_path.mkdir()
    pa = write_tiny_checkpoint(tmp_path / "a.safetensors", state_dict=sds[0])
    pb = write_tiny_checkpoint(tmp_path / "b.safetensors", state_dict=sds[1])
    calls = {"n": 0}
    real = merge_mod._combine

    def failing(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 20:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(merge_mod, "_combine", failing)
    with pytest.raises(OSError):
        merge_checkpoints(pa, pb, out=tmp_path / "out.safetensors", options=MergeOptions(WS))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors"]
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    with pytest.raises(MergeError, match="junk"):
        merge_checkpoints(
            pa, tmp_path / "junk.safetensors", out=tmp_path / "out.safetensors", options=MergeOptions(WS)
        )
    assert not (tmp_path / "out.safetensors").exists()


def test_cli_merge_output_loads_and_self_merge_is_exact(tmp_path: Path, sds) -> None:  # type: ignore[no-untyped-def]
    pa = write_tiny_checkpoint(tmp_path / "a.safetensors", state_dict=sds[0])
    out = tmp_path / "self.safetensors"
    rc = cli_main(
        [
            "merge",
            "--a",
            str(pa),
            "--b",
            str(pa),
            "--method",
            "block_weighted",
            "--preset",
            "GRAD_V",
            "--base-alpha",
            "0.37",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    merged = load_model(out, tokenizer=_Tok())
    orig = load_model(pa, tokenizer=_Tok())
    for mod in ("unet", "vae", "text_encoder"):
        o = getattr(orig, mod).state_dict()
        for k, v in getattr(merged, mod).state_dict().items():
            assert torch.equal(v, o[k]), (mod, k)
    assert (
        cli_main(
            ["merge", "--a", str(pa), "--method", "weighted_sum", "--out", str(tmp_path / "x.safetensors")]
        )
        == 1
    )
    assert np.isfinite(1.0)


@pytest.fixture(scope="module")
def xl_sds() -> tuple[dict[str, torch.Tensor], ...]:
    from voidprompt.testing.fake_checkpoints import tiny_sdxl_state_dict

    return tiny_sdxl_state_dict(0), tiny_sdxl_state_dict(1), tiny_sdxl_state_dict(2, inpainting=True)


def test_sdxl_weighted_sum_and_add_difference(tmp_path: Path, xl_sds) -> None:  # type: ignore[no-untyped-def]
    from voidprompt.models.convert_sdxl import SDXL_POSITION_IDS_KEY
    from voidprompt.testing.fake_checkpoints import write_tiny_sdxl_checkpoint

    a, b, _ = xl_sds
    c = {k: v * 0.5 if v.is_floating_point() else v for k, v in a.items()}
    pa = write_tiny_sdxl_checkpoint(tmp_path / "a.safetensors", state_dict=a)
    pb = write_tiny_sdxl_checkpoint(tmp_path / "b.safetensors", state_dict=b)
    pc = write_tiny_sdxl_checkpoint(tmp_path / "c.safetensors", state_dict=c)
    ws = merge_checkpoints(pa, pb, out=tmp_path / "ws.safetensors", options=MergeOptions(WS, 0.3))
    ad = merge_checkpoints(
        pa, pb, pc, out=tmp_path / "ad.safetensors", options=MergeOptions(MergeMethod.ADD_DIFFERENCE, 0.7)
    )
    out_ws, out_ad = load_file(str(ws.path)), load_file(str(ad.path))
    assert set(out_ws) == set(a) == set(out_ad)
    for key, x in a.items():
        if key == SDXL_POSITION_IDS_KEY:
            assert torch.equal(out_ws[key], x) and out_ws[key].dtype == torch.int64
            continue
        x64, b64 = x.double(), b[key].double()
        assert torch.equal(out_ws[key], (x64 + 0.3 * (b64 - x64)).float()), key
        assert torch.equal(out_ad[key], (x64 + 0.7 * (b64 - c[key].double())).float()), key
    # Every SDXL part is merged: the two text encoders, the UNet's label_emb, the VAE.
    assert ws.merged_keys == len(a) - 1
    merged_model = load_model(ws.path, tokenizer=_Tok())
    assert merged_model.family is ModelFamily.SDXL and merged_model.report.unused == []


def test_sdxl_inpainting_a_merges_with_sdxl_b(tmp_path: Path, xl_sds) -> None:  # type: ignore[no-untyped-def]
    from voidprompt.testing.fake_checkpoints import write_tiny_sdxl_checkpoint

    base, _, inpaint = xl_sds
    pa = write_tiny_sdxl_checkpoint(tmp_path / "a.safetensors", state_dict=inpaint)
    pb = write_tiny_sdxl_checkpoint(tmp_path / "b.safetensors", state_dict=base)
    result = merge_checkpoints(pa, pb, out=tmp_path / "m.safetensors", options=MergeOptions(WS, 0.5))
    assert result.recipe["is_inpainting"] is True
    key = "model.diffusion_model.input_blocks.0.0.weight"
    out = load_file(str(result.path))[key]
    a64, b64 = inpaint[key].double(), base[key].double()
    assert torch.equal(out[:, :4], (a64[:, :4] + 0.5 * (b64 - a64[:, :4])).float())
    assert torch.equal(out[:, 4:], inpaint[key][:, 4:])
    with pytest.raises(MergeError, match="A must be the inpainting model"):
        merge_checkpoints(pb, pa, out=tmp_path / "swapped.safetensors", options=MergeOptions(WS, 0.5))


def test_cross_family_merges_are_refused_before_writing(tmp_path: Path, xl_sds, sds) -> None:  # type: ignore[no-untyped-def]
    from voidprompt.testing.fake_checkpoints import tiny_sdxl_state_dict, write_tiny_sdxl_checkpoint

    xl = write_tiny_sdxl_checkpoint(tmp_path / "xl.safetensors", state_dict=xl_sds[0])
    refiner = write_tiny_sdxl_checkpoint(
        tmp_path / "refiner.safetensors", state_dict=tiny_sdxl_state_dict(0, refiner=True)
    )
    sd1 = write_tiny_checkpoint(tmp_path / "sd1.safetensors", state_dict=sds[0])
    cases = [
        ((sd1, xl), r"cannot merge SD1\.x \(.*/sd1\.safetensors\) with SDXL \(.*/xl\.safetensors\)"),
        ((xl, sd1), r"cannot merge SDXL \(.*/xl\.safetensors\) with SD1\.x \(.*/sd1\.safetensors\)"),
        (
            (xl, refiner),
            r"cannot merge SDXL \(.*/xl\.safetensors\) with SDXL refiner \(.*/refiner\.safetensors\)",
        ),
    ]
    for n, ((pa, pb), message) in enumerate(cases):
        out = tmp_path / f"out{n}.safetensors"
        with pytest.raises(MergeError, match=message):
            merge_checkpoints(pa, pb, out=out, options=MergeOptions(WS, 0.5))
        assert not out.exists()
    block = MergeOptions(MergeMethod.BLOCK_WEIGHTED, block_weights=BLOCK_PRESETS["GRAD_V"])
    with pytest.raises(MergeError, match="SD1's UNet blocks"):
        merge_checkpoints(xl, xl, out=tmp_path / "bw.safetensors", options=block)
    written = sorted(p.name for p in tmp_path.iterdir() if p.name != "cache")
    assert written == ["refiner.safetensors", "sd1.safetensors", "xl.safetensors"]
